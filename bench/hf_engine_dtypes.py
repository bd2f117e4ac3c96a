"""Generation throughput of the embedded hf rollout engine by engine dtype, with and without route capture.

    python bench/hf_engine_dtypes.py --device cpu                  # tiny model (configs/models/qwen3_moe_tiny.json)
    python bench/hf_engine_dtypes.py --device cuda --json out.json

One randomly initialised model (seed 0), one engine per --dtypes entry (the engine's own decode loop for the device,
`HFEngineConfig` defaults), the same call per arm: --batch sequences of --prompt-tokens random tokens, --new-tokens
each, temperature 1 and no stop token. Arms (dtype x routes off/on) are interleaved over --repeats rounds after one
warm-up call each; tokens/s is the engine's own `last_stats["tokens_per_s"]`. "routes cost" is the best tokens/s
without route capture over the best with it, per dtype (what recording routes for R3 costs generation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, environment, print_table, select_device, write_json  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--hf-config", default="configs/models/qwen3_moe_tiny.json", help="HF config JSON")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma list of engine dtypes")
    parser.add_argument("--batch", type=int, default=64, help="sequences generated together (one batch)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def main():
    args = parse_args()
    device = select_device(args.device)

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_r3.platform.dtypes import torch_dtype
    from megatron_r3.rollout.base import SamplingParams
    from megatron_r3.rollout.engines.hf import HFRolloutEngine

    with open(os.path.join(REPO, args.hf_config)) as handle:
        fields = json.load(handle)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if args.prompt_tokens + args.new_tokens > hf_config.max_position_embeddings:
        raise SystemExit(f"--prompt-tokens + --new-tokens must be <= max_position_embeddings "
                         f"{hf_config.max_position_embeddings}")
    dtypes = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    for name in dtypes:
        torch_dtype(name)  # a clear error for an unknown name before anything is built
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    prompts = torch.randint(0, hf_config.vocab_size, (args.batch, args.prompt_tokens)).tolist()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    engines = {name: HFRolloutEngine(model, dtype=name, device=device, max_batch_size=args.batch, progress=False)
               for name in dtypes}
    arms = [(name, routes) for name in dtypes for routes in (False, True)]
    rates = {arm: [] for arm in arms}
    for name, routes in arms:  # warm-up
        engines[name].generate(prompts, params, return_routes=routes)
    for _ in range(args.repeats):
        for name, routes in arms:
            engines[name].generate(prompts, params, return_routes=routes)
            rates[(name, routes)].append(engines[name].last_stats["tokens_per_s"])
    for engine in engines.values():
        engine.close()

    rows, results = [], []
    for name, routes in arms:
        best, median = max(rates[(name, routes)]), statistics.median(rates[(name, routes)])
        cost = max(rates[(name, False)]) / best if routes else float("nan")
        rows.append([name, "on" if routes else "off", best, median, cost])
        results.append({"dtype": name, "routes": routes, "tokens_per_s": rates[(name, routes)],
                        "best_tokens_per_s": best, "routes_cost": cost})
    title = (f"hf engine generation by dtype, {args.hf_config}, {device}: {args.batch} sequences x "
             f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, threads={torch.get_num_threads()}, "
             f"best of {args.repeats}")
    print_table(title, ["dtype", "routes", "tokens/s best", "tokens/s median", "routes cost"], rows)
    write_json(args.json, {"environment": environment(device), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
