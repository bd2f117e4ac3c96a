"""Generation throughput of the embedded hf rollout engine: its first loop (DynamicCache, finished sequences retired
with a host sync per token) vs the fixed-shape loop of megatron_r3/rollout/hf_generate.py (StaticCache, sampling and
stop checks on the device), and that loop with its decode forward in a CUDA graph (CUDA only).

    python bench/hf_generate.py --device cpu                       # tiny model (configs/models/qwen3_moe_tiny.json)
    python bench/hf_generate.py --device cuda --json out.json      # ~1B model (configs/models/qwen3_moe_1b_bench.json)

One engine (randomly initialised model, --dtype, routes captured as R3 needs them) and the same call per arm:
--batch sequences of --prompt-tokens random tokens (one batch: the GRPO bench's 16 prompts x 8 samples), --new-tokens
each, temperature 1 and no stop token, so every arm generates the same number of tokens. Arms are interleaved over
--repeats rounds after one warm-up call each; the table gives the best and median tokens/s, the wall time per
generated position (one decode step of the batch) and the speed-up of the best over the first loop's best.
"same tokens" is the fraction of samples whose tokens equal the first loop's (expected 1 in fp32: no sequence
finishes early; bf16 rounding of the two loops' attention may make long samples drift apart). "= static" is the
fraction whose tokens, logprobs and routes equal the static loop's bitwise (the CUDA graph replays the same kernels on
the same inputs, so anything below 1 is a bug of the graph arm). "host reads" counts the Python-level tensor reads
(.item(), .tolist(), bool/int/float/index of a tensor; each a device sync on a GPU) of one extra, untimed call,
the engine's prompt checks included; C++-internal syncs (torch.multinomial checks its input with two per draw) are
not seen by this count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, environment, print_table, select_device, write_json  # noqa: E402

DEFAULTS = {
    "cpu": dict(hf_config="configs/models/qwen3_moe_tiny.json", batch=64, prompt_tokens=16, new_tokens=32),
    "cuda": dict(hf_config="configs/models/qwen3_moe_1b_bench.json", batch=128, prompt_tokens=64, new_tokens=128),
}


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
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def main():
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
    if args.prompt_tokens + args.new_tokens > limit:
        raise SystemExit(f"--prompt-tokens + --new-tokens must be <= max_position_embeddings {limit}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    engine = HFRolloutEngine(model, dtype=args.dtype, device=device, max_batch_size=args.batch, progress=False)
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

    def call(arm):
        engine.generate_config = configs[arm]
        sync()
        start = time.perf_counter()
        samples = engine.generate(prompts, params, return_routes=not args.no_routes).samples
        sync()
        seconds = time.perf_counter() - start
        return seconds, samples

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
    errors, outputs, step_ms = {}, {}, {arm: [] for arm in arms}
    for arm in arms:  # warm-up (and the samples compared below)
        try:
            _, outputs[arm] = call(arm)
        except Exception as error:  # noqa: BLE001 - an arm that fails is reported, the others still run
            errors[arm] = f"{type(error).__name__}: {error}"[:300]
    reads = {arm: host_reads(arm) for arm in arms if arm not in errors}
    for _ in range(args.repeats):
        for arm in arms:
            if arm in errors:
                continue
            seconds, samples = call(arm)
            tokens = sum(s.response_length for s in samples)
            rates[arm].append(tokens / seconds)
            step_ms.setdefault(arm, []).append(seconds / max(s.response_length for s in samples) * 1e3)

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
            rows.append([arm, "failed", "", "", "", "", "", "", errors[arm]])
            results.append({"arm": arm, "error": errors[arm]})
            continue
        best, median = max(rates[arm]), statistics.median(rates[arm])
        same = (sum(torch.equal(a.tokens, b.tokens) for a, b in zip(reference, outputs[arm])) / len(reference)
                if reference is not None else float("nan"))
        speedup = best / base if base else float("nan")
        bitwise = equal_to(outputs[arm], static) if arm != "first" else float("nan")  # rounding differs by design
        rows.append([arm, best, median, min(step_ms[arm]), speedup, same, bitwise, reads[arm], ""])
        results.append({"arm": arm, "tokens_per_s": rates[arm], "best_tokens_per_s": best, "ms_per_step": step_ms[arm],
                        "speedup_vs_first": speedup, "same_tokens_as_first": same, "bitwise_as_static": bitwise,
                        "host_reads_per_call": reads[arm]})
    title = (f"hf engine generation, {args.hf_config}, {args.dtype}, {device}: {args.batch} sequences x "
             f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, routes={'off' if args.no_routes else 'on'}, "
             f"stop check every {interval} steps, best of {args.repeats}")
    print_table(title, ["loop", "tokens/s best", "tokens/s median", "ms/step best", "speed-up", "same tokens",
                        "= static", "host reads", "error"], rows)
    write_json(args.json, {"environment": environment(device), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
