"""The rollout phase of a GRPO step: generate on rank 0, validate routes, score, and hand every rank the batch.

One process talks to the rollout engine (the embedded hf engine lives there; the SGLang client sends from there), so
the samples of a step do not depend on how the trainer is laid out. Everything rank 0 learns, including a failure,
travels in one collective (a broadcast, or a scatter that gives each rank only the routes it replays): a bad route
raises on every rank alike instead of leaving the others waiting.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_r3.grpo.advantages import group_normalized_advantages
from megatron_r3.platform import metric_names
from megatron_r3.platform.logging import get_logger
from megatron_r3.platform.parallel_context import ParallelContext
from megatron_r3.replay.routes import RouteError, validate_routes
from megatron_r3.rollout.base import RolloutEngine, SamplingParams
from megatron_r3.rollout.multiturn import generate_multiturn
from megatron_r3.train.microbatching import TrainSample

log = get_logger(__name__)


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
    failure_policy: str  # "raise" | "skip" (--rollout-failure-policy): prompts the engine could not serve
    global_batch_size: Optional[int] = None  # with "skip": kept samples must fill whole mini-batches of this size


def generate_batch(
    engine: RolloutEngine, prompt_ids: Sequence[Sequence[int]], records, tokenizer, reward_fn, settings: RolloutSettings
) -> RolloutPayload:
    """Rank 0: sample, validate routes, score and compute group-normalised advantages."""
    start = time.perf_counter()
    try:
        turns = multi_turn_plan(records, tokenizer)
        if turns is None:
            result = engine.generate(
                prompt_ids, settings.sampling, samples_per_prompt=settings.group_size,
                return_routes=settings.return_routes,
            )
        else:
            result = generate_multiturn(
                engine, prompt_ids, settings.sampling, samples_per_prompt=settings.group_size,
                return_routes=settings.return_routes, num_turns=turns[0], tool=turns[1],
            )
    except Exception as error:  # noqa: BLE001 - raised on every rank by share_from_rank0, not on rank 0 alone
        return RolloutPayload(error=f"the rollout engine failed: {type(error).__name__}: {error}")
    rollout_s = time.perf_counter() - start
    kept, failed, trimmed, error = select_groups(result, len(prompt_ids), settings)
    if error is not None:
        return RolloutPayload(failures=failed, error=error)
    if failed or trimmed:
        log.info(
            f"rollout: {len(failed)} of {len(prompt_ids)} prompts failed and were skipped "
            f"(--rollout-failure-policy skip); {len(trimmed)} more prompts trimmed (prompt indices {trimmed}) so "
            f"that the {len(kept)} kept samples fill whole mini-batches of --global-batch-size "
            f"{settings.global_batch_size}. Failures: " + "; ".join(failed[:3])
            + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else "")
        )
    samples, fallback_rows, bad_rows, route_rows = [], 0, 0, 0
    for index, sample in enumerate(kept):
        free_rows = None
        problem = logprob_problem(sample.response_logprobs)
        if problem:
            return RolloutPayload(error=f"sample {index} (prompt {sample.prompt_index}): the rollout engine's "
                                        f"response logprobs {problem}")
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
            route_rows += int(check.bad_rows.numel())
            if not check.ok:
                free_rows = check.bad_rows.clone()
                if sample.routes.start_row:
                    free_rows = torch.cat([torch.ones(sample.routes.start_row, dtype=torch.bool), free_rows])
                fallback_rows += int(free_rows.sum())
                bad_rows += check.num_bad_rows
        samples.append((sample, free_rows))
    # a multi-turn sample is scored on its last answer (the tokens after the last inserted span)
    responses = [tokenizer.decode(s.final_turn_ids().tolist(), skip_special_tokens=False) for s, _ in samples]
    rewards = reward_fn_scores(reward_fn, responses, [records[s.prompt_index] for s, _ in samples])
    advantages = group_normalized_advantages(rewards, settings.group_size)
    train_samples = [
        TrainSample(
            index=index, tokens=sample.tokens, prompt_length=sample.prompt_length,
            rollout_logprobs=sample.response_logprobs, reward=float(rewards[index]),
            advantage=float(advantages[index]), routes=sample.routes, free_rows=free_rows,
            response_mask=sample.response_mask,
        )
        for index, (sample, free_rows) in enumerate(samples)
    ]
    lengths = torch.tensor([float(s.response_length) for s, _ in samples])
    metrics = {
        metric_names.REWARD_MEAN: float(rewards.mean()),
        metric_names.REWARD_STD: float(rewards.std(unbiased=False)),
        metric_names.ROLLOUT_RESPONSE_LENGTH_MEAN: float(lengths.mean()),
        metric_names.ROLLOUT_SAMPLES: float(len(samples)),
        metric_names.REPLAY_FALLBACK_TOKENS: float(fallback_rows),  # one route row per token
        # of the rows the engine sent, the fraction that was unusable (routed natively): --max-fallback-fraction
        metric_names.REPLAY_FALLBACK_FRACTION: bad_rows / route_rows if route_rows else 0.0,
        metric_names.ROLLOUT_FAILED_PROMPTS: float(len(failed)),
        metric_names.ROLLOUT_TRIMMED_PROMPTS: float(len(trimmed)),
        metric_names.TIMING_ROLLOUT_S: rollout_s,
    }
    stats = getattr(engine, "last_stats", None) or {}
    for key, name in (("retries", metric_names.ROLLOUT_HTTP_RETRIES),
                      ("dropped_servers", metric_names.ROLLOUT_DROPPED_SERVERS)):
        if key in stats:  # the SGLang engine: retried HTTP requests, dead servers removed so far
            metrics[name] = float(stats[key])
    return RolloutPayload(samples=train_samples, metrics=metrics, failures=failed)


def multi_turn_plan(records, tokenizer):
    """(num_turns, tool) when the step's records belong to a multi-turn synthetic task (`Task.num_turns > 1`), else
    None. The tool inserts the task's `tool_reply` text, tokenized without special tokens."""
    from megatron_r3.train.tasks import TASKS

    names = {r.metadata.get("task") if isinstance(r.metadata, dict) else None for r in records}
    multi = {name for name in names if name in TASKS and TASKS[name].num_turns > 1}
    if not multi:
        return None
    if len(names) > 1:
        raise ValueError(f"a step mixes the multi-turn task {sorted(multi)[0]} with other prompts ({sorted(map(str, names))}); "
                         "use one multi-turn task per run")
    task = TASKS[multi.pop()]

    def tool(prompt_index: int, turn: int, conversation: list) -> list:
        text = task.tool_reply(records[prompt_index], turn)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return task.num_turns, tool


def logprob_problem(logprobs: torch.Tensor, slack: float = 1e-3) -> str:
    """'' when every logprob is finite and <= 0 (up to rounding `slack`), else what is wrong with the first bad one.

    Checked here for every engine: -inf (or NaN) would turn the mismatch metrics and the importance weights into
    inf/NaN, and a positive value is not a log-probability."""
    bad = ~torch.isfinite(logprobs) | (logprobs > slack)
    if not bool(bad.any()):
        return ""
    first = int(torch.nonzero(bad)[0, 0])
    return (f"hold {int(bad.sum())} value(s) that are not finite log-probabilities <= 0, the first at response token "
            f"{first}: {float(logprobs[first])}")


def select_groups(result, num_prompts: int, settings: RolloutSettings):
    """The samples to train on: (kept samples, failure reasons, trimmed prompt indices, error or None).

    Every prompt must come back either with its `group_size` samples or as a failure (none may vanish). With
    `failure_policy="raise"` any failure is an error. With "skip" the failed prompts' groups are dropped, then whole
    groups are trimmed from the end (highest prompt index first) until the kept sample count is a multiple of
    `global_batch_size` (the planner splits a step into whole mini-batches; each is divisible by the data-parallel
    size by argument validation): the kept group count is rounded down to a multiple of
    lcm(group_size, global_batch_size) / group_size. Nothing left is an error.
    """
    group = settings.group_size
    failed_at = {failure.prompt_index: failure.reason for failure in result.failures}
    failed = [f"prompt {index}: {reason}" for index, reason in sorted(failed_at.items())]
    by_prompt: dict[int, list] = {}
    for sample in result.samples:
        by_prompt.setdefault(sample.prompt_index, []).append(sample)
    problems = []
    both = sorted(set(by_prompt) & set(failed_at))
    if both:
        problems.append(f"prompts {both} came back both with samples and as failures")
    vanished = sorted(set(range(num_prompts)) - set(by_prompt) - set(failed_at))
    if vanished:
        problems.append(f"prompts {vanished} came back neither with samples nor as failures")
    short = sorted(p for p, got in by_prompt.items() if len(got) != group or not 0 <= p < num_prompts)
    if short:
        problems.append(f"prompts {short} came back with a number of samples other than --grpo-group-size {group} "
                        f"(or an unknown prompt index)")
    if problems:
        return [], failed, [], "the rollout engine returned an inconsistent result: " + "; ".join(problems)
    if failed and settings.failure_policy != "skip":
        return [], failed, [], (
            "rollout failed for " + "; ".join(failed) + " (--rollout-failure-policy skip trains on the other prompts)"
        )
    served = sorted(by_prompt)
    unit = 1
    if settings.global_batch_size:
        unit = math.lcm(group, settings.global_batch_size) // group
    keep = len(served) // unit * unit
    trimmed = served[keep:]
    if keep == 0:
        return [], failed, trimmed, (
            f"only {len(served)} of {num_prompts} prompts were served ({len(failed)} failed), fewer than the "
            f"{unit} prompts one mini-batch of --global-batch-size {settings.global_batch_size} needs; failures: "
            + "; ".join(failed)
        )
    kept = [sample for prompt in served[:keep] for sample in by_prompt[prompt]]
    return kept, failed, trimmed, None


def reward_fn_scores(reward_fn, responses, records) -> torch.Tensor:
    from megatron_r3.train.rewards import score

    return score(responses, records, reward_fn)


@dataclass(frozen=True)
class RouteShare:
    """The layers of a step's routes one rank replays (its routers' layers: its pipeline stage and virtual chunks).
    Which samples it replays follows from its coordinates (`ParallelContext.peer(rank).owns_sample`)."""

    layer_numbers: tuple[int, ...]


def share_from_rank0(
    payload: Optional[RolloutPayload],
    parallel: ParallelContext,
    route_shares: Optional[Sequence[RouteShare]] = None,
    global_batch_size: Optional[int] = None,
) -> RolloutPayload:
    """Send rank 0's payload to every rank (host memory, gloo); raise everywhere if it carries an error.

    With `route_shares` (one per global rank) and `global_batch_size`, each rank receives routes only for the
    samples its data-parallel rank trains, and only for the layers of its own routers (its pipeline stage and
    virtual chunks): the route ids are the bulk of a step's payload (48 layers x top-8 is 384 bytes per token
    against about 12 for the rest). Every other field, and every sample's tokens, still reach every rank. The
    tensor- and context-parallel ranks of one stage receive the same share and keep their tokens in
    `localize_routes`."""
    if parallel.world_size > 1:
        if route_shares is None or (parallel.dp_size == 1 and len(set(route_shares)) == 1):
            box = [payload]
            dist.broadcast_object_list(box, src=0, group=parallel.host_group)
            payload = box[0]
        else:
            per_rank = None
            if parallel.is_global_rank_zero:
                # one share per (data-parallel rank, layers): the TP/CP ranks of a stage get the same object
                keys = [(parallel.peer(rank).dp_rank, share) for rank, share in enumerate(route_shares)]
                built = {}
                for rank, key in enumerate(keys):
                    if key not in built:
                        built[key] = routes_for_share(payload, parallel.peer(rank), key[1], global_batch_size)
                per_rank = [built[key] for key in keys]
            box = [None]
            dist.scatter_object_list(box, per_rank, src=0, group=parallel.host_group)
            payload = box[0]
    if payload.error is not None:
        raise RolloutPhaseError(payload.error)
    return payload


def routes_for_share(
    payload: RolloutPayload, owner: ParallelContext, share: RouteShare, global_batch_size: int
) -> RolloutPayload:
    """`payload` as the rank `owner` needs it: routes (and fallback rows) only on the samples that its data-parallel
    rank trains, narrowed to its routers' layers (`share`)."""
    if payload.error is not None or not payload.samples:
        return payload
    layers = tuple(sorted(set(share.layer_numbers)))
    index = torch.tensor([n - 1 for n in layers], dtype=torch.long)
    samples = []
    for position, sample in enumerate(payload.samples):
        if not owner.owns_sample(position, global_batch_size):
            samples.append(dataclasses.replace(sample, routes=None, free_rows=None))
        elif sample.routes is None:
            samples.append(sample)
        else:
            routes = sample.routes
            narrowed = dataclasses.replace(routes, expert_ids=routes.expert_ids.index_select(1, index))
            samples.append(dataclasses.replace(sample, routes=narrowed, route_layer_numbers=layers))
    return dataclasses.replace(payload, samples=samples)
