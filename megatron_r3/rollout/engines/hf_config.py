"""Flags of the embedded hf rollout engine (no torch here: the registry reads them before the heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class HFEngineConfig:
    """Decode loop of the embedded hf rollout engine (megatron_r3/rollout/hf_generate.py)."""

    hf_static_decode: Literal["auto", "on", "off"] = "auto"
    """on: decode with a static KV cache, sampling and stop checks on the device (fixed shapes, one host check every
    --hf-stop-check-interval steps); off: the first loop, which retires finished sequences from a DynamicCache (a
    host sync per token; on a CPU it is the faster one); auto: on for CUDA, off on the CPU. The two loops give the
    same tokens until a sequence of the batch finishes, then differ in where the seeded generator stands."""

    hf_stop_check_interval: int = 16
    """Decode steps between host checks whether every sequence of a batch has finished (one device sync each; at
    most this many minus one extra decode forwards after the last sequence stops)."""

    hf_cuda_graph: bool = False
    """Capture the static loop's decode forward of each batch in a CUDA graph and replay it (CUDA only; the model
    must use sdpa or eager attention)."""

    def __post_init__(self):
        interval = self.hf_stop_check_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"--hf-stop-check-interval must be a positive int, got {interval!r}")

    def check(self) -> None:
        if self.hf_cuda_graph and self.hf_static_decode == "off":
            raise ValueError("--hf-cuda-graph captures the static decode loop: drop --hf-static-decode off")

    def static_decode(self, device_type: str) -> bool:
        """Whether the static loop runs on a device of this type."""
        return self.hf_static_decode == "on" or (self.hf_static_decode == "auto" and device_type == "cuda")
