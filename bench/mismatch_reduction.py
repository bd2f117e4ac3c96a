"""Rollout/train mismatch with and without router replay on the SAME rollout batch: the hf engine (bf16) samples,
the megatron trainer (fp32) recomputes the old logprobs once with native routing (off) and once replaying the
engine's expert ids (R3).

    python bench/mismatch_reduction.py --device cpu                  # default model "deep", CPU
    python bench/mismatch_reduction.py --device cpu --model demo     # the `make demo` model
    python bench/mismatch_reduction.py --device cuda --json out.json

Built from the trainer's own pieces: `GRPOTrainer(args)` (policy, hf engine with the policy's weights, prompts),
its `_rollout()` and `_plan()`, then `logprob_pass` twice per batch: RECORD with the engine's routes observed (native
routing, the "off" old-logprob pass, which also records the trainer's own ids) and REPLAY_FORWARD with them (R3).
Δ = logp_train − logp_rollout over response tokens; metrics as in `megatron_r3.grpo.mismatch` (k3 = mean(e^Δ−1−Δ),
τ2/τ5 = fraction with |Δ| > ln 2 / ln 5), plus medians over tokens and over samples (per-sample mean k3), routing
agreement per (token, layer) and the fraction of tokens whose top-k set differs in at least one MoE layer. The
decomposition splits the off arm's k3 into tokens with a routing flip somewhere and tokens without: what R3 can
remove (flips) vs the bf16-vs-fp32 numeric floor it cannot.

Models (Qwen3-MoE, randomly initialised from --seed, first layer dense like the demo):
  demo   configs/models/qwen3_moe_tiny.json: 4 layers, hidden 64, 8 experts top-2, expert ffn 32, vocab 64
  demo8  the demo model with 8 layers
  deep   8 layers, hidden 128, 64 experts top-8, expert ffn 64, 4 q / 2 kv heads of 32, vocab 64
  wide   12 layers, hidden 256, 128 experts top-8, expert ffn 64, 8 q / 2 kv heads of 32, vocab 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, environment, print_table, select_device, write_json  # noqa: E402

MODELS = {
    "demo": {},
    "demo8": dict(num_hidden_layers=8),
    "deep": dict(num_hidden_layers=8, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=64, num_experts_per_tok=8),
    "wide": dict(num_hidden_layers=12, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, num_experts=128, num_experts_per_tok=8),
}


def model_config(name: str, out_dir: str, initializer_range: float | None) -> tuple[str, dict]:
    with open(os.path.join(REPO, "configs/models/qwen3_moe_tiny.json")) as handle:
        values = json.load(handle)
    values.update(MODELS[name])
    values["max_position_embeddings"] = max(values.get("max_position_embeddings", 64), 128)
    if initializer_range is not None:
        values["initializer_range"] = initializer_range
    path = os.path.join(out_dir, f"qwen3_moe_{name}.json")
    with open(path, "w") as handle:
        json.dump(values, handle, indent=1)
    return path, values


def token_stats(delta: list[float]) -> dict:
    n = len(delta)
    if n == 0:
        return {}
    k3 = [math.expm1(d) - d for d in delta]
    return {
        "tokens": n,
        "k3_mean": sum(k3) / n,
        "k3_median": statistics.median(k3),
        "abs_diff_mean": sum(abs(d) for d in delta) / n,
        "abs_diff_median": statistics.median(abs(d) for d in delta),
        "sq_diff_mean": sum(d * d for d in delta) / n,
        "tau2": sum(abs(d) > math.log(2) for d in delta) / n,
        "tau5": sum(abs(d) > math.log(5) for d in delta) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="deep")
    parser.add_argument("--initializer-range", type=float, default=None, help="override the config's (0.2)")
    parser.add_argument("--steps", type=int, default=4, help="rollout batches (distinct prompts each)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per batch")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--task", default="copy_last")
    parser.add_argument("--rollout-dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--trainer-dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--load", default=None,
                        help="a checkpoint folder of pretrain_grpo.py (e.g. runs/demo/R3/checkpoints) to measure a "
                             "trained model instead of a random one; --model must name its architecture")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    select_device(args.device)

    import torch

    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.grpo.mismatch import MetricAccumulator
    from megatron_r3.platform.distributed import device, initialize_torch_distributed
    from megatron_r3.train.arguments import parse_grpo_args
    from megatron_r3.train.passes import declare_metrics, logprob_pass
    from megatron_r3.train.trainer import GRPOTrainer

    work = tempfile.mkdtemp(prefix="mismatch_")
    config_path, config_values = model_config(args.model, work, args.initializer_range)
    batch = args.prompts * args.group_size
    argv = [
        "--hf-config", config_path, "--task", args.task, "--reward-fn", "synthetic", "--rollout-engine", "hf",
        "--rollout-dtype", args.rollout_dtype, "--router-replay", "R3", "--grpo-prompts-per-step", str(args.prompts),
        "--grpo-group-size", str(args.group_size), "--global-batch-size", str(batch),
        "--micro-batch-size", str(min(args.micro_batch_size, batch)), "--max-new-tokens", str(args.max_new_tokens),
        "--seq-length", str(config_values["max_position_embeddings"]), "--train-iters", str(args.steps),
        "--rl-default-temperature", str(args.temperature), "--seed", str(args.seed), "--lr", "1e-6",
        "--run-dir", work, "--no-progress", "--save-interval", "100000",
    ]
    if args.trainer_dtype == "bf16":
        argv.append("--bf16")
    if args.load:
        # the weights only (this bench never steps the optimizer), resumed at the checkpoint's step
        argv += ["--load", args.load, "--train-iters", str(10**6), "--no-load-optim",
                 "--override-opt_param-scheduler"]
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # megatron prints every argument
        grpo_args = parse_grpo_args(argv)
    initialize_torch_distributed()
    start = time.perf_counter()
    trainer = GRPOTrainer(grpo_args)
    setup = trainer.setup
    dev = device()

    arms = {"off": {"delta": [], "sample_k3": [], "flip": []}, "R3": {"delta": [], "sample_k3": [], "flip": []}}
    counters = {"off": torch.zeros(4, dtype=torch.float64), "R3": torch.zeros(4, dtype=torch.float64)}
    accumulators = {}
    flipped_tokens = valid_tokens = 0
    differing_pairs = compared_pairs = 0
    for step in range(args.steps):
        trainer.step = step
        payload = trainer._rollout()
        plan = trainer._plan(payload.samples)
        microbatches = plan.microbatches
        for mb in microbatches:
            mb.routes = mb.routes.pin_memory().to(dev, non_blocking=True)
        ctx = trainer._context(setup.model, setup.routers, plan)
        for arm in ("off", "R3"):
            metrics = accumulators.setdefault(arm, MetricAccumulator())
            declare_metrics(metrics, ["train/entropy"], mismatch=True)
            setup.routers.statistics(reset=True)
            if arm == "off":  # native routing, the engine's routes observed; the trainer's own ids recorded
                result = logprob_pass(ctx, microbatches, target="old", action=RouterReplayAction.RECORD,
                                      routes=[mb.routes.observed() for mb in microbatches], metrics=metrics,
                                      collect_agreement=True)
            else:
                result = logprob_pass(ctx, microbatches, target="old", action=RouterReplayAction.REPLAY_FORWARD,
                                      routes=[mb.routes for mb in microbatches], metrics=metrics,
                                      collect_agreement=True)
            stats = setup.routers.statistics(reset=True)
            for per_layer in stats.layer_counters.values():
                counters[arm] += torch.stack([per_layer[k].double().cpu() for k in ("valid", "compared", "agree",
                                                                                     "match")])
            for index, mb in enumerate(microbatches):
                b, s = mb.inputs.tokens.shape
                mask = mb.inputs.loss_mask.cpu().bool()
                delta = (mb.old_logp.float().cpu() - mb.rollout_logp.float().cpu())
                if arm == "off":
                    # tokens whose trainer top-k set differs from the engine's in at least one MoE layer
                    differs = torch.zeros(s * b, dtype=torch.bool)
                    for number, ids in result.recorded[index].items():
                        mine = ids.long().sort(dim=1).values.cpu()
                        theirs = mb.routes.for_layer(number).expert_ids.long().sort(dim=1).values.cpu()
                        layer_differs = (mine != theirs).any(dim=1)
                        differs |= layer_differs
                        valid_rows = mb.routes.valid.cpu()
                        differing_pairs += int((layer_differs & valid_rows).sum())
                        compared_pairs += int(valid_rows.sum())
                    mb.flip = differs.view(s, b).t()  # router order [s*b] -> model order [b, s]
                    valid_model = mb.routes.valid.cpu().view(s, b).t()
                    flipped_tokens += int((mb.flip & valid_model).sum())
                    valid_tokens += int(valid_model.sum())
                for row in range(b):
                    row_mask = mask[row]
                    if not bool(row_mask.any()):
                        continue
                    row_delta = delta[row][row_mask].tolist()
                    arms[arm]["delta"] += row_delta
                    arms[arm]["flip"] += mb.flip[row][row_mask].tolist()
                    arms[arm]["sample_k3"].append(sum(math.expm1(d) - d for d in row_delta) / len(row_delta))
        print(f"batch {step + 1}/{args.steps}: {len(payload.samples)} samples, "
              f"{len(arms['off']['delta'])} response tokens so far", flush=True)
    seconds = time.perf_counter() - start

    summary = {}
    for arm in ("off", "R3"):
        delta, flip = arms[arm]["delta"], arms[arm]["flip"]
        summary[arm] = token_stats(delta)
        summary[arm]["sample_k3_median"] = statistics.median(arms[arm]["sample_k3"])
        summary[arm]["samples"] = len(arms[arm]["sample_k3"])
        valid, compared, agree, match = counters[arm].tolist()
        summary[arm]["routing_agreement"] = agree / compared if compared else float("nan")
        summary[arm]["used_route_match"] = match / valid if valid else float("nan")
        summary[arm]["k3_accumulator"] = accumulators[arm].means().get("rollout_train_k3_kl")
        with_flip = [d for d, f in zip(delta, flip) if f]
        without = [d for d, f in zip(delta, flip) if not f]
        k3_sum = sum(math.expm1(d) - d for d in delta) or float("nan")
        summary[arm]["flip_tokens"] = len(with_flip)
        summary[arm]["k3_mean_flip_tokens"] = token_stats(with_flip).get("k3_mean", float("nan"))
        summary[arm]["k3_mean_other_tokens"] = token_stats(without).get("k3_mean", float("nan"))
        summary[arm]["k3_share_flip_tokens"] = sum(math.expm1(d) - d for d in with_flip) / k3_sum

    def ratio(key):
        a, b = summary["off"].get(key, float("nan")), summary["R3"].get(key, float("nan"))
        return a / b if b else float("inf")

    rows = []
    for key, label in (("k3_mean", "k3 KL (token mean)"), ("k3_median", "k3 KL (token median)"),
                       ("sample_k3_median", "k3 KL (median over samples of the sample mean)"),
                       ("abs_diff_mean", "|Δ| mean"), ("abs_diff_median", "|Δ| median"),
                       ("sq_diff_mean", "Δ² mean"), ("tau2", "τ2 fraction (|Δ| > ln 2)"),
                       ("tau5", "τ5 fraction (|Δ| > ln 5)"), ("routing_agreement", "routing agreement (token x layer)"),
                       ("used_route_match", "used route = engine's (token x layer)"),
                       ("k3_mean_flip_tokens", "k3 mean, tokens with a flip in some layer (off)"),
                       ("k3_mean_other_tokens", "k3 mean, tokens without a flip (off)"),
                       ("k3_share_flip_tokens", "share of the k3 sum from flip tokens")):
        rows.append((label, summary["off"][key], summary["R3"][key],
                     ratio(key) if key not in ("routing_agreement", "used_route_match", "k3_share_flip_tokens")
                     else ""))
    moe_layers = sum(1 for i in range(config_values["num_hidden_layers"]) if i not in config_values["mlp_only_layers"])
    model_text = (f"{args.model}: {config_values['num_hidden_layers']} layers ({moe_layers} MoE), hidden "
                  f"{config_values['hidden_size']}, {config_values['num_experts']} experts top-"
                  f"{config_values['num_experts_per_tok']}, init range {config_values['initializer_range']}")
    print_table(f"Rollout ({args.rollout_dtype} hf engine) vs trainer ({args.trainer_dtype} megatron), same batch: "
                f"{summary['off']['samples']} samples, {summary['off']['tokens']} response tokens; {model_text}; "
                f"{args.device}", ["metric", "off (native routing)", "R3 (engine's routes)", "off / R3"], rows)
    extra = [
        ("tokens fed (valid router rows)", valid_tokens),
        ("tokens whose top-k set differs in >= 1 MoE layer (off)", f"{flipped_tokens / max(valid_tokens, 1):.4f}"),
        ("(token, layer) pairs that differ (off)", f"{differing_pairs / max(compared_pairs, 1):.4f}"),
        ("k3 ratio off / R3 (token mean); target >= 26", f"{ratio('k3_mean'):.2f}"),
        ("k3 ratio off / R3 (median over samples)", f"{ratio('sample_k3_median'):.2f}"),
        ("wall time (s)", f"{seconds:.1f}"),
    ]
    print_table("Routing flips and the ratio", ["quantity", "value"], extra)
    write_json(args.json, {"environment": environment(args.device), "args": vars(args), "model": config_values,
                           "summary": summary, "flip_token_fraction": flipped_tokens / max(valid_tokens, 1),
                           "flip_pair_fraction": differing_pairs / max(compared_pairs, 1),
                           "k3_ratio_mean": ratio("k3_mean"), "k3_ratio_sample_median": ratio("sample_k3_median"),
                           "seconds": seconds})
    setup.close()


if __name__ == "__main__":
    main()
