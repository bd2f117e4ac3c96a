"""Multi-turn (agentic) rollouts: several ``generate`` calls over a growing context, stitched into one sample.

Turn 1 samples a response to the prompt. Before each later turn a deterministic ``tool`` appends its reply (tool or
user tokens) to the conversation, and the engine continues from the whole context. The trainer then sees one
:class:`~megatron_r3.rollout.base.RolloutSample` per conversation:

* ``tokens`` is the whole conversation (prompt, answer 1, tool reply, answer 2, ...);
* ``response_mask`` is True on the model's own tokens only: inserted tokens carry no loss and no rollout logprob
  (their ``response_logprobs`` entries are 0);
* ``routes`` cover every fed position, ``0 .. T-2`` (the T-1 rule over the whole conversation), inserted tokens
  included: they pass through the MoE layers, so R3 replays them like any other token.

Routes of a later turn are requested with ``routed_experts_start_len`` = the previous turn's ``T - 1`` (SGLang
0.5.23 then returns rows ``[start_len, seqlen - 1)``, and so does the embedded engine). The previous turn's last
sampled token was never fed there, so its row, and the inserted tokens' rows, come from this turn's prefill; the
earlier rows are the ones the earlier turns returned (with the radix cache on, SGLang returns for cached positions
the routes that computed their KV, which are those rows). :func:`stitch_routes` checks that the parts tile
``0 .. T-2`` exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from megatron_r3.replay.routes import RouteError, Routes
from megatron_r3.rollout.base import RolloutEngine, RolloutFailure, RolloutResult, RolloutSample, SamplingParams

# (prompt index, number of turns done so far, conversation token ids) -> the token ids to insert before the next turn
ToolFn = Callable[[int, int, list], Sequence[int]]
_TURN_SEED_STRIDE = 1_000_033  # turn t samples with seed + t * stride: no two turns share a seed
_SEED_MASK = (1 << 63) - 1


def stitch_routes(parts: Sequence[Routes], turn_lengths: Sequence[int], *, sample_id) -> Routes:
    """One conversation's routes from its turns' parts: part k must cover rows ``[T_{k-1} - 1, T_k - 1)`` (``T_k``
    the conversation's length after turn k, ``T_0 - 1`` read as 0), so together they cover ``0 .. T-2``."""
    if len(parts) != len(turn_lengths) or not parts:
        raise RouteError(f"{len(parts)} route parts for {len(turn_lengths)} turns", sample_id=sample_id)
    start = 0
    for turn, (part, length) in enumerate(zip(parts, turn_lengths), start=1):
        if part.start_row != start:
            raise RouteError(
                f"turn {turn} routes start at row {part.start_row}, expected {start} (routed_experts_start_len of "
                f"turn {turn} must be the previous turn's T-1 = {start})", sample_id=sample_id)
        if part.end_row != length - 1:
            raise RouteError(
                f"turn {turn} routes have {part.num_rows} rows, expected T - 1 - start_len = {length} - 1 - {start} "
                f"= {length - 1 - start}", sample_id=sample_id)
        if (part.num_layers, part.topk, part.num_experts) != (parts[0].num_layers, parts[0].topk,
                                                              parts[0].num_experts):
            raise RouteError(f"turn {turn} routes have {part.num_layers} layers x top-{part.topk} of "
                             f"{part.num_experts} experts, turn 1 {parts[0].num_layers} x top-{parts[0].topk} of "
                             f"{parts[0].num_experts}", sample_id=sample_id)
        start = part.end_row
    ids = torch.cat([part.expert_ids for part in parts])
    return Routes(ids, num_experts=parts[0].num_experts, start_row=0, source=parts[0].source)


@dataclass
class _Conversation:
    prompt_index: int
    prompt_length: int
    tokens: list
    mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    routes: list = field(default_factory=list)
    turn_lengths: list = field(default_factory=list)
    finish_reason: str = "stop"

    def add_turn(self, inserted: Sequence[int], sample: RolloutSample) -> None:
        context = self.tokens + list(inserted)
        if sample.tokens[: len(context)].tolist() != context:
            raise ValueError(f"prompt {self.prompt_index}: the engine's sample does not start with the context sent")
        response = sample.response_ids.tolist()
        self.tokens = context + response
        self.mask += [False] * len(inserted) + [True] * len(response)
        self.logprobs += [0.0] * len(inserted) + sample.response_logprobs.float().tolist()
        self.routes.append(sample.routes)
        self.turn_lengths.append(len(self.tokens))
        self.finish_reason = sample.finish_reason


def generate_multiturn(
    engine: RolloutEngine,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    *,
    samples_per_prompt: int,
    return_routes: bool,
    num_turns: int,
    tool: ToolFn,
) -> RolloutResult:
    """``num_turns`` turns per sample (the tool's reply inserted before each later turn); samples grouped by prompt,
    in prompt order, like ``engine.generate``. A prompt any of whose conversations fails at any turn is a failure."""
    if isinstance(num_turns, bool) or not isinstance(num_turns, int) or num_turns < 1:
        raise ValueError(f"num_turns must be a positive int, got {num_turns!r}")
    first = engine.generate(prompts, sampling, samples_per_prompt=samples_per_prompt, return_routes=return_routes)
    failures = list(first.failures)
    conversations = []
    for sample in first.samples:
        conversation = _Conversation(sample.prompt_index, sample.prompt_length, sample.tokens[: sample.prompt_length]
                                     .tolist())
        conversation.add_turn([], sample)
        conversations.append(conversation)
    for turn in range(1, num_turns):
        if not conversations:
            break
        inserted = [list(map(int, tool(c.prompt_index, turn, list(c.tokens)))) for c in conversations]
        contexts = [c.tokens + extra for c, extra in zip(conversations, inserted)]
        seed = None if sampling.seed is None else (sampling.seed + turn * _TURN_SEED_STRIDE) & _SEED_MASK
        result = engine.generate(
            contexts, dataclasses.replace(sampling, seed=seed), samples_per_prompt=1, return_routes=return_routes,
            routes_start_len=[len(c.tokens) - 1 for c in conversations] if return_routes else None,
        )
        failed = {}
        for failure in result.failures:
            failed.setdefault(conversations[failure.prompt_index].prompt_index,
                              f"turn {turn + 1}: {failure.reason}")
        for sample in result.samples:
            conversations[sample.prompt_index].add_turn(inserted[sample.prompt_index], sample)
        failures += [RolloutFailure(prompt, reason) for prompt, reason in sorted(failed.items())]
        conversations = [c for c in conversations if c.prompt_index not in failed]
    samples = []
    for c in conversations:
        routes = None
        if return_routes:
            routes = stitch_routes(c.routes, c.turn_lengths,
                                   sample_id=f"prompt {c.prompt_index} (multi-turn, {num_turns} turns)")
        samples.append(RolloutSample(
            tokens=torch.tensor(c.tokens, dtype=torch.int64), prompt_length=c.prompt_length,
            response_logprobs=torch.tensor(c.logprobs, dtype=torch.float32), routes=routes,
            finish_reason=c.finish_reason, prompt_index=c.prompt_index,
            response_mask=torch.tensor(c.mask, dtype=torch.bool),
        ))
    return RolloutResult(samples=samples, failures=sorted(failures, key=lambda f: f.prompt_index))
