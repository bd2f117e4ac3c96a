"""Token logprobs and entropy from logits sharded over the vocabulary (tensor parallelism).

Megatron's output layer leaves each TP rank with `V / tp` logits per token. Logprobs use megatron's own
`vocab_parallel_cross_entropy` (−CE = log p(label)); entropy needs three reductions over the vocabulary (max, sum of
exps, sum of exp·logit), done with megatron's autograd-aware reductions so an entropy bonus can be trained.
Temperature divides the logits first, matching how the rollout engines report logprobs. When megatron padded the
vocabulary (to a multiple of TP), the padding columns are excluded (set to -inf) so no probability leaks to tokens the
Hugging Face model does not have.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_r3.platform import collectives


def _scaled(logits: torch.Tensor, temperature: float, vocab_size: Optional[int], tp_rank: int) -> torch.Tensor:
    """A fresh fp32 copy: megatron's vocab_parallel_cross_entropy exponentiates its input *in place*, so handing it
    the model's logits (already fp32, temperature 1) would corrupt them for anything computed afterwards."""
    scaled = logits.to(torch.float32, copy=True)
    if temperature != 1.0:
        scaled /= temperature
    local = scaled.shape[-1]
    if vocab_size is not None and (tp_rank + 1) * local > vocab_size:
        column = torch.arange(tp_rank * local, (tp_rank + 1) * local, device=scaled.device)
        scaled = scaled.masked_fill(column >= vocab_size, float("-inf"))
    return scaled


def vocab_parallel_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, *, vocab_size: Optional[int] = None,
    tp_rank: int = 0, group=None,
) -> torch.Tensor:
    """log softmax(logits / temperature)[label], fp32, `[b, s]` from logits `[b, s, V/tp]`; `group` is the
    tensor-parallel group the vocabulary is split over (None: megatron's default)."""
    scaled = _scaled(logits, temperature, vocab_size, tp_rank)
    return -tensor_parallel.vocab_parallel_cross_entropy(scaled, labels, tp_group=group)


def vocab_parallel_entropy(
    logits: torch.Tensor, temperature: float = 1.0, group=None, *, vocab_size: Optional[int] = None, tp_rank: int = 0
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per token, fp32, differentiable, `[b, s]`."""
    scaled = _scaled(logits, temperature, vocab_size, tp_rank)
    local_max = scaled.max(dim=-1, keepdim=True).values.detach()
    if group is not None and torch.distributed.get_world_size(group) > 1:
        collectives.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = scaled - local_max
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1)
    sum_exp_logit = (exp * shifted.masked_fill(exp == 0, 0.0)).sum(dim=-1)  # -inf columns contribute 0, not NaN
    if group is not None and torch.distributed.get_world_size(group) > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=group)
        sum_exp_logit = reduce_from_tensor_model_parallel_region(sum_exp_logit, group=group)
    # H = log Z - E[logit - max] with Z = sum exp(logit - max)
    return sum_exp.log() - sum_exp_logit / sum_exp
