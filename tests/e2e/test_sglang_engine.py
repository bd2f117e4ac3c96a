"""The SGLang rollout backend against the protocol stand-in (tests/sglang_standin) on CPU.

What it shows:
- the client returns exactly what the embedded engine samples (tokens, logprobs, routes) for the same request;
- every injected fault ends in a retry that succeeds or a clear per-prompt failure, nothing is lost and nothing hangs
  (5xx, 4xx, timeouts, dropped connections, aborts, truncated base64, wrong row counts, missing routes, dead server);
- `--rollout-failure-policy skip` trains on the served prompts and reports the failed/trimmed ones;
- through the CLI and tools/launch_sglang.py --standin: GRPO with R3 via `--rollout-engine sglang` logs the same
  metrics as the hf engine with the same seed for the first two steps (only possible if the trainer's weight sync
  reaches the servers before the first rollout and after the first step);
- after each training step the servers generate with exactly the trainer's exported weights (greedy logprobs of a
  fixed prompt via /generate == the embedded engine loaded with the export), through the distributed path and the
  disk path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_r3.rollout.base import SamplingParams
from megatron_r3.rollout.engines.sglang.engine import SGLangClientConfig, SGLangConfigError, SGLangEngine
from tests.distributed.launch import REPO, free_port, subprocess_env
from tests.sglang_standin import start_in_thread

TINY = os.path.join(REPO, "configs", "models", "qwen3_moe_tiny.json")
LAYERS, TOPK, EXPERTS, VOCAB = 4, 2, 8, 64
PROMPTS = [[1, 4, 5, 6], [1, 7, 8], [1, 9, 10, 11, 12], [1, 13]]
FAST = dict(request_timeout_s=30.0, connect_timeout_s=2.0, control_timeout_s=10.0, max_retries=2,
            retry_backoff_s=0.01, startup_timeout_s=10.0)


def make_engine(urls, require_routes=True, **overrides) -> SGLangEngine:
    config = SGLangClientConfig(**{**FAST, **overrides})
    return SGLangEngine(urls if isinstance(urls, list) else [urls], num_layers=LAYERS, topk=TOPK,
                        num_experts=EXPERTS, vocab_size=VOCAB, config=config, require_routes=require_routes)


@pytest.fixture(scope="module")
def server():
    srv = start_in_thread(TINY, enable_return_routed_experts=True)
    yield srv
    srv.shutdown()


@pytest.fixture
def standin(server):
    server.set_faults({})
    yield server
    server.set_faults({})


def sampling(max_new_tokens=3, seed=7):
    return SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)


def check_complete(result, num_prompts=len(PROMPTS), group=2):
    """Every prompt is either fully served or reported failed; none vanish."""
    served = [s.prompt_index for s in result.samples]
    failed = [f.prompt_index for f in result.failures]
    assert sorted(set(served) | set(failed)) == list(range(num_prompts))
    assert not set(served) & set(failed)
    for prompt in set(served):
        assert served.count(prompt) == group
    assert served == sorted(served)  # grouped by prompt, in prompt order
    for sample in result.samples:
        assert sample.routes.num_rows == sample.tokens.shape[0] - 1
        assert sample.tokens[: sample.prompt_length].tolist() == PROMPTS[sample.prompt_index]


# ------------------------------------------------------------------------------------------------ plain generation
def test_batch_request_reproduces_the_embedded_engine(standin):
    from transformers import AutoModelForCausalLM

    from megatron_r3.rollout.engines.hf import HFRolloutEngine

    torch.manual_seed(0)  # the stand-in's initial weights: seed 0, from_config
    model = AutoModelForCausalLM.from_config(standin.hf_config, dtype=torch.float32)
    local = HFRolloutEngine(model, dtype="bfloat16", max_batch_size=1024, progress=False)
    expected = local.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
    with make_engine(standin.url, request_size=0) as engine:
        got = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
        assert engine.last_stats["requests"] == 1
    check_complete(got)
    for a, b in zip(expected.samples, got.samples):
        assert torch.equal(a.tokens, b.tokens) and a.finish_reason == b.finish_reason
        assert torch.equal(a.response_logprobs, b.response_logprobs)
        assert torch.equal(a.routes.expert_ids, b.routes.expert_ids) and b.routes.source == "sglang"


def test_one_request_per_sample_is_seeded_per_sample(standin):
    with make_engine(standin.url, max_concurrency=3) as engine:
        first = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
        again = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
        assert engine.last_stats["requests"] == 8 and engine.last_stats["retries"] == 0
    check_complete(first)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(first.samples, again.samples))  # same seeds
    stats = standin.stats
    assert stats["samples"] >= 16


# ------------------------------------------------------------------------------------------------ faults
@pytest.mark.parametrize("fault", [
    {"http_500_first": 2},
    {"drop_connection_first": 2},
    {"abort_first": 2},
    {"delay_first": 1, "delay_s": 1.0},
])
def test_transient_faults_are_retried(standin, fault):
    standin.set_faults(fault)
    overrides = {"request_timeout_s": 0.4} if "delay_first" in fault else {}
    start = time.monotonic()
    with make_engine(standin.url, max_concurrency=1, **overrides) as engine:
        result = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
        retries = engine.last_stats["retries"]
    check_complete(result)
    assert not result.failures and len(result.samples) == 8
    assert retries == (1 if "delay_first" in fault else 2)
    assert time.monotonic() - start < 20
    time.sleep(fault.get("delay_s", 0))  # let the abandoned slow reply finish before the next test


def test_5xx_beyond_the_retry_budget_fails_the_prompt(standin):
    standin.set_faults({"http_500_first": 3})  # request 0 and its 2 retries
    with make_engine(standin.url, max_concurrency=1) as engine:
        result = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
    check_complete(result)
    assert [f.prompt_index for f in result.failures] == [0]
    assert "after 3 attempts" in result.failures[0].reason and "HTTP 500" in result.failures[0].reason
    assert len(result.samples) == 6


def test_4xx_is_reported_at_once_not_retried(standin):
    standin.set_faults({"http_400_first": 1})
    with make_engine(standin.url, max_concurrency=1) as engine:
        result = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
        assert engine.last_stats["retries"] == 0
    check_complete(result)
    assert [f.prompt_index for f in result.failures] == [0] and "HTTP 400" in result.failures[0].reason
    assert standin.stats["generate_requests"] == 8  # 8 samples, no retry


@pytest.mark.parametrize("fault,text", [
    ("truncate_routes_first", "not valid base64"),
    ("wrong_rows_first", "rows, expected seqlen - 1 - start_len"),
])
def test_bad_routes_fail_the_sample_with_the_route_error(standin, fault, text):
    standin.set_faults({fault: 1})
    with make_engine(standin.url, max_concurrency=1) as engine:
        result = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
    check_complete(result)
    assert [f.prompt_index for f in result.failures] == [0]
    assert text in result.failures[0].reason and "routes of sample 'prompt 0 sample 0'" in result.failures[0].reason
    assert standin.stats["generate_requests"] == 8


def test_missing_routes_is_a_clear_configuration_error(standin):
    standin.set_faults({"omit_routes_first": 1})
    with make_engine(standin.url, max_concurrency=1) as engine:
        with pytest.raises(SGLangConfigError, match="--enable-return-routed-experts"):
            engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)


def test_server_without_the_routes_flag():
    plain = start_in_thread(TINY)  # like SGLang without --enable-return-routed-experts
    try:
        with pytest.raises(SGLangConfigError, match="enable_return_routed_experts=false"):
            make_engine(plain.url)  # found at start-up through /get_server_info
        with make_engine(plain.url, require_routes=False) as engine:
            assert engine.generate(PROMPTS[:1], sampling(), return_routes=False).samples[0].routes is None
            with pytest.raises(SGLangConfigError, match="--enable-return-routed-experts"):
                engine.generate(PROMPTS[:1], sampling(), return_routes=True)  # silently omitted -> raised
    finally:
        plain.shutdown()


def test_dead_server_fails_fast_without_hanging():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SGLangConfigError, match="not healthy"):
        make_engine(url, startup_timeout_s=1.0)
    engine = SGLangEngine([url], num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS,
                          config=SGLangClientConfig(**{**FAST, "max_retries": 1}), wait_for_health=False)
    result = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
    engine.close()
    check_complete(result)
    assert len(result.failures) == 4 and "ConnectionError" in result.failures[0].reason
    assert time.monotonic() - start < 20


def test_retries_move_to_the_next_server(standin):
    other = start_in_thread(TINY, enable_return_routed_experts=True)
    try:
        other.set_faults({"http_500_first": 100})  # a broken second server
        with make_engine([standin.url, other.url], max_retries=1) as engine:
            result = engine.generate(PROMPTS, sampling(), samples_per_prompt=2, return_routes=True)
        check_complete(result)
        assert not result.failures
        assert other.stats["generate_requests"] == 4 and standin.stats["generate_requests"] == 8
    finally:
        other.shutdown()


def test_skip_policy_trains_on_the_rest(standin, capsys):
    from megatron_r3.train.rewards import get_reward_fn
    from megatron_r3.train.rollout_phase import RolloutSettings, generate_batch
    from megatron_r3.train.tasks import build_demo_tokenizer, make_synthetic_dataset

    tokenizer = build_demo_tokenizer()
    records = make_synthetic_dataset("copy_last", 4, 0)
    prompt_ids = [tokenizer.encode(r.prompt) for r in records]
    settings = RolloutSettings(sampling=sampling(), group_size=2, return_routes=True,
                               moe_layers=(False, True, True, True), topk=TOPK, route_fallback="raise",
                               failure_policy="skip", global_batch_size=4)
    standin.set_faults({"http_400_first": 1})
    with make_engine(standin.url, max_concurrency=1) as engine:
        payload = generate_batch(engine, prompt_ids, records, tokenizer, get_reward_fn("synthetic"), settings)
    assert payload.error is None
    # counted in metrics.jsonl: a 4xx is not retried; no server was dropped
    assert payload.metrics["rollout/http_retries"] == 0.0 and payload.metrics["rollout/dropped_servers"] == 0.0
    assert payload.metrics["rollout/failed_prompts"] == 1.0 and payload.metrics["rollout/trimmed_prompts"] == 1.0
    assert len(payload.samples) == 4 and payload.metrics["rollout/samples"] == 4.0
    assert "1 of 4 prompts failed and were skipped" in capsys.readouterr().out
    standin.set_faults({"http_500_first": 1})  # one 5xx, retried: counted in metrics.jsonl
    with make_engine(standin.url, max_concurrency=1) as engine:
        payload = generate_batch(engine, prompt_ids, records, tokenizer, get_reward_fn("synthetic"), settings)
    assert payload.error is None and payload.metrics["rollout/http_retries"] == 1.0
    standin.set_faults({"http_400_first": 1})
    with make_engine(standin.url, max_concurrency=1) as engine:  # the default policy raises (on every rank)
        settings.failure_policy = "raise"
        payload = generate_batch(engine, prompt_ids, records, tokenizer, get_reward_fn("synthetic"), settings)
    assert payload.error and "HTTP 400" in payload.error


# ------------------------------------------------------------------------------------------------ multi-turn
def test_start_len_rows_match_the_embedded_engine(standin):
    """The same request with routed_experts_start_len: the stand-in (rows cut by SGLang's own get_topk) and the
    embedded engine's capture return the same rows, start_row and ids."""
    from transformers import AutoModelForCausalLM

    from megatron_r3.rollout.engines.hf import HFRolloutEngine

    torch.manual_seed(0)  # the stand-in's initial weights: seed 0, from_config
    model = AutoModelForCausalLM.from_config(standin.hf_config, dtype=torch.float32)
    local = HFRolloutEngine(model, dtype="bfloat16", max_batch_size=1024, progress=False)
    contexts, starts = [[1, 4, 5, 6, 9], [1, 7, 8, 9, 10]], [3, 3]
    expected = local.generate(contexts, sampling(), samples_per_prompt=2, return_routes=True, routes_start_len=starts)
    before = standin.stats["start_len_requests"]
    with make_engine(standin.url, request_size=0) as engine:
        got = engine.generate(contexts, sampling(), samples_per_prompt=2, return_routes=True, routes_start_len=starts)
        assert engine.last_stats["requests"] == 1
    assert standin.stats["start_len_requests"] == before + 1
    for a, b in zip(expected.samples, got.samples):
        assert torch.equal(a.tokens, b.tokens)
        assert a.routes.start_row == b.routes.start_row == 3 and b.routes.end_row == b.tokens.shape[0] - 1
        assert torch.equal(a.routes.expert_ids, b.routes.expert_ids)


def test_multiturn_conversations_through_the_standin(standin):
    from megatron_r3.replay.routes import validate_routes
    from megatron_r3.rollout.multiturn import generate_multiturn

    before = standin.stats["start_len_requests"]
    with make_engine(standin.url, max_concurrency=2) as engine:
        result = generate_multiturn(engine, PROMPTS, sampling(), samples_per_prompt=2, return_routes=True,
                                    num_turns=2, tool=lambda i, turn, ids: [40, 41 + i])
    check_complete(result)
    assert standin.stats["start_len_requests"] == before + 8  # every second turn asked only for its new rows
    moe = tuple(i > 0 for i in range(LAYERS))  # the tiny config's layer 0 is dense
    for sample in result.samples:
        assert sample.response_mask.tolist().count(False) == 2
        assert sample.response_ids[~sample.response_mask].tolist() == [40, 41 + sample.prompt_index]
        validate_routes(sample.routes, num_tokens=sample.tokens.shape[0], moe_layers=moe, topk=TOPK, sample_id=0)


def test_a_start_len_beyond_the_input_is_refused_with_sglangs_message(standin):
    import requests

    body = {"input_ids": [1, 4, 5], "sampling_params": {"max_new_tokens": 1}, "return_routed_experts": True,
            "routed_experts_start_len": 4}
    reply = requests.post(standin.url + "/generate", json=body, timeout=30)
    assert reply.status_code == 400
    assert ("recv_req.routed_experts_start_len=4 is higher than the number of input tokens "
            "len(req.origin_input_ids)=3. Please use a smaller routed_experts_start_len.") in reply.text
    body["routed_experts_start_len"] = -1
    reply = requests.post(standin.url + "/generate", json=body, timeout=30)
    assert reply.status_code == 400 and "is lower than 0. Please use a non-negative" in reply.text


# ------------------------------------------------------------------------------------------------ through the CLI
SMALL = ["--config", "configs/demo_tiny.yaml", "--grpo-prompts-per-step", "8", "--grpo-group-size", "4",
         "--global-batch-size", "16", "--micro-batch-size", "4", "--max-new-tokens", "3", "--no-progress",
         "--router-replay", "R3", "--train-iters", "2"]


def _env():
    return subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module", autouse=True)
def launcher(tmp_path_factory):
    """tools/launch_sglang.py --standin with two servers, started with the module's first test so that the
    servers boot while the in-process tests run; `launched` waits for them."""
    root = tmp_path_factory.mktemp("sglang")
    address_dir = root / "addresses"
    address_dir.mkdir()
    log = open(root / "launcher.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "tools/launch_sglang.py", "--standin", "--model-path", "configs/models/qwen3_moe_tiny.json",
         "--num-servers", "2", "--base-port", "0", "--address-file", f"{address_dir}/", "--wait-timeout", "150"],
        cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    yield {"root": root, "address_dir": address_dir, "proc": proc}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    text = (root / "launcher.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert not [f for f in os.listdir(address_dir) if f.endswith(".txt")]  # the address file goes with the servers
    pids = [int(line.split("(pid ")[1].split(")")[0]) for line in text.splitlines() if "(pid " in line]
    assert len(pids) == 2
    for pid in pids:  # the launcher stopped (and reaped) its servers
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.fixture(scope="module")
def launched(launcher):
    root, address_dir, proc = launcher["root"], launcher["address_dir"], launcher["proc"]
    deadline = time.monotonic() + 180
    files = []
    while time.monotonic() < deadline and proc.poll() is None:
        files = [f for f in os.listdir(address_dir) if f.endswith(".txt")]
        if files:
            break
        time.sleep(0.2)
    if not files:
        proc.kill()
        raise AssertionError("launch_sglang.py --standin did not write its address file:\n"
                             + (root / "launcher.log").read_text()[-3000:])
    return {"root": str(root), "addresses": str(address_dir), "proc": proc}


def _read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_launcher_writes_addresses_and_cleans_up(launched):
    from megatron_r3.rollout.engines.sglang.protocol import read_address_file

    urls = read_address_file(launched["addresses"])
    assert len(urls) == 2 and all(url.startswith("http://127.0.0.1:") for url in urls)
    assert launched["proc"].poll() is None  # supervising


def test_grpo_r3_through_sglang_matches_the_hf_engine(launched):
    root = launched["root"]
    runs = {}
    procs = {}
    for name, extra in (("hf", []), ("sglang", ["--rollout-engine", "sglang", "--sglang-address-file",
                                               launched["addresses"], "--sglang-request-size", "0",
                                               "--weight-sync-timeout", "60"])):
        run_dir = os.path.join(root, name)
        runs[name] = run_dir
        procs[name] = subprocess.Popen([sys.executable, "pretrain_grpo.py", *SMALL, "--run-dir", run_dir, *extra],
                                       cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{outputs[name][-5000:]}"
    assert "rollout engine: SGLang at" in outputs["sglang"]
    hf, sg = _read_metrics(runs["hf"]), _read_metrics(runs["sglang"])
    assert [m["step"] for m in hf] == [m["step"] for m in sg] == [0, 1]
    compared = 0
    for a, b in zip(hf, sg):
        for key, value in a.items():
            if key.startswith(("timing/", "throughput/")):
                continue
            assert b[key] == value, (a["step"], key, value, b[key])
            compared += 1
    assert compared > 40 and sg[1]["rollout/failed_prompts"] == 0.0


def test_multiturn_task_replays_stitched_routes_exactly(launched):
    """tool_echo (two turns, a tool reply inserted between them) through the CLI on the embedded engine and on the
    stand-in servers: R3 replays the stitched routes on every token (used_route_match 1.0) and the first update sees
    the old-logprob pass's numbers (ppo_kl_first_minibatch 0)."""
    import requests

    from megatron_r3.rollout.engines.sglang.protocol import read_address_file

    urls = read_address_file(launched["addresses"])
    before = sum(requests.get(url + "/standin/stats", timeout=10).json()["start_len_requests"] for url in urls)
    procs = {}
    for name, extra in (("mt_hf", []), ("mt_sglang", ["--rollout-engine", "sglang", "--sglang-address-file",
                                                     launched["addresses"], "--weight-sync-timeout", "60"])):
        procs[name] = subprocess.Popen(
            [sys.executable, "pretrain_grpo.py", *SMALL, "--task", "tool_echo", "--max-new-tokens", "2",
             "--run-dir", os.path.join(launched["root"], name), *extra],
            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} run failed:\n{outputs[name][-5000:]}"
        metrics = _read_metrics(os.path.join(launched["root"], name))
        assert [m["step"] for m in metrics] == [0, 1]
        for m in metrics:
            assert m["replay/used_route_match"] == 1.0, (name, m["step"])
            assert m["train/ppo_kl_first_minibatch"] == 0.0, (name, m["step"])
            assert m["rollout/response_length_mean"] >= 5  # two answers and the 3-token tool reply
    after = sum(requests.get(url + "/standin/stats", timeout=10).json()["start_len_requests"] for url in urls)
    assert after - before == 2 * 32  # each step's 32 second turns asked only for their new rows


def sync_check_main(address_dir: str, run_dir: str, disk_dir: str, out: str) -> None:
    """Subprocess body, on 2 ranks (TP2: every rank walks the export, rank 0 alone talks to the servers): a real
    trainer (GRPOTrainer) on the stand-ins; after each step the servers' greedy logprobs of a fixed prompt must equal
    those of the embedded engine loaded with the trainer's export."""
    import dataclasses

    import requests
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from megatron_r3.model.weights import export_hf_weights
    from megatron_r3.platform.distributed import initialize_torch_distributed
    from megatron_r3.rollout.engines.hf import HFRolloutEngine
    from megatron_r3.train.arguments import parse_grpo_args
    from megatron_r3.train.trainer import GRPOTrainer

    args = parse_grpo_args([*SMALL, "--run-dir", run_dir, "--rollout-engine", "sglang", "--sglang-address-file",
                            address_dir, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--weight-sync-timeout", "60"])
    initialize_torch_distributed()
    rank = dist.get_rank()
    trainer = GRPOTrainer(args)
    setup, engine = trainer.setup, trainer.setup.engine
    assert (engine is not None) == (rank == 0)
    probe = [1, 4, 5, 6, 7]

    def on_servers():
        if rank != 0:
            return None
        out = []
        for url in engine.urls:
            body = requests.post(url + "/generate", json={
                "input_ids": probe, "sampling_params": {"temperature": 0.0, "max_new_tokens": 4},
                "return_logprob": True}, timeout=30).json()
            out.append([[lp, tok] for lp, tok, _ in body["meta_info"]["output_token_logprobs"]])
        return out

    def from_export():
        # every rank walks the export
        tensors = {name: tensor for name, tensor in export_hf_weights(setup.chunks, setup.arch, setup.parallel)}
        if rank != 0:
            return None
        model = AutoModelForCausalLM.from_config(args.hf_model_config, dtype=torch.float32)
        local = HFRolloutEngine(model, state_dict=tensors, dtype="bfloat16", progress=False)
        sample = local.generate([probe], SamplingParams(temperature=0.0, max_new_tokens=4)).samples[0]
        return [[lp, tok] for lp, tok in zip(sample.response_logprobs.tolist(), sample.response_ids.tolist())]

    records = [{"stage": "initial", "servers": on_servers(), "export": from_export()}]
    trainer.train_step()  # distributed sync at the end
    trainer.step += 1
    records.append({"stage": "step0-distributed", "servers": on_servers(), "export": from_export()})
    if engine is not None:
        engine.weight_sync = dataclasses.replace(engine.weight_sync, mode="disk", directory=disk_dir)
    setup.engine_setup = dataclasses.replace(  # what the other ranks' settings come from
        setup.engine_setup, config=dataclasses.replace(setup.engine_setup.config, weight_sync="disk",
                                                       weight_sync_dir=disk_dir))
    trainer.train_step()  # disk sync at the end
    trainer.step += 1
    records.append({"stage": "step1-disk", "servers": on_servers(), "export": from_export()})
    if rank == 0:
        versions = [requests.get(url + "/model_info", timeout=10).json()["weight_version"]
                    for url in engine.urls]
    # a server that refuses the update (here: a weight-update session is already open on server 0): every trainer
    # rank fails promptly with the server's message, never after the group timeout (60 s)
    from megatron_r3.rollout.engines.sglang.weight_sync import WeightSyncError

    if engine is not None:
        engine.weight_sync = dataclasses.replace(engine.weight_sync, mode="distributed")
        requests.post(engine.urls[0] + "/begin_weight_update", json={}, timeout=10).raise_for_status()
    setup.engine_setup = dataclasses.replace(
        setup.engine_setup, config=dataclasses.replace(setup.engine_setup.config, weight_sync="distributed"))
    start = time.monotonic()
    try:
        setup.sync_weights_to_engine()
        refused = None
    except WeightSyncError as error:
        refused = str(error)
    refusals: list = [None] * dist.get_world_size()
    dist.all_gather_object(refusals, {"seconds": time.monotonic() - start, "error": refused})
    if engine is not None:
        requests.post(engine.urls[0] + "/end_weight_update", json={}, timeout=10)
    setup.close()
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"records": records, "versions": versions, "disk": sorted(os.listdir(disk_dir)),
                       "refusals": refusals}, handle)
    dist.barrier()


def test_servers_use_the_weights_pushed_after_each_step(launched, tmp_path):
    out = tmp_path / "sync.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
           "-m", "tests.e2e.test_sglang_engine", launched["addresses"], str(tmp_path / "run"),
           str(tmp_path / "disk"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    records = result["records"]
    for record in records:
        for server in record["servers"]:  # both servers, exactly the export's greedy logprobs
            assert server == record["export"], record["stage"]
    assert records[0]["export"] != records[1]["export"] != records[2]["export"]  # every step changed the weights
    assert result["versions"] == ["3", "3"]  # initial sync, after step 0, after step 1
    assert result["disk"] == ["weights-v3"]  # atomic versioned directory, older ones removed
    for refusal in result["refusals"]:  # every rank, promptly, with the server's message
        assert refusal["error"] and "a weight-update session is already open" in refusal["error"], refusal
        assert refusal["seconds"] < 30, refusal


def test_update_weights_from_this_process(launched, tmp_path):
    """`SGLangEngine.update_weights(named HF tensors)` (the engine interface, one process) on both paths."""
    from megatron_r3.rollout.engines.hf import HFRolloutEngine
    from megatron_r3.rollout.engines.sglang.protocol import read_address_file
    from megatron_r3.rollout.engines.sglang.weight_sync import WeightSyncSettings
    from tests.sglang_standin.server import load_hf_config

    config = load_hf_config(TINY)
    probe = SamplingParams(temperature=0.0, max_new_tokens=3)
    urls = read_address_file(launched["addresses"])
    for seed, settings in ((11, WeightSyncSettings(mode="distributed", timeout_s=60, bucket_bytes=64 * 1024)),
                           (12, WeightSyncSettings(mode="disk", directory=str(tmp_path / "disk"), timeout_s=60))):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        local = HFRolloutEngine(model, dtype="bfloat16", progress=False)
        tensors = [(name, param.detach().clone()) for name, param in model.state_dict().items()]
        local.update_weights(tensors)
        want = local.generate([PROMPTS[0]], probe).samples[0]
        with SGLangEngine(urls, num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS, vocab_size=VOCAB,
                          config=SGLangClientConfig(**FAST), weight_sync=settings, hf_config=config) as engine:
            engine.update_weights(tensors)
            got = engine.generate([PROMPTS[0]], probe, samples_per_prompt=2)
        for sample in got.samples:  # both servers (requests go round-robin)
            assert torch.equal(sample.tokens, want.tokens)
            assert torch.equal(sample.response_logprobs, want.response_logprobs), settings.mode


if __name__ == "__main__":  # the 2-rank trainer of test_servers_use_the_weights_pushed_after_each_step
    sync_check_main(*sys.argv[1:5])
