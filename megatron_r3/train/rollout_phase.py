"""The rollout phase of a GRPO step: generate on rank 0, validate routes, score, and hand every rank the same batch.

One process talks to the rollout engine (the embedded hf engine lives there; the SGLang client sends from there), so
the samples of a step do not depend on how the trainer is laid out. Everything rank 0 learns, including a failure,
travels in one broadcast: a bad route raises on every rank alike instead of leaving the others waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_r3.grpo.advantages import group_normalized_advantages
from megatron_r3.platform.distributed import host_group
from megatron_r3.replay.routes import RouteError, validate_routes
from megatron_r3.rollout.base import RolloutEngine, SamplingParams
from megatron_r3.train.microbatching import TrainSample


class RolloutPhaseError(RuntimeError):
    """Rank 0 could not produce the step's batch; raised on every rank."""


@dataclass
class RolloutPayload:
    samples: list[TrainSample] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    error: Optional[str] = None


@dataclass
class RolloutSettings:
    sampling: SamplingParams
    group_size: int
    return_routes: bool
    moe_layers: tuple[bool, ...]
    topk: int
    route_fallback: str  # "raise" | "native"


def generate_batch(
    engine: RolloutEngine, prompt_ids: Sequence[Sequence[int]], records, tokenizer, reward_fn, settings: RolloutSettings
) -> RolloutPayload:
    """Rank 0: sample, validate routes, score and compute group-normalised advantages."""
    start = time.perf_counter()
    result = engine.generate(
        prompt_ids, settings.sampling, samples_per_prompt=settings.group_size, return_routes=settings.return_routes
    )
    rollout_s = time.perf_counter() - start
    if result.failures:
        reasons = [f"prompt {failure.prompt_index}: {failure.reason}" for failure in result.failures]
        return RolloutPayload(failures=reasons, error="rollout failed for " + "; ".join(reasons))
    expected = len(prompt_ids) * settings.group_size
    if len(result.samples) != expected:
        return RolloutPayload(error=f"the rollout engine returned {len(result.samples)} samples, expected {expected}")
    samples, fallback_rows = [], 0
    for index, sample in enumerate(result.samples):
        free_rows = None
        if settings.return_routes:
            if sample.routes is None:
                return RolloutPayload(
                    error=f"sample {index} came back without routed experts (is the SGLang server started with "
                          f"--enable-return-routed-experts?)"
                )
            try:
                check = validate_routes(
                    sample.routes, num_tokens=sample.tokens.shape[0], moe_layers=settings.moe_layers,
                    topk=settings.topk, sample_id=index, rank=0,
                    allow_row_fallback=settings.route_fallback == "native",
                )
            except RouteError as error:
                return RolloutPayload(error=str(error))
            if not check.ok:
                free_rows = check.bad_rows.clone()
                if sample.routes.start_row:
                    free_rows = torch.cat([torch.ones(sample.routes.start_row, dtype=torch.bool), free_rows])
                fallback_rows += int(free_rows.sum())
        samples.append((sample, free_rows))
    responses = [tokenizer.decode(s.response_ids.tolist(), skip_special_tokens=False) for s, _ in samples]
    rewards = reward_fn_scores(reward_fn, responses, [records[s.prompt_index] for s, _ in samples])
    advantages = group_normalized_advantages(rewards, settings.group_size)
    train_samples = [
        TrainSample(
            index=index, tokens=sample.tokens, prompt_length=sample.prompt_length,
            rollout_logprobs=sample.response_logprobs, reward=float(rewards[index]),
            advantage=float(advantages[index]), routes=sample.routes, free_rows=free_rows,
        )
        for index, (sample, free_rows) in enumerate(samples)
    ]
    lengths = torch.tensor([float(s.response_length) for s, _ in samples])
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std(unbiased=False)),
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/samples": float(len(samples)),
        "replay/fallback_rows": float(fallback_rows),
        "timing/rollout_s": rollout_s,
    }
    return RolloutPayload(samples=train_samples, metrics=metrics)


def reward_fn_scores(reward_fn, responses, records) -> torch.Tensor:
    from megatron_r3.train.rewards import score

    return score(responses, records, reward_fn)


def share_from_rank0(payload: Optional[RolloutPayload]) -> RolloutPayload:
    """Broadcast rank 0's payload to every rank (host memory, gloo); raise everywhere if it carries an error."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [payload]
        dist.broadcast_object_list(box, src=0, group=host_group())
        payload = box[0]
    if payload.error is not None:
        raise RolloutPhaseError(payload.error)
    return payload
