"""The rollout interface every engine implements (embedded `hf`, remote `sglang`).

An engine turns prompts into sampled responses with the engine's own per-token logprobs and, for R3, the expert
ids it chose in every MoE layer for every position it fed through the model, in SGLang's layout
(`[T-1, num_hidden_layers, num_experts_per_tok]`, dense layers zero). Whatever the engine, the trainer sees the
same `RolloutSample`s, so it cannot tell the engines apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence

import torch

from megatron_r3.replay.routes import Routes


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, with SGLang's field names where they exist."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RolloutSample:
    """One sampled response.

    tokens: prompt + response token ids, `[T]` (int64, CPU).
    prompt_length: number of prompt tokens at the start of `tokens`.
    response_logprobs: the engine's logprob of each response token, `[T - prompt_length]` (float32).
    routes: expert ids for positions `0 .. T-2` (`Routes.end_row == T - 1`), or None when not requested.
    finish_reason: "stop" (a stop token), "length" (max_new_tokens) or "abort".
    prompt_index: index of the prompt in the `generate` call.
    response_mask: bool `[T - prompt_length]`, True where the model generated the token, False where a multi-turn
        rollout inserted it (tool/user turns; :mod:`megatron_r3.rollout.multiturn`); None: every response token was
        generated (single turn). Inserted tokens carry no loss and their `response_logprobs` are 0, but they still
        have route rows: they pass through the MoE layers.
    """

    tokens: torch.Tensor
    prompt_length: int
    response_logprobs: torch.Tensor
    routes: Optional[Routes]
    finish_reason: str
    prompt_index: int
    response_mask: Optional[torch.Tensor] = None

    @property
    def response_length(self) -> int:
        return self.tokens.shape[0] - self.prompt_length

    @property
    def response_ids(self) -> torch.Tensor:
        return self.tokens[self.prompt_length :]

    def final_turn_ids(self) -> torch.Tensor:
        """The tokens the model generated after the last inserted span (the whole response for a single turn): the
        answer a multi-turn task's reward checks."""
        if self.response_mask is None:
            return self.response_ids
        inserted = torch.nonzero(~self.response_mask.bool()).flatten()
        start = int(inserted[-1]) + 1 if inserted.numel() else 0
        return self.response_ids[start:]


@dataclass
class RolloutFailure:
    """A prompt the engine could not serve (after retries); reported, never silently dropped."""

    prompt_index: int
    reason: str


@dataclass
class RolloutResult:
    samples: list[RolloutSample]
    failures: list[RolloutFailure] = field(default_factory=list)


class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        samples_per_prompt: int = 1,
        return_routes: bool = False,
        routes_start_len: Optional[Sequence[int]] = None,
    ) -> RolloutResult:
        """Sample `samples_per_prompt` responses per prompt; samples come back grouped by prompt, in prompt order.

        routes_start_len: per prompt, the first route row to return (SGLang's `routed_experts_start_len`, in
        `[0, len(prompt)]`): routes then cover rows `start_len .. T-2` (`Routes.start_row == start_len`). A
        multi-turn rollout asks each later turn only for the rows the earlier turns did not cover."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights given by Hugging Face checkpoint names (full, unsharded tensors)."""
        ...

    def close(self) -> None:
        ...
