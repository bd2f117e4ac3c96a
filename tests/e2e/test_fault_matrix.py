"""The fault matrix of issue 14 through the CLI (`pretrain_grpo.py`) and the SGLang stand-in: every bad input or
fault ends in the exact one-line error, or is run and counted, within a bounded time, without losing or overwriting
data. The README's "Reliability" table lists the same cases.

- preflight cases: a subprocess each, answered before torch is imported (< 5 s even on a loaded 2-core machine);
- one-process cases: one subprocess (tests/e2e/fault_cases.py) runs them all through `pretrain_grpo.main`;
- multi-process cases: torchrun with 2 ranks (kill -9 of the launcher; rank 0 failing alone).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.distributed.launch import REPO, free_port, subprocess_env

TIME_LIMIT_S = 900  # the one-process cases together; each case's own time is asserted below


def _env(**extra):
    return subprocess_env(OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **extra)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------------------------------------ preflight
@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/missing.yaml"], "error: --config configs/missing.yaml: no such file"),
    (["--config", "configs/demo_tiny.yaml", "--tensor-model-parallel-size", "2", "--sequence-parallel"],
     "error: tensor x pipeline x context parallel = 2 x 1 x 1 needs 2 processes (or a multiple): use torchrun "
     "--nproc-per-node 2 pretrain_grpo.py ..."),
    (["--config", "configs/demo_tiny.yaml", "--prompt-data", "missing.jsonl"],
     "error: --prompt-data missing.jsonl: no such file or directory"),
    (["--hf-checkpoint", "configs", "--task", "copy_last"],
     "error: --hf-checkpoint configs: no config.json there (a Hugging Face checkpoint directory holds config.json, "
     "the tokenizer and *.safetensors)"),
])
def test_preflight_answers_before_the_heavy_imports(argv, message):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "pretrain_grpo.py", *argv], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", message + "\n")
    assert time.perf_counter() - start < 10  # megatron's import alone takes longer


def test_preflight_yaml_typo(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("hf_config: configs/models/qwen3_moe_tiny.json\ntask: copy_last\nroute_fallbak: native\n")
    proc = subprocess.run([sys.executable, "pretrain_grpo.py", "--config", str(config)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: {config}: unknown config keys 'route_fallbak' (did you mean 'route_fallback'?) (keys are flag names "
        f"with '_')\n")


# ------------------------------------------------------------------------------------------------ one process
@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("faults"))
    proc = subprocess.run([sys.executable, "tests/e2e/fault_cases.py", work], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIME_LIMIT_S)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            case = json.loads(line[len("CASE "):])
            results[case["name"]] = case
    assert proc.returncode == 0 and results, proc.stdout[-3000:] + proc.stderr[-5000:]
    results["_work"] = work
    return results


def _one_line(case, message_start: str, code: int = 1) -> str:
    """The case ended with exactly one error line, `error: ...` starting with `message_start`, as the last line of
    its console output (before it at most a few informational lines), and no traceback."""
    assert case["code"] == code, case
    lines = [line for line in case["output"].splitlines() if line.strip()]
    assert _error_lines(case["output"]) == lines[-1:] and len(lines) <= 3, case["output"][-3000:]
    assert lines[-1].startswith("error: " + message_start), case["output"][-3000:]
    assert "Traceback" not in case["output"]
    assert case["seconds"] < 120, case["seconds"]
    return lines[-1]


YAML_ERRORS = {
    "yaml_choice_typo": "route_fallback: invalid choice 'nativ' for --route-fallback (choose from 'raise', 'native')",
    "yaml_policy_typo": "rollout_failure_policy: invalid choice 'skipp' for --rollout-failure-policy (choose from "
                        "'raise', 'skip')",
    "yaml_engine_case": "rollout_engine: invalid choice 'HF' for --rollout-engine (choose from 'hf', 'sglang')",
    "yaml_dtype": "rollout_dtype: invalid choice 'fp16' for --rollout-dtype (choose from 'bf16', 'fp32')",
    "yaml_float_for_int": "seq_length: invalid int value 32.5 for --seq-length",
    "yaml_string_for_switch": "collect_routing_agreement: --collect-routing-agreement is a switch; give true or "
                              "false, not 'no'",
    "yaml_list_for_scalar": "micro_batch_size: --micro-batch-size takes one value, not a list [1, 2]",
}


@pytest.mark.parametrize("name", sorted(YAML_ERRORS))
def test_yaml_values_are_checked_like_flags(cases, name):
    path = os.path.join(cases["_work"], name, "config.yaml.in")
    assert _one_line(cases[name], "") == f"error: {path}: {YAML_ERRORS[name]}"


PARSE_ERRORS = {
    "lr_huge": "--lr 1e+39: the learning rate must be a finite number in (0, 1]",
    "lr_negative": "--lr -1.0: the learning rate must be a finite number in (0, 1]",
    "train_iters_zero": "--train-iters 0: give at least 1 training step",
    "group_size_one": "--grpo-group-size 1: GRPO needs at least 2 samples per prompt (a group of one has advantage 0 "
                      "everywhere and trains nothing)",
    "router_fusion_r3": "--router-replay R3 cannot work with this configuration: - moe_router_fusion=True uses "
                        "TransformerEngine's fused top-k, which never calls the replay hook",
    "router_fusion_off": "--moe-router-fusion needs TransformerEngine, which is not installed; drop the flag",
    "inference_optimized_r3": "--router-replay R3 cannot work with this configuration: - "
                              "transformer_impl='inference_optimized' builds InferenceTopKRouter, which has no replay "
                              "hook",
    "capacity_factor_r3": "--router-replay R3 cannot work with this configuration: - moe_expert_capacity_factor "
                          "drops tokens *after* the replayed top-k, so replayed routes would not be the routes used; "
                          "set it to None (dropless)",
    "megatron_assert": "megatron-core's validate_args rejected the arguments: --hierarchical-context-parallel-sizes "
                       "must be set when a2a+p2p is used in cp comm (arguments.py:",
}


@pytest.mark.parametrize("name", sorted(PARSE_ERRORS))
def test_parse_time_errors_are_one_line_with_the_traceback_in_the_log(cases, name):
    line = _one_line(cases[name], PARSE_ERRORS[name])
    log = os.path.join(cases["_work"], name, "run", "logs", "rank_0.log")
    assert line.endswith(f" (traceback in {log})")
    with open(log) as handle:
        assert "Traceback (most recent call last)" in handle.read()


def test_megatron_flag_the_trainer_ignores_is_refused_before_the_model_is_built(cases):
    _one_line(cases["ignored_megatron_flag"], "--exit-interval 5: not supported by pretrain_grpo.py; stop after N "
                                              "steps with --train-iters N")


def test_help_lists_every_flag(cases):
    case = cases["help"]
    assert case["code"] == 0
    for flag in ("--router-replay", "--moe-paged-stash-buffer-size-factor-cuda", "--max-fallback-fraction",
                 "--min-routing-agreement", "--skip-long-prompts", "--tensor-model-parallel-size"):
        assert flag in case["output"], flag


def test_non_utf8_prompt_file_names_file_and_line(cases):
    path = os.path.join(cases["_work"], "non_utf8_prompts", "prompts.jsonl")
    _one_line(cases["non_utf8_prompts"], f"{path}:2: not UTF-8 text (byte 0xff at column 15); re-encode the file "
                                         f"as UTF-8")


def test_every_too_long_prompt_is_reported_at_start_or_skipped_with_a_count(cases):
    _one_line(cases["long_prompts"], "2 of 8 prompts are longer than --seq-length - --max-new-tokens = 30 tokens: "
                                     "prompts 2 (")
    assert "prompts 2 (80 tokens), 5 (80 tokens); raise --seq-length" in cases["long_prompts"]["output"]
    skipped = cases["long_prompts_skipped"]
    assert skipped["code"] == 0, skipped["output"][-3000:]
    assert ("--skip-long-prompts: dropped 2 of 8 prompts longer than 30 tokens (prompt indices [2, 5])"
            in skipped["output"])


def test_off_mode_runs_sinkhorn(cases):
    case = cases["sinkhorn_off"]  # main: "router replay failed: ... installed route(s) were never used"
    assert case["code"] == 0, case["output"][-3000:]
    assert "iteration        0/       1" in case["output"]


def test_checkpoint_damage_and_a_missing_tracker_never_lose_data(cases):
    results = cases["checkpoints"]
    assert results["first"][0] == 0, results["first"][1][-3000:]
    assert "done: 1 steps; outputs in" in results["first"][1]
    run_dir = os.path.join(cases["_work"], "checkpoints", "run")
    code, text = results["new_run_same_dir"]
    assert code == 1 and _error_lines(text) == [
        f"error: {run_dir}/metrics.jsonl already holds metrics of an earlier run but there is no checkpoint to "
        f"resume; use a new --run-dir, or pass --overwrite-run-dir to start over here (traceback in "
        f"{run_dir}/logs/rank_0.log)"]
    code, text = results["damaged"]
    assert code == 1 and _error_lines(text)[0].startswith(
        f"error: checkpoint step 1 is damaged: {results['damaged_file']}: contents changed since the save (checksum "
        f"mismatch); no older checkpoint verifies"), text[-3000:]
    code, text = results["no_tracker"]
    ckpt = results["ckpt"]
    assert code == 1 and _error_lines(text) == [
        f"error: --save {ckpt} holds checkpoints (steps 1) but no 'latest' tracker file; to resume from the newest, "
        f"write 1 into {ckpt}/latest; to start over, use a new --run-dir / --save (traceback in "
        f"{run_dir}/logs/rank_0.log)"]
    assert results["unchanged"] == []  # metrics.jsonl, config.yaml and the checkpoint are as the first run left them


# the first sample the stand-in serves carries the fault; which prompt it belongs to depends on request order
FAILED_SAMPLE = r"error: rollout failed for prompt \d: 1 of 2 samples failed; first: http://127\.0\.0\.1:\d+: "


def test_standin_neginf_logprob(cases):
    line = _one_line(cases["standin_neginf_logprob"], "rollout failed for prompt ")
    assert re.match(FAILED_SAMPLE + re.escape("output_token_logprobs[0] has logprob -inf (a sampled token's "
                                              "log-probability must be finite and <= 0)"), line), line


def test_standin_routes_as_int(cases):
    line = _one_line(cases["standin_routes_as_int"], "rollout failed for prompt ")
    assert re.match(FAILED_SAMPLE + r"routes of sample 'prompt \d sample \d' on rank 0: "
                    + re.escape("routed_experts must be a base64 string, got int '12345'"), line), line


def test_standin_all_rows_fall_back_fails_the_gate(cases):
    line = _one_line(cases["standin_all_rows_fall_back"], "--max-fallback-fraction: 100.0% of the route rows at "
                                                          "step 0 (")
    assert line.endswith("fell back to native routing, above the bound 1.0%: the engine's routes are unusable, so "
                         f"--router-replay R3 is effectively off (traceback in {cases['_work']}/"
                         f"standin_all_rows_fall_back/run/logs/rank_0.log)")


def test_standin_counted_fallback_is_in_the_metrics_and_the_iteration_line(cases):
    case = cases["standin_counted_fallback"]
    assert case["code"] == 0, case["output"][-3000:]
    metrics = case["metrics"][0]
    assert 0 < metrics["replay/fallback_fraction"] < 1 and metrics["replay/fallback_tokens"] > 0
    assert f"replay/fallback_tokens: {int(metrics['replay/fallback_tokens'])} |" in case["output"]


def test_standin_shifted_routes_fail_the_agreement_gate(cases):
    line = _one_line(cases["standin_shifted_routes"], "--min-routing-agreement: replay/routing_agreement is 0.")
    assert "below the bound 0.6000: the trainer's own top-k rarely picks the replayed experts" in line


def test_standin_healthy_run_passes_both_gates(cases):
    case = cases["standin_healthy"]
    assert case["code"] == 0, case["output"][-3000:]
    metrics = case["metrics"][0]
    assert metrics["replay/fallback_fraction"] == 0.0 and metrics["replay/routing_agreement"] > 0.9


# ------------------------------------------------------------------------------------------------ torchrun
def _torchrun(run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}",
         "pretrain_grpo.py", "--config", "configs/demo_tiny.yaml", "--no-progress", "--run-dir", run_dir, *extra],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_kill_9_of_torchrun_leaves_no_orphan_workers(tmp_path):
    import psutil

    launcher = _torchrun(str(tmp_path / "run"))
    workers = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(workers) < 2:
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "python" in p.name()]
            time.sleep(0.2)
        assert len(workers) == 2
        time.sleep(5)  # the workers arm their parent-death signal first thing (before the heavy imports)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert alive == [], [p.pid for p in alive]  # main: the workers went on training, reparented to init
    finally:
        for worker in workers:
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass


def test_rank_0_failing_alone_is_named_by_the_other_rank(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "config.yaml").mkdir(parents=True)  # only rank 0 writes it: rank 0 fails alone
    proc = _torchrun(str(run_dir), "--train-iters", "1")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0
    cause = f"[Errno 21] Is a directory: '{run_dir}/config.yaml'"
    errors = _error_lines(output)
    assert f"error: {cause} (traceback in {run_dir}/logs/rank_0.log)" in errors, output[-5000:]
    # rank 1 either names rank 0's error or was stopped by torchrun first; never a bare gloo error
    assert all(line.startswith("error: ") and cause in line for line in errors), output[-5000:]
    assert "Connection closed by peer" not in output.replace(f"{run_dir}/logs", "")
