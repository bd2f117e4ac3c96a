"""The layer norm of the local (TransformerEngine-free) layer spec: RMSNorm or LayerNorm that supports sequence
parallelism on any device and keeps its weights in the model's `params_dtype`.

Why not megatron's choices: without apex the local spec builds `WrappedTorchNorm`, which asserts "sequence parallel
not supported by torch LayerNorm" (TP+SP crashes at build time on GPUs without TransformerEngine, and on CPUs), and
whose `torch.nn.RMSNorm` parameters stay fp32 under `--bf16` (megatron's mixed-precision optimizer then cannot map
them in `sharded_state_dict`: "Param id N does not match any model sharded param"). apex's `FusedLayerNorm` has no
RMSNorm. TransformerEngine's `TENorm` is used unchanged when TE is installed.

Sequence parallelism: every TP rank normalises its own slice of the sequence with the same (replicated) weight, so
each rank holds only part of the weight's gradient. The weights carry `sequence_parallel = True`, the attribute
megatron's `finalize_model_grads` (`_allreduce_non_tensor_model_parallel_grads`) reads to sum those gradients over the
tensor-parallel group, exactly as for megatron's own `FusedLayerNorm` and TE's norms.

Numerics: statistics in fp32, the normalised activations cast back to the input dtype before the weight multiply
(the Hugging Face Qwen3 / Llama RMSNorm formula; identical to `torch.nn.RMSNorm` in fp32 up to rounding). On GPUs
the RMSNorm formula runs compiled into one kernel forward and one backward (`model/fusions.py`).
"""

from __future__ import annotations

import torch

from megatron_r3.model.fusions import rms_norm


class SequenceParallelNorm(torch.nn.Module):
    """`config.normalization` ("RMSNorm" or "LayerNorm") over the last dimension; megatron's norm constructor
    signature (`build_module(norm, config=..., hidden_size=..., eps=...)`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str | None = None):
        super().__init__()
        self.normalization = config.normalization
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(
                f"normalization {self.normalization!r} is not supported by megatron_r3's local spec "
                f"(RMSNorm or LayerNorm); install TransformerEngine for others"
            )
        self.zero_centered_gamma = bool(zero_centered_gamma or config.layernorm_zero_centered_gamma)
        self.hidden_size = hidden_size
        self.eps = eps
        dtype = config.params_dtype
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype)) if self.normalization == "LayerNorm" else None
        self.sequence_parallel = bool(config.sequence_parallel)
        for param in self.parameters():
            param.sequence_parallel = self.sequence_parallel  # summed over TP by finalize_model_grads under SP

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + 1 if self.zero_centered_gamma else self.weight
        if self.normalization == "RMSNorm":
            return rms_norm(x, weight, self.eps)  # one fused kernel each way on GPUs (model/fusions.py)
        normed = torch.nn.functional.layer_norm(x.float(), (self.hidden_size,), eps=self.eps)
        return weight * normed.to(x.dtype) + self.bias

    def extra_repr(self) -> str:
        return f"{self.normalization}({self.hidden_size}, eps={self.eps}, sequence_parallel={self.sequence_parallel})"
