"""Fixed-shape decoding for the embedded hf engine: a static KV cache, sampling and stop checks on the device.

Why
    The engine's first loop (``HFRolloutEngine._generate_batch`` without this module) waits on the device after
    every generated token: it counts finished sequences (``int(done.sum())``), retires them from the batch and the
    ``DynamicCache`` (``batch_select_indices``), and ``torch.multinomial`` checks its input on the host (two
    ``.item()`` calls per draw). On a GPU the decode step is launch-bound, so these waits, plus a cache that grows by
    concatenation, dominate the rollout. This loop keeps every shape fixed for the whole batch instead:

    * a transformers ``StaticCache`` sized ``width + max_steps - 1`` (the longest prompt plus the tokens fed back;
      the last sampled token is never fed), filled in place;
    * the batch never shrinks: a finished sequence keeps being fed the pad token, its samples are masked out
      (``done`` lives on the device) and its rows are cut off on the host at the end, like the first loop's;
    * the attention mask is a preallocated additive 4-D mask (``sdpa`` or ``eager`` attention) updated in place,
      so transformers' mask builder (which reads the padding mask on the host) is skipped;
    * the host asks whether every sequence finished only every ``hf_stop_check_interval`` steps (one sync each), so
      at most ``interval - 1`` extra decode forwards run after the last sequence stops;
    * routes are written by router hooks into device buffers at a device-side step index (no boolean indexing) and
      copied to the host once per batch;
    * optionally (``hf_cuda_graph``, CUDA only) the decode forward is captured once per batch in a CUDA graph and
      replayed (the first decode forward runs eagerly on a side stream as warm-up, followed by the one extra sync
      of the batch); sampling stays outside the graph.

What a replayed decode forward reads (:class:`CUDADecodeGraph`)
    A replay reruns the kernels recorded at capture on the same addresses and runs no Python, so every input that
    changes per step lives in a buffer updated in place before the replay: the fed tokens, their positions (rotary),
    the additive mask (one more slot opened per step), the route recorder's ``step_index``, and the cache slot
    written, which transformers' ``StaticCache`` (5.x) takes from its device tensor ``cumulative_length``, advanced
    in place by every forward (the capture records the advance without running it; each replay runs it once).
    Nothing of the decode forward may read the host (a capture fails on it). The unit tests replay the loop with a
    CPU stand-in that records the aten ops of the capture and reruns only those, which fails on a per-step value
    baked into the capture; that the CUDA graph then gives the static loop's tokens is checked by bench/hf_generate.py
    (greedy, fp32 and bf16).

Sampling semantics (:mod:`megatron_r3.rollout.sampling`, shared with the first loop)
    Temperature, top-k, top-p and the reported logprob are computed by the same functions. The draw is
    ``argmax(probs / Exp(1) noise)`` with the noise from ``exponential_(generator=...)``, which is exactly the
    algorithm ``torch.multinomial(probs, 1)`` runs for one sample, minus its host-side input checks (tested
    bitwise against :func:`~megatron_r3.rollout.sampling.sample_tokens`).

Equality with the first loop (same seed)
    Greedy decoding gives the same tokens and routes. Seeded sampling gives the same tokens while no sequence of the
    batch has finished; after the first sequence finishes they may differ, for a reason no fixed-shape loop can
    avoid: the first loop draws noise for the still-active rows only, so the generator's position after a
    retirement depends on how many rows were retired at each step (a data-dependent count the host would have to
    read), while this loop draws ``[batch, vocab]`` noise every step. Both loops are reproducible from the seed,
    and both depend on the batch composition. Logits differ from the first loop's by rounding only (attention runs
    over the whole static cache with the unused slots masked), so logprobs agree to float rounding.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch

from megatron_r3.model.families import family_of
from megatron_r3.replay.routes import compact_index_dtype, routes_from_array
from megatron_r3.rollout.engines.hf_config import HFEngineConfig
from megatron_r3.rollout.base import RolloutSample, SamplingParams
from megatron_r3.rollout.hf_capture import find_routers
from megatron_r3.rollout.sampling import filter_top_k_top_p, logprobs_for_sampling


def sample_on_device(logits: torch.Tensor, sampling: SamplingParams,
                     generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~megatron_r3.rollout.sampling.sample_tokens` without a host sync: ``(tokens int64 [B], logprobs
    float32 [B])``.

    ``torch.multinomial(probs, 1)`` draws ``q ~ Exp(1)`` with ``exponential_`` and returns ``argmax(probs / q)``
    after checking on the host that ``probs`` is a valid distribution; the same two steps are run here without the
    check (``probs`` is a softmax, valid by construction), so the same generator state gives the same tokens.
    """
    logprobs = logprobs_for_sampling(logits, sampling.temperature)
    if sampling.temperature == 0:
        tokens = torch.argmax(logprobs, dim=-1)
    else:
        filtered = filter_top_k_top_p(logprobs, top_k=sampling.top_k, top_p=sampling.top_p)
        probs = torch.softmax(filtered, dim=-1)
        noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
        tokens = torch.argmax(probs / noise, dim=-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _RouteRecorder:
    """Router forward hooks writing top-k ids into device buffers without any host sync.

    Prompt forward: ids of fed position ``[b, s]`` go to ``prompt[b, s]``. Decode forward: ids of batch row ``b``
    go to ``decode[layer, step, b]`` with ``step`` read from the device tensor ``step_index`` (so a captured CUDA
    graph writes to the right step on replay). Same ids as :class:`~megatron_r3.rollout.hf_capture.RouteCapture`
    records (the router's third output, in its top-k order, narrowed to the compact dtype).
    """

    def __init__(self, model, batch: int, width: int, decode_steps: int, device):
        config = model.config
        self.num_layers, self.topk = config.num_hidden_layers, config.num_experts_per_tok
        self.num_experts = family_of(config).arch(config).num_experts  # Qwen: num_experts, DeepSeek: n_routed_experts
        self.dtype = compact_index_dtype(self.num_experts)
        self.routers = find_routers(model)
        self.batch, self.width = batch, width
        self.prompt = torch.zeros(batch, width, self.num_layers, self.topk, dtype=self.dtype, device=device)
        self.decode = torch.zeros(self.num_layers, max(decode_steps, 1), batch, self.topk, dtype=self.dtype,
                                  device=device)
        self.step_index = torch.zeros(1, dtype=torch.int64, device=device)
        self.mode: Optional[str] = None  # "prompt" | "decode" | None (a forward nobody announced: not recorded)
        self.reported: set[int] = set()
        self.handles = [router.register_forward_hook(self._hook(layer)) for layer, router in self.routers.items()]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            if self.mode is None:
                return
            if not (isinstance(output, tuple) and len(output) == 3):
                raise RuntimeError(
                    f"route capture: the Qwen3-MoE router returned {type(output).__name__} instead of (router_logits, "
                    "routing_weights, selected_experts); this transformers version changed the router and "
                    "hf_generate must be updated"
                )
            ids = output[2]
            fed = self.batch * (self.width if self.mode == "prompt" else 1)
            if ids.shape != (fed, self.topk):
                raise RuntimeError(f"route capture: layer {layer} router returned ids of shape {tuple(ids.shape)}, "
                                   f"expected {(fed, self.topk)}")
            if layer in self.reported:
                raise RuntimeError(f"route capture: layer {layer} reported twice in one forward")
            self.reported.add(layer)
            if self.mode == "prompt":
                self.prompt[:, :, layer] = ids.view(self.batch, self.width, self.topk).to(self.dtype)
            else:
                self.decode[layer].index_copy_(0, self.step_index, ids.view(1, self.batch, self.topk).to(self.dtype))

        return hook

    def announce(self, mode: str) -> None:
        self.mode, self.reported = mode, set()

    def finish(self) -> None:
        """Every MoE layer must have reported exactly once in the announced forward (checked in Python: no sync)."""
        if len(self.reported) != len(self.routers):
            missing = sorted(set(self.routers) - self.reported)
            raise RuntimeError(f"route capture: MoE layers {missing} did not report their expert ids this step")
        self.mode = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.mode = [], None

    def rows_on_host(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt [B, width, L, K], decode [B, steps, L, K])`` on the CPU: the one route copy of a batch."""
        return self.prompt.cpu(), self.decode.permute(2, 1, 0, 3).cpu()


def _check_attention(model) -> None:
    kind = getattr(model.config, "_attn_implementation", None) or "eager"
    if kind not in ("sdpa", "eager"):
        raise ValueError(
            f"hf_generate builds its own 4-D attention masks for 'sdpa' or 'eager' attention; the model uses "
            f"{kind!r}: build it with attn_implementation='sdpa' or pass --no-hf-static-decode"
        )


def _additive_mask(attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``attend`` (True: may attend) as an additive mask (0 or the dtype's lowest value), the form both
    ``eager`` and ``sdpa`` attention take; sdpa would otherwise convert a boolean mask in every layer."""
    zero = torch.zeros((), dtype=dtype, device=attend.device)
    return torch.where(attend, zero, torch.finfo(dtype).min)


def _cache_kwarg(model) -> str:
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is deprecated)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _host_all_done(done: torch.Tensor) -> bool:
    """The loop's only device -> host read: whether every sequence of the batch has finished."""
    return bool(done.all())


class CUDADecodeGraph:
    """The decode forward of one batch in a CUDA graph: ``warm_up`` runs it eagerly on a side stream (as
    ``torch.cuda.graphs`` asks before a capture; followed by the one extra sync of the batch), ``capture`` records it
    without running it, ``replay`` runs the recorded kernels and returns the captured output (the same tensor every
    time, overwritten by each replay). The loop of :func:`generate_batch_static` takes any object with these three
    methods (the unit tests pass a CPU stand-in).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.output: Optional[torch.Tensor] = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def warm_up(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            output = forward()
        torch.cuda.synchronize(self.device)  # once per batch: the side stream's memory is reused by the main one
        return output

    def capture(self, forward: Callable[[], torch.Tensor]) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                output = forward()
        except RuntimeError as error:
            raise RuntimeError(f"hf_cuda_graph: capturing the decode forward failed ({error}); "
                               "turn --hf-cuda-graph off") from error
        self.graph, self.output = graph, output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


@torch.inference_mode()
def generate_batch_static(model, chunk, first: int, sampling: SamplingParams, generator, return_routes: bool,
                          bar, config: HFEngineConfig, stats: Optional[dict] = None,
                          decode_graph: Optional[Callable[[torch.device], CUDADecodeGraph]] = None
                          ) -> list[RolloutSample]:
    """Generate one batch of ``chunk`` = ``[(prompt_index, prompt int64 CPU tensor), ...]`` with fixed shapes.

    Same arguments and samples as ``HFRolloutEngine._generate_batch`` (``first``: index of the batch's first
    sequence in the call, for route ids; ``bar``: a tqdm bar advanced once per batch). ``stats``, if given, receives
    ``decode_forwards`` and ``host_checks`` (the number of device syncs of the decode loop). ``decode_graph`` builds
    the graph of the decode forward when ``config.hf_cuda_graph`` is set (default :class:`CUDADecodeGraph`).
    """
    device = next(model.parameters()).device
    if config.hf_cuda_graph and decode_graph is None and device.type != "cuda":
        raise ValueError(f"hf_cuda_graph needs the model on a CUDA device, it is on {device}; turn the flag off")
    _check_attention(model)
    hf_config = model.config
    batch = len(chunk)
    prompt_lengths = [prompt.numel() for _, prompt in chunk]
    width = max(prompt_lengths)
    limit = hf_config.max_position_embeddings
    max_new_host = [min(limit - n, sampling.max_new_tokens) for n in prompt_lengths]  # >= 1: prompts are < limit
    max_steps = max(max_new_host)
    cache_len = width + max_steps - 1
    pad_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    dtype = next(model.parameters()).dtype

    input_ids = torch.full((batch, width), pad_id, dtype=torch.int64)
    prompt_mask = torch.zeros((batch, width), dtype=torch.bool)
    for row, (_, prompt) in enumerate(chunk):
        input_ids[row, width - prompt.numel():] = prompt
        prompt_mask[row, width - prompt.numel():] = True
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    lengths = torch.tensor(prompt_lengths, dtype=torch.int64, device=device)
    max_new = torch.tensor(max_new_host, dtype=torch.int64, device=device)

    # attend[b, j]: cache slot j holds a real token of sequence b (prompt slots; decode slots open in decode_mask)
    attend = torch.zeros((batch, cache_len), dtype=torch.bool, device=device)
    attend[:, :width] = prompt_mask
    slots = torch.arange(cache_len, device=device)
    causal = slots[None, :] <= torch.arange(width, device=device)[:, None]  # [width, cache_len]
    diagonal = slots[None, :] == torch.arange(width, device=device)[:, None]
    # a padding query attends to itself only: no fully masked row (NaN in some kernels) and nothing real sees it
    prefill_attend = causal[None] & (attend[:, None, :] | diagonal[None])  # [B, width, cache_len]
    prefill_mask = _additive_mask(prefill_attend[:, None], dtype)
    decode_mask = _additive_mask(attend[:, None, None, :], dtype)  # [B, 1, 1, cache_len], updated in place

    from transformers import StaticCache

    cache = StaticCache(config=hf_config, max_cache_len=cache_len)
    cache_kwargs = {_cache_kwarg(model): cache}
    recorder = _RouteRecorder(model, batch, width, max_steps - 1, device) if return_routes else None
    try:
        if recorder is not None:
            recorder.announce("prompt")
        out = model(input_ids=input_ids, attention_mask=prefill_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **cache_kwargs)
        if recorder is not None:
            recorder.finish()
        logits = out.logits[:, -1, :]

        fed_tokens = torch.full((batch, 1), pad_id, dtype=torch.int64, device=device)
        fed_positions = torch.zeros((batch, 1), dtype=torch.int64, device=device)

        def decode_forward() -> torch.Tensor:
            step_out = model(input_ids=fed_tokens, attention_mask=decode_mask, position_ids=fed_positions,
                             use_cache=True, **cache_kwargs)
            return step_out.logits[:, -1, :]

        response = torch.zeros((batch, max_steps), dtype=torch.int64, device=device)
        logprobs = torch.zeros((batch, max_steps), dtype=torch.float32, device=device)
        response_length = torch.zeros(batch, dtype=torch.int64, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.int64, device=device)
        pad = torch.full((), pad_id, dtype=torch.int64, device=device)
        graph = (decode_graph or CUDADecodeGraph)(device) if config.hf_cuda_graph else None
        forwards = host_checks = 0
        for step in range(max_steps):
            tokens, token_logprobs = sample_on_device(logits, sampling, generator)
            live = ~done
            tokens = torch.where(live, tokens, pad)  # a finished sequence is fed padding from now on
            response[:, step] = tokens
            logprobs[:, step] = torch.where(live, token_logprobs, 0.0)
            response_length += live
            hit_stop = torch.isin(tokens, stop_ids) & live
            stopped |= hit_stop
            done |= hit_stop | (step + 1 >= max_new)
            if step + 1 == max_steps:
                break
            if (step + 1) % config.hf_stop_check_interval == 0:
                host_checks += 1
                if _host_all_done(done):
                    break
            # feed response token `step` (it sits at position P + step, in cache slot width + step)
            fed_tokens.copy_(tokens.unsqueeze(1))
            torch.add(lengths, step, out=fed_positions.view(-1))
            decode_mask[:, :, :, width + step] = 0
            if recorder is not None:
                recorder.step_index.fill_(step)
                recorder.announce("decode")
            hooks_ran = True  # the router hooks run in every forward that runs Python: all but a replay
            if graph is None:
                logits = decode_forward()
            elif graph.captured:
                logits, hooks_ran = graph.replay(), False
            elif forwards >= 1:  # the first decode forward ran eagerly: warm-up done
                graph.capture(decode_forward)
                logits = graph.replay()  # capture records without running: run this step now
            else:
                logits = graph.warm_up(decode_forward)
            if recorder is not None:
                if hooks_ran:
                    recorder.finish()
                recorder.mode = None
            forwards += 1

        if stats is not None:
            stats.update(decode_forwards=forwards, host_checks=host_checks)
        response, logprobs = response.cpu(), logprobs.cpu()
        lengths_out, stopped_out = response_length.cpu().tolist(), stopped.cpu().tolist()
        routes_rows = recorder.rows_on_host() if recorder is not None else None
    finally:
        if recorder is not None:
            recorder.remove()
    bar.update(batch)

    samples = []
    for row, (prompt_index, prompt) in enumerate(chunk):
        length, prompt_length = lengths_out[row], prompt.numel()
        routes = None
        if routes_rows is not None:
            prompt_rows, decode_rows = routes_rows
            rows = torch.cat([prompt_rows[row, width - prompt_length:], decode_rows[row, : length - 1]])
            routes = routes_from_array(rows, num_experts=recorder.num_experts, source="hf", sample_id=first + row)
        samples.append(sample_of_row(prompt_index, prompt, response[row], logprobs[row], length, stopped_out[row],
                                     routes))
    return samples


def sample_of_row(prompt_index: int, prompt: torch.Tensor, response: torch.Tensor, logprobs: torch.Tensor,
                  length: int, stopped: bool, routes) -> RolloutSample:
    """One decoded row (host tensors, padded past `length`) as a sample; both decode loops end with this."""
    return RolloutSample(
        tokens=torch.cat([prompt, response[:length]]),
        prompt_length=prompt.numel(),
        response_logprobs=logprobs[:length].clone(),
        routes=routes,
        finish_reason="stop" if stopped else "length",
        prompt_index=prompt_index,
    )
