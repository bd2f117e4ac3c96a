"""Router replay checks for many parallel layouts in ONE torchrun launch (gloo on CPU, or NCCL on GPUs).

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 tests/distributed/replay_checks.py --out results.json [LAYOUT ...]

For every layout x recompute mode (none / full / selective moe) it checks, on every rank:
  token_slots   our router-order slot indices == megatron's own get_batch_on_this_cp_rank + SP scatter
  r2_roundtrip  RECORD (old-logprob pass) -> gather to per-sample [T-1, L_all, K] -> perturb router weights ->
                replay in a training pass: every router call (forward and recompute) used the recorded ids
  r2_sensitive  the perturbation really changes free routing (so the check above can fail)
  r3_exact      external per-sample routes [T-1, L_all, K] (dense layers zero): every router call of every rank
                used exactly the ids at its tokens (token positions from megatron's functions, not ours)
  r3_gather     what the routers used, gathered back with the R2 inverse path, equals the given routes
  own_bitwise   replaying the model's own routes gives bitwise the losses and gradients of native routing
  errors_*      missing / extra / unconsumed routes raise RouteReplayError on every rank (no hang)
Rank 0 writes one JSON object per (layout, recompute) with every check's result (True on all ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_r3.platform.distributed import initialize_model_parallel  # noqa: E402
from megatron_r3.platform.parallel_context import ParallelSizes  # noqa: E402

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region  # noqa: E402
from megatron.core.transformer.moe.router_replay import RouterReplayAction  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.utils import get_batch_on_this_cp_rank  # noqa: E402

from megatron_r3.model.gpt import build_gpt_chunks  # noqa: E402
from megatron_r3.replay.router import InstalledRoutes  # noqa: E402
from megatron_r3.platform.distributed import device, host_group  # noqa: E402
from megatron_r3.replay.layout import (  # noqa: E402
    moe_layer_pattern,
    pack_bshd,
    router_token_slots,
    sequence_pad_multiple,
)
from megatron_r3.replay.microbatch import localize_routes, routes_from_recorded  # noqa: E402
from megatron_r3.replay.r2 import gather_recorded_routes  # noqa: E402
from megatron_r3.replay.schedule import ReplayRouters, RouteReplayError, run_schedule  # noqa: E402
from megatron_r3.train.batch import microbatch_inputs  # noqa: E402
from tests.distributed.launch import finish_launch  # noqa: E402
from tests.distributed.layouts import LAYOUTS, RECOMPUTE  # noqa: E402

VOCAB, NUM_LAYERS, EXPERTS, TOPK = 128, 4, 8, 2
MOE_LAYER_FREQ = [0, 1, 1, 1]
NUM_MICROBATCHES, SAMPLES_PER_MICROBATCH, SEQ_LENGTH = 2, 2, 20
# DeepSeek-V3 family layouts (`deepseek=True`): MLA without q LoRA and megatron's DeepSeek-V3 router (sigmoid scores,
# selection-only expert bias - randomised after the build so that it changes the top-k -, group-limited top-k,
# routed scaling factor) with a shared expert
DEEPSEEK = dict(multi_latent_attention=True, q_lora_rank=None, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8,
                v_head_dim=12, rope_type="rope", rotary_base=10000, apply_rope_fusion=False,
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=0.0, moe_router_num_groups=4, moe_router_group_topk=1,
                moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=32)


def make_config(sizes: ParallelSizes, overrides: dict, recompute: dict, dtype=torch.float32) -> TransformerConfig:
    if "pipeline_dtype" in overrides:  # pipeline stages send activations in the model's dtype
        overrides = dict(overrides, pipeline_dtype=dtype)
    config_class = TransformerConfig
    if overrides.get("deepseek"):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config_class = MLATransformerConfig
        overrides = dict({k: v for k, v in overrides.items() if k != "deepseek"}, **DEEPSEEK)
    return config_class(
        num_layers=NUM_LAYERS, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=64, moe_layer_freq=MOE_LAYER_FREQ,
        moe_token_dispatcher_type=overrides.get("moe_token_dispatcher_type", "alltoall"),
        moe_grouped_gemm=overrides.get("moe_grouped_gemm", False),
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, use_cpu_initialization=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
        normalization="RMSNorm", gated_linear_unit=True, qk_layernorm=True,
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        **{k: v for k, v in overrides.items() if k not in ("moe_token_dispatcher_type", "moe_grouped_gemm")},
        **recompute,
    )


class Harness:
    """Model chunks, this rank's microbatches and a router-call log for one layout."""

    def __init__(self, parallel, overrides: dict, recompute: dict, dtype=torch.float32):
        self.parallel = parallel  # this rank's ParallelContext
        self.sizes = sizes = parallel.sizes
        if "pipeline_dtype" in overrides:
            overrides = dict(overrides, pipeline_dtype=dtype)
        self.config = make_config(sizes, overrides, recompute, dtype)
        self.sp = bool(self.config.sequence_parallel)
        torch.manual_seed(1234)
        self.chunks = build_gpt_chunks(self.config, parallel, vocab_size=VOCAB, max_sequence_length=64)
        with torch.no_grad():  # a selection bias large enough to reorder the sigmoid top-k (DeepSeek layouts)
            for chunk in self.chunks:
                for name, buffer in chunk.named_buffers():
                    if name.endswith("router.expert_bias"):
                        buffer.copy_(0.5 * torch.randn(buffer.shape, generator=torch.Generator().manual_seed(9)))
        self.routers = ReplayRouters(self.chunks)
        self.calls: list[tuple[int, object, torch.Tensor]] = []
        for routers in self.routers.by_chunk:
            for number, router in routers.items():
                router.register_forward_hook(
                    lambda module, inputs, output, n=number: self.calls.append(
                        (n, module.replay.action, output[1].detach().clone())
                    )
                )
        self.tp, self.tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.cp, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        self.pattern = moe_layer_pattern(NUM_LAYERS, MOE_LAYER_FREQ)
        pad = sequence_pad_multiple(self.tp, self.cp, self.sp)
        dp_rank = ps.get_data_parallel_rank()
        gen = torch.Generator().manual_seed(100 + dp_rank)
        self.microbatches = []
        for mb in range(NUM_MICROBATCHES):
            lengths = [int(x) for x in torch.randint(8, 20, (SAMPLES_PER_MICROBATCH,), generator=gen)]
            sequences = [torch.randint(0, VOCAB, (n + 1,), generator=gen) for n in lengths]
            # one seq_length for all microbatches: pipeline stages exchange fixed-shape activations
            layout = pack_bshd(lengths, seq_length=SEQ_LENGTH, pad_multiple=pad)
            routes = [self.random_routes(n, gen) for n in lengths]
            self.microbatches.append(dict(sequences=sequences, layout=layout, routes=routes))
            self.microbatches[-1]["inputs"] = microbatch_inputs(
                sequences, layout, context_parallel_size=self.cp, cp_rank=self.cp_rank
            )
            self.microbatches[-1]["slots"] = router_token_slots(
                layout, context_parallel_size=self.cp, cp_rank=self.cp_rank,
                tensor_model_parallel_size=self.tp, tp_rank=self.tp_rank, sequence_parallel=self.sp,
            )

    def random_routes(self, n: int, gen) -> torch.Tensor:
        """[n, L_all, K] uint8: K distinct ids per row on MoE layers, zeros on dense layers (SGLang's format)."""
        ids = torch.argsort(torch.rand(n, NUM_LAYERS, EXPERTS, generator=gen), dim=-1)[..., :TOPK]
        ids[:, [i for i, moe in enumerate(self.pattern) if not moe]] = 0
        return ids.to(torch.uint8)

    def megatron_slots(self, layout) -> torch.Tensor:
        """Router-order slots computed with megatron's own CP split and SP scatter, for comparison."""
        slot_ids = torch.arange(layout.num_slots).view(layout.batch_size, layout.seq_length)
        batch = get_batch_on_this_cp_rank({"tokens": slot_ids, "cu_seqlens": None}, False, ps.get_context_parallel_group())
        sequence_major = batch["tokens"].t().contiguous().unsqueeze(-1).float()  # [s, b, 1]
        if self.sp and self.tp > 1:
            sequence_major = scatter_to_sequence_parallel_region(sequence_major, group=ps.get_tensor_model_parallel_group())
        return sequence_major.reshape(-1).long()

    def localized(self, routes_per_mb):
        return [
            localize_routes(routes, mb["layout"], mb["slots"], self.routers.layer_numbers, EXPERTS).to(device())
            for routes, mb in zip(routes_per_mb, self.microbatches)
        ]

    def run(self, action=None, routes=None, forward_only=False):
        self.calls.clear()
        for chunk in self.chunks:
            chunk.zero_grad(set_to_none=True)
        vp = len(self.chunks) > 1

        def forward_step(data_iterator, model):
            inputs = next(data_iterator)["inputs"].to(device())
            output = model(inputs.tokens, inputs.position_ids, None, labels=inputs.labels)

            def loss_func(output_tensor):
                loss = (output_tensor.float() * inputs.loss_mask).sum() / inputs.loss_mask.sum()
                return loss, {"loss": loss.detach()}

            return output, loss_func

        iterators = [iter(self.microbatches) for _ in self.chunks] if vp else iter(self.microbatches)
        result = run_schedule(
            get_forward_backward_func(), self.routers, action=action, routes=routes,
            forward_step_func=forward_step, data_iterator=iterators, model=self.chunks if vp else self.chunks[0],
            num_microbatches=NUM_MICROBATCHES, forward_only=forward_only, seq_length=self.microbatches[0]["layout"].seq_length,
            micro_batch_size=SAMPLES_PER_MICROBATCH, host_group=self.parallel.host_group,
        )
        grads = [p.grad.clone() if p.grad is not None else None for c in self.chunks for p in c.parameters()]
        losses = [float(x["loss"]) for x in result.losses] if result.losses else []
        return result, losses, grads

    def gather(self, recorded):
        return gather_recorded_routes(
            recorded, [mb["layout"] for mb in self.microbatches], [mb["slots"] for mb in self.microbatches],
            num_layers=NUM_LAYERS, topk=TOPK, dtype=torch.uint8,
            groups=(ps.get_tensor_and_context_parallel_group(), ps.get_pipeline_model_parallel_group()),
        )

    def calls_match(self, expected_per_mb, require_recompute: bool) -> bool:
        """Every logged router call used the expected ids of its microbatch on real (non-padding) tokens: forward
        calls in microbatch order, recompute calls (REPLAY_BACKWARD) in the same order, per layer."""
        seen, ok = {}, True
        for number, action, routing_map in self.calls:
            key = (number, action == RouterReplayAction.REPLAY_BACKWARD)
            mb = seen.get(key, 0)
            seen[key] = mb + 1
            ids = expected_per_mb[mb][number].long().cpu()
            expected = torch.zeros(ids.shape[0], EXPERTS, dtype=torch.bool).scatter(1, ids, True)
            valid = self.microbatches[mb]["layout"].valid[self.microbatches[mb]["slots"]]
            ok &= torch.equal(routing_map.cpu()[valid], expected[valid])
            ok &= bool((routing_map.sum(dim=1) == TOPK).all())
        layers = self.routers.layer_numbers
        ok &= all(seen.get((n, False), 0) == NUM_MICROBATCHES for n in layers)
        if require_recompute:
            ok &= all(seen.get((n, True), 0) == NUM_MICROBATCHES for n in layers)
        return bool(ok)

    def expected_at_slots(self, routes_per_mb, slots_per_mb):
        """{layer: ids [num_tokens, K]} per microbatch, read from per-sample routes at the given slots (padding
        slots get zeros; calls_match ignores them)."""
        out = []
        for routes, mb, slots in zip(routes_per_mb, self.microbatches, slots_per_mb):
            layout = mb["layout"]
            sample, position = layout.slot_sample[slots], layout.slot_position[slots]
            per_layer = {}
            for number in self.routers.layer_numbers:
                ids = torch.zeros(len(slots), TOPK, dtype=torch.long)
                for row in range(len(slots)):
                    if sample[row] >= 0:
                        ids[row] = routes[int(sample[row])][int(position[row]), number - 1].long()
                per_layer[number] = ids
            out.append(per_layer)
        return out


def check_layout(name: str, recompute_name: str, with_errors: bool, dtype=torch.float32) -> dict:
    sizes, overrides = LAYOUTS[name]
    parallel = initialize_model_parallel(sizes, sequence_parallel=bool(overrides.get("sequence_parallel")))
    h = Harness(parallel, overrides, RECOMPUTE[recompute_name], dtype)
    recompute = recompute_name != "none"
    results = {}

    # token_slots: ours vs megatron's
    results["token_slots"] = all(torch.equal(h.megatron_slots(mb["layout"]), mb["slots"]) for mb in h.microbatches)

    # own_bitwise: a native training pass (recording its routes) vs replaying those routes row for row
    record_train, free_losses, free_grads = h.run(RouterReplayAction.RECORD)
    own = [routes_from_recorded(rec, mb["layout"].valid[mb["slots"]], 0) for rec, mb in zip(record_train.recorded, h.microbatches)]
    _, replay_losses, replay_grads = h.run(RouterReplayAction.REPLAY_FORWARD, [r.to(device()) for r in own])
    results["own_bitwise"] = free_losses == replay_losses and all(
        (a is None and b is None) or torch.equal(a, b) for a, b in zip(free_grads, replay_grads)
    )
    results["own_calls"] = h.calls_match(record_train.recorded, require_recompute=recompute)

    # r2_roundtrip: RECORD in a forward-only (old-logprob) pass, gather to per-sample routes, perturb the router
    # weights, lay the routes out again and replay them in a training pass
    record, _, _ = h.run(RouterReplayAction.RECORD, forward_only=True)
    own_routes = h.gather(record.recorded)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for routers in h.routers.by_chunk:
            for number in sorted(routers):
                weight = routers[number].weight
                weight.add_(torch.randn(weight.shape, generator=gen).to(weight.device) * 0.5)
    h.run(RouterReplayAction.REPLAY_FORWARD, h.localized(own_routes))
    results["r2_roundtrip"] = h.calls_match(record.recorded, require_recompute=recompute)
    record_after, _, _ = h.run(RouterReplayAction.RECORD, forward_only=True)
    changed = sum(
        int(not torch.equal(record_after.recorded[mb][n], record.recorded[mb][n]))
        for mb in range(NUM_MICROBATCHES) for n in h.routers.layer_numbers
    )
    changed_t = torch.tensor([changed])
    dist.all_reduce(changed_t, group=host_group())
    results["r2_sensitive"] = int(changed_t) > 0

    # r3_exact: external routes; the expected ids are looked up at token slots from megatron's own functions
    given = [mb["routes"] for mb in h.microbatches]
    h.run(RouterReplayAction.REPLAY_FORWARD, h.localized(given))
    megatron_slots = [h.megatron_slots(mb["layout"]) for mb in h.microbatches]
    results["r3_exact"] = h.calls_match(h.expected_at_slots(given, megatron_slots), require_recompute=recompute)

    # r3_gather: what the routers used under R3 (forward-only, recorded from the routing maps) gathered back with
    # the R2 inverse path equals the given routes on MoE layers (as sets per row)
    h.run(RouterReplayAction.REPLAY_FORWARD, h.localized(given), forward_only=True)
    used = [dict() for _ in range(NUM_MICROBATCHES)]
    for number, _, routing_map in h.calls:
        mb = sum(1 for per_mb in used if number in per_mb)
        used[mb][number] = routing_map.float().topk(TOPK, dim=1).indices.sort(dim=1).values.to(torch.uint8)
    moe = [i for i, m in enumerate(h.pattern) if m]
    results["r3_gather"] = all(
        torch.equal(g[:, moe], r[:, moe].sort(dim=-1).values)
        for gs, rs in zip(h.gather(used), given) for g, r in zip(gs, rs)
    )

    if with_errors:
        results.update(check_errors(h))
    flags = torch.tensor([int(bool(v)) for v in results.values()])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=host_group())
    return {key: bool(flag) for key, flag in zip(results, flags.tolist())}


def check_errors(h: Harness) -> dict:
    """Each bad case must raise RouteReplayError on every rank and leave the ranks in step."""
    rank = dist.get_rank()
    given = [mb["routes"] for mb in h.microbatches]
    results = {}

    def raises(fn) -> bool:
        try:
            fn()
        except RouteReplayError:
            return True
        return False

    def missing_layer():
        routes = h.localized(given)
        if rank == 0 and h.routers.layer_numbers:
            first = routes[0]
            keep = [i for i, n in enumerate(first.layer_numbers) if n != h.routers.layer_numbers[0]]
            routes[0] = type(first)(
                expert_ids=first.expert_ids[:, keep], layer_numbers=tuple(first.layer_numbers[i] for i in keep),
                valid=first.valid, num_valid=first.num_valid,
            )
        h.run(RouterReplayAction.REPLAY_FORWARD, routes)

    def extra_microbatch():
        routes = h.localized(given)
        h.run(RouterReplayAction.REPLAY_FORWARD, routes + routes[:1])

    def unconsumed():
        if rank == dist.get_world_size() - 1 and h.routers.layer_numbers:
            number = h.routers.layer_numbers[-1]
            chunk = next(c for c in h.routers.by_chunk if number in c)
            chunk[number].replay.install(InstalledRoutes(torch.zeros(1, TOPK, dtype=torch.uint8)))
        h.run(RouterReplayAction.REPLAY_FORWARD, h.localized(given))

    for key, fn in (("errors_missing", missing_layer), ("errors_extra", extra_microbatch), ("errors_unconsumed", unconsumed)):
        results[key] = raises(fn)
        dist.barrier()  # still in step after the error
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layouts", nargs="*", default=list(LAYOUTS))
    parser.add_argument("--recompute", nargs="*", default=list(RECOMPUTE))
    parser.add_argument("--out", default=None)
    parser.add_argument("--dtype", nargs="*", choices=("fp32", "bf16"), default=["fp32"])
    args = parser.parse_args()
    initialize_model_parallel(ParallelSizes())  # gloo/NCCL + CPU support before megatron builds anything
    rank = dist.get_rank()
    records = []
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name, recompute_name, dtype_name in [(n, r, d) for n in args.layouts for r in args.recompute
                                             for d in args.dtype]:
        start = time.time()
        try:
            results = check_layout(name, recompute_name, with_errors=recompute_name == args.recompute[0],
                                   dtype=dtypes[dtype_name])
            error = None
        except Exception as exc:  # report, keep going with the next layout
            results, error = {}, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
            print(f"rank {rank} {name}/{recompute_name} failed: {error}", file=sys.stderr, flush=True)
        record = dict(layout=name, recompute=recompute_name, dtype=dtype_name, results=results, error=error,
                      seconds=round(time.time() - start, 2))
        records.append(record)
        if rank == 0:
            print(json.dumps(record), flush=True)
    finish_launch(records, args.out)


if __name__ == "__main__":
    main()
