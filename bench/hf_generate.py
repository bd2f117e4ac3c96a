"""Generation throughput of the embedded hf rollout engine: its first loop (DynamicCache, finished sequences retired
with a host sync per token) vs the fixed-shape loop of megatron_r3/rollout/hf_generate.py (StaticCache, sampling and
stop checks on the device), and that loop with its decode forward in a CUDA graph (CUDA only); then a greedy check
that decides whether the graph arm differs from the static loop by rounding only or by a bug.

    python bench/hf_generate.py --device cpu                       # tiny model (configs/models/qwen3_moe_tiny.json)
    python bench/hf_generate.py --device cuda --json out.json      # ~1B model (configs/models/qwen3_moe_1b_bench.json)

Throughput table. One engine (randomly initialised model, --dtype, routes captured as R3 needs them) and the same
call per arm: --batch sequences of --prompt-tokens random tokens (one batch: the GRPO bench's 16 prompts x 8 samples),
--new-tokens each, temperature 1 and no stop token, so every arm generates the same number of tokens. Arms are
interleaved over --repeats rounds after one warm-up call each; the table gives the best and median tokens/s, the wall
time per generated position (one decode step of the batch), where the best call's time went (setup: prompt checks
and host-side preparation up to the prefill forward; prefill: that forward and the first draw; decode: the rest,
timed with CUDA events at the start of the first two model forwards, so no sync is added) and the speed-up of the
best over the first loop's best. "same tokens" is the fraction of samples whose tokens equal the first loop's.
"= static" is the fraction whose tokens, logprobs and routes equal the static loop's bitwise: 1 only if the graph
replays the very kernels the eager forward runs; on a GPU it need not (the check table says why it is not).
"host reads" counts the Python-level tensor reads (.item(), .tolist(), bool/int/float/index of a tensor; each a
device sync on a GPU) of one extra, untimed call, the engine's prompt checks included; C++-internal syncs
(torch.multinomial checks its input with two per draw) are not seen by this count.

Check table (--checks). Pairs of loops on the same prompts: "graph vs static" and, as the scale of rounding-only
differences, "static vs first" (the same math with other kernels and reduction orders: a dynamic cache, attention
over fewer slots; unit-tested equal within 2e-5 in fp32 on the CPU). Per pair and sequence: the first response step
whose token differs (from there on the two continue different texts, so nothing after it is compared), the
|logprob difference| at steps 0 (drawn from the prefill's logits: the same code in the static and graph arms),
1 (the graph arm's eager warm-up forward) and 2 (its first replay), the largest one before the divergence, and
whether the routes agree on the rows computed before it. Rows: the sampled throughput calls above, and greedy calls
(--check-batch x --check-prompt-tokens + --check-new-tokens) per dtype:experts in --checks (grouped_mm: the
transformers default the throughput rows use; batched_mm: capture-safe in fp32, where torch's grouped_mm for
non-bf16 inputs may read the offsets on the host, which a capture refuses). Verdict of a graph-vs-static row:
"identical" (bitwise: tokens, logprobs, routes), "rounding" or "BUG". A stale input of the replayed forward (a cache
slot, position, mask or token not advanced) leaves the first replay right (the capture saw the right values) and
moves logprobs by > 1e-2 from the second replay on (step 3), so that most sequences part within a few steps. The
fp32 greedy rows decide: "rounding" if the largest |dlp| before the divergence is no larger than the static-vs-first
pair's in the same setting, floored at 2e-5 ("tolerance"). bf16 rows show how soon rounding alone parts the texts:
"rounding" if their |dlp| over steps < 9 is at most twice the static-vs-first pair's there ("tolerance") and the
largest before the divergence is no larger than that pair's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, environment, print_table, select_device, write_json  # noqa: E402

DEFAULTS = {
    "cpu": dict(hf_config="configs/models/qwen3_moe_tiny.json", batch=64, prompt_tokens=16, new_tokens=32,
                check_batch=16, check_prompt_tokens=16, check_new_tokens=32),
    "cuda": dict(hf_config="configs/models/qwen3_moe_1b_bench.json", batch=128, prompt_tokens=64, new_tokens=128,
                 check_batch=32, check_prompt_tokens=32, check_new_tokens=64),
}
FP32_FLOOR = 2e-5  # the repo's fp32 bound for static vs first (tests/unit/test_hf_generate.py)
STEPS = (0, 1, 2)  # prefill draw, warm-up forward, first replay
EARLY = 9  # steps 0..8: the first replay and six more, where a stale input of the replayed forward shows first


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--hf-config", default=None, help="HF config JSON (default per device, see above)")
    parser.add_argument("--batch", type=int, default=None, help="sequences generated together (one batch)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="engine dtype (default bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--no-routes", action="store_true", help="do not capture routes")
    parser.add_argument("--stop-check-interval", type=int, default=16)
    parser.add_argument("--arms", default="first,static,static+graph",
                        help="comma list of first, static, static+graph (static+graph is skipped off CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checks", default="fp32:batched_mm,bf16:grouped_mm,fp32:grouped_mm",
                        help="greedy checks, comma list of dtype:experts_implementation ('none': skip; fp32:grouped_mm last: "
                             "a capture that fails on a host read may leave CUDA unusable)")
    parser.add_argument("--check-batch", type=int, default=None)
    parser.add_argument("--check-prompt-tokens", type=int, default=None)
    parser.add_argument("--check-new-tokens", type=int, default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


class PhaseClock:
    """Marks the start of the first two forwards of the model in a call (the prefill, then the first decode step)
    with CUDA events on the current stream (a perf_counter on the CPU): no sync, and no mark inside a later forward
    (a CUDA graph capture runs the third one)."""

    def __init__(self, model, device: str):
        import torch

        self.cuda = device == "cuda"
        self.torch = torch
        self.marks = []
        model.register_forward_pre_hook(self._on_forward)

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _on_forward(self, module, args):
        if self.armed and len(self.marks) < 3:
            self.marks.append(self.now())

    def start(self):
        self.marks, self.armed = [self.now()], True

    def stop(self) -> dict:
        """Call after the device has synchronised: setup / prefill / decode milliseconds of the call."""
        end, self.armed = self.now(), False
        if self.cuda:
            self.torch.cuda.synchronize()
        marks = self.marks + [end] * (4 - len(self.marks))

        def ms(a, b):
            return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

        return {"setup_ms": ms(marks[0], marks[1]), "prefill_ms": ms(marks[1], marks[2]),
                "decode_ms": ms(marks[2], marks[3])}

    armed = False


def pair_stats(a_samples, b_samples) -> dict:
    """Where two loops' samples of the same prompts part (see the module docstring, check table)."""
    import torch

    first_divergence, diverged, routes_equal, worst, early = None, 0, 0, 0.0, 0.0
    at_step = {step: 0.0 for step in STEPS}
    compared = {step: 0 for step in STEPS}
    for a, b in zip(a_samples, b_samples):
        ra, rb = a.tokens[a.prompt_length:], b.tokens[b.prompt_length:]
        common = min(ra.numel(), rb.numel())
        differ = (ra[:common] != rb[:common]).nonzero()
        split = int(differ[0]) if differ.numel() else common
        if split < max(ra.numel(), rb.numel()):
            diverged += 1
            first_divergence = split if first_divergence is None else min(first_divergence, split)
        gap = (a.response_logprobs[:split] - b.response_logprobs[:split]).abs()
        worst = max(worst, float(gap.max()) if gap.numel() else 0.0)
        early = max(early, float(gap[:EARLY].max()) if gap.numel() else 0.0)
        for step in STEPS:
            if step < split:
                at_step[step] = max(at_step[step], float(gap[step]))
                compared[step] += 1
        if a.routes is not None and b.routes is not None:
            rows = min(a.prompt_length + split, a.routes.num_rows, b.routes.num_rows)
            routes_equal += torch.equal(a.routes.expert_ids[:rows], b.routes.expert_ids[:rows])
    count = len(a_samples)
    return {"sequences": count, "tokens_equal": 1 - diverged / count, "first_divergence_step": first_divergence,
            **{f"max_dlogprob_step{step}": at_step[step] if compared[step] else float("nan") for step in STEPS},
            "max_dlogprob_early": early, "max_dlogprob_before_divergence": worst,
            "routes_equal_before_divergence": routes_equal / count if a_samples[0].routes is not None else None}


def verdict(graph: dict, reference: Optional[dict], dtype: str) -> tuple[float, str]:
    """The tolerance and what a graph-vs-static row says (module docstring). Routes: at least the static-vs-first
    pair's fraction of sequences with equal routes before the divergence. fp32: the static-vs-first pair's largest
    |dlp| before its divergence, floored at FP32_FLOOR. Other dtypes: that bound for the whole prefix and twice the
    pair's early-window |dlp| for steps < EARLY (the tolerance shown), where a stale input shows first."""
    nan = float("nan")
    whole = reference["max_dlogprob_before_divergence"] if reference else nan
    if graph["tokens_equal"] == 1 and graph["max_dlogprob_before_divergence"] == 0 and graph[
            "routes_equal_before_divergence"] in (1, None):
        return (max(whole, FP32_FLOOR) if dtype == "fp32" else whole), "identical"
    routes, routes_reference = graph["routes_equal_before_divergence"], (
        reference["routes_equal_before_divergence"] if reference else None)
    if routes is not None and routes < (1 if routes_reference is None else routes_reference):
        return nan, "BUG (routes)"  # fewer sequences with the static loop's routes than rounding alone gives
    if dtype == "fp32":
        tolerance = max(whole, FP32_FLOOR) if whole == whole else FP32_FLOOR
        within = graph["max_dlogprob_before_divergence"] <= tolerance
    else:
        tolerance = 2 * reference["max_dlogprob_early"] if reference else nan
        within = graph["max_dlogprob_early"] <= tolerance and graph["max_dlogprob_before_divergence"] <= whole
    return tolerance, "rounding" if within else "BUG"  # nan (no reference) is not within


def main():
    began = time.perf_counter()
    args = parse_args()
    device = select_device(args.device)
    for key, value in DEFAULTS[device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_r3.rollout.base import SamplingParams
    from megatron_r3.rollout.engines.hf import HFRolloutEngine
    from megatron_r3.rollout.engines.hf_config import HFEngineConfig

    with open(os.path.join(REPO, args.hf_config)) as handle:
        fields = json.load(handle)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    limit = hf_config.max_position_embeddings
    for prompt_tokens, new_tokens in ((args.prompt_tokens, args.new_tokens),
                                      (args.check_prompt_tokens, args.check_new_tokens)):
        if prompt_tokens + new_tokens > limit:
            raise SystemExit(f"prompt tokens + new tokens must be <= max_position_embeddings {limit}")
    checks = [] if args.checks.strip() == "none" else [item.strip().split(":") for item in args.checks.split(",")]
    if any(len(item) != 2 for item in checks):
        raise SystemExit(f"--checks: expected dtype:experts items, got {args.checks!r}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    spare = copy.deepcopy(model) if any(dtype != args.dtype for dtype, _ in checks) else None  # engines cast in place
    engines = {args.dtype: HFRolloutEngine(model, dtype=args.dtype, device=device, max_batch_size=max(
        args.batch, args.check_batch), progress=False)}
    engine = engines[args.dtype]
    experts_default = engine.model.config._experts_implementation
    clock = PhaseClock(engine.model, device)
    prompts = torch.randint(0, hf_config.vocab_size, (args.batch, args.prompt_tokens)).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    interval = args.stop_check_interval
    configs = {
        "first": HFEngineConfig(hf_static_decode="off"),
        "static": HFEngineConfig(hf_static_decode="on", hf_stop_check_interval=interval),
        "static+graph": HFEngineConfig(hf_static_decode="on", hf_stop_check_interval=interval, hf_cuda_graph=True),
    }
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in configs]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {sorted(configs)}")
    if device != "cuda" and "static+graph" in arms:
        arms.remove("static+graph")
        print("static+graph skipped: CUDA graphs need --device cuda", flush=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call(arm, timed=False, on=engine, call_prompts=prompts, call_params=params):
        on.generate_config = configs[arm]
        sync()
        if timed:
            clock.start()
        start = time.perf_counter()
        samples = on.generate(call_prompts, call_params, return_routes=not args.no_routes).samples
        sync()
        seconds = time.perf_counter() - start
        return seconds, samples, clock.stop() if timed else None

    def host_reads(arm):
        counts = [0]
        names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
        originals = {name: getattr(torch.Tensor, name) for name in names}

        def counting(original):
            def counted(*a, **k):
                counts[0] += 1
                return original(*a, **k)
            return counted

        try:
            for name, original in originals.items():
                setattr(torch.Tensor, name, counting(original))
            call(arm)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        return counts[0]

    rates = {arm: [] for arm in arms}
    errors, outputs, step_ms, phases = {}, {}, {arm: [] for arm in arms}, {}
    for arm in arms:  # warm-up (and the samples compared below)
        try:
            _, outputs[arm], _ = call(arm)
        except Exception as error:  # noqa: BLE001 - an arm that fails is reported, the others still run
            errors[arm] = f"{type(error).__name__}: {error}"[:300]
    reads = {arm: host_reads(arm) for arm in arms if arm not in errors}
    for _ in range(args.repeats):
        for arm in arms:
            if arm in errors:
                continue
            seconds, samples, split = call(arm, timed=True)
            tokens = sum(s.response_length for s in samples)
            if not rates[arm] or tokens / seconds > max(rates[arm]):
                phases[arm] = split
            rates[arm].append(tokens / seconds)
            step_ms[arm].append(seconds / max(s.response_length for s in samples) * 1e3)

    reference, static = outputs.get("first"), outputs.get("static")

    def equal_to(samples, other):
        if other is None:
            return float("nan")
        same = [torch.equal(a.tokens, b.tokens) and torch.equal(a.response_logprobs, b.response_logprobs)
                and (a.routes is None or torch.equal(a.routes.expert_ids, b.routes.expert_ids))
                for a, b in zip(samples, other)]
        return sum(same) / len(same)

    base = max(rates["first"]) if rates.get("first") else None
    rows, results = [], []
    for arm in arms:
        if arm in errors:
            rows.append([arm, "failed"] + [""] * 10 + [errors[arm]])
            results.append({"arm": arm, "error": errors[arm]})
            continue
        best, median = max(rates[arm]), statistics.median(rates[arm])
        same = (sum(torch.equal(a.tokens, b.tokens) for a, b in zip(reference, outputs[arm])) / len(reference)
                if reference is not None else float("nan"))
        speedup = best / base if base else float("nan")
        bitwise = equal_to(outputs[arm], static) if arm != "first" else float("nan")  # rounding differs by design
        split = phases[arm]
        rows.append([arm, best, median, min(step_ms[arm]), split["setup_ms"], split["prefill_ms"], split["decode_ms"],
                     speedup, same, bitwise, reads[arm], ""])
        results.append({"arm": arm, "tokens_per_s": rates[arm], "best_tokens_per_s": best, "ms_per_step": step_ms[arm],
                        "best_call_ms": split, "speedup_vs_first": speedup, "same_tokens_as_first": same,
                        "bitwise_as_static": bitwise, "host_reads_per_call": reads[arm]})
    title = (f"hf engine generation, {args.hf_config}, {args.dtype}, experts {experts_default}, {device}: {args.batch} "
             f"sequences x {args.prompt_tokens} prompt + {args.new_tokens} new tokens, routes="
             f"{'off' if args.no_routes else 'on'}, stop check every {interval} steps, best of {args.repeats}")
    print_table(title, ["loop", "tokens/s best", "tokens/s median", "ms/step best", "setup ms", "prefill ms",
                        "decode ms", "speed-up", "same tokens", "= static", "host reads", "error"], rows)

    # ---------------------------------------------------------------- check: graph vs static, static vs first
    check_rows, check_results = [], []

    def add_pairs(label, dtype, experts, samples, failed):
        reference_stats = None
        for pair, (a, b) in (("static vs first", ("first", "static")), ("graph vs static", ("static", "static+graph"))):
            if a not in samples or b not in samples:
                why = "; ".join(f"{arm}: {failed[arm]}" for arm in (a, b) if arm in failed) or "arm not run"
                check_rows.append([label, dtype, experts, pair] + [""] * 11 + [why[:300]])
                check_results.append({"calls": label, "dtype": dtype, "experts": experts, "pair": pair, "error": why})
                continue
            stats = pair_stats(samples[a], samples[b])
            tolerance, says = (float("nan"), "") if pair == "static vs first" else verdict(stats, reference_stats,
                                                                                               dtype)
            if pair == "static vs first":
                reference_stats = stats
            check_rows.append([label, dtype, experts, pair, stats["sequences"], stats["tokens_equal"],
                               "none" if stats["first_divergence_step"] is None else stats["first_divergence_step"]]
                              + [stats[f"max_dlogprob_step{step}"] for step in STEPS]
                              + [stats["max_dlogprob_early"], stats["max_dlogprob_before_divergence"],
                                 "n/a" if stats["routes_equal_before_divergence"] is None
                                 else stats["routes_equal_before_divergence"], tolerance, says, ""])
            check_results.append({"calls": label, "dtype": dtype, "experts": experts, "pair": pair, **stats,
                                  "tolerance": tolerance, "verdict": says})

    add_pairs(f"throughput, T=1 seed 0, {args.batch}x{args.prompt_tokens}+{args.new_tokens}", args.dtype,
              experts_default, outputs, errors)
    check_prompts = torch.randint(0, hf_config.vocab_size, (args.check_batch, args.check_prompt_tokens)).tolist()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.check_new_tokens)
    for dtype, experts in checks:
        if dtype not in engines:
            engines[dtype] = HFRolloutEngine(spare, dtype=dtype, device=device, max_batch_size=max(
                args.batch, args.check_batch), progress=False)
        on = engines[dtype]
        on.model.set_experts_implementation(experts)
        samples, failed = {}, {}
        for arm in arms:
            try:
                samples[arm] = call(arm, on=on, call_prompts=check_prompts, call_params=greedy)[1]
            except Exception as error:  # noqa: BLE001 - reported in the row
                failed[arm] = f"{type(error).__name__}: {error}"
        on.model.set_experts_implementation(experts_default)
        add_pairs(f"greedy, {args.check_batch}x{args.check_prompt_tokens}+{args.check_new_tokens}", dtype, experts,
                  samples, failed)
    print_table(f"graph check ({device}): where two loops part, |logprob difference| before that", [
        "calls", "dtype", "experts", "pair", "seqs", "tokens equal", "first divergence step", "|dlp| step 0",
        "|dlp| step 1 (warm-up)", "|dlp| step 2 (1st replay)", f"max |dlp| steps < {EARLY}",
        "max |dlp| before divergence",
        "routes equal before divergence", "tolerance", "verdict", "error"], check_rows)
    write_json(args.json, {"environment": environment(device), "args": vars(args), "results": results,
                           "checks": check_results, "seconds": time.perf_counter() - began})
    print(f"bench took {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
