"""Where the fast path's fwd+bwd step time goes: torch.profiler over a few steps of bench/layer_mfu.py's fast model
(GroupedExperts + SDPA, Qwen3-30B-A3B-shaped layers), printed as Markdown tables.

    python bench/profile_step.py --device cuda --json out.json     # ~20 s on an H200
    python bench/profile_step.py --device cpu                       # the same code on the CPU preset (seconds)

Tables
  step        wall time per step, GPU kernel time per step (sum of kernel durations) and the difference (GPU idle:
              launch gaps, host syncs, Python).
  categories  GPU kernel time per step split by what launched it: the forward by module (record_function ranges
              opened by forward hooks: experts, router, token dispatch = MoE layer minus router and experts,
              core attention, attention linears (qkv/proj), norms, embedding, output layer, loss, the rest of the
              attention and of the layer), the backward
              by the autograd node that ran it (grouped-mm/stack nodes -> experts, SDPA nodes -> core attention,
              mm/addmm -> dense matmuls, index/scatter/sort/gather -> dispatch, topk/softmax -> router, norms,
              AccumulateGrad, rest).
  kernels     top --top CUDA kernels by self device time (ms per step, calls per step, share of kernel time).
  cpu ops     top --top CPU ops by self CPU time (ms per step, calls per step): host overhead, syncs.
  ddp         last: the same step inside megatron's DistributedDataParallel (fp32 main grads, the distributed
              optimizer's param buffer) and whether GroupedExperts still reads its weights without a copy there.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, select_device, write_json  # noqa: E402

import torch  # noqa: E402

# forward module labels, checked in this order (the first matching class name wins)
MODULE_LABELS = (
    ("GroupedExperts", "experts"), ("SequentialMLP", "experts"), ("TopKRouter", "router"),
    ("DotProductAttention", "core attention"), ("MoELayer", "token dispatch + permute"),
    ("ColumnParallelLinear", "dense linears"), ("RowParallelLinear", "dense linears"),
    ("Norm", "norms"), ("LanguageModelEmbedding", "embedding"),
    ("SelfAttention", "attention rest (RoPE, qkv split)"), ("TransformerLayer", "layer rest (residuals)"),
)

# backward: (pattern on the autograd node / op names of the launching op's ancestors, category), first match wins
BACKWARD_RULES = (
    (r"grouped_mm|GroupedMm|_StackedParameters|_ContiguousGrad", "experts"),
    (r"scaled_dot_product|[Ff]lash|[Ee]fficientAttention|[Cc]udnnAttention|ScaledDotProduct", "core attention"),
    (r"[Nn]orm", "norms"),
    (r"[Tt]opk|[Ss]oftmax", "router"),
    (r"[Ii]ndex|[Ss]catter|[Ss]ort|[Gg]ather|[Pp]ermute|MaskedSelect|[Bb]incount|[Cc]umsum", "token dispatch + permute"),
    (r"\bMm|Addmm|Bmm|[Ll]inear|matmul|aten::mm|aten::addmm", "dense linears"),
    (r"[Ee]mbedding", "embedding"),
    (r"AccumulateGrad", "grad accumulation (param.grad)"),
)


class ForwardLabels:
    """Forward hooks that open a profiler range `fwd:<label>` around each labelled module's forward."""

    def __init__(self, model):
        self.handles, self.open = [], []
        for name, module in model.named_modules():
            label = "output layer" if name.split(".")[-1] == "output_layer" else self._label(module)
            if label is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(label)))
            self.handles.append(module.register_forward_hook(self._exit))

    @staticmethod
    def _label(module):
        name = type(module).__name__
        for key, label in MODULE_LABELS:
            if key in name:
                return label
        return None

    def _enter(self, label):
        def hook(module, args):
            scope = torch.profiler.record_function(f"fwd:{label}")
            scope.__enter__()
            self.open.append(scope)
        return hook

    def _exit(self, module, args, output):
        self.open.pop().__exit__(None, None, None)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def categorize(events, steps: int, cpu_self_time: bool = False) -> dict:
    """GPU kernel time per step (ms) by (pass, category), from the launching op's ancestor chain; with
    `cpu_self_time` (a CPU run: no kernels) each op's self CPU time instead, so the same attribution runs here."""
    totals = defaultdict(float)
    unexplained = defaultdict(float)  # "other": the autograd node (backward) or the op (forward), for a look
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        kernels = getattr(event, "kernels", None)
        if cpu_self_time:
            weight = event.self_cpu_time_total
        elif kernels:
            weight = sum(k.duration for k in kernels)
        else:
            continue
        chain, node = [], event
        while node is not None:
            chain.append(node.name)
            node = node.cpu_parent
        labels = [name[4:] for name in chain if name.startswith("fwd:")]
        backward = any("evaluate_function" in name or "Backward" in name for name in chain)
        if labels and not backward:
            inner = labels[0]
            if inner == "token dispatch + permute" and re.search(r"loss|cross_entropy|log_softmax", " ".join(chain)):
                inner = "loss"
            key = ("forward", inner)
        elif backward:
            text = " ".join(chain)
            category = next((label for pattern, label in BACKWARD_RULES if re.search(pattern, text)), "other")
            key = ("backward", category)
        else:
            text = " ".join(chain)
            category = "loss" if re.search(r"loss|cross_entropy|log_softmax|mean", text) else "other"
            key = ("forward", category)
        totals[key] += weight / 1e3 / steps
        if key[1] == "other":
            node = next((name for name in chain if "evaluate_function" in name), event.name)
            unexplained[f"{key[0]}: {node.replace('autograd::engine::evaluate_function: ', '')}"] += weight / 1e3 / steps
    return totals, unexplained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-ddp", action="store_true", help="skip the DistributedDataParallel step timing")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.device = select_device(args.device)

    from layer_mfu import PRESETS, Stepper, build, sync

    from megatron_r3.model.grouped_experts import GroupedExperts
    from megatron_r3.platform.distributed import device, initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    args.preset = args.preset or ("qwen3-30b-a3b-4l" if args.device == "cuda" else "cpu-tiny")
    preset = PRESETS[args.preset]
    initialize_model_parallel(ParallelSizes())
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {"environment": environment(args.device), "args": vars(args)}

    config, model = build(preset, dtype, fast=True)
    stepper = Stepper(model, preset, dev)
    for _ in range(args.warmup):
        stepper.step()
    plain_ms = statistics.median(stepper.step() for _ in range(5)) * 1e3

    labels = ForwardLabels(model)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    stepper.step()  # hooks warm
    sync(dev)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            stepper.step()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    labels.remove()
    events = prof.events()
    # device-side events minus the profiler ranges mirrored on the GPU timeline (our `fwd:<label>` ranges and other
    # user annotations span many kernels: counting them as kernels doubled the kernel time of the first H200 run)
    device_events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU
                     and not getattr(e, "is_user_annotation", False) and not e.name.startswith("fwd:")]
    kernel_ms = sum(e.time_range.elapsed_us() for e in device_events) / 1e3 / args.steps

    step_rows = [("step ms, no profiler (median of 5)", plain_ms),
                 (f"step ms under the profiler (mean of {args.steps})", wall_ms),
                 ("GPU kernel time per step, ms" if dev.type == "cuda" else "device kernel time (CPU run: none)",
                  kernel_ms),
                 ("GPU idle per step, ms (wall - kernels)", wall_ms - kernel_ms)]
    results["step"] = dict(step_rows)
    print_table(f"profile of the fast path, {args.preset}, {dtype}", ["quantity", "value"], step_rows)

    cpu_run = dev.type != "cuda"
    totals, unexplained = categorize(events, args.steps, cpu_self_time=cpu_run)
    if cpu_run:
        kernel_ms = sum(totals.values())
    categories = sorted({c for _, c in totals})
    rows = []
    for category in sorted(categories, key=lambda c: -(totals[("forward", c)] + totals[("backward", c)])):
        f, b = totals[("forward", category)], totals[("backward", category)]
        rows.append((category, f, b, f + b, (f + b) / kernel_ms if kernel_ms else float("nan")))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows), 1.0))
    results["categories_ms_per_step"] = rows
    print_table(("CPU self time (CPU run)" if cpu_run else "GPU kernel time") + " per step by module (forward: "
                "module ranges; backward: autograd node)",
                ["module", "forward ms", "backward ms", "total ms", "share"], rows)

    rows = sorted(unexplained.items(), key=lambda item: -item[1])[:12]
    results["other_ms_per_step"] = rows
    print_table("'other' above: the autograd nodes / ops behind it", ["pass: node or op", "ms / step"], rows)

    by_kernel = defaultdict(lambda: [0.0, 0])
    for e in device_events:
        by_kernel[e.name][0] += e.time_range.elapsed_us() / 1e3 / args.steps
        by_kernel[e.name][1] += 1
    top = sorted(by_kernel.items(), key=lambda item: -item[1][0])[:args.top]
    rows = [(name[:110].replace("|", "/"), ms, count / args.steps, ms / kernel_ms if kernel_ms else float("nan"))
            for name, (ms, count) in top]
    results["top_kernels"] = rows
    print_table(f"top {args.top} CUDA kernels by self time", ["kernel", "ms / step", "calls / step", "share"], rows)

    cpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    cpu.sort(key=lambda e: -e.self_cpu_time_total)
    rows = [(e.key[:90].replace("|", "/"), e.self_cpu_time_total / 1e3 / args.steps, e.count / args.steps,
             e.cpu_time_total / 1e3 / args.steps) for e in cpu[:args.top]]
    results["top_cpu_ops"] = rows
    print_table(f"top {args.top} CPU ops by self CPU time", ["op", "self ms / step", "calls / step",
                                                             "total ms / step (incl. children)"], rows)
    write_json(args.json, results)  # written twice: a timeout in the DDP part keeps the profile

    # DDP: the trainer's wrapping (fp32 main grads); how many parameters (grad hooks, AccumulateGrad nodes) it has
    ddp = {}
    if not args.no_ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        wrapped = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True))
        experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
        ddp["parameters (DDP grad hooks)"] = sum(1 for p in model.parameters() if p.requires_grad)
        ddp["of them routed-expert weights"] = sum(1 for e in experts for p in e.parameters())
        ddp_stepper = Stepper(wrapped, preset, dev)
        for _ in range(args.warmup):
            ddp_stepper.step()
        ddp["DDP step ms (median of 5)"] = statistics.median(ddp_stepper.step() for _ in range(5)) * 1e3
        ddp["step ms without DDP (above)"] = plain_ms
        results["ddp"] = ddp
        print_table("the same step inside megatron's DistributedDataParallel (fp32 main grads, distributed optimizer's "
                    "param buffer)", ["quantity", "value"], list(ddp.items()))

    write_json(args.json, results)


if __name__ == "__main__":
    main()
