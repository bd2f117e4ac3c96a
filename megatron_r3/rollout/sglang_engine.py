"""The SGLang rollout engine: an HTTP client for one or many SGLang servers (``--rollout-engine sglang``).

It implements :class:`~megatron_r3.rollout.base.RolloutEngine`, so the trainer cannot tell it from the embedded
engine: the same :class:`~megatron_r3.rollout.base.RolloutSample`\\ s, with routes in SGLang's
``[T-1, num_hidden_layers, top_k]`` layout as ``Routes(source="sglang")``. The wire format lives in
:mod:`megatron_r3.rollout.sglang_protocol`; weight sync in :mod:`megatron_r3.rollout.weight_sync`.

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
    start-up when ``/get_server_info`` says so). Every HTTP call has a timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import torch

from megatron_r3.replay.routes import RouteError
from megatron_r3.rollout.base import RolloutFailure, RolloutResult, RolloutSample, SamplingParams
from megatron_r3.rollout.sglang_protocol import (
    ROUTES_HINT,
    AbortedError,
    MissingRoutesError,
    ProtocolError,
    ServerFacts,
    generate_payload,
    normalize_url,
    parse_sample,
    plan_samples,
    read_address_file,
    reply_entries,
    sampling_params_payload,
    server_facts,
    split_requests,
)

logger = logging.getLogger("megatron_r3.rollout.sglang")


class SGLangConfigError(RuntimeError):
    """The servers are not set up the way the trainer needs (e.g. no --enable-return-routed-experts)."""


class SGLangHTTPError(RuntimeError):
    """One failed HTTP call; ``retryable`` for connection errors, timeouts and 5xx."""

    def __init__(self, url: str, message: str, *, status: Optional[int] = None, retryable: bool):
        self.url, self.status, self.retryable = url, status, retryable
        super().__init__(f"{url}: {message}")


@dataclass
class SGLangClientConfig:
    max_concurrency: int = 64  # /generate requests in flight, over all servers
    request_size: int = 1  # samples per /generate request; 0 = the whole call in one request
    request_timeout_s: float = 600.0  # read timeout of a /generate request
    connect_timeout_s: float = 10.0
    control_timeout_s: float = 120.0  # pause/flush/continue/health/info/version
    max_retries: int = 3
    retry_backoff_s: float = 1.0
    retry_backoff_max_s: float = 30.0
    startup_timeout_s: float = 300.0  # waiting for the address file and /health

    def __post_init__(self):
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.request_size < 0:
            raise ValueError(f"request_size must be >= 0 (0 = one request per call), got {self.request_size}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        for name in ("request_timeout_s", "connect_timeout_s", "control_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (every HTTP call has a timeout), got {getattr(self, name)}")


@dataclass
class _Outcome:
    samples: dict = field(default_factory=dict)  # flat index -> RolloutSample
    errors: dict = field(default_factory=dict)  # flat index -> reason
    retries: int = 0


class SGLangEngine:
    """Client for SGLang servers, implementing :class:`~megatron_r3.rollout.base.RolloutEngine`.

    Args:
        urls: server base URLs (``http://host:port``).
        num_layers, topk, num_experts: the model's ``num_hidden_layers``, ``num_experts_per_tok``, ``num_experts``
            (route decoding).
        vocab_size: generated ids are checked against it when given.
        config: client settings (:class:`SGLangClientConfig`).
        require_routes: fail at start-up when a server reports it runs without --enable-return-routed-experts.
        weight_sync: :class:`~megatron_r3.rollout.weight_sync.WeightSyncSettings` (``update_weights`` and the
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
        import requests
        from requests.adapters import HTTPAdapter

        self.urls = [normalize_url(url) for url in urls]
        if not self.urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        duplicates = sorted({url for url in self.urls if self.urls.count(url) > 1})
        if duplicates:
            raise ValueError(f"SGLang server URLs listed twice: {duplicates}")
        self.config = config or SGLangClientConfig()
        self.num_layers, self.topk, self.num_experts = int(num_layers), int(topk), int(num_experts)
        self.vocab_size = vocab_size
        self.hf_config = hf_config
        self._requests = requests
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=len(self.urls), pool_maxsize=max(8, self.config.max_concurrency),
                              max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._stop = threading.Event()
        self._closed = False
        self.weight_version = 0
        self.last_stats: dict[str, float] = {}
        from megatron_r3.rollout.weight_sync import WeightSyncSettings

        self.weight_sync = weight_sync or WeightSyncSettings()
        self._weight_sender = None
        self._facts: Optional[list[ServerFacts]] = None
        if wait_for_health:
            self.wait_healthy()
            _ = self.facts
        if require_routes:
            off = [url for url, facts in zip(self.urls, self.facts) if facts.routes_enabled is False]
            if off:
                raise SGLangConfigError(
                    f"routes are needed (--router-replay R3 or --collect-routing-agreement) but {', '.join(off)} "
                    f"report enable_return_routed_experts=false: {ROUTES_HINT}"
                )

    # ------------------------------------------------------------------ HTTP
    def call(self, url: str, method: str, path: str, *, json: Any = None, timeout: Optional[float] = None,
             retries: Optional[int] = None) -> Any:
        """One endpoint of one server, with retries on connection errors, timeouts and 5xx (not on 4xx).
        Returns the decoded JSON reply, the text when it is not JSON, or None when empty."""
        retries = self.config.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self._once(url, method, path, json=json, timeout=timeout)
            except SGLangHTTPError as error:
                if not error.retryable or attempt == retries or self._stop.is_set():
                    raise
                logger.warning("SGLang %s %s failed (%s); retry %d/%d", method, path, error, attempt + 1, retries)
                self._backoff(attempt)
        raise AssertionError("unreachable")

    def _once(self, url: str, method: str, path: str, *, json: Any = None, timeout: Optional[float] = None) -> Any:
        requests = self._requests
        read = self.config.control_timeout_s if timeout is None else timeout
        try:
            reply = self.session.request(method, url + path, json=json, timeout=(self.config.connect_timeout_s, read))
        except requests.Timeout as error:
            raise SGLangHTTPError(url, f"{method} {path} timed out after {read:g} s ({error})", retryable=True)
        except requests.RequestException as error:  # connection refused/reset, truncated body, ...
            raise SGLangHTTPError(url, f"{method} {path}: {type(error).__name__}: {error}", retryable=True)
        if reply.status_code >= 400:
            text = reply.text.strip()[:500]
            raise SGLangHTTPError(url, f"{method} {path} -> HTTP {reply.status_code}: {text}",
                                  status=reply.status_code, retryable=reply.status_code >= 500)
        if not reply.content:
            return None
        try:
            return reply.json()
        except ValueError:
            return reply.text

    def _backoff(self, attempt: int) -> None:
        delay = min(self.config.retry_backoff_max_s, self.config.retry_backoff_s * (2 ** attempt))
        self._stop.wait(delay)

    def on_all(self, method: str, path: str, *, json: Any = None, timeout: Optional[float] = None,
               retries: Optional[int] = None, payloads: Optional[Sequence[Any]] = None) -> list[Any]:
        """The same call on every server, in parallel; raises the first error after all have finished."""
        bodies: list[Any] = [None] * len(self.urls)
        errors: list[Optional[BaseException]] = [None] * len(self.urls)

        def run(i: int) -> None:
            try:
                body = json if payloads is None else payloads[i]
                bodies[i] = self.call(self.urls[i], method, path, json=body, timeout=timeout, retries=retries)
            except BaseException as error:  # noqa: BLE001 - re-raised below
                errors[i] = error

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(self.urls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for error in errors:
            if error is not None:
                raise error
        return bodies

    def wait_healthy(self, timeout_s: Optional[float] = None) -> None:
        """Poll ``GET /health`` of every server until it answers 200 (or raise after ``startup_timeout_s``)."""
        deadline = time.monotonic() + (self.config.startup_timeout_s if timeout_s is None else timeout_s)
        pending = list(self.urls)
        last: dict[str, str] = {}
        while pending:
            for url in list(pending):
                try:
                    self._once(url, "GET", "/health", timeout=min(10.0, self.config.control_timeout_s))
                    pending.remove(url)
                except SGLangHTTPError as error:
                    last[url] = str(error)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise SGLangConfigError(
                    "SGLang servers not healthy after "
                    f"{self.config.startup_timeout_s:g} s: " + "; ".join(last.get(url, url) for url in pending)
                )
            time.sleep(0.5)

    @property
    def facts(self) -> list[ServerFacts]:
        """Per server, what ``GET /get_server_info`` says (TP size for the weight-update group, routes flag)."""
        if self._facts is None:
            self._facts = [self._server_facts(url) for url in self.urls]
        return self._facts

    def _server_facts(self, url: str) -> ServerFacts:
        try:
            return server_facts(self.call(url, "GET", "/get_server_info", retries=1))
        except SGLangHTTPError as error:
            if error.status is not None and error.status < 500:
                return ServerFacts()  # endpoint missing: assume one rank, routes unknown
            raise

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams,
        *,
        samples_per_prompt: int = 1,
        return_routes: bool = False,
    ) -> RolloutResult:
        """Sample ``samples_per_prompt`` responses per prompt; samples come back grouped by prompt, in prompt order;
        prompts that could not be served come back as failures."""
        self._check_open()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if isinstance(samples_per_prompt, bool) or not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be a positive int, got {samples_per_prompt!r}")
        checked = [self._check_prompt(index, prompt) for index, prompt in enumerate(prompts)]
        start = time.perf_counter()
        specs = plan_samples(len(checked), samples_per_prompt, sampling.seed)
        requests = split_requests(specs, self.config.request_size)
        outcome = _Outcome()
        self._stop.clear()
        if requests:
            workers = min(self.config.max_concurrency, len(requests))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang") as pool:
                futures = [
                    pool.submit(self._serve, index, request, checked, sampling, return_routes)
                    for index, request in enumerate(requests)
                ]
                try:
                    for future in as_completed(futures):
                        part = future.result()
                        outcome.samples.update(part.samples)
                        outcome.errors.update(part.errors)
                        outcome.retries += part.retries
                except BaseException:
                    self._stop.set()  # running requests stop retrying; queued ones are cancelled
                    for future in futures:
                        future.cancel()
                    raise
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
            "failed_prompts": float(len(result.failures)),
        }
        return result

    def _check_prompt(self, index: int, prompt) -> list[int]:
        tokens = torch.as_tensor(prompt)
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"prompt {index} must be a non-empty 1-D sequence of token ids, got shape "
                             f"{tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dtype.is_complex:
            raise ValueError(f"prompt {index} must hold integer token ids, got {tokens.dtype}")
        ids = tokens.to(torch.int64).tolist()
        if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ValueError(f"prompt {index} holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _serve(self, index: int, specs, prompts, sampling: SamplingParams, return_routes: bool) -> _Outcome:
        """One /generate request (with retries): every sample of it ends up in ``samples`` or ``errors``."""
        outcome = _Outcome()
        payload = generate_payload(
            [prompts[spec.prompt_index] for spec in specs],
            [sampling_params_payload(sampling, spec.seed) for spec in specs],
            return_routes=return_routes,
            batch=len(specs) > 1,
        )
        retries = self.config.max_retries
        last = ""
        for attempt in range(retries + 1):
            if self._stop.is_set():
                last = last or "cancelled"
                break
            url = self.urls[(index + attempt) % len(self.urls)]
            try:
                body = self._once(url, "POST", "/generate", json=payload, timeout=self.config.request_timeout_s)
                entries = reply_entries(body, len(specs))
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
        The trainer's multi-rank sync goes through :func:`megatron_r3.rollout.weight_sync.sync_policy_weights`."""
        self._check_open()
        from megatron_r3.rollout.weight_sync import push_named_tensors

        push_named_tensors(self, named_tensors)

    def next_weight_version(self) -> str:
        self.weight_version += 1
        return str(self.weight_version)

    def weight_sender(self):
        """The distributed-path sender (its process group is created on first use)."""
        if self._weight_sender is None:
            from megatron_r3.rollout.weight_sync import DistributedWeightSender

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


def client_config_from_args(args) -> SGLangClientConfig:
    return SGLangClientConfig(
        max_concurrency=args.sglang_max_concurrency,
        request_size=args.sglang_request_size,
        request_timeout_s=args.sglang_request_timeout,
        connect_timeout_s=args.sglang_connect_timeout,
        max_retries=args.sglang_max_retries,
        retry_backoff_s=args.sglang_retry_backoff,
        startup_timeout_s=args.sglang_startup_timeout,
    )


def build_sglang_engine(args, hf_config) -> SGLangEngine:
    """``--rollout-engine sglang``: the client for the servers named by the arguments (rank 0 only)."""
    from megatron_r3.model.qwen3_moe import arch_from_hf_config
    from megatron_r3.rollout.weight_sync import settings_from_args

    arch = arch_from_hf_config(hf_config)
    config = client_config_from_args(args)
    urls = resolve_urls(args.sglang_url, args.sglang_address_file, wait_s=config.startup_timeout_s)
    engine = SGLangEngine(
        urls, num_layers=arch.num_layers, topk=arch.topk, num_experts=arch.num_experts, vocab_size=arch.vocab_size,
        config=config, require_routes=args.router_replay == "R3" or bool(args.collect_routing_agreement),
        weight_sync=settings_from_args(args), hf_config=hf_config,
    )
    print(f"rollout engine: SGLang at {', '.join(engine.urls)} (weight sync: {engine.weight_sync.mode})", flush=True)
    return engine
