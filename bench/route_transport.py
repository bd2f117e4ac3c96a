"""Route transport: bytes per (token x layer x k) on every hop from the rollout engine to the router, and the decode
throughput of SGLang's base64 int32 payload on the CPU.

    python bench/route_transport.py --device cpu [--json out.json]
    python bench/route_transport.py --device cuda        # adds the pinned host-to-device copy rate

Hops (Qwen3-30B-A3B routes: 48 MoE layers, top-8 of 128 experts):
  wire       SGLang `meta_info["routed_experts"]`: base64 of int32 (SGLang 0.5.23); uint8 for comparison only
  host       `Routes.expert_ids` after `decode_sglang_routed_experts`: compact dtype (uint8 up to 256 experts)
  scatter    rank 0 -> every rank (`share_from_rank0`: a pickled payload per rank over the gloo host group; each
             rank gets the routes of its data-parallel share and its routers' layers), measured as the pickled size
             of `TrainSample`s, and the fraction of the step's ids each rank receives (`routes_for_share`)
  device     what one rank copies host -> device: `localize_routes` keeps only its tokens (SP / CP split, its
             data-parallel share of the samples) and its MoE layers (PP stage)
Decode: one 30k-token sample (61 MB of base64), pybase64 vs the standard library (binascii), full decode (base64,
range check, narrowing to uint8) and its parts; medians and best of --repeats interleaved calls (the best is the
least disturbed by other jobs on a shared machine). Target: >= 1 GB/s of payload.
"""

from __future__ import annotations

import argparse
import binascii
import os
import pickle
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, resolve_device, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megatron_r3.rollout.engines.sglang import codec as route_module  # noqa: E402
from megatron_r3.replay.layout import pack_bshd, pack_thd, router_token_slots, sequence_pad_multiple  # noqa: E402
from megatron_r3.replay.microbatch import localize_routes  # noqa: E402
from megatron_r3.rollout.engines.sglang.codec import decode_sglang_routed_experts, encode_sglang_routed_experts  # noqa: E402

LAYERS, TOPK, EXPERTS = 48, 8, 128


def rank_share(layout_name: str, tp=1, cp=1, pp=1, dp=1, sp=False, thd=True, samples=8, tokens=4096) -> dict:
    """Fraction of the step's route ids one rank copies to its device, measured with localize_routes on rank 0 of
    each parallel group (all ranks of a group hold equal shares) times its data-parallel share of the samples."""
    multiple = sequence_pad_multiple(tp, cp, sp)
    lengths = [tokens] * samples
    layout = pack_thd(lengths, pad_multiple=multiple) if thd else pack_bshd(lengths, pad_multiple=multiple)
    gen = torch.Generator().manual_seed(0)
    routes = [torch.randint(0, EXPERTS, (n, LAYERS, TOPK), generator=gen, dtype=torch.uint8) for n in lengths]
    stage_layers = tuple(range(1, LAYERS // pp + 1))
    slots = router_token_slots(layout, context_parallel_size=cp, cp_rank=0, tensor_model_parallel_size=tp,
                               tp_rank=0, sequence_parallel=sp)
    local = localize_routes(routes, layout, slots, stage_layers, EXPERTS)
    full = sum(n for n in lengths) * LAYERS * TOPK
    fraction = local.expert_ids.numel() / full / dp  # the rank's microbatches hold 1/dp of the step's samples
    return {"layout": layout_name, "fraction": fraction, "bytes_per_id_on_rank": local.expert_ids.element_size(),
            "tokens_per_rank_microbatch": local.expert_ids.shape[0], "layers_per_rank": len(stage_layers)}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def host_share(name: str, dp: int, pp: int, vp: int) -> dict:
    """Fraction of a step's route ids that `routes_for_share` leaves for data-parallel rank 0, stage 0."""
    from megatron_r3.platform.parallel_context import ParallelContext, ParallelSizes
    from megatron_r3.replay.routes import Routes
    from megatron_r3.train.microbatching import TrainSample
    from megatron_r3.train.rollout_phase import RolloutPayload, RouteShare, routes_for_share

    samples = [TrainSample(index=i, tokens=torch.zeros(17, dtype=torch.long), prompt_length=1,
                           rollout_logprobs=torch.zeros(16), reward=0.0, advantage=0.0,
                           routes=Routes(torch.zeros(16, LAYERS, TOPK, dtype=torch.uint8), num_experts=EXPERTS))
               for i in range(8)]
    per_chunk = LAYERS // (pp * vp)  # megatron's interleaved assignment: stage 0 holds chunks 0, pp, 2pp, ...
    layers = tuple(n for chunk in range(0, pp * vp, pp) for n in range(chunk * per_chunk + 1,
                                                                       (chunk + 1) * per_chunk + 1))
    owner = ParallelContext.for_rank(ParallelSizes(), dp, 0)  # data-parallel rank 0 of dp
    share = routes_for_share(RolloutPayload(samples=samples), owner, RouteShare(layers), len(samples))
    total = sum(s.routes.nbytes() for s in samples)
    kept = sum(s.routes.nbytes() for s in share.samples if s.routes is not None)
    return {"layout": name, "fraction": kept / total, "layers": len(layers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, default=30000, help="rows of the decoded sample")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    env = environment(device)
    results: dict = {"environment": env}

    # ---------------------------------------------------------------- bytes per id on every hop
    rng = np.random.default_rng(0)
    sample = np.argsort(rng.random((args.tokens, LAYERS, EXPERTS), dtype=np.float32), axis=-1)[..., :TOPK]
    sample = sample.astype(np.int32)
    ids = sample.size
    wire_int32 = encode_sglang_routed_experts(sample, "int32")
    wire_uint8 = encode_sglang_routed_experts(sample, "uint8")
    decoded = decode_sglang_routed_experts(wire_int32, num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS)

    from megatron_r3.train.microbatching import TrainSample

    train_sample = TrainSample(index=0, tokens=torch.zeros(args.tokens + 1, dtype=torch.long), prompt_length=1,
                               rollout_logprobs=torch.zeros(args.tokens), reward=0.0, advantage=0.0,
                               routes=decoded)
    pickled = len(pickle.dumps([train_sample]))
    without_routes = len(pickle.dumps([TrainSample(index=0, tokens=train_sample.tokens, prompt_length=1,
                                                   rollout_logprobs=train_sample.rollout_logprobs, reward=0.0,
                                                   advantage=0.0)]))
    hops = [
        ("wire: SGLang base64 int32 (default)", len(wire_int32) / ids, "all decoder layers, every rank's tokens"),
        ("wire: base64 uint8 (hypothetical)", len(wire_uint8) / ids, "not sent by SGLang 0.5.23"),
        ("host: Routes after decode (uint8)", decoded.nbytes() / ids, "rank 0"),
        ("scatter: rank 0 -> each rank (pickled TrainSample)", (pickled - without_routes) / ids,
         "a rank receives its data-parallel share and its routers' layers, see below"),
        ("device: host -> GPU per rank (localize_routes)", 1.0, "only the rank's tokens and layers, see below"),
    ]
    print_table(f"Bytes per (token x layer x k) id, one {args.tokens}-token sample, {LAYERS} layers, top-{TOPK} of "
                f"{EXPERTS}", ["hop", "bytes / id", "scope"], [(h, round(b, 4), s) for h, b, s in hops])
    results["bytes_per_id"] = {h: b for h, b, _ in hops}

    shares = [
        rank_share("1 GPU"), rank_share("TP2 (no SP)", tp=2), rank_share("TP2+SP", tp=2, sp=True),
        rank_share("CP2", cp=2), rank_share("PP2", pp=2), rank_share("DP2 (or EP2: expert ranks are DP ranks)", dp=2),
        rank_share("TP2+SP x CP2 x PP2", tp=2, sp=True, cp=2, pp=2),
        rank_share("TP2+SP x CP2 x PP2 x DP2", tp=2, sp=True, cp=2, pp=2, dp=2),
    ]
    print_table("Share of the step's route ids one rank copies to its device (after localize_routes)",
                ["layout", "fraction of ids", "bytes / id", "tokens / microbatch", "layers"],
                [(s["layout"], round(s["fraction"], 4), s["bytes_per_id_on_rank"], s["tokens_per_rank_microbatch"],
                  s["layers_per_rank"]) for s in shares])
    results["rank_shares"] = shares

    host_shares = [host_share("1 rank / TP2 / CP2 (same share)", dp=1, pp=1, vp=1),
                   host_share("DP2 (or EP2)", dp=2, pp=1, vp=1), host_share("PP2", dp=1, pp=2, vp=1),
                   host_share("PP2 x VP2", dp=1, pp=2, vp=2), host_share("DP2 x PP2", dp=2, pp=2, vp=1),
                   host_share("DP4 x PP4", dp=4, pp=4, vp=1)]
    print_table("Share of the step's route ids rank 0 ships to one rank's host (routes_for_share, 48 layers)",
                ["layout", "fraction of ids", "layers per rank"],
                [(h["layout"], round(h["fraction"], 4), h["layers"]) for h in host_shares])
    results["host_shares"] = host_shares

    # ---------------------------------------------------------------- decode throughput
    import importlib.util

    have_pybase64 = importlib.util.find_spec("pybase64") is not None
    backends = {"binascii": None}
    if have_pybase64:
        import pybase64

        backends = {"pybase64": pybase64, "binascii": None}
    saved = route_module._pybase64
    times = {name: [] for name in backends}
    try:
        for _ in range(args.repeats):  # interleaved
            for name, module in backends.items():
                route_module._pybase64 = module
                times[name] += timed(lambda: decode_sglang_routed_experts(
                    wire_int32, num_layers=LAYERS, topk=TOPK, num_experts=EXPERTS), 1)
    finally:
        route_module._pybase64 = saved
    raw = binascii.a2b_base64(wire_int32)
    flat = np.frombuffer(raw, dtype="<i4")
    parts = {
        "binascii.a2b_base64 (strict)": timed(lambda: binascii.a2b_base64(wire_int32, strict_mode=True), args.repeats),
        "range check (min, max)": timed(lambda: (flat.min(), flat.max()), args.repeats),
        "narrow int32 -> uint8": timed(lambda: flat.astype(np.uint8), args.repeats),
    }
    if have_pybase64:
        parts["pybase64.b64decode (validate)"] = timed(lambda: pybase64.b64decode(wire_int32, validate=True),
                                                       args.repeats)
    size = len(wire_int32)
    rows = []
    for name, samples in times.items():
        rows.append((f"decode_sglang_routed_experts, {name}", round(statistics.median(samples) * 1e3, 2),
                     round(size / statistics.median(samples) / 1e9, 3), round(size / min(samples) / 1e9, 3)))
    for name, samples in parts.items():
        rows.append((f"  part: {name}", round(statistics.median(samples) * 1e3, 2),
                     round(size / statistics.median(samples) / 1e9, 3), round(size / min(samples) / 1e9, 3)))
    # a step's batch decoded by a thread pool (the SGLang client serves requests from threads)
    batch = [wire_int32] * 8
    workers = os.cpu_count() or 1
    with ThreadPoolExecutor(workers) as pool:
        decode = lambda text: decode_sglang_routed_experts(text, num_layers=LAYERS, topk=TOPK,  # noqa: E731
                                                            num_experts=EXPERTS)
        pooled = timed(lambda: list(pool.map(decode, batch)), max(3, args.repeats // 3))
    rows.append((f"8 samples, thread pool of {workers} ({'pybase64' if have_pybase64 else 'binascii'})",
                 round(statistics.median(pooled) * 1e3, 2), round(8 * size / statistics.median(pooled) / 1e9, 3),
                 round(8 * size / min(pooled) / 1e9, 3)))
    print_table(f"Decode of one SGLang payload: {size / 1e6:.1f} MB base64 int32 ({args.tokens} x {LAYERS} x {TOPK}); "
                f"target >= 1 GB/s of payload", ["call", "ms (median)", "GB/s (median)", "GB/s (best)"], rows)
    results["decode"] = {r[0].strip(): {"ms": r[1], "GBps_median": r[2], "GBps_best": r[3]} for r in rows}
    results["payload_bytes"] = size
    if not have_pybase64:
        print("pybase64 is not installed: `pip install pybase64` (a dependency in setup.py) for the fast decoder")

    # ---------------------------------------------------------------- host -> device rate of the rank's share
    if device == "cuda":
        layout = pack_thd([4096] * 8)
        gen = torch.Generator().manual_seed(0)
        routes = [torch.randint(0, EXPERTS, (4096, LAYERS, TOPK), generator=gen, dtype=torch.uint8)
                  for _ in range(8)]
        local = localize_routes(routes, layout, router_token_slots(layout), range(1, LAYERS + 1), EXPERTS).pin_memory()
        copies = []
        for _ in range(args.repeats + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            local.to("cuda", non_blocking=True)
            torch.cuda.synchronize()
            copies.append(time.perf_counter() - start)
        copies = copies[2:]
        nbytes = local.expert_ids.nbytes
        print_table("Host -> device copy of one rank's microbatch routes (pinned, non_blocking)",
                    ["MB", "ms (median)", "GB/s"],
                    [(round(nbytes / 1e6, 2), round(statistics.median(copies) * 1e3, 3),
                      round(nbytes / statistics.median(copies) / 1e9, 2))])
        results["h2d"] = {"bytes": nbytes, "ms": statistics.median(copies) * 1e3}
    write_json(args.json, results)


if __name__ == "__main__":
    main()
