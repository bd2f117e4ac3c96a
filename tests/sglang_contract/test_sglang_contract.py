"""The SGLang client against SGLang 0.5.23's own code (its wheel installed without dependencies; see
tests/sglang_standin/sglang_code.py for what imports on a CPU and what does not, and why).

- every request body the client builds is validated by SGLang's request classes (``GenerateReqInput`` +
  ``normalize_batch_and_arguments()``, ``SamplingParams(...).verify()``, the HTTP contract gate, the weight-update
  structs through the pydantic schema FastAPI uses);
- the launcher's commands parse with SGLang's own ``ServerArgs`` CLI parser;
- the weight-update session: the stand-in runs SGLang's ``SchedulerWeightUpdaterManager``; an update outside a
  begin/end session is refused and the client fails at once with SGLang's message (today's client, without the
  session, broadcast into a server that never received until the group timeout);
- the weight version is read from ``/model_info`` (there is no ``/get_weight_version``) and from each reply's
  ``meta_info``; a stale server fails the rollout clearly.

Without SGLang installed these tests skip with the reason (fail under ``CI=true``); the stand-in tests that do not
need SGLang's classes run either way.
"""

from __future__ import annotations

import os
import time

import pytest
import requests
import torch

from megatron_r3.rollout.base import SamplingParams
from megatron_r3.rollout.engines.sglang.engine import SGLangClientConfig, SGLangConfigError, SGLangEngine, StaleWeightsError
from megatron_r3.rollout.engines.sglang.protocol import (
    generate_payload,
    init_weights_update_group_payload,
    sampling_params_payload,
    update_weights_from_disk_payload,
    update_weights_from_distributed_payload,
)
from megatron_r3.rollout.engines.sglang.weight_sync import WeightSyncError, WeightSyncSettings, verify_weight_version
from tests.distributed.launch import REPO
from tests.sglang_standin.server import start_subprocess
from tests.sglang_standin.sglang_code import load, require, validate

TINY = os.path.join(REPO, "configs", "models", "qwen3_moe_tiny.json")
LAYERS, TOPK, EXPERTS, VOCAB = 4, 2, 8, 64
FAST = dict(request_timeout_s=30.0, connect_timeout_s=2.0, control_timeout_s=10.0, max_retries=1,
            retry_backoff_s=0.01, startup_timeout_s=10.0)


class _Server:
    """A stand-in in a subprocess (a weight update group cannot join itself inside one process)."""

    def __init__(self, proc, url):
        self.proc, self.url = proc, url

    def post(self, path, body):
        return requests.post(self.url + path, json=body, timeout=30)

    def set_faults(self, faults):
        self.post("/standin/faults", faults).raise_for_status()

    def set_version(self, version):
        self.post("/standin/weight_version", {"weight_version": version}).raise_for_status()

    def stats(self):
        return requests.get(self.url + "/standin/stats", timeout=10).json()


@pytest.fixture(scope="module")
def server():
    proc, url = start_subprocess(["--model-path", TINY, "--enable-return-routed-experts"])
    yield _Server(proc, url)
    proc.kill()
    proc.wait(timeout=30)


def engine_for(srv, **settings) -> SGLangEngine:
    return SGLangEngine([srv.url], num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS, vocab_size=VOCAB,
                        config=SGLangClientConfig(**FAST),
                        weight_sync=WeightSyncSettings(mode="distributed", timeout_s=60, **settings))


def tiny_tensors(srv):
    from transformers import AutoModelForCausalLM

    from tests.sglang_standin.server import load_hf_config

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(load_hf_config(TINY), dtype=torch.float32)
    return [(name, param.detach().clone()) for name, param in model.state_dict().items()][:3]


# ------------------------------------------------------------------------------------------------ multi-turn start_len
def test_start_len_bodies_and_rows_follow_sglang():
    """A later turn's body (one int routed_experts_start_len, batch form too) passes SGLang's request class, each
    entry of the batch gets that int (``__getitem__``), the stand-in's rows come from SGLang's own
    ``BaseTopkCapturer.get_topk`` (rows ``[start_len, seqlen - 1)``), and the refusal it mirrors is the
    scheduler's (its source text, since scheduler.py needs CUDA kernels to import)."""
    import inspect

    from tests.sglang_standin.sglang_code import check_start_len, returned_routes

    sgl = require()
    params = sampling_params_payload(SamplingParams(max_new_tokens=2), None)
    body = generate_payload([[1, 2, 3, 4], [5, 6, 7, 8]], [params, params], return_routes=True, batch=True,
                            routes_start_len=3)
    assert sgl.api_contract.generate_contract_error(body) is None
    request = sgl.io_struct.GenerateReqInput(**body)
    request.normalize_batch_and_arguments()
    assert [request[i].routed_experts_start_len for i in range(2)] == [3, 3]
    rows = torch.arange(9 * LAYERS * TOPK, dtype=torch.int64).view(9, LAYERS, TOPK)  # seqlen 10: rows 0..8
    assert torch.equal(returned_routes(rows, 10, 6), rows[6:])
    assert torch.equal(returned_routes(rows, 10, 0), rows)
    import sglang.srt.state_capturer.base as capturer_base

    assert "start_len : seqlen - 1" in inspect.getsource(capturer_base.BaseTopkCapturer.get_topk)
    scheduler = os.path.join(os.path.dirname(capturer_base.__file__), "..", "managers", "scheduler.py")
    with open(scheduler) as handle:
        source = handle.read()
    for fragment in ('f"{recv_req.routed_experts_start_len=} is lower than 0. "',
                     '"Please use a non-negative routed_experts_start_len."',
                     'f"number of input tokens {len(req.origin_input_ids)=}. Please "'):
        assert fragment in source, fragment
    recv_req = type("R", (), {"routed_experts_start_len": 7})()  # the f-string's own rendering of the value
    assert check_start_len(7, 3).startswith(f"{recv_req.routed_experts_start_len=} is higher than the ")
    assert check_start_len(3, 3) is None and check_start_len(0, 3) is None


# ------------------------------------------------------------------------------------------------ request bodies
def test_generate_bodies_pass_sglangs_own_request_classes():
    sgl = require()
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=4, stop_token_ids=(3,), seed=1)
    single = generate_payload([[1, 2, 3]], [sampling_params_payload(sampling, 11)], return_routes=True, batch=False)
    batch = generate_payload([[1, 2, 3], [4, 5]], [sampling_params_payload(sampling, s) for s in (1, 2)],
                             return_routes=True, batch=True)
    for body, size in ((single, 1), (batch, 2)):
        assert sgl.api_contract.generate_contract_error(body) is None
        request = sgl.io_struct.GenerateReqInput(**body)
        request.normalize_batch_and_arguments()
        assert request.return_routed_experts is True and request.return_logprob is not None
        params = body["sampling_params"] if size > 1 else [body["sampling_params"]]
        for sp in params:
            sgl.sampling_params.SamplingParams(**sp).verify(VOCAB)
    with pytest.raises(TypeError):  # the oracle is strict: an unknown sampling field is caught
        sgl.sampling_params.SamplingParams(**{**single["sampling_params"], "seed": 1})


def test_weight_sync_bodies_pass_sglangs_own_request_structs():
    sgl = require()
    tensors = [torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.float32)]
    bodies = {
        "InitWeightsUpdateGroupReqInput": init_weights_update_group_payload(
            master_address="10.0.0.1", master_port=1234, rank_offset=1, world_size=3, group_name="g", backend="nccl"),
        "UpdateWeightsFromDistributedReqInput": update_weights_from_distributed_payload(
            ["a", "b"], tensors, group_name="g", flush_cache=False, weight_version="7"),
        "UpdateWeightFromDiskReqInput": update_weights_from_disk_payload("/x/weights-v7", weight_version="7"),
        "BeginWeightUpdateReqInput": {}, "EndWeightUpdateReqInput": {},
        "PauseGenerationReqInput": {}, "ContinueGenerationReqInput": {},
        "DestroyWeightsUpdateGroupReqInput": {"group_name": "g"},
    }
    for name, body in bodies.items():
        request = validate(sgl, name, body)
        for key, value in body.items():
            assert getattr(request, key) == value, (name, key)
    assert validate(sgl, "PauseGenerationReqInput", {}).mode == "abort"  # running requests end: flush then succeeds
    from pydantic import ValidationError

    with pytest.raises(ValidationError):  # the oracle is strict: a wrong type is caught
        validate(sgl, "InitWeightsUpdateGroupReqInput", {**bodies["InitWeightsUpdateGroupReqInput"], "world_size": "x"})
    update = validate(sgl, "UpdateWeightsFromDistributedReqInput", bodies["UpdateWeightsFromDistributedReqInput"])
    assert [getattr(torch, d) for d in update.dtypes] == [torch.bfloat16, torch.float32]  # how SGLang reads them


def test_launcher_commands_parse_with_sglangs_server_args():
    import argparse

    from tools.launch_sglang import build_parser, server_command

    sgl = require()
    parser = argparse.ArgumentParser()
    sgl.server_args.ServerArgs.add_cli_args(parser)
    for argv, radix, deterministic in ((["--model-path", "/m"], True, True),
                                       (["--model-path", "/m", "--radix-cache", "off", "--no-deterministic"],
                                        False, False)):
        opts = build_parser().parse_args(argv + ["--tp-size", "2", "--gpus", "2"])
        cmd = server_command(opts, 30001)
        assert cmd[1:3] == ["-m", "sglang.launch_server"]
        args = sgl.server_args.ServerArgs.from_cli_args(parser.parse_args(cmd[3:]))
        assert args.enable_return_routed_experts and args.tp_size == 2 and args.port == 30001
        assert args.disable_radix_cache is (not radix)
        assert args.enable_deterministic_inference is deterministic


def test_launcher_defaults_keep_the_radix_cache_and_honour_seeds():
    from tools.launch_sglang import build_parser, server_command

    cmd = server_command(build_parser().parse_args(["--model-path", "/m", "--gpus", "1"]), 30000)
    assert "--enable-deterministic-inference" in cmd and "--disable-radix-cache" not in cmd
    cmd = server_command(build_parser().parse_args(["--model-path", "/m", "--gpus", "1", "--radix-cache", "off",
                                                    "--no-deterministic"]), 30000)
    assert "--enable-deterministic-inference" not in cmd and "--disable-radix-cache" in cmd


# ------------------------------------------------------------------------------------------------ weight session
def test_standin_runs_sglangs_session_manager(server):
    sgl = require()
    cls = sgl.weight_updater.SchedulerWeightUpdaterManager
    assert server.stats()["session"] == f"{cls.__module__}.{cls.__name__}"
    reply = requests.post(server.url + "/end_weight_update", json={}, timeout=10)
    assert reply.status_code == 400
    assert reply.json()["message"] == "no weight-update session is open; call begin_weight_update() first"


def test_update_outside_a_session_is_refused_at_once_with_sglangs_message(server):
    """Today's sender (no begin/end) would broadcast into a server that refused without receiving; the sender now
    sees the refusal and fails in seconds, with the server's message, instead of waiting for the group timeout."""
    with engine_for(server) as engine:
        sender = engine.weight_sender()
        sender.ensure_group()
        sender.version = "1"
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="must run between begin_weight_update.. and end_weight_update"):
            sender.send_bucket(tiny_tensors(server))
        assert time.monotonic() - start < 20  # the group timeout is 60 s
        assert sender.group is None  # the half-done group is dropped, rebuilt at the next sync


def test_distributed_update_runs_in_a_session_and_is_verified_on_model_info(server):
    """Fails on today's code: without /begin_weight_update the server refuses the update."""
    with engine_for(server) as engine:
        start = time.monotonic()
        engine.update_weights(tiny_tensors(server))
        assert time.monotonic() - start < 30
        info = requests.get(server.url + "/model_info", timeout=10).json()
        assert info["weight_version"] == engine.synced_weight_version == "1"
        assert requests.get(server.url + "/get_weight_version", timeout=10).status_code == 404  # not SGLang's
        # the session is closed: a new one opens
        assert requests.post(server.url + "/begin_weight_update", json={}, timeout=10).status_code == 200
        assert requests.post(server.url + "/end_weight_update", json={}, timeout=10).status_code == 200


def test_a_refused_begin_fails_and_leaves_no_session_open(server):
    with engine_for(server) as engine:
        assert requests.post(server.url + "/begin_weight_update", json={}, timeout=10).status_code == 200
        with pytest.raises(WeightSyncError, match="a weight-update session is already open"):
            engine.update_weights(tiny_tensors(server))
        assert not server.stats()["paused"]  # continue_generation after the failure
        # the failed sync closed the session it tried to open: the next one works
        engine.update_weights(tiny_tensors(server))
        assert requests.get(server.url + "/model_info", timeout=10).json()["weight_version"] == "2"


def test_weight_version_comes_from_model_info_and_a_wrong_one_fails(server):
    """Fails on today's code: it asked /get_weight_version, got 404 and skipped the check."""
    with engine_for(server) as engine:
        server.set_version("old")
        with pytest.raises(WeightSyncError, match="reports weight version 'old' after the update to '9'"):
            verify_weight_version(engine, "9")


def test_a_reply_from_stale_weights_fails_the_rollout(server):
    with engine_for(server) as engine:
        engine.record_weight_version("5")
        server.set_version("4")
        with pytest.raises(StaleWeightsError, match="weight_version '4' in meta_info, but the trainer's last weight "
                                                    "sync set '5'"):
            engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, seed=1))
        server.set_version("5")
        assert len(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, seed=1)).samples) == 1


# ------------------------------------------------------------------------------------------------ seeds, flush, abort
def test_seeds_need_deterministic_inference(server):
    config = SGLangClientConfig(**FAST, require_deterministic=True)
    with SGLangEngine([server.url], num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS, config=config) as engine:
        assert engine.facts[0].deterministic is False
        with pytest.raises(SGLangConfigError, match="without --enable-deterministic-inference"):
            engine.generate([[1, 2]], SamplingParams(max_new_tokens=1, seed=3))
        assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=1, seed=None)).samples  # unseeded: fine


def test_aborts_with_an_error_status_arrive_as_http_errors(server):
    server.set_faults({"abort_first": 1})
    try:
        reply = requests.post(server.url + "/generate", json={"input_ids": [1, 2], "sampling_params":
                                                              {"max_new_tokens": 1}}, timeout=30)
        assert reply.status_code == 500 and "injected fault" in reply.text
    finally:
        server.set_faults({})


def test_sglang_importable_in_ci():
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        ns, why = load()
        assert ns is not None, why


# ------------------------------------------------------------------------------------------------ radix cache
def test_a_shared_cached_prefix_returns_the_routes_that_computed_its_kv():
    """SGLang's own capture path (``state_capturer.base``: device buffer -> host buffer indexed by KV slot ->
    ``get_topk`` through the request's ``req_to_token`` row) with a radix-cache hit: request B reuses the KV slots of
    request A's prompt prefix and prefills only its own tail. B's routes are A's routes for the cached rows (the
    forward that computed the KV B attends to) and B's own for the rest: exactly what the engine ran, so replay is
    right with the radix cache on. The payload (int32 ``numpy().tobytes()`` in base64, the encoding of
    ``DetokenizerManager._b64_encode_per_request``) decodes with SGLang's ``extract_routed_experts_from_meta_info``
    and with our decoder to the same array, and ``parse_sample`` accepts it (T-1 rows)."""
    import types

    from megatron_r3.rollout.engines.sglang.codec import encode_sglang_routed_experts
    from megatron_r3.rollout.engines.sglang.protocol import parse_sample

    require()
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.state_capturer.base import BaseDeviceCache, BaseTopkCapturer
    from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info

    layers, topk, experts = LAYERS, TOPK, EXPERTS
    capturer = BaseTopkCapturer.__new__(BaseTopkCapturer)  # its host cache pins memory (CUDA): a plain one here
    capturer.num_layers, capturer.topk_size = layers, topk
    capturer.host_cache = types.SimpleNamespace(buffer=torch.zeros(64, layers, topk, dtype=torch.int32))
    capturer.device_cache = BaseDeviceCache(16, layers, topk, "cpu", name="routed_experts")
    pool = ReqToTokenPool(size=4, max_context_len=32, device="cpu", enable_memory_saver=False)
    generator = torch.Generator().manual_seed(0)

    def forward(slots):
        """One forward over tokens written to KV ``slots``: every layer's top-k captured, then stored by slot."""
        routes = torch.stack([torch.randperm(experts, generator=generator)[:topk] for _ in range(len(slots) * layers)])
        routes = routes.view(len(slots), layers, topk).to(torch.int32)
        for layer in range(layers):
            capturer.capture(layer, routes[:, layer, :])
        batch = types.SimpleNamespace(out_cache_loc=torch.tensor(slots), out_cache_loc_virtual=None)
        capturer.on_forward_end(batch, can_run_graph=False, cuda_graph_batch=None)
        return routes

    # request A: prompt of 6 tokens in slots 1..6, then 3 decode steps (the last sampled token is never fed)
    a_row, a_slots = 1, list(range(1, 10))
    pool.write((a_row, slice(0, 9)), torch.tensor(a_slots, dtype=torch.int32))
    a_routes = torch.cat([forward(a_slots[:6]), forward([7]), forward([8]), forward([9])])
    # request B: same first 4 prompt tokens (radix hit on A's slots 1..4), own tail of 3 prompt tokens + 2 decodes
    b_row, b_slots = 2, [1, 2, 3, 4, 20, 21, 22, 23, 24]
    pool.write((b_row, slice(0, 9)), torch.tensor(b_slots, dtype=torch.int32))
    b_own = torch.cat([forward([20, 21, 22]), forward([23]), forward([24])])
    seqlen = 10  # 7 prompt + 3 sampled; rows = seqlen - 1
    got = capturer.get_topk(b_row, seqlen, pool)
    engine_ran = torch.cat([a_routes[:4], b_own])  # the forwards that computed the KV at each of B's positions
    assert torch.equal(got, engine_ran)
    assert torch.equal(capturer.get_topk(a_row, 10, pool), a_routes)  # A is untouched by B

    payload = encode_sglang_routed_experts(got.to(torch.int64))
    meta = {"routed_experts": payload, "finish_reason": {"type": "length", "length": 3},
            "output_token_logprobs": [[-1.0, 5, None], [-1.0, 6, None], [-1.0, 7, None]], "weight_version": "1"}
    assert torch.equal(torch.from_numpy(extract_routed_experts_from_meta_info({"meta_info": meta}).copy()),
                       got.flatten())
    sample = parse_sample({"output_ids": [5, 6, 7], "meta_info": meta}, prompt_ids=[1, 2, 3, 4, 9, 10, 11],
                          prompt_index=0, return_routes=True, num_layers=layers, topk=topk, num_experts=experts,
                          vocab_size=VOCAB, sample_id="B")
    assert torch.equal(sample.routes.expert_ids.to(torch.int32), engine_ran)
    # a planted bug is caught: a recompute of the prefix (fresh routes) is not what the engine ran
    assert not torch.equal(torch.cat([forward([30, 31, 32, 33]), b_own]), engine_ran)


# ------------------------------------------------------------------------------------------------ faults (issue 14)
def test_a_server_that_accepts_and_never_answers_hits_the_rollout_deadline(server):
    """The deadline comes from the work (base + tokens / floor rate); the error names the silent server."""
    server.set_faults({"delay_first": 100, "delay_s": 30.0})
    try:
        config = SGLangClientConfig(**{**FAST, "request_timeout_s": 600.0, "max_retries": 3},
                                    deadline_base_s=2.0, deadline_min_tokens_per_s=4.0, progress_log_s=1.0)
        with SGLangEngine([server.url], num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS, config=config) as engine:
            assert engine.rollout_deadline(2, 4) == 2.0 + 2 * 4 / 4.0
            start = time.monotonic()
            with pytest.raises(SGLangConfigError, match=r"did not finish within its deadline of 4 s \(derived: 2 s \+ "
                                                        r"2 samples x 4 tokens / 4 tokens/s\): 2 of 2 requests "
                                                        rf"unanswered; no reply from {server.url} \(2 requests"):
                engine.generate([[1, 2]], SamplingParams(max_new_tokens=4), samples_per_prompt=2)
            assert time.monotonic() - start < 10  # not 600 s x 4 attempts
    finally:
        server.set_faults({})


def test_a_dead_server_is_dropped_at_the_weight_sync_and_counted(server, tmp_path):
    """One of two servers dies: the rollout fails over (retries counted), the next weight sync removes it and
    updates the live one instead of stopping the run."""
    proc, url = start_subprocess(["--model-path", TINY, "--enable-return-routed-experts"])
    try:
        with SGLangEngine([url, server.url], num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS,
                          config=SGLangClientConfig(**{**FAST, "max_retries": 2}),
                          weight_sync=WeightSyncSettings(mode="distributed", timeout_s=60)) as engine:
            engine.update_weights(tiny_tensors(server))  # both servers in the group
            proc.kill()
            proc.wait(timeout=30)
            result = engine.generate([[1, 2], [3, 4]], SamplingParams(max_new_tokens=2), samples_per_prompt=2)
            assert not result.failures and engine.last_stats["retries"] >= 1
            engine.update_weights(tiny_tensors(server))
            assert engine.urls == [server.url] and engine.dropped_servers == 1
            assert requests.get(server.url + "/model_info", timeout=10).json()["weight_version"] == "2"
            assert engine.generate([[1, 2]], SamplingParams(max_new_tokens=2)).samples
            assert engine.last_stats["dropped_servers"] == 1.0
    finally:
        proc.kill()


def test_flush_is_refused_while_a_request_runs_and_pause_aborts_it(server):
    """SGLang answers /flush_cache with 400 while requests run or wait; pause_generation's default mode ("abort")
    ends them, so the trainer's pause -> flush order works."""
    import threading

    server.set_faults({"delay_first": 1, "delay_s": 4.0})
    replies = []
    thread = threading.Thread(target=lambda: replies.append(server.post(
        "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}})))
    try:
        thread.start()
        time.sleep(1.0)
        assert requests.get(server.url + "/flush_cache", timeout=10).status_code == 400
        assert server.post("/pause_generation", {}).status_code == 200
        assert requests.get(server.url + "/flush_cache", timeout=10).status_code == 200
        assert server.post("/continue_generation", {}).status_code == 200
        thread.join(timeout=30)
        assert replies[0].json()["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        thread.join(timeout=30)
        server.set_faults({})
