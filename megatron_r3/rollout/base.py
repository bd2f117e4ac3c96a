"""The rollout interface every engine implements, the data it returns, and the checks every engine shares.

An engine turns prompts into sampled responses with the engine's own per-token logprobs and, for R3, the expert
ids it chose in every MoE layer for every position it fed through the model, in SGLang's layout
(`[T-1, num_hidden_layers, num_experts_per_tok]`, dense layers zero). Whatever the engine, the trainer sees the
same `RolloutSample`s, so it cannot tell the engines apart.

The contract (:class:`RolloutEngine`): `build` (trainer rank 0 only) from an :class:`EngineSetup`, `generate`,
a collective `sync_weights` (every trainer rank calls it with the same setup; rank 0 holds the engine and alone
talks to it, the other ranks pass None and drive the export's gathers), `close`. Engines are looked up by name in
:mod:`megatron_r3.rollout.engines`, each registered with the config dataclass its flags come from. Prompt and
argument checks are written once here (:func:`check_generate_request`) and called by every engine's `generate`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from megatron_r3.platform import collectives
from megatron_r3.platform.parallel_context import ParallelContext
from megatron_r3.replay.routes import Routes
from megatron_r3.rollout.config import RolloutConfig


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, with SGLang's field names where they exist."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = RolloutConfig.max_new_tokens  # --max-new-tokens
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


@dataclass(frozen=True)
class EngineSetup:
    """Everything an engine is built from, the same on every trainer rank (built once by the trainer).

    config: the engine's own config dataclass (registered beside it; None for an engine without flags).
    rollout: the flags every engine shares.
    hf_config: the policy's Hugging Face config (architecture, vocabulary, what a disk export writes).
    seed: the run's seed (generators of engines that sample in-process).
    max_batch_size: the samples of one step (an in-process engine decodes at most this many together).
    progress: show a progress bar while generating.
    require_routes: the run replays or compares routes (R3, routing agreement): an engine that can tell at
        build time that it will not return them must refuse.
    """

    config: Any
    rollout: RolloutConfig
    hf_config: Any
    seed: int = 0
    max_batch_size: int = 64
    progress: bool = True
    require_routes: bool = False


@dataclass(frozen=True)
class PolicyWeights:
    """The trainer's sharded policy as a source of full, Hugging Face-named weights (collective to walk)."""

    chunks: list
    arch: Any
    hf_config: Any
    parallel: ParallelContext  # this trainer rank's: the export's groups, and the host group failures are agreed on

    def named_tensors(self) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        """(HF name, full tensor) on trainer rank 0, (HF name, None) elsewhere; every rank must walk it to the end
        (each step drives the tensor-, expert- and pipeline-parallel gathers)."""
        from megatron_r3.model.weights import export_hf_weights

        return iter(export_hf_weights(self.chunks, self.arch, self.parallel))


class WeightSyncError(RuntimeError):
    """A weight update did not reach the rollout engine; raised on every trainer rank alike."""


class RolloutEngine(abc.ABC):
    """What the trainer needs from a rollout engine; every engine subclasses it.

    Adding an engine: a module with a subclass (and, for flags of its own, a config dataclass in a module that does
    not import torch) plus one line in `megatron_r3.rollout.engines.ENGINES`.
    """

    @classmethod
    @abc.abstractmethod
    def build(cls, setup: EngineSetup) -> "RolloutEngine":
        """The engine, on trainer rank 0 only (the other ranks hold None)."""

    @abc.abstractmethod
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
        Starts with :func:`check_generate_request`.

        routes_start_len: per prompt, the first route row to return (SGLang's `routed_experts_start_len`, in
        `[0, len(prompt)]`): routes then cover rows `start_len .. T-2` (`Routes.start_row == start_len`). A
        multi-turn rollout asks each later turn only for the rows the earlier turns did not cover."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights given by Hugging Face checkpoint names (full, unsharded tensors), from this
        process alone (tests, tools); the trainer goes through :meth:`sync_weights`."""

    @classmethod
    def sync_weights(cls, engine: Optional["RolloutEngine"], weights: PolicyWeights, setup: EngineSetup) -> None:
        """Collective: every trainer rank calls it with the same `setup`; `engine` is the engine on rank 0 and None
        elsewhere. Every rank walks `weights` (it drives the gathers); rank 0 alone talks to the engine. A failure
        on any rank raises the same :class:`WeightSyncError` on every rank (never a hang).

        This default streams the full tensors into `engine.update_weights` on rank 0 (an engine in this process);
        an engine whose weights travel another way (buckets over NCCL, a disk export) overrides it."""
        exported = weights.named_tensors()
        error: Optional[BaseException] = None
        if engine is not None:
            try:
                engine.update_weights((name, tensor) for name, tensor in exported if tensor is not None)
            except Exception as exc:  # noqa: BLE001 - made collective below
                error = exc
        try:
            for _ in exported:  # the other ranks (and rank 0 after a failure) walk the export to its end
                pass
        except Exception as exc:  # noqa: BLE001 - made collective below
            error = error or exc
        collectives.raise_if_any_rank_failed(error, weights.parallel.host_group,
                                             what=f"weight sync to the {cls.__name__}", error_type=WeightSyncError)

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the engine holds (threads, sockets, process groups, memory); idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ================================================================================================ shared checks
@dataclass(frozen=True)
class GenerateRequest:
    """A checked `generate` call: int64 CPU prompts and per-prompt route start rows."""

    prompts: list[torch.Tensor]
    routes_start_len: list[int]


def check_generate_request(
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams,
    samples_per_prompt: int,
    routes_start_len: Optional[Sequence[int]] = None,
    *,
    vocab_size: Optional[int] = None,
    max_positions: Optional[int] = None,
) -> GenerateRequest:
    """The arguments of `RolloutEngine.generate`, checked the same way for every engine (one-line errors naming the
    prompt and what is wrong): TypeError for a sampling that is not a SamplingParams, ValueError otherwise."""
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be a positive int, got {samples_per_prompt!r}")
    checked = [check_prompt(index, prompt, vocab_size=vocab_size, max_positions=max_positions)
               for index, prompt in enumerate(prompts)]
    return GenerateRequest(checked, check_routes_start_len(checked, routes_start_len))


def check_prompt(index: int, prompt, *, vocab_size: Optional[int] = None,
                 max_positions: Optional[int] = None) -> torch.Tensor:
    """Prompt `index` as an int64 CPU tensor of token ids, or ValueError: not 1-D, empty, not integers, an id
    outside `[0, vocab_size)`, or no room for one generated token within `max_positions`."""
    tokens = torch.as_tensor(prompt)
    if tokens.dim() != 1:
        raise ValueError(f"prompt {index} must be a 1-D sequence of token ids, got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"prompt {index} is empty; every prompt needs at least one token")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dtype.is_complex:
        raise ValueError(f"prompt {index} must hold integer token ids, got {tokens.dtype}")
    tokens = tokens.to(torch.int64).cpu()
    if vocab_size is not None:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"prompt {index} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    if max_positions is not None and tokens.numel() >= max_positions:
        raise ValueError(
            f"prompt {index} has {tokens.numel()} tokens but the model's max_position_embeddings is {max_positions}: "
            f"a prompt may have at most {max_positions - 1} tokens to leave room for one generated token"
        )
    return tokens


def check_routes_start_len(prompts: Sequence[Sequence[int]], start_lens: Optional[Sequence[int]]) -> list[int]:
    """Per-prompt ``routed_experts_start_len`` values, checked by SGLang 0.5.23's rule (the scheduler refuses a
    request whose start_len is below 0 or above its input length); None -> all 0."""
    if start_lens is None:
        return [0] * len(prompts)
    if len(start_lens) != len(prompts):
        raise ValueError(f"routes_start_len has {len(start_lens)} entries for {len(prompts)} prompts; give one per prompt")
    out = []
    for index, (prompt, start) in enumerate(zip(prompts, start_lens)):
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(prompt):
            raise ValueError(f"routes_start_len[{index}] = {start!r} must be an int in [0, {len(prompt)}] (the "
                             "prompt's length), as SGLang requires of routed_experts_start_len")
        out.append(int(start))
    return out
