"""Token sampling for the embedded rollout engine: temperature, top-k, top-p, greedy, and the reported logprob.

Logprob convention (the trainer computes its logprobs the same way, so the two are comparable token by token):

    logprob(token) = log_softmax(logits / T)[token]      with T = temperature, and T = 1 when temperature == 0

i.e. the temperature-scaled model distribution *before* top-k / top-p filtering. Filtering only decides which
tokens may be drawn; it is not part of the reported probability (otherwise a top-p cut would make the logprob
depend on the sampler rather than on the policy, and the trainer could not reproduce it from logits alone).
Greedy decoding (temperature 0) reports the untempered log_softmax(logits).

Everything is computed in float32 whatever the model dtype (logits are upcast first), like SGLang's sampler.
"""

from __future__ import annotations

from typing import Optional

import torch


def logprobs_for_sampling(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in float32 over the last dim; T = 1 when temperature is 0 (greedy)."""
    scaled = logits.float()
    if temperature > 0 and temperature != 1.0:
        scaled = scaled / temperature
    return torch.log_softmax(scaled, dim=-1)


def filter_top_k_top_p(logprobs: torch.Tensor, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the top-p nucleus; top-k first, then top-p.

    ``logprobs`` is ``[B, V]`` (any monotone score works for top-k; top-p needs normalised logprobs). The nucleus
    keeps the smallest prefix of the sorted distribution (renormalised after top-k) whose mass reaches ``top_p``,
    and always at least the most likely token. ``top_k <= 0`` or ``top_k >= V`` disables top-k.
    """
    vocab = logprobs.shape[-1]
    out = logprobs
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_lp, dim=-1)  # renormalised over what top-k kept
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p  # mass of the strictly more likely tokens already reaches top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = -1,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` ``[B, V]``; return ``(tokens int64 [B], logprobs float32 [B])``.

    Temperature 0 is greedy (argmax; ties go to the lowest id). The logprob follows the module convention.
    Sampling uses ``torch.multinomial`` with ``generator``, so a seeded generator gives reproducible draws.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    logprobs = logprobs_for_sampling(logits, temperature)
    if temperature == 0:
        tokens = torch.argmax(logprobs, dim=-1)
    else:
        filtered = filter_top_k_top_p(logprobs, top_k=top_k, top_p=top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen
