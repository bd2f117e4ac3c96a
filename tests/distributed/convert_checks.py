"""HF <-> Megatron conversion checks for many parallel layouts in ONE torchrun launch (gloo on CPU).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc-per-node 4 tests/distributed/convert_checks.py \
        --out results.json [LAYOUT ...]

A tiny random HF model (every parameter randomised, norms included, so swapped tensors cannot hide) is loaded into
the Megatron chunks of each layout, and on every rank:
  logits_replay   Megatron logits == HF logits (max abs diff < 1e-4, fp32) when HF's own routes (captured from the
                  HF routers' top-k) are replayed through `localize_routes` + `run_schedule`
  logits_free     reported only: the diff with Megatron's native routing (no replay)
  replay_sensitive  replaying other routes (ids + 1 mod E) moves the logits by > 1e-2 (some layouts)
  export_equal    `export_hf_weights` (receivers="all") == the original checkpoint-named HF tensors, torch.equal,
                  same names in `export_order`
  buckets         `export_hf_buckets` gives the same names in buckets within the byte limit (some layouts)
  saved_dir       `save_hf_checkpoint` (sharded + index) reloads with `from_pretrained` bit-identically and loads
                  into Megatron again from the directory (some layouts)
  tools_roundtrip HF dir -> tools/convert_hf_to_mcore.py (TP2) -> tools/convert_mcore_to_hf.py (EP2) -> identical
Rank 0 writes one JSON object per layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.distributed.launch import finish_launch  # noqa: E402

TOLERANCE = 1e-4
SEQ, BATCH = 16, 2


def make_hf_model(kind: str):
    """Tiny fp32 HF model, eager attention, every parameter random (seeded: identical on every rank)."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager",
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    )
    if kind == "qwen3":
        config, cls = Qwen3MoeConfig(**common, norm_topk_prob=True), Qwen3MoeForCausalLM
    elif kind == "qwen3_tied":
        config, cls = Qwen3MoeConfig(**common, norm_topk_prob=True, tie_word_embeddings=True), Qwen3MoeForCausalLM
    elif kind == "qwen2_shared":  # shared expert with sigmoid gate, q/k/v bias, no q/k norm, norm_topk_prob=False
        config = Qwen2MoeConfig(**common, shared_expert_intermediate_size=48, norm_topk_prob=False, qkv_bias=True)
        cls = Qwen2MoeForCausalLM
    elif kind.startswith("deepseek"):  # DeepSeek-V3 family: MLA, sigmoid router with a large expert bias
        from tests.unit.test_deepseek_v3 import make_hf

        return make_hf({"deepseek": "gloo_q_lora_groups", "deepseek_noq": "gloo_no_q_lora"}[kind])
    else:
        raise KeyError(kind)
    torch.manual_seed(0)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)
    return model


def hf_reference(model, tokens):
    """(logits [B, S, V], per-sample routes [S, L_all, K] uint8 with dense layers 0) from HF's own routers."""
    import torch

    captured = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            hooks.append(gate.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[2].detach())))
    with torch.no_grad():
        out = model(input_ids=tokens, output_router_logits=True)
    for hook in hooks:
        hook.remove()
    config = model.config
    B, S = tokens.shape
    K = config.num_experts_per_tok
    routes = torch.zeros(B, S, config.num_hidden_layers, K, dtype=torch.uint8)
    for i, ids in captured.items():
        routes[:, :, i] = ids.view(B, S, K).to(torch.uint8)
        if config.model_type != "deepseek_v3":  # softmax routers: same top-k, same order as the router logits
            logits = out.router_logits[sorted(captured).index(i)]
            assert torch.equal(torch.topk(torch.softmax(logits.float(), -1), K, dim=-1).indices, ids)
    return out.logits.detach(), [routes[b] for b in range(B)]


LAYOUTS = {
    # name: (model, ParallelSizes kwargs, config overrides, extra checks)
    "tp1": ("qwen3", {}, {}, ("buckets",)),
    "tp2sp": ("qwen3", dict(tensor_model_parallel_size=2), dict(sequence_parallel=True), ()),
    "ep2": ("qwen3", dict(expert_model_parallel_size=2), {}, ()),
    "tp2ep2": (
        "qwen3",
        dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
        dict(sequence_parallel=True),
        ("buckets", "replay_sensitive"),
    ),
    "pp2": ("qwen3", dict(pipeline_model_parallel_size=2), {}, ("saved_dir",)),
    "pp2vp2_tied": (
        "qwen3_tied",
        dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        {},
        ("replay_sensitive",),
    ),
    "tp2_tied": ("qwen3_tied", dict(tensor_model_parallel_size=2), {}, ()),
    "tp2ep2etp1_shared": (
        "qwen2_shared",
        dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1),
        dict(sequence_parallel=True),
        ("saved_dir",),
    ),
    # GroupedExperts (model/grouped_experts.py, stacked weights seen per expert under TE GroupedMLP names), ETP2 x EP2
    "tp2ep2_grouped": (
        "qwen3",
        dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
        dict(sequence_parallel=True, moe_grouped_gemm=True),
        ("saved_dir", "replay_sensitive"),
    ),
    # DeepSeek-V3 family (MLA with and without q LoRA, expert_bias buffer, shared experts, dense-first layers)
    "ds_tp2sp": ("deepseek", dict(tensor_model_parallel_size=2), dict(sequence_parallel=True), ("replay_sensitive",)),
    "ds_ep2": ("deepseek", dict(expert_model_parallel_size=2), {}, ("buckets",)),
    "ds_pp2_noq": ("deepseek_noq", dict(pipeline_model_parallel_size=2), {}, ("saved_dir",)),
    # ... with the grouped experts a bf16 GPU run builds (GroupedExperts' stacked weights) over ETP2 x EP2
    "ds_tp2ep2_noq_grouped": (
        "deepseek_noq",
        dict(tensor_model_parallel_size=2, expert_model_parallel_size=2),
        dict(sequence_parallel=True, moe_grouped_gemm=True),
        ("replay_sensitive",),
    ),
}


class Context:
    """Per-model HF reference data, computed once per launch."""

    def __init__(self):
        self.models = {}

    def get(self, kind):
        if kind not in self.models:
            import torch

            from megatron_r3.model.hf_module import hf_state_dict_to_checkpoint_names

            model = make_hf_model(kind)
            gen = torch.Generator().manual_seed(5)
            sequences = [torch.randint(0, model.config.vocab_size, (SEQ + 1,), generator=gen) for _ in range(BATCH)]
            tokens = torch.stack([s[:-1] for s in sequences])
            logits, routes = hf_reference(model, tokens)
            ckpt = {n: t.clone() for n, t in hf_state_dict_to_checkpoint_names(model)}
            self.models[kind] = dict(model=model, sequences=sequences, logits=logits, routes=routes, ckpt=ckpt)
        return self.models[kind]


def forward_logits(chunks, config, parallel, sequences, routes, replay: bool):
    """Full-vocabulary logits [B, S, V] of one forward-only microbatch (None on ranks without the last stage)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.replay.layout import pack_bshd, router_token_slots, sequence_pad_multiple
    from megatron_r3.replay.microbatch import localize_routes
    from megatron_r3.replay.schedule import ReplayRouters, run_schedule
    from megatron_r3.train.batch import microbatch_inputs

    tp, tp_rank = parallel.tp_size, parallel.tp_rank
    sp = bool(config.sequence_parallel)
    routers = ReplayRouters(chunks)
    # one sample per microbatch: the interleaved (VP) schedule needs at least PP microbatches
    layouts = [pack_bshd([len(s) - 1], pad_multiple=sequence_pad_multiple(tp, 1, sp)) for s in sequences]
    inputs = [microbatch_inputs([s], layout) for s, layout in zip(sequences, layouts)]
    micro_routes = None
    if replay:
        micro_routes = []
        for sample_routes, layout in zip(routes, layouts):
            slots = router_token_slots(layout, tensor_model_parallel_size=tp, tp_rank=tp_rank, sequence_parallel=sp)
            micro_routes.append(localize_routes([sample_routes], layout, slots, routers.layer_numbers,
                                                config.num_moe_experts))
    collected = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch.tokens, batch.position_ids, None)

        def loss_func(output_tensor):
            full = gather_from_tensor_model_parallel_region(output_tensor)
            collected.append(full.detach().clone())
            return output_tensor.sum() * 0.0, {}

        return output, loss_func

    vp = len(chunks) > 1
    iterators = [iter(inputs) for _ in chunks] if vp else iter(inputs)
    run_schedule(
        get_forward_backward_func(), routers, action=RouterReplayAction.REPLAY_FORWARD if replay else None,
        routes=micro_routes, forward_step_func=forward_step, data_iterator=iterators,
        model=chunks if vp else chunks[0], num_microbatches=len(inputs), forward_only=True,
        seq_length=layouts[0].seq_length, micro_batch_size=1, host_group=parallel.host_group,
    )
    return torch.cat(collected, dim=0) if collected else None


def check_layout(name: str, ctx: Context, workdir: str) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_r3.model.families import arch_from_hf_config, build_from_hf_config
    from megatron_r3.model.weights import (
        SafetensorsSource,
        export_hf_buckets,
        export_hf_weights,
        export_order,
        load_hf_weights,
        save_hf_checkpoint,
    )
    from megatron_r3.platform.distributed import initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    kind, sizes_kwargs, overrides, extra = LAYOUTS[name]
    ref = ctx.get(kind)
    parallel = initialize_model_parallel(ParallelSizes(**sizes_kwargs),
                                         sequence_parallel=bool(overrides.get("sequence_parallel")))
    hf_config = ref["model"].config
    arch = arch_from_hf_config(hf_config)
    config, chunks = build_from_hf_config(hf_config, parallel, use_cpu_initialization=True, **overrides)
    for chunk in chunks:
        chunk.eval()
    load_hf_weights(chunks, ref["ckpt"], arch, parallel)
    results, report = {}, {}

    # logits exist on last-stage ranks only (-1 elsewhere); every rank takes part in the same reductions
    logits = forward_logits(chunks, config, parallel, ref["sequences"], ref["routes"], replay=True)
    free = forward_logits(chunks, config, parallel, ref["sequences"], ref["routes"], replay=False)
    diffs = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    if logits is not None:
        diffs[0] = (logits[..., : arch.vocab_size] - ref["logits"]).abs().max().item()
    if free is not None:
        diffs[1] = (free[..., : arch.vocab_size] - ref["logits"]).abs().max().item()
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    report["logits_replay_max_abs_diff"], report["logits_free_max_abs_diff"] = diffs.tolist()
    results["logits_replay"] = 0.0 <= report["logits_replay_max_abs_diff"] < TOLERANCE
    if "replay_sensitive" in extra:  # replaying other routes changes the logits: the replay is not a silent no-op
        shifted = [((r.long() + 1) % arch.num_experts).to(r.dtype) for r in ref["routes"]]
        other = forward_logits(chunks, config, parallel, ref["sequences"], shifted, replay=True)
        moved = torch.tensor([-1.0 if other is None else
                              (other[..., : arch.vocab_size] - ref["logits"]).abs().max().item()], dtype=torch.float64)
        dist.all_reduce(moved, op=dist.ReduceOp.MAX)
        report["logits_other_routes_max_abs_diff"] = moved.item()
        results["replay_sensitive"] = moved.item() > 1e-2

    names, equal = [], True
    for hf_name, tensor in export_hf_weights(chunks, arch, parallel, receivers="all"):
        names.append(hf_name)
        equal &= hf_name in ref["ckpt"] and torch.equal(tensor, ref["ckpt"][hf_name])
    results["export_equal"] = bool(equal) and names == export_order(arch) and sorted(names) == sorted(ref["ckpt"])

    if "buckets" in extra:
        limit = 20_000
        buckets = list(export_hf_buckets(chunks, arch, parallel, bucket_bytes=limit))
        flat = [n for bucket in buckets for n, _ in bucket]
        rank0 = dist.get_rank() == 0
        ok = flat == export_order(arch) and len(buckets) > 1
        for bucket in buckets:
            sizes_b = [ref["ckpt"][n].numel() * 4 for n, _ in bucket]
            ok &= len(bucket) == 1 or sum(sizes_b) <= limit
            ok &= all((t is not None) == rank0 for _, t in bucket)
            ok &= not rank0 or all(torch.equal(t, ref["ckpt"][n]) for n, t in bucket)
        results["buckets"] = bool(ok)

    if "saved_dir" in extra:
        out = os.path.join(workdir, f"saved_{name}")
        written = save_hf_checkpoint(chunks, arch, hf_config, out, parallel, max_shard_bytes=200_000)
        ok = True
        if dist.get_rank() == 0:
            from transformers import AutoModelForCausalLM

            ok &= "model.safetensors.index.json" in os.listdir(out) and len(written) > 2
            reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
            original = ref["model"].state_dict()
            ok &= sorted(reloaded.state_dict()) == sorted(original)
            ok &= all(torch.equal(t, original[n]) for n, t in reloaded.state_dict().items())
        dist.barrier()
        # and back into Megatron from the directory (each rank reads its own tensors)
        for chunk in chunks:
            for param in chunk.parameters():
                param.data.zero_()
        load_hf_weights(chunks, SafetensorsSource(out), arch, parallel)
        again = dict(export_hf_weights(chunks, arch, parallel, receivers="all"))
        ok &= all(torch.equal(again[n], ref["ckpt"][n]) for n in ref["ckpt"])
        results["saved_dir"] = bool(ok)

    flags = torch.tensor([int(bool(v)) for v in results.values()])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    agreed = {key: bool(flag) for key, flag in zip(results, flags.tolist())}
    return dict(results=agreed, report=report)


def check_tools(ctx: Context, workdir: str, kind: str = "qwen3") -> dict:
    """HF dir -> convert_hf_to_mcore (TP2, SP) -> convert_mcore_to_hf (EP2) -> identical safetensors."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_hf_to_mcore
    import convert_mcore_to_hf

    ref = ctx.get(kind)
    hf_dir, mcore_dir, back_dir = (os.path.join(workdir, f"{d}_{kind}") for d in ("hf", "mcore", "hf_back"))
    if dist.get_rank() == 0:
        ref["model"].save_pretrained(hf_dir)
    dist.barrier()
    convert_hf_to_mcore.main(["--hf-dir", hf_dir, "--out", mcore_dir, "--tensor-model-parallel-size", "2",
                              "--sequence-parallel"])
    convert_mcore_to_hf.main(["--checkpoint", mcore_dir, "--out", back_dir, "--expert-model-parallel-size", "2",
                              "--max-shard-size-mb", "0.25"])
    ok = True
    if dist.get_rank() == 0:
        from safetensors.torch import load_file

        from megatron_r3.model.weights import SafetensorsSource

        back = SafetensorsSource(back_dir)
        ok &= sorted(back.names()) == sorted(ref["ckpt"])
        ok &= all(torch.equal(back.get(n), ref["ckpt"][n]) for n in ref["ckpt"])
        original = {}
        for file in os.listdir(hf_dir):
            if file.endswith(".safetensors"):
                original.update(load_file(os.path.join(hf_dir, file)))
        ok &= sorted(original) == sorted(back.names())
        with open(os.path.join(back_dir, "config.json")) as handle:
            ok &= json.load(handle)["n_routed_experts" if kind.startswith("deepseek") else "num_experts"] == 8
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return dict(results={"tools_roundtrip": bool(flag.item())}, report={})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("layouts", nargs="*", default=list(LAYOUTS) + ["tools", "tools_deepseek"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if not torch.cuda.is_available() and not getattr(torch.Tensor.cuda, "_convert_checks", False):
        # Tied embeddings with PP > 1: megatron's LanguageModule.setup_embeddings_and_output_layer runs
        # `weight.data = weight.data.cuda()` before the first/last-stage all-reduce; megatron_r3.platform.cpu_support
        # has no answer to that call yet, so this launch maps it onto the CPU (test scope only).
        def cpu_cuda(self, *args, **kwargs):
            return self

        cpu_cuda._convert_checks = True
        torch.Tensor.cuda = cpu_cuda
    from megatron_r3.platform.distributed import initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    initialize_model_parallel(ParallelSizes())
    rank = dist.get_rank()
    ctx = Context()
    records = []
    workdir = tempfile.mkdtemp(prefix="convert_checks_") if rank == 0 else None
    shared = [workdir]
    dist.broadcast_object_list(shared, src=0)
    workdir = shared[0]
    for name in args.layouts:
        start = time.time()
        try:
            if name.startswith("tools"):
                outcome = check_tools(ctx, workdir, "deepseek" if name == "tools_deepseek" else "qwen3")
            else:
                outcome = check_layout(name, ctx, workdir)
            error = None
        except Exception as exc:  # report, keep going with the next layout
            outcome = dict(results={}, report={})
            error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
        record = dict(layout=name, **outcome, error=error, seconds=round(time.time() - start, 2))
        records.append(record)
        if rank == 0:
            print(json.dumps(record), flush=True)
    finish_launch(records, args.out)


if __name__ == "__main__":
    main()
