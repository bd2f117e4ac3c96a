"""Host syncs of a training step with R3 replay vs without, with a calibration that proves the counter counts.

    python bench/sync_count.py --device cuda [--json out.json]      # GPU only (prints a note on --device cpu)

Why a calibration: `torch.cuda.set_sync_debug_mode("warn")` only sees syncs that go through c10's checks (`.item()`,
`.cpu()`/blocking copies, `nonzero`, `Stream.synchronize` ...). It does NOT see `torch.cuda.Event.synchronize()`
(cudaEventSynchronize) nor `torch.cuda.synchronize()`, and megatron-core's alltoall dispatcher syncs exactly with
`Event.synchronize()` (`_maybe_dtoh_and_synchronize`): so a "0 syncs" reading of a MoE step means "none of the kind
the debug mode sees", not "none". This counter adds up
  implicit  every "called a synchronizing CUDA operation" warning, caught both as Python warnings
            (`catch_warnings(record=True)` + `simplefilter("always")`, so repeats from one source line all count)
            and on file descriptor 2 (C++ warnings raised outside a Python warning handler are printed there)
  explicit  calls of torch.cuda.synchronize, torch.cuda.Event.synchronize and torch.cuda.Stream.synchronize,
            wrapped for the counted region (the debug mode is switched off inside the wrapper, so a Stream.synchronize
            counts once, not twice)
The calibration runs known operations inside the counted region and checks each count (e.g. one `.item()` -> 1,
three `.item()` from one line -> 3, an event sync -> 1 explicit and 0 implicit, a pinned non_blocking copy -> 0).
Then a whole training step (forward, backward, full recompute or none) through megatron's schedule is counted with
R3 replay (including `localize_routes`, pin, copy) and with native routing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, environment, print_table, write_json  # noqa: E402

import torch  # noqa: E402

MESSAGE = "synchronizing CUDA operation"


class SyncCounter:
    """Counts host syncs inside `with counter.region():` (see the module docstring)."""

    def __init__(self) -> None:
        self.implicit = 0
        self.explicit = 0
        self.explicit_by = {}
        self.sites = {}  # "file:line (kind)" -> count: where the syncs the counter saw came from

    @property
    def total(self) -> int:
        return self.implicit + self.explicit

    @contextlib.contextmanager
    def region(self):
        self.implicit = self.explicit = 0
        self.explicit_by = {}
        self.sites = {}
        patched = [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize")]
        originals = [getattr(owner, name) for owner, name in patched]

        def wrap(label, original):
            def counted(*args, **kwargs):
                self.explicit += 1
                self.explicit_by[label] = self.explicit_by.get(label, 0) + 1
                caller = traceback.extract_stack(limit=2)[0]
                site = f"{os.path.basename(caller.filename)}:{caller.lineno} ({label})"
                self.sites[site] = self.sites.get(site, 0) + 1
                mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode(0)
                try:
                    return original(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode(mode)

            return counted

        for (owner, name), original in zip(patched, originals):
            label = f"{getattr(owner, '__name__', 'torch.cuda')}.{name}"
            setattr(owner, name, wrap(label, original))
        sys.stderr.flush()
        saved_fd = os.dup(2)
        capture = tempfile.TemporaryFile(mode="w+b")
        os.dup2(capture.fileno(), 2)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield self
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            for (owner, name), original in zip(patched, originals):
                setattr(owner, name, original)
            capture.seek(0)
            printed = capture.read().decode("utf-8", "replace")
            capture.close()
            self.implicit = sum(MESSAGE in str(w.message) for w in caught) + printed.count(MESSAGE)
            for w in caught:
                if MESSAGE in str(w.message):
                    site = f"{os.path.basename(w.filename)}:{w.lineno} (implicit)"
                    self.sites[site] = self.sites.get(site, 0) + 1
            if printed.count(MESSAGE):
                self.sites["C++ warning, no Python site"] = printed.count(MESSAGE)


def calibrate(counter: SyncCounter) -> list[tuple]:
    x = torch.ones(4, device="cuda")
    pinned = torch.ones(1 << 20).pin_memory()
    cases = []

    def case(name, fn, implicit, explicit):
        torch.cuda.synchronize()
        with counter.region():
            fn()
        torch.cuda.synchronize()
        ok = counter.implicit == implicit and counter.explicit == explicit
        cases.append((name, implicit, explicit, counter.implicit, counter.explicit, ok))

    def three_items():
        for _ in range(3):
            x.sum().item()

    def event_sync():
        event = torch.cuda.Event()
        event.record()
        event.synchronize()

    case("nothing (a kernel launch)", lambda: x.mul_(1.0), 0, 0)
    case("one .item()", lambda: x.sum().item(), 1, 0)
    case("three .item() from one source line", three_items, 3, 0)
    case("one blocking .cpu()", lambda: x.cpu(), 1, 0)
    case("pinned host -> device, non_blocking", lambda: pinned.to("cuda", non_blocking=True), 0, 0)
    case("torch.cuda.current_stream().synchronize()", lambda: torch.cuda.current_stream().synchronize(), 0, 1)
    case("torch.cuda.Event.synchronize() (megatron's dispatcher)", event_sync, 0, 1)
    case("torch.cuda.synchronize()", lambda: torch.cuda.synchronize(), 0, 1)
    case("torch.nonzero (data-dependent shape)", lambda: torch.nonzero(x), 1, 0)
    return cases


def count_step(counter: SyncCounter, recompute: str) -> dict:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    from megatron_r3.platform.distributed import host_group
    from megatron_r3.replay.microbatch import localize_routes
    from megatron_r3.replay.schedule import run_schedule
    from tests.gpu.gpu_checks import routes_for, tiny_model

    config, chunks = tiny_model(recompute)
    chunks[0].cuda()
    routers, samples, layout, slots, experts = routes_for(chunks, seq=512, batch=2)
    tokens = torch.randint(0, 512, (2, 512), device="cuda")
    positions = torch.arange(512, device="cuda").expand(2, -1)

    def forward_step(data_iterator, model):
        output = model(tokens, positions, None, labels=tokens)
        return output, lambda o: (o.float().mean(), {"loss": o.detach().float().mean()})

    def step(replay: bool) -> tuple[int, int, dict]:
        torch.cuda.synchronize()
        with counter.region():
            routes = None
            if replay:
                routes = [localize_routes(samples, layout, slots, routers.layer_numbers, experts)
                          .pin_memory().to("cuda", non_blocking=True)]
            run_schedule(get_forward_backward_func(), routers,
                         action=RouterReplayAction.REPLAY_FORWARD if replay else None, routes=routes,
                         forward_step_func=forward_step, data_iterator=iter([None]), model=chunks[0],
                         num_microbatches=1, forward_only=False, seq_length=512, micro_batch_size=2,
                         host_group=host_group())
        torch.cuda.synchronize()
        chunks[0].zero_grad(set_to_none=True)
        return counter.implicit, counter.explicit, dict(counter.explicit_by)

    step(False), step(True)  # warm-up: lazy initialisation, caching allocator
    off, r3 = step(False), step(True)
    return {"moe_layers": len(routers.layer_numbers), "off_implicit": off[0], "off_explicit": off[1],
            "off_explicit_by": off[2], "r3_implicit": r3[0], "r3_explicit": r3[1], "r3_explicit_by": r3[2],
            "replay_adds": (r3[0] + r3[1]) - (off[0] + off[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.device != "cuda" or not torch.cuda.is_available():
        print_table("Host syncs", ["section", "result"], [("sync count", "needs CUDA: run with --device cuda on a GPU")])
        return
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from megatron_r3.platform.distributed import initialize_model_parallel
    from megatron_r3.platform.parallel_context import ParallelSizes

    initialize_model_parallel(ParallelSizes())
    counter = SyncCounter()
    results = {"environment": environment("cuda")}
    cases = calibrate(counter)
    print_table("Calibration: known operations inside the counted region",
                ["operation", "expected implicit", "expected explicit", "counted implicit", "counted explicit", "ok"],
                cases)
    results["calibration"] = [dict(zip(("operation", "want_implicit", "want_explicit", "implicit", "explicit", "ok"),
                                       c)) for c in cases]
    results["calibration_ok"] = all(c[-1] for c in cases)
    rows = []
    for recompute in ("none", "full"):
        out = count_step(counter, recompute)
        results[f"step_{recompute}"] = out
        rows.append((recompute, out["moe_layers"], out["off_implicit"], out["off_explicit"], out["r3_implicit"],
                     out["r3_explicit"], out["replay_adds"], out["r3_explicit_by"]))
    print_table("Host syncs of one training step (fwd + bwd), 4-layer MoE (16 experts, top-4), bf16",
                ["recompute", "MoE layers", "off implicit", "off explicit", "R3 implicit", "R3 explicit",
                 "R3 - off", "R3 explicit by call"], rows)
    results["replay_adds_no_sync"] = all(results[f"step_{r}"]["replay_adds"] <= 0 for r in ("none", "full"))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
