"""SGLang's HTTP wire format: request building and response parsing, as pure functions (no I/O).

Everything here follows SGLang 0.5.23's own code (`sglang.srt.entrypoints.http_server`, the request classes of
`sglang.srt.managers.io_struct`): tests/sglang_contract validates every body built here with SGLang's request classes (its wheel installed without dependencies; it runs
on a CPU only that far), and the stand-in server in ``tests/sglang_standin`` runs its weight-update session code.

``POST /generate`` (token ids in, token ids out; the trainer never needs SGLang's tokenizer)::

    {"input_ids": [...],                       # or a list of lists: SGLang's batch form
     "sampling_params": {"temperature", "top_p", "top_k", "max_new_tokens", "stop_token_ids", "sampling_seed"},
                                               # one dict, or one dict per entry in the batch form
     "return_logprob": true, "logprob_start_len": -1,   # output-token logprobs only
     "return_routed_experts": true}            # only sent when routes are wanted

Reply (a dict, or a list of dicts in the batch form, in request order)::

    {"text": ..., "output_ids": [...],
     "meta_info": {"finish_reason": {"type": "stop"|"length"|"abort", ...},
                   "output_token_logprobs": [[logprob, token_id, text_or_null], ...],
                   "routed_experts": "<base64>",     # int32; 0.5.23 sends no dtype or start_len field
                   "weight_version": ..., ...}}

The response tokens are read from ``output_token_logprobs`` (one entry per sampled token, the stop token included),
which also gives the rollout logprobs. SGLang's default logprob is ``log_softmax(logits / T)`` of the sampled token,
before top-k/top-p renormalisation, the same convention as the embedded engine and the trainer (do not run the
server with ``SGLANG_RETURN_ORIGINAL_LOGPROB``, which reports logprobs before temperature scaling).

``routed_experts`` is base64 of flat row-major ints ``[seqlen - 1 - start_len, num_hidden_layers, top_k]``:
one row per position fed through the model (every prompt token and every generated token except the last), all
decoder layers (dense layers zero). A wrong row count or undecodable payload fails *that sample* with the
:class:`~megatron_r3.replay.routes.RouteError` text; a missing payload when routes were requested is a server
configuration error (:class:`MissingRoutesError`), since SGLang silently omits routes when it was started without
``--enable-return-routed-experts``.

Seeds: SGLang's per-request ``sampling_params["sampling_seed"]`` is honoured **only** by a server started with
``--enable-deterministic-inference`` (0.5.23 ignores it silently otherwise; the engine reads the flag from
``/server_info`` and warns once, or refuses with ``require_deterministic``). The same seed on two requests with the
same prompt gives the same sample there, so every sample gets its own seed ``base + flat sample index``
(:func:`sample_seed`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from megatron_r3.platform.dtypes import dtype_name
from megatron_r3.replay.routes import RouteError
from megatron_r3.rollout.engines.sglang.codec import decode_sglang_routed_experts
from megatron_r3.rollout.base import RolloutSample, SamplingParams

ROUTES_HINT = (
    "start every SGLang server with --enable-return-routed-experts (without it SGLang silently omits "
    "meta_info['routed_experts'])"
)
FINISH_REASONS = ("stop", "length", "abort")
_SEED_MASK = (1 << 63) - 1


class ProtocolError(ValueError):
    """A reply that does not follow SGLang's format (a sample-level failure unless said otherwise)."""


class MissingRoutesError(ProtocolError):
    """Routes were requested but the reply has none: the server runs without --enable-return-routed-experts."""


class AbortedError(ProtocolError):
    """The server aborted the request (finish_reason "abort"); worth a retry."""


# ================================================================================================ addresses
def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` -> ``http://host:port`` (no trailing slash)."""
    url = url.strip()
    if not url:
        raise ValueError("empty SGLang URL")
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def parse_address_lines(text: str) -> list[str]:
    """URLs from an address file's text: one per line; blank lines and ``#`` comments are ignored."""
    urls = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            urls.append(normalize_url(line))
    return urls


def read_address_file(path: str) -> list[str]:
    """The URLs in ``path``: a file with one URL per line, or a directory of such files (``*.txt``, read in name
    order; one file per launcher node), as written by ``tools/launch_sglang.py``."""
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if name.endswith(".txt") and not name.startswith("."))
        urls = []
        for name in names:
            with open(os.path.join(path, name)) as handle:
                urls += parse_address_lines(handle.read())
        return urls
    with open(path) as handle:
        return parse_address_lines(handle.read())


# ================================================================================================ requests
@dataclass(frozen=True)
class SampleSpec:
    """One sample to draw: the prompt it belongs to, its index within the prompt's group and in the whole call."""

    prompt_index: int
    group_index: int
    flat_index: int
    seed: Optional[int]


def sample_seed(base_seed: Optional[int], flat_index: int) -> Optional[int]:
    """The ``sampling_seed`` of sample ``flat_index`` of a call seeded with ``base_seed`` (None: unseeded)."""
    if base_seed is None:
        return None
    return (int(base_seed) + int(flat_index)) & _SEED_MASK


def plan_samples(num_prompts: int, samples_per_prompt: int, base_seed: Optional[int]) -> list[SampleSpec]:
    """Every sample of a call, grouped by prompt, in prompt order (the order samples are returned in)."""
    specs, flat = [], 0
    for prompt in range(num_prompts):
        for j in range(samples_per_prompt):
            specs.append(SampleSpec(prompt, j, flat, sample_seed(base_seed, flat)))
            flat += 1
    return specs


def split_requests(specs: Sequence[SampleSpec], request_size: int,
                   start_lens: Optional[Sequence[int]] = None) -> list[list[SampleSpec]]:
    """Consecutive samples per ``/generate`` call: ``request_size`` each (0 = all in one call). With per-prompt
    ``start_lens``, a request also ends where the start length changes: SGLang takes one
    ``routed_experts_start_len`` per request (``GenerateReqInput.__getitem__`` hands the same int to every entry)."""
    if request_size < 0:
        raise ValueError(f"request_size must be >= 0, got {request_size}")
    size = len(specs) if request_size == 0 else request_size
    size = max(1, size)
    requests: list[list[SampleSpec]] = []
    for spec in specs:
        if (not requests or len(requests[-1]) >= size
                or (start_lens is not None
                    and start_lens[spec.prompt_index] != start_lens[requests[-1][0].prompt_index])):
            requests.append([])
        requests[-1].append(spec)
    return requests


def sampling_params_payload(sampling: SamplingParams, seed: Optional[int]) -> dict:
    """SGLang ``sampling_params`` for one sample (SGLang: temperature 0 = greedy, top_k -1 = off)."""
    params = {
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k) if sampling.top_k and sampling.top_k > 0 else -1,
        "max_new_tokens": int(sampling.max_new_tokens),
    }
    if sampling.stop_token_ids:
        params["stop_token_ids"] = [int(t) for t in sampling.stop_token_ids]
    if seed is not None:
        params["sampling_seed"] = int(seed)
    return params


def generate_payload(
    input_ids: Sequence[Sequence[int]],
    sampling: Sequence[dict],
    *,
    return_routes: bool,
    batch: bool,
    routes_start_len: int = 0,
) -> dict:
    """The ``/generate`` body for one sample (``batch=False``) or SGLang's batch form (lists, one entry each)."""
    if len(input_ids) != len(sampling) or not input_ids:
        raise ValueError(f"need one sampling dict per prompt, got {len(input_ids)} prompts and {len(sampling)}")
    if not batch and len(input_ids) != 1:
        raise ValueError("the single form carries exactly one prompt")
    ids = [[int(t) for t in prompt] for prompt in input_ids]
    payload: dict[str, Any] = {
        "input_ids": ids if batch else ids[0],
        "sampling_params": list(sampling) if batch else sampling[0],
        "return_logprob": True,
        "logprob_start_len": -1,
    }
    if return_routes:
        payload["return_routed_experts"] = True
        if routes_start_len:  # one int for the whole request; 0 (SGLang's default: every row) is not sent
            payload["routed_experts_start_len"] = int(routes_start_len)
    return payload


# ================================================================================================ replies
def reply_entries(body: Any, expected: int) -> list[dict]:
    """The per-sample dicts of a ``/generate`` reply (a dict for one sample, a list in the batch form)."""
    entries = body if isinstance(body, list) else [body]
    if len(entries) != expected:
        raise ProtocolError(f"/generate returned {len(entries)} results for {expected} prompts")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("meta_info"), dict):
            raise ProtocolError(f"/generate result without meta_info: {str(entry)[:200]}")
    return entries


def finish_reason_of(meta: dict) -> str:
    """SGLang's ``finish_reason`` ({"type": ...} or a plain string) as "stop" / "length" / "abort"."""
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in FINISH_REASONS:
        raise ProtocolError(f"unknown finish_reason {reason!r}")
    if kind == "abort":
        message = reason.get("message", "") if isinstance(reason, dict) else ""
        raise AbortedError(f"the server aborted the request{': ' + message if message else ''}")
    return kind


# rounding slack above 0 for the logprob of a (near-)certain token, as engines compute log-softmax in low precision
LOGPROB_SLACK = 1e-3


def output_tokens_and_logprobs(meta: dict) -> tuple[list[int], list[float]]:
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise ProtocolError("the reply has no meta_info['output_token_logprobs'] (was return_logprob=true sent?)")
    if not entries:
        raise ProtocolError("the reply has no generated tokens")
    tokens, logprobs = [], []
    for position, entry in enumerate(entries):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise ProtocolError(f"output_token_logprobs[{position}] is {entry!r}, expected [logprob, token_id, text]")
        logprob, token = entry[0], entry[1]
        if logprob is None or isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
            raise ProtocolError(f"output_token_logprobs[{position}] has logprob {logprob!r}")
        if isinstance(token, bool) or not isinstance(token, int):
            raise ProtocolError(f"output_token_logprobs[{position}] has token id {token!r}")
        if not math.isfinite(logprob) or logprob > LOGPROB_SLACK:
            raise ProtocolError(f"output_token_logprobs[{position}] has logprob {logprob} (a sampled token's "
                                f"log-probability must be finite and <= 0)")
        tokens.append(token)
        logprobs.append(float(logprob))
    return tokens, logprobs


def parse_sample(
    entry: dict,
    *,
    prompt_ids: Sequence[int],
    prompt_index: int,
    return_routes: bool,
    num_layers: int,
    topk: int,
    num_experts: int,
    vocab_size: Optional[int] = None,
    sample_id: Any = None,
    requested_start_len: int = 0,
) -> RolloutSample:
    """One ``/generate`` result -> :class:`RolloutSample`.

    Raises :class:`AbortedError` (retry), :class:`MissingRoutesError` (server configuration),
    :class:`~megatron_r3.replay.routes.RouteError` (bad payload or wrong row count) or :class:`ProtocolError`.
    """
    meta = entry["meta_info"]
    finish = finish_reason_of(meta)
    response, logprobs = output_tokens_and_logprobs(meta)
    if vocab_size is not None:
        bad = [t for t in response if not 0 <= t < vocab_size]
        if bad:
            raise ProtocolError(f"generated token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    tokens = torch.tensor([*prompt_ids, *response], dtype=torch.int64)
    routes = None
    if return_routes:
        payload = meta.get("routed_experts")
        if payload is None:
            raise MissingRoutesError(f"routes were requested but the reply has no meta_info['routed_experts']: "
                                     f"{ROUTES_HINT}")
        start_len = meta.get("routed_experts_start_len", requested_start_len) or 0
        routes = decode_sglang_routed_experts(
            payload, num_layers=num_layers, topk=topk, num_experts=num_experts,
            dtype=meta.get("routed_experts_dtype"), start_len=int(start_len), sample_id=sample_id, rank=0,
        )
        expected = tokens.shape[0] - 1 - int(start_len)
        if routes.num_rows != expected:
            raise RouteError(
                f"routed_experts has {routes.num_rows} rows, expected seqlen - 1 - start_len = "
                f"{tokens.shape[0]} - 1 - {int(start_len)} = {expected} ({len(prompt_ids)} prompt + "
                f"{len(response)} generated tokens)",
                sample_id=sample_id, rank=0,
            )
    return RolloutSample(
        tokens=tokens,
        prompt_length=len(prompt_ids),
        response_logprobs=torch.tensor(logprobs, dtype=torch.float32),
        routes=routes,
        finish_reason=finish,
        prompt_index=prompt_index,
    )


# ================================================================================================ weight sync
def init_weights_update_group_payload(
    *, master_address: str, master_port: int, rank_offset: int, world_size: int, group_name: str, backend: str
) -> dict:
    return {
        "master_address": str(master_address),
        "master_port": int(master_port),
        "rank_offset": int(rank_offset),
        "world_size": int(world_size),
        "group_name": str(group_name),
        "backend": str(backend),
    }


def update_weights_from_distributed_payload(
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    *,
    group_name: str,
    flush_cache: bool,
    weight_version: Optional[str] = None,
) -> dict:
    """Names (HF checkpoint names), dtypes and shapes of one bucket, in the order they will be broadcast."""
    payload = {
        "names": list(names),
        "dtypes": [dtype_name(t.dtype) for t in tensors],  # SGLang reads getattr(torch, name)
        "shapes": [list(t.shape) for t in tensors],
        "group_name": group_name,
        "flush_cache": bool(flush_cache),
    }
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    return payload


def update_weights_from_disk_payload(model_path: str, *, load_format: Optional[str] = None,
                                     weight_version: Optional[str] = None) -> dict:
    payload: dict[str, Any] = {"model_path": model_path, "load_format": load_format}
    if weight_version is not None:
        payload["weight_version"] = str(weight_version)
    return payload


def check_success(body: Any, what: str) -> str:
    """SGLang's ``{"success": bool, "message": str}`` replies: the message, or ProtocolError when not successful."""
    if isinstance(body, dict) and "success" in body:
        if not body["success"]:
            raise ProtocolError(f"{what} failed: {body.get('message', body)}")
        return str(body.get("message", ""))
    if isinstance(body, (dict, str)) or body is None:  # endpoints that reply with plain text or an empty body
        return "" if body is None else str(body)
    raise ProtocolError(f"{what}: unexpected reply {str(body)[:200]}")


def weight_version_of(body: Any) -> Optional[str]:
    """``weight_version`` of a ``GET /model_info`` reply or of a reply's ``meta_info`` (None when it has none)."""
    if isinstance(body, dict):
        value = body.get("weight_version")
        return None if value is None else str(value)
    return None


@dataclass(frozen=True)
class ServerFacts:
    """What ``GET /get_server_info`` tells (None where the server does not say)."""

    tp_size: int = 1
    dp_size: int = 1
    pp_size: int = 1
    routes_enabled: Optional[bool] = None
    version: Optional[str] = None
    deterministic: Optional[bool] = None  # enable_deterministic_inference: sampling_seed honoured only then

    @property
    def weight_sync_ranks(self) -> int:
        """Ranks this server contributes to a weight update group (one per GPU worker)."""
        return self.tp_size  # SGLang 0.5.23 joins ranks rank_offset + tp_rank (no PP term; pp > 1 is refused)


def server_facts(body: Any) -> ServerFacts:
    if not isinstance(body, dict):
        return ServerFacts()
    args = body.get("server_args") if isinstance(body.get("server_args"), dict) else body

    def _int(key, default=1):
        value = args.get(key, default)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    routes = args.get("enable_return_routed_experts")
    deterministic = args.get("enable_deterministic_inference")
    return ServerFacts(
        deterministic=deterministic if isinstance(deterministic, bool) else None,
        tp_size=_int("tp_size"), dp_size=_int("dp_size"), pp_size=_int("pp_size"),
        routes_enabled=routes if isinstance(routes, bool) else None,
        version=str(body["version"]) if "version" in body else None,
    )
