"""A stand-in for an SGLang server: SGLang's HTTP wire format, a tiny HF Qwen3-MoE behind it.

SGLang cannot be installed on the development machines (its wheel is CUDA-only), so the client in
``megatron_r3/rollout/engines/sglang/engine.py`` is tested against this server. It answers the endpoints the trainer uses in
SGLang's format (REFERENCE §3) and generates through the embedded :class:`~megatron_r3.rollout.engines.hf.HFRolloutEngine`:

    POST /generate                      input_ids (single or batch form), sampling_params (dict or list; n), return_logprob,
                                        return_routed_experts, routed_experts_start_len -> text/output_ids/meta_info
    GET  /health, /health_generate      200
    GET  /model_info (alias /get_model_info)     weight_version among SGLang's fields
    GET  /server_info (alias /get_server_info)   flat ServerArgs fields (tp_size, enable_return_routed_experts, ...)
    GET|POST /flush_cache               "Cache flushed." (HTTP 400 while a /generate runs, as SGLang)
    POST /pause_generation, /continue_generation   (paused: new /generate requests wait)
    POST /init_weights_update_group     joins the trainer's group (blocks until every rank joined, like SGLang)
    POST /begin_weight_update, /end_weight_update   the weight-update session (SGLang's own state machine)
    POST /update_weights_from_distributed   inside a session: receives each tensor by broadcast from rank 0, in order,
                                        and loads them; outside one: 400 without receiving (SGLang 0.5.23)
    POST /destroy_weights_update_group
    POST /update_weights_from_disk      loads the safetensors of model_path
    POST /standin/faults, /standin/weight_version, GET /standin/stats   test control (not SGLang)

SGLang's own code where it runs on a CPU (``sglang_code.py``; when SGLang is installed): every weight-update
request body is validated by its request struct, and begin/update/end/disk go through the scheduler's
``SchedulerWeightUpdaterManager`` (session rules and messages); without SGLang a mirror of those rules is used.
An abort whose ``finish_reason`` has ``status_code >= 400`` is an HTTP error of that status, not a reply
(``TokenizerManager._handle_abort_finish_reason``).

Faithful details: routes are base64 of flat row-major int32 (SGLang 0.5.23 sends no dtype or start-len field;
``--routed-experts-dtype`` announces another dtype only to exercise the decoder's tolerance) of shape
``[seqlen - 1 - start_len, num_hidden_layers, top_k]``, dense layers zero; without ``--enable-return-routed-experts``
the routes are silently omitted, as SGLang does; unknown sampling parameters are a 400; generation also stops at the
model config's ``eos_token_id`` unless ``ignore_eos``. Not faithful: sampling. A request (or a run of consecutive
entries of a batch request with equal sampling parameters) is sampled as one ``HFRolloutEngine.generate`` call whose
generator is seeded by its first entry's ``sampling_seed``; a batch request holding all of a trainer step's samples
therefore reproduces the embedded engine's rollout exactly (same batch, same generator), which the e2e test uses.

Faults (``Faults``; CLI ``--fault name=value``; ``POST /standin/faults``) are counted from the server start (or the
last fault reset): HTTP-level ones per ``/generate`` request, route-level ones per sample served.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import torch

from tests.sglang_standin.faults import Faults
from tests.sglang_standin.sglang_code import check_start_len, returned_routes

SAMPLING_FIELDS = {
    "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids",
    "sampling_seed", "n", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "regex", "json_schema", "ebnf", "custom_params",
    "stream_interval", "logit_bias",
}
UNSUPPORTED_NONDEFAULT = {"min_p": 0.0, "min_new_tokens": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                          "repetition_penalty": 1.0}


@dataclass
class StandinConfig:
    model_path: str  # a config.json (file) or an HF directory (config.json [+ safetensors])
    host: str = "127.0.0.1"
    port: int = 0
    enable_return_routed_experts: bool = False
    dtype: str = "bfloat16"
    random_seed: int = 0
    max_running_requests: int = 1024  # the embedded engine's batch size
    routed_experts_dtype: Optional[str] = None  # None: int32 without announcing it (releases before the field)
    tp_size: int = 1
    enable_deterministic_inference: bool = False
    disable_radix_cache: bool = False
    faults: Faults = field(default_factory=Faults)


class _HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def load_hf_config(path: str):
    from transformers import AutoConfig

    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    with open(path) as handle:
        values = json.load(handle)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def read_safetensors_dir(path: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    files = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    out = []
    for name in files:
        out += list(load_file(os.path.join(path, name)).items())
    return out


class StandinServer:
    def __init__(self, config: StandinConfig):
        from transformers import AutoModelForCausalLM

        from megatron_r3.rollout.engines.hf import HFRolloutEngine

        if config.tp_size != 1:
            raise ValueError("the stand-in serves with one rank (--tp-size 1)")
        self.config = config
        self.faults = config.faults
        self.hf_config = load_hf_config(config.model_path)
        torch.manual_seed(config.random_seed)
        model = AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
        self.engine = HFRolloutEngine(model, dtype=config.dtype, max_batch_size=config.max_running_requests,
                                      progress=False, seed=config.random_seed)
        if os.path.isdir(config.model_path) and any(n.endswith(".safetensors") for n in os.listdir(config.model_path)):
            self.engine.update_weights(read_safetensors_dir(config.model_path))
        self.lock = threading.Lock()  # one generation / weight load at a time
        self.counter_lock = threading.Lock()
        self.resume = threading.Event()
        self.resume.set()
        self.weight_version = "default"
        self.groups: dict[str, Any] = {}
        self.stats = {"generate_requests": 0, "samples": 0, "weight_updates": 0, "pauses": 0, "flushes": 0,
                      "start_len_requests": 0}  # requests with routed_experts_start_len > 0 (multi-turn turns)
        self._samples_seen = 0
        self._requests_seen = 0
        self._running: set = set()  # /generate requests running or waiting (flush refusal)
        from tests.sglang_standin.sglang_code import MirrorSession, SessionManager, load

        hooks = dict(receive=self._receive, load_received=self._load_received, load_from_disk=self._load_from_disk,
                     flush=self._flush, set_version=self._set_version)
        sglang, _ = load()
        self.session = SessionManager(sglang, **hooks) if sglang is not None else MirrorSession(**hooks)
        self.httpd = ThreadingHTTPServer((config.host, config.port), _make_handler(self))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{config.host}:{self.port}"
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "StandinServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sglang-standin", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        if self._thread is not None:  # serve_forever runs in our thread: stop it first
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()
        for group in list(self.groups.values()):
            _destroy(group)
        self.groups.clear()

    def set_faults(self, values: dict) -> None:
        with self.counter_lock:
            self.faults = Faults()
            self.faults.update(values)
            self._samples_seen = 0
            self._requests_seen = 0
            self.stats["generate_requests"] = self.stats["samples"] = 0

    # ------------------------------------------------------------------ endpoints
    def _validate(self, path: str, body: Any) -> None:
        """With SGLang installed: the body must pass the request class FastAPI validates it with (422 otherwise)."""
        from tests.sglang_standin.sglang_code import load, validate

        sglang, _ = load()
        if sglang is None:
            return
        if path == "/generate":
            try:
                request = sglang.io_struct.GenerateReqInput(**(body or {}))
                request.normalize_batch_and_arguments()
                params = request.sampling_params if isinstance(request.sampling_params, list) else [
                    request.sampling_params or {}]
                for sp in params:
                    sglang.sampling_params.SamplingParams(**sp).verify(self.hf_config.vocab_size)
            except (TypeError, ValueError) as error:
                raise _HTTPError(400, f"{type(error).__name__}: {error}")
            return
        name = _REQUEST_CLASSES.get(path)
        if name is not None:
            from pydantic import ValidationError

            try:
                validate(sglang, name, body or {})
            except ValidationError as error:
                raise _HTTPError(422, str(error))

    def route(self, method: str, path: str, body: Any, handler) -> tuple[int, Any]:
        path = path.split("?", 1)[0]
        if method == "POST":
            self._validate(path, body)
        if path in ("/health", "/health_generate"):
            return 200, None
        if path in ("/model_info", "/get_model_info"):
            return 200, {"model_path": self.config.model_path, "tokenizer_path": None, "is_generation": True,
                         "preferred_sampling_params": None, "weight_version": self.weight_version,
                         "model_type": self.hf_config.model_type}
        if path in ("/server_info", "/get_server_info"):
            return 200, {"model_path": self.config.model_path, "tp_size": self.config.tp_size, "dp_size": 1,
                         "pp_size": 1, "dtype": self.config.dtype, "random_seed": self.config.random_seed,
                         "enable_return_routed_experts": self.config.enable_return_routed_experts,
                         "max_running_requests": self.config.max_running_requests, "version": "standin",
                         "enable_deterministic_inference": self.config.enable_deterministic_inference,
                         "disable_radix_cache": self.config.disable_radix_cache}
        if path == "/flush_cache":
            if not self._flush():  # http_server.flush_cache: 400 with the scheduler's refusal
                raise _HTTPError(400, "Flush cache failed.\n")
            self.stats["flushes"] += 1
            return 200, "Cache flushed.\nPlease check backend logs for more details. (When there are running or " \
                        "waiting requests, the operation will not be performed.)\n"
        if path == "/standin/stats":
            return 200, dict(self.stats, weight_version=self.weight_version, paused=not self.resume.is_set(),
                             session=f"{type(getattr(self.session, 'manager', self.session)).__module__}."
                                     f"{type(getattr(self.session, 'manager', self.session)).__name__}")
        if method != "POST":
            raise _HTTPError(404 if path not in _POST_PATHS else 405, f"{method} {path} not found")
        if path == "/generate":
            token = object()
            with self.counter_lock:
                self._running.add(token)
            try:
                status, reply = self.generate(body or {}, handler)
            finally:
                with self.counter_lock:
                    aborted = token not in self._running
                    self._running.discard(token)
            if aborted:  # pause_generation (mode "abort") aborted it while it ran
                for entry in reply if isinstance(reply, list) else [reply]:
                    entry["meta_info"]["finish_reason"] = {"type": "abort", "message": "Abort by pause_generation."}
            return status, reply
        if path == "/pause_generation":
            mode = (body or {}).get("mode", "abort")
            if mode not in ("abort", "retract", "in_place"):
                raise _HTTPError(400, f"unknown pause mode {mode!r}")
            if mode != "in_place":  # abort: running requests end as aborted; retract: back to waiting (flushable)
                with self.counter_lock:
                    self._running.clear()
            self.resume.clear()
            self.stats["pauses"] += 1
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if path == "/continue_generation":
            self.resume.set()
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if path == "/init_weights_update_group":
            return self.init_group(body or {})
        if path in ("/begin_weight_update", "/end_weight_update", "/update_weights_from_distributed"):
            success, message = self.session.call(path[1:], body or {})
            return (200 if success else 400), {"success": success, "message": message}
        if path == "/destroy_weights_update_group":
            group = self.groups.pop((body or {}).get("group_name", "weight_update_group"), None)
            if group is not None:
                _destroy(group)
            return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
        if path == "/update_weights_from_disk":
            path_ = (body or {}).get("model_path")
            if self.faults.fail_weight_update:
                return 400, {"success": False, "message": "injected fault: failed to update weights"}
            success, message = self.session.call("update_weights_from_disk", body or {})
            return (200 if success else 400), {"success": success, "message": message, "num_paused_requests": 0}
        if path == "/standin/weight_version":  # test control: a server that missed a sync
            self.weight_version = str((body or {})["weight_version"])
            return 200, {"weight_version": self.weight_version}
        if path == "/standin/faults":
            self.set_faults(body or {})
            return 200, {"faults": dataclasses.asdict(self.faults)}
        raise _HTTPError(404, f"POST {path} not found")

    # -- generation
    def generate(self, body: dict, handler) -> tuple[int, Any]:
        with self.counter_lock:
            number = self._requests_seen
            self._requests_seen += 1
            self.stats["generate_requests"] += 1
        faults = self.faults
        if number < faults.drop_connection_first:
            handler.close_connection = True
            raise _DropConnection()
        if number < faults.delay_first:
            time.sleep(faults.delay_s)
        if number < faults.http_500_first:
            raise _HTTPError(500, "injected fault: internal server error")
        if number < faults.http_400_first:
            raise _HTTPError(400, "injected fault: bad request")
        if "input_ids" not in body:
            raise _HTTPError(400, "the stand-in takes input_ids (SGLang's text input is not supported here)")
        ids = body["input_ids"]
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        prompts = ids if batch else [ids]
        params = body.get("sampling_params") or {}
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise _HTTPError(400, f"{len(params)} sampling_params for {len(prompts)} prompts")
        start_len = body.get("routed_experts_start_len", 0)  # one int for the whole request, as in SGLang
        if isinstance(start_len, bool) or not isinstance(start_len, int):
            raise _HTTPError(400, f"routed_experts_start_len must be an int, got {start_len!r}")
        if start_len:
            with self.counter_lock:
                self.stats["start_len_requests"] += 1
        entries = []  # (prompt, params, start_len), expanded by n like SGLang (prompt-major)
        for prompt, sp in zip(prompts, params):
            unknown = sorted(set(sp) - SAMPLING_FIELDS)
            if unknown:
                raise _HTTPError(400, f"SamplingParams.__init__() got an unexpected keyword argument {unknown[0]!r}")
            for key, default in UNSUPPORTED_NONDEFAULT.items():
                if key in sp and sp[key] != default:
                    raise _HTTPError(400, f"the stand-in does not implement {key}={sp[key]}")
            if not prompt or not all(isinstance(t, int) and 0 <= t < self.hf_config.vocab_size for t in prompt):
                raise _HTTPError(400, f"input_ids must be token ids in [0, {self.hf_config.vocab_size})")
            refused = check_start_len(start_len, len(prompt)) if body.get("return_routed_experts") else None
            if refused:  # the scheduler aborts the request with status 400: an HTTP 400 (see the abort rule below)
                raise _HTTPError(400, refused)
            for _ in range(int(sp.get("n", 1))):
                entries.append((prompt, sp, int(start_len)))
        routes_wanted = bool(body.get("return_routed_experts")) and self.config.enable_return_routed_experts
        if not self.resume.wait(timeout=120):
            raise _HTTPError(503, "generation paused for more than 120 s")
        start = time.perf_counter()
        results = []
        with self.lock:
            run: list = []
            for entry in entries + [None]:
                if run and (entry is None or _sampling_key(entry[1]) != _sampling_key(run[0][1])):
                    results += self._generate_run(run, routes_wanted)
                    run = []
                if entry is not None:
                    run.append(entry)
        latency = time.perf_counter() - start
        outputs = []
        for (prompt, sp, start_len), sample in zip(entries, results):
            outputs.append(self._reply_entry(prompt, sp, start_len, sample, routes_wanted,
                                             bool(body.get("return_logprob")), latency))
        for output in outputs:  # TokenizerManager._handle_abort_finish_reason: status_code >= 400 -> HTTP error
            finish = output["meta_info"]["finish_reason"]
            code = finish.get("status_code")
            if finish.get("type") == "abort" and isinstance(code, int) and 400 <= code < 600:
                raise _HTTPError(code, finish["message"])
        return 200, outputs if batch or len(outputs) > 1 else outputs[0]

    def _generate_run(self, run, routes_wanted: bool):
        from megatron_r3.rollout.base import SamplingParams

        sp = run[0][1]
        stop = list(sp.get("stop_token_ids") or [])
        eos = getattr(self.hf_config, "eos_token_id", None)
        if not sp.get("ignore_eos"):
            for token in (eos if isinstance(eos, list) else [eos]):
                if token is not None and token not in stop:
                    stop.append(token)
        else:
            stop = []
        top_k = int(sp.get("top_k", -1))
        sampling = SamplingParams(
            temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
            top_k=top_k if top_k > 0 else -1, max_new_tokens=int(sp.get("max_new_tokens", 128)),
            stop_token_ids=tuple(stop), seed=sp.get("sampling_seed"),
        )
        result = self.engine.generate([prompt for prompt, _, _ in run], sampling, samples_per_prompt=1,
                                      return_routes=routes_wanted)
        return result.samples

    def _reply_entry(self, prompt, sp, start_len, sample, routes_wanted, return_logprob, latency) -> dict:
        from megatron_r3.rollout.engines.sglang.codec import encode_sglang_routed_experts

        with self.counter_lock:
            number = self._samples_seen
            self._samples_seen += 1
            self.stats["samples"] += 1
        faults = self.faults
        response = sample.response_ids.tolist()
        finish: dict = ({"type": "stop", "matched": response[-1]} if sample.finish_reason == "stop"
                        else {"type": "length", "length": len(response)})
        if number < faults.abort_first:
            finish = {"type": "abort", "message": "injected fault: request aborted", "status_code": 500}
        meta: dict = {
            "id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": len(prompt),
            "completion_tokens": len(response), "cached_tokens": 0, "weight_version": self.weight_version,
            "e2e_latency": latency,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[float(lp), int(t), None]
                                             for lp, t in zip(sample.response_logprobs.tolist(), response)]
            if number < faults.neginf_logprob_first:
                meta["output_token_logprobs"][0][0] = float("-inf")  # json writes -Infinity, as Python servers do
            meta["input_token_logprobs"] = []
        if routes_wanted and number >= faults.omit_routes_first:
            ids = returned_routes(sample.routes.expert_ids.to(torch.int64), sample.tokens.shape[0], start_len)
            if number < faults.wrong_rows_first:
                ids = ids[:-1]
            if number < faults.duplicate_ids_first:
                ids = torch.zeros_like(ids)  # top-k of one repeated id: every MoE row is unusable
            if number < faults.shift_routes_first:
                ids = torch.roll(ids, 1, dims=0)
            wire = self.config.routed_experts_dtype or "int32"
            payload = encode_sglang_routed_experts(ids, dtype=wire)
            if number < faults.truncate_routes_first:
                payload = payload[: max(0, len(payload) // 2 - 1)]
            meta["routed_experts"] = payload if number >= faults.routes_as_int_first else 12345
            if self.config.routed_experts_dtype:  # not SGLang 0.5.23 (int32, no dtype field): the decoder's tolerance
                meta["routed_experts_dtype"] = self.config.routed_experts_dtype
        return {"text": "", "output_ids": response, "meta_info": meta}

    # -- weights
    def init_group(self, body: dict) -> tuple[int, Any]:
        from megatron_r3.rollout.engines.sglang.weight_sync import init_custom_process_group

        name = body.get("group_name", "weight_update_group")
        if name in self.groups:
            return 400, {"success": False, "message": f"group {name} already exists"}
        try:
            group = init_custom_process_group(
                backend=body.get("backend", "gloo"),
                init_method=f"tcp://{body['master_address']}:{body['master_port']}",
                world_size=int(body["world_size"]), rank=int(body["rank_offset"]), group_name=name,
                timeout_s=float(body.get("timeout_s", 120)),
            )
        except Exception as error:  # noqa: BLE001 - reported to the client
            return 400, {"success": False, "message": f"Failed to init custom process group: {error}"}
        self.groups[name] = group
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    # the model side of SGLang's weight-update manager (``SessionManager`` / ``_MirrorSession`` call these)
    def _receive(self, names, dtypes, shapes, group_name):
        import torch.distributed as dist

        group = self.groups.get(group_name)
        if group is None:
            raise RuntimeError(f"no weight update group {group_name!r}; call /init_weights_update_group first")
        received = []
        for tensor_name, dtype, shape in zip(names, dtypes, shapes):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(tensor, src=0, group=group)
            received.append((tensor_name, tensor))
        return received

    def _load_received(self, tensors) -> tuple[bool, str]:
        if self.faults.fail_weight_update:
            return False, "injected fault: failed to update weights"
        return self._load(tensors)

    def _load_from_disk(self, path) -> tuple[bool, str]:
        if not path or not os.path.isdir(path):
            return False, f"model_path {path!r} is not a directory"
        try:
            tensors = read_safetensors_dir(path)
        except Exception as error:  # noqa: BLE001 - reported to the client
            return False, f"Failed to load weights from {path}: {error}"
        success, message = self._load(tensors)
        return success, ("Succeeded to update model weights." if success else message)

    def _set_version(self, version) -> None:
        if version is not None:
            self.weight_version = str(version)
        self.stats["weight_updates"] += 1

    def _flush(self) -> bool:
        """SGLang's scheduler refuses to flush while requests run or wait."""
        with self.counter_lock:
            return not self._running

    def _load(self, tensors) -> tuple[bool, str]:
        with self.lock:
            try:
                self.engine.update_weights(tensors)
            except Exception as error:  # noqa: BLE001 - reported to the client
                return False, f"Failed to load weights: {error}"
        return True, "Succeeded to update parameter online."


_POST_PATHS = {"/generate", "/pause_generation", "/continue_generation", "/init_weights_update_group",
               "/begin_weight_update", "/end_weight_update",
               "/update_weights_from_distributed", "/destroy_weights_update_group", "/update_weights_from_disk",
               "/standin/faults", "/standin/weight_version"}


_REQUEST_CLASSES = {  # http_server.py: the body class of each endpoint
    "/pause_generation": "PauseGenerationReqInput", "/continue_generation": "ContinueGenerationReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput", "/end_weight_update": "EndWeightUpdateReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
}


class _DropConnection(Exception):
    pass


def _sampling_key(sp: dict) -> str:
    return json.dumps({k: v for k, v in sp.items() if k not in ("sampling_seed", "n")}, sort_keys=True)


def _destroy(group) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(group)
    except Exception:  # noqa: BLE001 - shutting down
        pass


def _make_handler(server: StandinServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # quiet
            pass

        def _handle(self, method: str):
            body = None
            length = int(self.headers.get("Content-Length") or 0)
            try:
                if length:
                    body = json.loads(self.rfile.read(length))
                status, reply = server.route(method, self.path, body, self)
            except _DropConnection:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            except _HTTPError as error:
                status, reply = error.status, {"error": {"message": str(error)}}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                status, reply = 400, {"error": {"message": f"{type(error).__name__}: {error}"}}
            except Exception as error:  # noqa: BLE001 - a server bug is a 500, like SGLang
                status, reply = 500, {"error": {"message": f"{type(error).__name__}: {error}"}}
            if reply is None:
                data, kind = b"", "text/plain"
            elif isinstance(reply, str):
                data, kind = reply.encode(), "text/plain; charset=utf-8"
            else:
                data, kind = json.dumps(reply).encode(), "application/json"
            try:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout fault)
                pass

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

    return Handler


# ================================================================================================ starting
def start_in_thread(model_path: str, **kwargs) -> StandinServer:
    """A stand-in serving from a thread of this process (``server.url``; ``server.shutdown()`` when done)."""
    faults = kwargs.pop("faults", None)
    config = StandinConfig(model_path=model_path, **kwargs)
    if isinstance(faults, dict):
        config.faults.update(faults)
    elif isinstance(faults, Faults):
        config.faults = faults
    return StandinServer(config).start()


def start_subprocess(args: list[str], *, timeout_s: float = 120.0, env: Optional[dict] = None,
                     log_path: Optional[str] = None) -> tuple[subprocess.Popen, str]:
    """``python -m tests.sglang_standin ARGS --port 0``; returns (process, url) once ``/health`` answers."""
    import tempfile

    import requests

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port_file = os.path.join(tempfile.mkdtemp(prefix="standin-"), "port")
    cmd = [sys.executable, "-m", "tests.sglang_standin", *args, "--port-file", port_file]
    if "--port" not in args:
        cmd += ["--port", "0"]
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("OMP_NUM_THREADS", "1")
    run_env["PYTHONPATH"] = repo + os.pathsep + run_env.get("PYTHONPATH", "")
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, cwd=repo, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stand-in exited with {proc.returncode} before serving ({' '.join(cmd)})")
        if os.path.exists(port_file):
            with open(port_file) as handle:
                text = handle.read().strip()
            if text:
                url = f"http://127.0.0.1:{int(text)}"
                try:
                    if requests.get(url + "/health", timeout=2).status_code == 200:
                        return proc, url
                except requests.RequestException:
                    pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"stand-in not healthy within {timeout_s} s")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sglang_standin",
        description="SGLang stand-in: SGLang's HTTP protocol in front of a tiny HF Qwen3-MoE (tests only).")
    parser.add_argument("--model-path", required=True, help="config.json file or HF directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--port-file", default=None, help="write the bound port here (with --port 0)")
    parser.add_argument("--enable-return-routed-experts", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--max-running-requests", type=int, default=1024)
    parser.add_argument("--routed-experts-dtype", default=None, choices=("int32", "uint8", "uint16", "int16"))
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--fault", action="append", default=[], help="name=value (see Faults)")
    # SGLang launch flags the launcher passes; accepted and ignored here
    parser.add_argument("--mem-fraction-static", type=float, default=None)
    parser.add_argument("--disable-radix-cache", action="store_true")
    parser.add_argument("--chunked-prefill-size", type=int, default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    return parser


def main(argv=None) -> None:
    args = build_arg_parser().parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = StandinConfig(
        model_path=args.model_path, host=args.host, port=args.port,
        enable_return_routed_experts=args.enable_return_routed_experts, dtype=args.dtype,
        random_seed=args.random_seed, max_running_requests=args.max_running_requests,
        routed_experts_dtype=args.routed_experts_dtype, tp_size=args.tp_size, faults=Faults.parse(args.fault),
        enable_deterministic_inference=args.enable_deterministic_inference,
        disable_radix_cache=args.disable_radix_cache,
    )
    server = StandinServer(config)
    if args.port_file:
        temp = args.port_file + ".tmp"
        with open(temp, "w") as handle:
            handle.write(str(server.port))
        os.replace(temp, args.port_file)
    print(f"sglang stand-in serving {args.model_path} at {server.url} "
          f"(routes {'on' if args.enable_return_routed_experts else 'off'})", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
