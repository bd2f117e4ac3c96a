# megatron_r3 — every target installs what it needs into .venv on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MEGATRON_CORE := megatron-core==0.19.2
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)

.PHONY: install test test-unit test-distributed test-e2e demo bench clean

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q numpy 'packaging>=24.2'
	$(PY) -m pip install -q --no-deps --ignore-requires-python $(MEGATRON_CORE)
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-unit: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/unit

test-distributed: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/distributed

demo: install
	$(PY) tools/demo.py --out runs/demo

bench: install
	$(PY) bench/replay_overhead.py --device cpu
	@echo "GPU part (lent H100): see bench/README.md"

clean:
	rm -rf $(VENV) runs .pytest_cache
