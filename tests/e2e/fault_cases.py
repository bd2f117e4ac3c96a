"""Runs the one-process cases of the fault matrix through `pretrain_grpo.main`, one after another in this process
(the heavy imports are paid once), and prints one `CASE {json}` line per case: exit code, console output, seconds,
and what the case's check of its files found. Used by tests/e2e/test_fault_matrix.py:

    python tests/e2e/fault_cases.py WORK_DIR [CASE ...]
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, REPO)

TINY = ["--config", "configs/demo_tiny.yaml", "--grpo-prompts-per-step", "4", "--grpo-group-size", "2",
        "--global-batch-size", "8", "--micro-batch-size", "8", "--max-new-tokens", "2", "--no-progress",
        "--train-iters", "1"]
MINIMAL_YAML = "hf_config: configs/models/qwen3_moe_tiny.json\ntask: copy_last\nreward_fn: synthetic\n"


def _digest(path: str) -> dict:
    """{relative path: sha256} of every file under `path` (to show that nothing was overwritten)."""
    out = {}
    for parent, _, names in os.walk(path):
        for name in names:
            full = os.path.join(parent, name)
            with open(full, "rb") as handle:
                out[os.path.relpath(full, path)] = hashlib.sha256(handle.read()).hexdigest()
    return out


class Case:
    def __init__(self, work: str, name: str):
        self.work, self.name = work, name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)

    def yaml(self, text: str) -> str:
        path = os.path.join(self.dir, "config.yaml.in")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def run_dir(self) -> str:
        return os.path.join(self.dir, "run")


def run_main(argv: list[str]) -> tuple[int, str]:
    import pretrain_grpo

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = pretrain_grpo.main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as error:  # noqa: BLE001 - an unexpected error is a result of the case too
            print(f"UNEXPECTED {type(error).__name__}: {error}")
            code = -1
    return code, out.getvalue()


# ------------------------------------------------------------------------------------------------ the cases
def yaml_case(text: str, *extra: str):
    def case(c: Case):
        return run_main(["--config", c.yaml(MINIMAL_YAML + text), "--run-dir", c.run_dir(), *extra]), {}
    return case


def cli_case(*extra: str):
    def case(c: Case):
        return run_main([*TINY, "--run-dir", c.run_dir(), *extra]), {}
    return case


def non_utf8_prompts(c: Case):
    path = os.path.join(c.dir, "prompts.jsonl")
    with open(path, "wb") as handle:
        handle.write(b'{"prompt": "1 2", "answer": "2"}\n{"prompt": "3 \xff", "answer": "4"}\n')
    argv = [*TINY, "--task", "", "--prompt-data", path, "--tokenizer-dir", _tokenizer_dir(c), "--reward-fn",
            "exact_match", "--run-dir", c.run_dir()]
    return run_main(argv), {}


def _tokenizer_dir(c: Case) -> str:
    from megatron_r3.train.tasks import build_demo_tokenizer

    path = os.path.join(c.work, "tokenizer")
    if not os.path.isdir(path):
        build_demo_tokenizer().save_pretrained(path)
    return path


def long_prompts(skip: bool):
    def case(c: Case):
        path = os.path.join(c.dir, "prompts.jsonl")
        with open(path, "w") as handle:
            for index in range(8):
                digits = " ".join(["1"] * (40 if index in (2, 5) else 3))
                handle.write(json.dumps({"prompt": digits, "answer": "1"}) + "\n")
        argv = [*TINY, "--task", "", "--prompt-data", path, "--tokenizer-dir", _tokenizer_dir(c), "--reward-fn",
                "exact_match", "--run-dir", c.run_dir(), *(["--skip-long-prompts"] if skip else [])]
        return run_main(argv), {}
    return case


def checkpoint_cases(c: Case):
    """One run with a checkpoint, then: metrics.jsonl of a new run, a damaged checkpoint, a deleted tracker."""
    run_dir = c.run_dir()
    first = run_main([*TINY, "--run-dir", run_dir, "--save-interval", "1"])
    results = {"first": list(first)}
    before = _digest(run_dir)
    # a new run into the same run dir without a checkpoint (another --save) must not overwrite metrics.jsonl
    results["new_run_same_dir"] = list(run_main([*TINY, "--run-dir", run_dir, "--save",
                                                 os.path.join(c.dir, "other_ckpt")]))
    # 4 KiB overwritten inside the .distcp file
    ckpt = os.path.join(run_dir, "checkpoints")
    damaged = os.path.join(c.dir, "damaged")
    shutil.copytree(ckpt, damaged)
    distcp = [name for name in os.listdir(os.path.join(damaged, "step_0000001")) if name.endswith(".distcp")][0]
    with open(os.path.join(damaged, "step_0000001", distcp), "r+b") as handle:
        handle.seek(4096)
        handle.write(b"\x7f" * 4096)
    results["damaged"] = list(run_main([*TINY, "--train-iters", "2", "--run-dir", os.path.join(c.dir, "resume"),
                                        "--load", damaged, "--save", os.path.join(c.dir, "resume_ckpt")]))
    results["damaged_file"] = os.path.join(damaged, "step_0000001", distcp)
    # the tracker deleted: refuse instead of restarting from step 0 over the run's outputs
    os.remove(os.path.join(ckpt, "latest"))
    results["no_tracker"] = list(run_main([*TINY, "--train-iters", "2", "--run-dir", run_dir]))
    after = _digest(run_dir)
    # every output of the first run is as it was (the log files only grow: each run appends its own lines)
    results["unchanged"] = sorted(k for k in before if k != "checkpoints/latest" and not k.startswith("logs/")
                                  and before[k] != after.get(k))
    results["ckpt"] = ckpt
    return (0, ""), results


STANDIN = {}


def standin_case(faults: dict, *extra: str):
    def case(c: Case):
        from tests.sglang_standin import start_in_thread

        if "server" not in STANDIN:
            STANDIN["server"] = start_in_thread("configs/models/qwen3_moe_tiny.json",
                                                enable_return_routed_experts=True)
        server = STANDIN["server"]
        server.set_faults(faults)
        argv = [*TINY, "--run-dir", c.run_dir(), "--rollout-engine", "sglang", "--sglang-url", server.url,
                "--weight-sync", "disk", "--weight-sync-dir", os.path.join(c.dir, "weights"), "--router-replay",
                "R3", "--sglang-max-retries", "0", *extra]
        code, text = run_main(argv)
        metrics = []
        path = os.path.join(c.run_dir(), "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as handle:
                metrics = [json.loads(line) for line in handle if line.strip()]
        return (code, text), {"metrics": metrics}
    return case


CASES = {
    # YAML values through their flag's type and choices (14.6)
    "yaml_choice_typo": yaml_case("route_fallback: nativ\n"),
    "yaml_policy_typo": yaml_case("rollout_failure_policy: skipp\n"),
    "yaml_engine_case": yaml_case("rollout_engine: HF\n"),
    "yaml_dtype": yaml_case("rollout_dtype: fp16\n"),
    "yaml_float_for_int": yaml_case("seq_length: 32.5\n"),
    "yaml_string_for_switch": yaml_case('collect_routing_agreement: "no"\n'),
    "yaml_list_for_scalar": yaml_case("micro_batch_size: [1, 2]\n"),
    # unhelpful crashes (14.10) and parse-time config checks (14.9)
    "lr_huge": cli_case("--lr", "1e39"),
    "lr_negative": cli_case("--lr", "-1"),
    "train_iters_zero": cli_case("--train-iters", "0"),
    "group_size_one": cli_case("--grpo-group-size", "1", "--global-batch-size", "4"),
    "router_fusion_r3": cli_case("--moe-router-fusion", "--router-replay", "R3"),
    "router_fusion_off": cli_case("--moe-router-fusion"),
    "inference_optimized_r3": cli_case("--transformer-impl", "inference_optimized", "--router-replay", "R3"),
    "capacity_factor_r3": cli_case("--moe-expert-capacity-factor", "1.0", "--router-replay", "R3"),
    "megatron_assert": cli_case("--cp-comm-type", "a2a+p2p"),
    "ignored_megatron_flag": cli_case("--exit-interval", "5"),
    "help": lambda c: (run_main(["--help"]), {}),
    # runs that stop early with one line, or run what they can
    "non_utf8_prompts": non_utf8_prompts,
    "long_prompts": long_prompts(skip=False),
    "long_prompts_skipped": long_prompts(skip=True),
    "sinkhorn_off": cli_case("--moe-router-load-balancing-type", "sinkhorn"),
    "checkpoints": checkpoint_cases,
    # through the SGLang stand-in (R3)
    "standin_neginf_logprob": standin_case({"neginf_logprob_first": 1}),
    "standin_routes_as_int": standin_case({"routes_as_int_first": 1}),
    "standin_all_rows_fall_back": standin_case({"duplicate_ids_first": 1000}, "--route-fallback", "native"),
    "standin_counted_fallback": standin_case({"duplicate_ids_first": 1}, "--route-fallback", "native",
                                             "--max-fallback-fraction", "1"),
    "standin_shifted_routes": standin_case({"shift_routes_first": 1000}),
    "standin_healthy": standin_case({}),
}


def main(work: str, names: list[str]) -> None:
    os.chdir(REPO)
    os.makedirs(work, exist_ok=True)
    for name in names or list(CASES):
        start = time.perf_counter()
        (code, text), extra = CASES[name](Case(work, name))
        print("CASE " + json.dumps({"name": name, "code": code, "output": text, "seconds":
                                    time.perf_counter() - start, **extra}), flush=True)
    if "server" in STANDIN:
        STANDIN["server"].shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
