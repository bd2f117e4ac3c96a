# megatron_r3 — every target installs what it needs into .venv on a fresh machine and runs .venv/bin/python (no
# activated environment needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MEGATRON_CORE := megatron-core==0.19.2
TORCH := torch==2.13.0
# SGLang's own code for tests/sglang_contract only (never a runtime requirement): its wheel without dependencies,
# plus the pure-Python packages its request classes, CLI parser and weight updater import (~300 MB, ~1 min)
SGLANG_CONTRACT := sglang==0.5.23 orjson==3.13.0 starlette==1.10.0 msgspec==0.23.0 pyzmq==27.3.0 ipython==9.18.1 \
	traitlets==5.16.1 aiohttp==3.14.5 multidict==7.2.1 attrs==26.1.0 yarl==1.25.1 propcache==0.5.4 \
	aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 dill==0.4.1 apache-tvm-ffi==0.1.15.post2 \
	sentencepiece==0.2.3 compressed-tensors==0.20.1 loguru==0.7.3 gguf==0.19.0 openai==3.57.0 sniffio==1.3.1 \
	partial-json-parser==0.2.1.1.post7
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: install test test-unit test-distributed test-e2e demo bench clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q numpy 'packaging>=24.2'
	$(PY) -m pip install -q --no-deps --ignore-requires-python $(MEGATRON_CORE)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps $(SGLANG_CONTRACT)
	rm -f $(VENV)/.installed-*; touch $@

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-unit: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/unit

test-distributed: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/distributed

SEEDS ?= 1234

demo: install   # make demo SEEDS="1234 1 2": one off and one R3 run per seed, ranges over seeds in runs/demo/summary.md
	$(PY) tools/demo.py --out runs/demo --seeds $(SEEDS)

BENCH_OUT ?= runs/bench

bench: install
	@mkdir -p $(BENCH_OUT)
	$(PY) bench/replay_overhead.py --device cpu --preset cpu-tiny --recompute none --json $(BENCH_OUT)/overhead_none.json
	$(PY) bench/replay_overhead.py --device cpu --preset cpu-tiny --recompute full --json $(BENCH_OUT)/overhead_full.json
	$(PY) bench/layout_cost.py --device cpu --json $(BENCH_OUT)/layout_cost.json
	$(PY) bench/route_transport.py --device cpu --json $(BENCH_OUT)/route_transport.json
	$(PY) bench/replay_memory.py --device cpu --json $(BENCH_OUT)/replay_memory.json
	$(PY) bench/mismatch_reduction.py --device cpu --model demo --json $(BENCH_OUT)/mismatch_demo.json
	$(PY) bench/mismatch_reduction.py --device cpu --model deep --json $(BENCH_OUT)/mismatch_deep.json
	$(PY) bench/grpo_throughput.py --device cpu --json $(BENCH_OUT)/grpo_throughput.json
	$(PY) bench/sync_count.py --device cpu
	@echo ""
	@echo "CPU part done (JSON in $(BENCH_OUT)/). GPU part, one command on the lent H100 (~8 min, tables on stdout,"
	@echo "files in \$$OUT): bash bench/run_gpu.sh      (see bench/README.md)"

clean:
	rm -rf $(VENV) runs .pytest_cache
