"""The SGLang rollout engine: an HTTP client for one or many SGLang servers (``--rollout-engine sglang``).

It implements :class:`~megatron_r3.rollout.base.RolloutEngine`, so the trainer cannot tell it from the embedded
engine: the same :class:`~megatron_r3.rollout.base.RolloutSample`\\ s, with routes in SGLang's
``[T-1, num_hidden_layers, top_k]`` layout as ``Routes(source="sglang")``. The wire format lives in
:mod:`megatron_r3.rollout.engines.sglang.protocol`; weight sync in :mod:`megatron_r3.rollout.engines.sglang.weight_sync`.

Requests
    Every sample is its own ``POST /generate`` by default (``request_size=1``): SGLang batches concurrent requests
    itself (continuous batching), each sample gets its own ``sampling_seed``, and a failure costs one sample.
    ``request_size=N`` sends N consecutive samples (grouped by prompt) in SGLang's batch form (lists of
    ``input_ids`` and of ``sampling_params``); ``0`` sends the whole call as one request. Requests go to the servers
    round-robin (request i, attempt a -> server ``(i + a) % n``, so a retry moves to the next server), through a
    thread pool of at most ``max_concurrency`` requests in flight.

Failures
    Connection errors, timeouts, HTTP 5xx and aborted requests are retried up to ``max_retries`` times with
    exponential backoff (``retry_backoff_s * 2**attempt``, capped). HTTP 4xx replies are not retried: they are
    reported at once. A sample whose routes cannot be decoded or have the wrong row count fails with the
    RouteError text (not retried: the server would send the same). A prompt with any failed sample becomes a
    :class:`~megatron_r3.rollout.base.RolloutFailure`; every prompt of a call ends up either with all its samples
    or as a failure, never neither (checked). A reply without routes when routes were requested means the server
    was started without ``--enable-return-routed-experts``: :class:`SGLangConfigError`, raised at once (and at
    start-up when ``/server_info`` says so). Every HTTP call has a timeout (transport: :mod:`~megatron_r3.rollout.engines.sglang.http`). The whole
    call has a deadline derived from the work (``rollout_deadline``), with progress logs naming the servers waited
    on; past it, :class:`RolloutDeadlineError` names them. After a weight sync every reply's
    ``meta_info["weight_version"]`` must be the synced one (:class:`StaleWeightsError` otherwise).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from megatron_r3.platform.logging import get_logger
from megatron_r3.replay.routes import RouteError
from megatron_r3.rollout.base import (
    EngineSetup,
    PolicyWeights,
    RolloutEngine,
    RolloutFailure,
    RolloutResult,
    RolloutSample,
    SamplingParams,
    check_generate_request,
)
from megatron_r3.rollout.engines.sglang.config import SGLangEngineConfig
from megatron_r3.rollout.engines.sglang.protocol import (
    ROUTES_HINT,
    AbortedError,
    MissingRoutesError,
    ProtocolError,
    generate_payload,
    normalize_url,
    parse_sample,
    plan_samples,
    read_address_file,
    reply_entries,
    sampling_params_payload,
    split_requests,
    weight_version_of,
)
from megatron_r3.rollout.engines.sglang.http import (
    RolloutDeadlineError,
    SGLangClientConfig,
    SGLangConfigError,
    SGLangHTTP,
    SGLangHTTPError,
    StaleWeightsError,
)
from megatron_r3.rollout.engines.sglang.weight_sync import (
    DistributedWeightSender,
    WeightSyncSettings,
    push_named_tensors,
    sync_policy_weights,
)

logger = logging.getLogger("megatron_r3.rollout.sglang")
log = get_logger(__name__)  # console lines (rank-aware)


@dataclass
class _Outcome:
    samples: dict = field(default_factory=dict)  # flat index -> RolloutSample
    errors: dict = field(default_factory=dict)  # flat index -> reason
    retries: int = 0


class SGLangEngine(SGLangHTTP, RolloutEngine):
    """Client for SGLang servers, implementing :class:`~megatron_r3.rollout.base.RolloutEngine`.

    Flags: :class:`~megatron_r3.rollout.engines.sglang.config.SGLangEngineConfig` (``EngineSetup.config``). Weight sync: buckets over a
    NCCL group or a disk export, driven by :func:`~megatron_r3.rollout.engines.sglang.weight_sync.sync_policy_weights`.

    Args:
        urls: server base URLs (``http://host:port``).
        num_layers, topk, num_experts: the model's ``num_hidden_layers``, ``num_experts_per_tok``, ``num_experts``
            (route decoding).
        vocab_size: generated ids are checked against it when given.
        config: client settings (:class:`SGLangClientConfig`).
        require_routes: fail at start-up when a server reports it runs without --enable-return-routed-experts.
        weight_sync: :class:`~megatron_r3.rollout.engines.sglang.weight_sync.WeightSyncSettings` (``update_weights`` and the
            trainer's sync); None: distributed sync with defaults.
        hf_config: the model's HF config (written next to disk-path weights).
        wait_for_health: poll ``/health`` of every server (up to ``startup_timeout_s``) before anything else.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        num_layers: int,
        topk: int,
        num_experts: int,
        vocab_size: Optional[int] = None,
        config: Optional[SGLangClientConfig] = None,
        require_routes: bool = False,
        weight_sync=None,
        hf_config=None,
        wait_for_health: bool = True,
    ):
        super().__init__(urls, config)
        self.num_layers, self.topk, self.num_experts = int(num_layers), int(topk), int(num_experts)
        self.vocab_size = vocab_size
        self.hf_config = hf_config
        self._closed = False
        self.weight_version = 0
        self.synced_weight_version: Optional[str] = None  # the version every reply must carry after a sync
        self._in_flight: dict[int, str] = {}
        self._deadline = float("inf")
        self.last_stats: dict[str, float] = {}
        self.weight_sync = weight_sync or WeightSyncSettings()
        self._weight_sender = None
        if wait_for_health:
            self.wait_healthy()
            _ = self.facts
        self._warned_seeds = False
        if require_routes:
            off = [url for url, facts in zip(self.urls, self.facts) if facts.routes_enabled is False]
            if off:
                raise SGLangConfigError(
                    f"routes are needed (--router-replay R3 or --collect-routing-agreement) but {', '.join(off)} "
                    f"report enable_return_routed_experts=false: {ROUTES_HINT}"
                )

    # ------------------------------------------------------------------ the RolloutEngine class methods
    @classmethod
    def build(cls, setup: EngineSetup) -> "SGLangEngine":
        """``--rollout-engine sglang``: the client for the servers named by the flags (trainer rank 0 only)."""
        from megatron_r3.model.families import arch_from_hf_config

        arch = arch_from_hf_config(setup.hf_config)
        config: SGLangEngineConfig = setup.config
        client = config.client_config()
        urls = resolve_urls(config.sglang_url, config.sglang_address_file, wait_s=client.startup_timeout_s)
        engine = cls(
            urls, num_layers=arch.num_layers, topk=arch.topk, num_experts=arch.num_experts,
            vocab_size=arch.vocab_size, config=client, require_routes=setup.require_routes,
            weight_sync=config.weight_sync_settings(setup.rollout.rollout_dtype), hf_config=setup.hf_config,
        )
        log.info(f"rollout engine: SGLang at {', '.join(engine.urls)} (weight sync: {engine.weight_sync.mode})")
        return engine

    @classmethod
    def sync_weights(cls, engine: Optional["SGLangEngine"], weights: PolicyWeights, setup: EngineSetup) -> None:
        """Collective: buckets over the weight update group or a disk export; pause/flush/send/continue on rank 0
        (:func:`~megatron_r3.rollout.engines.sglang.weight_sync.sync_policy_weights`)."""
        settings = (engine.weight_sync if engine is not None
                    else setup.config.weight_sync_settings(setup.rollout.rollout_dtype))
        sync_policy_weights(engine, weights.chunks, weights.arch, weights.hf_config, weights.parallel, settings)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        samples_per_prompt: int = 1,
        return_routes: bool = False,
        routes_start_len: Optional[Sequence[int]] = None,
    ) -> RolloutResult:
        """Sample ``samples_per_prompt`` responses per prompt; samples come back grouped by prompt, in prompt order;
        prompts that could not be served come back as failures. ``routes_start_len`` (per prompt) is sent as
        ``routed_experts_start_len``: the server returns rows ``start_len .. T-2`` only (multi-turn rollouts)."""
        self._check_open()
        request = check_generate_request(prompts, sampling, samples_per_prompt, routes_start_len,
                                         vocab_size=self.vocab_size)
        checked = [prompt.tolist() for prompt in request.prompts]
        starts = request.routes_start_len if return_routes else [0] * len(checked)
        if sampling.seed is not None:
            self._check_seeds_honoured()
        start = time.perf_counter()
        specs = plan_samples(len(checked), samples_per_prompt, sampling.seed)
        requests = split_requests(specs, self.config.request_size, starts if any(starts) else None)
        outcome = _Outcome()
        self._stop.clear()
        deadline_s = self.rollout_deadline(len(specs), sampling.max_new_tokens)
        self._deadline = time.monotonic() + deadline_s
        self._in_flight = {}
        if requests:
            workers = min(self.config.max_concurrency, len(requests))
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang")
            futures = [
                pool.submit(self._serve, index, request, checked, sampling, return_routes,
                            starts[request[0].prompt_index])
                for index, request in enumerate(requests)
            ]
            last_log = time.monotonic()
            try:
                pending = set(futures)
                while pending:
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        raise RolloutDeadlineError(self._deadline_message(deadline_s, len(pending), len(futures),
                                                                          len(specs), sampling.max_new_tokens))
                    done, pending = wait(pending, timeout=min(remaining, self.config.progress_log_s),
                                         return_when=FIRST_COMPLETED)
                    for future in done:
                        part = future.result()
                        outcome.samples.update(part.samples)
                        outcome.errors.update(part.errors)
                        outcome.retries += part.retries
                    if pending and time.monotonic() - last_log >= self.config.progress_log_s:
                        last_log = time.monotonic()
                        logger.warning("rollout: %d of %d requests answered after %.0f s (deadline %.0f s); waiting on "
                                       "%s", len(futures) - len(pending), len(futures),
                                       deadline_s - (self._deadline - time.monotonic()), deadline_s,
                                       self._waiting_on() or "queued requests")
            except BaseException:
                self._stop.set()  # running requests stop retrying; queued ones are cancelled
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
        result = self._assemble(outcome, len(checked), samples_per_prompt)
        seconds = time.perf_counter() - start
        new_tokens = sum(sample.response_length for sample in result.samples)
        self.last_stats = {
            "sequences": float(len(result.samples)),
            "new_tokens": float(new_tokens),
            "seconds": seconds,
            "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
            "requests": float(len(requests)),
            "retries": float(outcome.retries),
            "dropped_servers": float(self.dropped_servers),
            "failed_prompts": float(len(result.failures)),
        }
        return result

    def rollout_deadline(self, num_samples: int, max_new_tokens: int) -> float:
        """Seconds one generate() call may take: the configured value, or derived from the tokens to generate."""
        if self.config.rollout_deadline_s is not None:
            return float(self.config.rollout_deadline_s)
        return self.config.deadline_base_s + num_samples * max_new_tokens / self.config.deadline_min_tokens_per_s

    def _waiting_on(self) -> str:
        counts: dict[str, int] = {}
        for url in list(self._in_flight.values()):
            counts[url] = counts.get(url, 0) + 1
        return ", ".join(f"{url} ({n} request{'s' if n > 1 else ''} unanswered)" for url, n in sorted(counts.items()))

    def _deadline_message(self, deadline_s, pending, total, samples, max_new_tokens) -> str:
        how = ("rollout_deadline_s" if self.config.rollout_deadline_s is not None else
               f"derived: {self.config.deadline_base_s:g} s + {samples} samples x {max_new_tokens} tokens / "
               f"{self.config.deadline_min_tokens_per_s:g} tokens/s")
        return (f"the rollout did not finish within its deadline of {deadline_s:.0f} s ({how}): {pending} of {total} "
                f"requests unanswered; no reply from {self._waiting_on() or 'any server (requests still queued)'}. "
                "A server that accepts requests and never answers is hung: restart it or remove it from the list")

    def _check_seeds_honoured(self) -> None:
        """SGLang 0.5.23 honours ``sampling_seed`` only with --enable-deterministic-inference (else ignores it)."""
        try:
            facts = self.facts
        except SGLangHTTPError:  # no server answers /server_info: the requests below fail and say why
            return
        off = [url for url, fact in zip(self.urls, facts) if fact.deterministic is not True]
        if not off:
            return
        message = (f"{', '.join(off)} run without --enable-deterministic-inference (per /server_info): SGLang "
                   "ignores the per-sample sampling_seed there, so rollouts are not reproducible from the seed")
        if self.config.require_deterministic:
            raise SGLangConfigError(message + "; start them with --enable-deterministic-inference "
                                    "(tools/launch_sglang.py does by default)")
        if not self._warned_seeds:
            self._warned_seeds = True
            logger.warning(message)

    def _serve(self, index: int, specs, prompts, sampling: SamplingParams, return_routes: bool,
               start_len: int = 0) -> _Outcome:
        """One /generate request (with retries): every sample of it ends up in ``samples`` or ``errors``."""
        outcome = _Outcome()
        payload = generate_payload(
            [prompts[spec.prompt_index] for spec in specs],
            [sampling_params_payload(sampling, spec.seed) for spec in specs],
            return_routes=return_routes,
            batch=len(specs) > 1,
            routes_start_len=start_len,
        )
        retries = self.config.max_retries
        last = ""
        for attempt in range(retries + 1):
            if self._stop.is_set():
                last = last or "cancelled"
                break
            urls = self.urls
            url = urls[(index + attempt) % len(urls)]
            left = getattr(self, "_deadline", float("inf")) - time.monotonic()
            self._in_flight[index] = url
            try:
                body = self._once(url, "POST", "/generate", json=payload,
                                  timeout=max(1.0, min(self.config.request_timeout_s, left + 1.0)))
                entries = reply_entries(body, len(specs))
                self._check_reply_version(url, entries)
            except SGLangHTTPError as error:
                last = str(error)
                if not error.retryable:  # 4xx: the request itself is wrong; report at once
                    break
            except ProtocolError as error:
                last = f"{url}: {error}"
                break
            else:
                parsed, aborted = {}, None
                for spec, entry in zip(specs, entries):
                    try:
                        parsed[spec.flat_index] = parse_sample(
                            entry, prompt_ids=prompts[spec.prompt_index], prompt_index=spec.prompt_index,
                            return_routes=return_routes, num_layers=self.num_layers, topk=self.topk,
                            num_experts=self.num_experts, vocab_size=self.vocab_size,
                            sample_id=f"prompt {spec.prompt_index} sample {spec.group_index}",
                            requested_start_len=start_len,
                        )
                    except MissingRoutesError as error:
                        raise SGLangConfigError(f"{url}: {error}") from None
                    except AbortedError as error:
                        aborted = f"{url}: {error}"
                    except (RouteError, ProtocolError) as error:
                        parsed[spec.flat_index] = f"{url}: {error}"
                if aborted is None:
                    for flat, value in parsed.items():
                        if isinstance(value, RolloutSample):
                            outcome.samples[flat] = value
                        else:
                            outcome.errors[flat] = value
                    return outcome
                last = aborted
            finally:
                self._in_flight.pop(index, None)
            if attempt < retries and not self._stop.is_set():
                outcome.retries += 1
                logger.warning("SGLang request %d failed (%s); retry %d/%d", index, last, attempt + 1, retries)
                self._backoff(attempt)
        attempts = outcome.retries + 1
        reason = f"request {index} failed after {attempts} attempt{'s' if attempts > 1 else ''}: {last}"
        for spec in specs:
            outcome.errors[spec.flat_index] = reason
        return outcome

    @staticmethod
    def _assemble(outcome: _Outcome, num_prompts: int, samples_per_prompt: int) -> RolloutResult:
        samples: list[RolloutSample] = []
        failures: list[RolloutFailure] = []
        for prompt in range(num_prompts):
            flats = range(prompt * samples_per_prompt, (prompt + 1) * samples_per_prompt)
            errors = [outcome.errors[f] for f in flats if f in outcome.errors]
            missing = [f for f in flats if f not in outcome.errors and f not in outcome.samples]
            if errors or missing:
                first = errors[0] if errors else "no reply"
                failed = len(errors) + len(missing)
                failures.append(RolloutFailure(
                    prompt, f"{failed} of {samples_per_prompt} samples failed; first: {first}"))
            else:
                samples.extend(outcome.samples[f] for f in flats)
        served = {sample.prompt_index for sample in samples}
        lost = set(range(num_prompts)) - served - {failure.prompt_index for failure in failures}
        if lost:  # pragma: no cover - guarded by construction; never let a prompt vanish silently
            raise AssertionError(f"prompts neither served nor failed: {sorted(lost)}")
        return RolloutResult(samples=samples, failures=failures)

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push full HF-named tensors from this process to every server (the configured distributed or disk path).
        The trainer's multi-rank sync goes through :func:`megatron_r3.rollout.engines.sglang.weight_sync.sync_policy_weights`."""
        self._check_open()
        push_named_tensors(self, named_tensors)

    def record_weight_version(self, version: Optional[str]) -> None:
        """After a successful sync: every later reply's ``meta_info["weight_version"]`` must equal ``version``."""
        self.synced_weight_version = None if version is None else str(version)

    def _check_reply_version(self, url: str, entries: list) -> None:
        expected = self.synced_weight_version
        if expected is None:
            return
        for entry in entries:
            meta = entry.get("meta_info") if isinstance(entry, dict) else None
            reported = weight_version_of(meta)
            if reported != expected:
                raise StaleWeightsError(
                    f"{url} answered /generate with weight_version {reported!r} in meta_info, but the trainer's last "
                    f"weight sync set {expected!r}: the rollout was produced by stale weights (a server that missed "
                    "the sync, or one restarted since); restart it or remove it from --sglang-url")

    def next_weight_version(self) -> str:
        self.weight_version += 1
        return str(self.weight_version)

    def weight_sender(self):
        """The distributed-path sender (its process group is created on first use)."""
        if self._weight_sender is None:
            self._weight_sender = DistributedWeightSender(self, self.weight_sync)
        return self._weight_sender

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("SGLangEngine is closed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._weight_sender is not None:
            try:
                self._weight_sender.close()
            finally:
                self._weight_sender = None
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ================================================================================================ construction
def resolve_urls(urls: Optional[Sequence[str]], address_file: Optional[str], *, wait_s: float = 0.0) -> list[str]:
    """Server URLs from ``--sglang-url`` (several, or comma-separated) and/or ``--sglang-address-file`` (waited
    for up to ``wait_s`` seconds: the launcher writes it once its servers are healthy)."""
    out = [normalize_url(part) for url in (urls or []) for part in str(url).split(",") if part.strip()]
    if address_file:
        deadline = time.monotonic() + wait_s
        while True:
            found = []
            try:
                found = read_address_file(address_file)
            except FileNotFoundError:
                pass
            if found:
                out += found
                break
            if time.monotonic() >= deadline:
                raise SGLangConfigError(
                    f"--sglang-address-file {address_file}: no server URLs after {wait_s:g} s (is "
                    f"tools/launch_sglang.py running and writing it?)"
                )
            time.sleep(1.0)
    if not out:
        raise SGLangConfigError("no SGLang server: give --sglang-url URL [URL ...] or --sglang-address-file FILE")
    return list(dict.fromkeys(out))
