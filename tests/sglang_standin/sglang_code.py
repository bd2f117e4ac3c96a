"""SGLang 0.5.23's own code, for the contract tests and the stand-in server (never a runtime dependency).

``make install`` puts the ``sglang==0.5.23`` wheel into the test environment *without its dependencies* (plus the
light pure-Python packages its protocol modules import). Its request classes, CLI parser and the scheduler's
weight-update session manager then import and run on a CPU; :func:`load` returns them, or ``None`` with the reason
when SGLang is absent (outside CI the contract tests then skip; with ``CI=true`` they fail).

What cannot be imported on a CPU, and why:
- ``torchvision`` (imported at module level by ``srt/multimodal/internvl_utils.py`` through ``srt/configs``, on the
  way to ``managers/io_struct.py``): the PyPI wheel links ``libtorch_cuda.so``, so against the CPU torch its ``_C``
  does not load and ``import torchvision`` fails ("operator torchvision::nms does not exist"). When no working
  torchvision is installed, :func:`load` registers inert placeholder modules for it *after* transformers has decided
  torchvision is unavailable; any use of them raises. None of the classes used here touch image code.
- ``managers/detokenizer_manager.py`` and ``tokenizer_manager.py`` import ``fastapi``, whose telemetry needs
  ``opentelemetry`` (a heavy tree): not installed. The route encoding (``_b64_encode_per_request``: base64 of the
  int32 tensor's ``numpy().tobytes()``) is mirrored and checked with SGLang's own decoder
  ``state_capturer.routed_experts.extract_routed_experts_from_meta_info``; abort -> HTTP error
  (``_handle_abort_finish_reason``) and the flush refusal are reproduced from their source, named at each place.
- ``state_capturer.base.BaseHostCache`` pins host memory (CUDA): the contract test gives the capturer a plain host
  buffer and runs the rest of SGLang's capture path (device buffer, ``on_forward_end``, ``get_topk`` through
  ``ReqToTokenPool``) as is.
- ``managers/scheduler.py`` (needs CUDA kernels to import): its check of ``routed_experts_start_len`` (below 0 or above
  the input length -> the request is aborted with status 400, i.e. an HTTP 400) is mirrored with its messages in
  :func:`check_start_len`; the rows returned for a start_len come from SGLang's own ``BaseTopkCapturer.get_topk``
  (:func:`returned_routes`).
- the scheduler, the model runner and the HTTP server need CUDA kernels (sgl-kernel, flashinfer) or a running
  scheduler; the stand-in serves HTTP itself.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Optional

VERSION = "0.5.23"
_CACHE: dict = {}


class _Inert:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(f"placeholder torchvision ({self._name}.{attr}) used: install a torchvision that loads")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"placeholder torchvision ({self._name}) called: install a torchvision that loads")


def _placeholder_torchvision() -> None:
    try:
        import torchvision  # noqa: F401

        return
    except Exception:  # noqa: BLE001 - missing, or a CUDA build that cannot load on this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    import transformers.utils.import_utils  # noqa: F401 - decides "no torchvision" before the placeholder exists

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional",
                 "torchvision.transforms.v2", "torchvision.transforms.v2.functional"):
        module = types.ModuleType(name)

        def getattr_(attr, _name=name):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Inert(f"{_name}.{attr}")

        module.__getattr__ = getattr_
        sys.modules[name] = module


def load() -> tuple[Optional[types.SimpleNamespace], str]:
    """(namespace of SGLang modules, "") or (None, why not)."""
    if "ns" in _CACHE:
        return _CACHE["ns"], _CACHE["why"]
    ns, why = None, ""
    try:
        import importlib.metadata as metadata

        version = metadata.version("sglang")
        if version != VERSION:
            raise ImportError(f"sglang {version} is installed, the contract is written against {VERSION}")
        _placeholder_torchvision()
        from sglang.srt.entrypoints import api_contract
        from sglang.srt.managers import io_struct
        from sglang.srt.managers.scheduler_components import weight_updater
        from sglang.srt.sampling import sampling_params
        from sglang.srt import server_args

        ns = types.SimpleNamespace(io_struct=io_struct, sampling_params=sampling_params, server_args=server_args,
                                   weight_updater=weight_updater, api_contract=api_contract)
    except Exception as error:  # noqa: BLE001 - reported by the caller
        why = (f"SGLang {VERSION}'s code is not importable ({type(error).__name__}: {error}); `make install` "
               f"installs it (pip install --no-deps sglang=={VERSION} + light deps)")
    _CACHE["ns"], _CACHE["why"] = ns, why
    return ns, why


def require():
    """The namespace; in CI a missing SGLang is a failure, elsewhere a skip (pytest)."""
    import pytest

    ns, why = load()
    if ns is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    return ns


def validate(ns, cls_name: str, body: dict):
    """``body`` as FastAPI validates it for the endpoint (SGLang's msgspec struct through its pydantic schema)."""
    from pydantic import TypeAdapter

    return TypeAdapter(getattr(ns.io_struct, cls_name)).validate_python(body)


class SessionManager:
    """SGLang's ``SchedulerWeightUpdaterManager`` (the begin/update/end session state machine and its messages) with
    the stand-in's model behind it: built without its ``__post_init__`` (which reads the scheduler's TP group), its
    TP CPU group a one-rank gloo group so its barriers run."""

    def __init__(self, ns, *, receive, load_received, load_from_disk, flush, set_version):
        from megatron_r3.rollout.engines.sglang.weight_sync import init_custom_process_group

        manager_cls = ns.weight_updater.SchedulerWeightUpdaterManager
        runner = types.SimpleNamespace(weight_updater=types.SimpleNamespace(
            begin_weight_update=lambda: None,
            end_weight_update=lambda run_post_load=True: None,
            receive_weights_from_distributed=lambda names, dtypes, shapes, group_name, load_format=None:
                receive(names, dtypes, shapes, group_name),
            load_weights_from_distributed=load_received,
            update_weights_from_disk=lambda model_path, load_format, recapture_cuda_graph=False:
                load_from_disk(model_path),
        ))
        tp_worker = types.SimpleNamespace(model_runner=runner, weight_update_runners=lambda: [("target", runner)])
        manager = manager_cls.__new__(manager_cls)
        values = dict(tp_worker=tp_worker, draft_worker=None, memory_saver_adapter=None,
                      flush_cache=lambda empty_cache=False: flush(),
                      is_fully_idle=lambda: True, scheduler=types.SimpleNamespace(
                          record_weight_version_change=lambda new_version: set_version(new_version)),
                      metrics_collector=None, offload_tags=set(), stashed_model_static_state=None, _session=None)
        for key, value in values.items():
            object.__setattr__(manager, key, value)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        object.__setattr__(manager, "tp_cpu_group", init_custom_process_group(
            backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0,
            group_name=f"standin_tp_{port}", timeout_s=60))
        self.ns, self.manager = ns, manager

    def call(self, method: str, body: dict) -> tuple[bool, str]:
        classes = {"begin_weight_update": "BeginWeightUpdateReqInput", "end_weight_update": "EndWeightUpdateReqInput",
                   "update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
                   "update_weights_from_disk": "UpdateWeightFromDiskReqInput"}
        request = validate(self.ns, classes[method], body)
        out = getattr(self.manager, method)(request)
        return bool(out.success), str(out.message)


class MirrorSession:
    """Without SGLang installed: the rules of 0.5.23's ``SchedulerWeightUpdaterManager`` (same messages), checked
    against the real one by tests/sglang_contract when SGLang is present."""

    def __init__(self, *, receive, load_received, load_from_disk, flush, set_version):
        self.receive, self.load_received, self.load_from_disk = receive, load_received, load_from_disk
        self.flush, self.set_version = flush, set_version
        self.open = False

    def call(self, method: str, body: dict) -> tuple[bool, str]:
        if method == "begin_weight_update":
            if self.open:
                return False, "a weight-update session is already open; call end_weight_update() first"
            self.open = True
            return True, "Success"
        if method == "end_weight_update":
            if not self.open:
                return False, "no weight-update session is open; call begin_weight_update() first"
            self.open = False
            return True, "Success"
        if method == "update_weights_from_disk":
            success, message = self.load_from_disk(body.get("model_path"))
            if success:
                self.set_version(body.get("weight_version"))
            return success, message
        if not self.open:
            return False, ("update_weights_from_distributed must run between begin_weight_update() and "
                           "end_weight_update()")
        try:
            weights = self.receive(body["names"], body["dtypes"], body["shapes"],
                                   body.get("group_name", "weight_update_group"))
        except Exception as error:  # noqa: BLE001 - SGLang's wording
            return False, f"Failed to receive weights: {error}"
        success, message = self.load_received(weights)
        if success:
            self.set_version(body.get("weight_version"))
            if body.get("flush_cache", True) and not self.flush():
                return False, ("Weights were updated, but the cache was not flushed because requests are still "
                               "running or queued. Retract or finish them, then call /flush_cache.")
        return success, message


def check_start_len(start_len: int, num_input_tokens: int) -> Optional[str]:
    """SGLang 0.5.23's ``Scheduler.handle_generate_request`` check of ``routed_experts_start_len`` (when routes are
    requested): the abort message, or None when the value is accepted."""
    error_msg = None
    if start_len < 0:
        error_msg = (f"recv_req.routed_experts_start_len={start_len!r} is lower than 0. "
                     "Please use a non-negative routed_experts_start_len.")
    if start_len > num_input_tokens:
        error_msg = (f"recv_req.routed_experts_start_len={start_len!r} is higher than the number of input tokens "
                     f"len(req.origin_input_ids)={num_input_tokens!r}. Please use a smaller routed_experts_start_len.")
    return error_msg


def returned_routes(rows, seqlen: int, start_len: int):
    """The routes SGLang returns for a finished request of ``seqlen`` tokens whose rows ``0 .. seqlen-2`` are
    ``rows``: ``BaseTopkCapturer.get_topk`` (``state_capturer/base.py``; clamps start_len to seqlen - 1 and reads
    ``[start_len, seqlen - 1)`` through the request's ``req_to_token`` row), run on a host buffer whose KV slot of
    position p is p. Without SGLang: the same slice."""
    import torch

    ns, _ = load()
    if ns is None:
        start = min(start_len, seqlen - 1)
        return rows[start : seqlen - 1]
    from sglang.srt.state_capturer.base import BaseTopkCapturer

    capturer = types.SimpleNamespace(host_cache=types.SimpleNamespace(buffer=rows))
    pool = types.SimpleNamespace(req_to_token=torch.arange(seqlen, dtype=torch.int64).unsqueeze(0))
    return BaseTopkCapturer.get_topk(capturer, 0, seqlen, pool, start_len=start_len)
