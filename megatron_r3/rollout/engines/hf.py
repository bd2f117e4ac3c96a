"""The embedded rollout engine: a transformers ``Qwen3MoeForCausalLM`` run in this process.

It is the CPU-capable default and deliberately a different implementation from the Megatron trainer (transformers'
attention, fused-expert MoE, its own kernels and, by default, bf16 against the trainer's fp32), so the
train/inference mismatch that router replay fixes is real. The trainer cannot tell it from SGLang: it returns the same
:class:`~megatron_r3.rollout.base.RolloutSample`\\ s, with routes in SGLang's ``[T-1, num_hidden_layers, top_k]``
layout (dense layers zero, ``Routes(source="hf")``).

Generation
    Sequences (``samples_per_prompt`` copies of each prompt, grouped by prompt) are run in batches of at most
    ``max_batch_size``. A batch is **left-padded** to its longest prompt with an attention mask and per-sequence
    position ids (``cumsum(mask) - 1``), prefilled once into a transformers ``DynamicCache``, then decoded one token
    per step; a sequence that finishes (stop token or length) is dropped from the batch and the cache
    (``DynamicCache.batch_select_indices``), like a continuous-batching server retiring a request. Each sequence is
    capped at ``max_position_embeddings`` tokens in total (finish reason "length"). That is the loop on the CPU;
    on a GPU (``--hf-static-decode auto``) the batch keeps its shape instead: a static cache, sampling and stop checks
    on the device, one host check every ``--hf-stop-check-interval`` steps (:mod:`megatron_r3.rollout.hf_generate`).

Logprobs
    ``response_logprobs[i] = log_softmax(logits / T)[token_i]`` in float32, T the temperature (T = 1 for greedy),
    *before* top-k / top-p filtering (see :mod:`megatron_r3.rollout.sampling`). The trainer computes its
    logprobs the same way, so ``logp_train - logp_rollout`` measures only the engines' numerical mismatch.

Routes
    :class:`~megatron_r3.rollout.hf_capture.RouteCapture` hooks every MoE router and records the top-k ids it
    returned, which are the ids the block used. Row r is position r: prompt rows come from the prefill (padding
    dropped), row ``P + j - 1`` from the decode step that fed response token ``j - 1``; the last sampled token is
    never fed, hence ``T - 1`` rows; a sequence that stopped early has no rows past its stop token.

Reproducibility
    ``SamplingParams.seed`` seeds a fresh generator for the call: the same call with the same seed gives identical
    samples. Without a seed, the engine's own generator (seeded by ``seed=`` at construction) advances across calls.
    Samples do not depend on the seed alone: batch composition (``max_batch_size``) may change them.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from megatron_r3.platform.dtypes import torch_dtype
from megatron_r3.replay.routes import Routes, routes_from_array
from megatron_r3.rollout.base import (
    EngineSetup,
    RolloutEngine,
    RolloutResult,
    RolloutSample,
    SamplingParams,
    check_generate_request,
)
from megatron_r3.rollout.hf_capture import RouteCapture, moe_layer_map
from megatron_r3.model.families import family_of
from megatron_r3.rollout.engines.hf_config import HFEngineConfig
from megatron_r3.rollout.hf_generate import generate_batch_static, sample_of_row
from megatron_r3.rollout.sampling import sample_tokens


# model_type -> the transformers class the embedded engine runs (its router must answer the capture contract of
# `hf_capture`, found through the model family's `find_routers`).
_ENGINE_MODELS = {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def _build_model(model_or_config):
    import transformers
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        model_type = getattr(model_or_config, "model_type", None)
        if model_type not in _ENGINE_MODELS:
            raise TypeError(f"expected a config of model_type {' or '.join(_ENGINE_MODELS)}, got {model_type!r}")
        return getattr(transformers, _ENGINE_MODELS[model_type])(model_or_config)
    if isinstance(model_or_config, torch.nn.Module):
        config = getattr(model_or_config, "config", None)
        if getattr(config, "model_type", None) not in _ENGINE_MODELS or not hasattr(model_or_config, "model"):
            raise TypeError(
                f"expected a transformers {' or '.join(_ENGINE_MODELS.values())}, got "
                f"{type(model_or_config).__name__} (model_type {getattr(config, 'model_type', None)!r})"
            )
        return model_or_config
    raise TypeError(
        f"HFRolloutEngine takes a transformers model or config of model_type {' or '.join(_ENGINE_MODELS)}, got "
        f"{type(model_or_config).__name__}"
    )


def _cast_keep_fp32_buffers(model, dtype: torch.dtype, device: torch.device) -> None:
    """``model.to(device, dtype)`` but float buffers (RoPE ``inv_freq``) keep their dtype, as ``from_pretrained``
    leaves them: casting the inverse frequencies to bf16 would bend every rotary angle at long positions."""
    keep = {name: buf.detach().clone() for name, buf in model.named_buffers() if buf.is_floating_point()}
    model.to(device=device, dtype=dtype)
    for name, value in keep.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = value.to(device)


class HFRolloutEngine(RolloutEngine):
    """A transformers Qwen3-MoE policy in this process, implementing :class:`~megatron_r3.rollout.base.RolloutEngine`.

    No flags of its own: it reads ``--rollout-dtype`` from the shared rollout config. Weight sync is the interface's
    default (the full tensors stream into :meth:`update_weights` on trainer rank 0).

    Args:
        model_or_config: a built ``Qwen3MoeForCausalLM`` (the engine takes ownership: it is cast and moved in place)
            or a ``Qwen3MoeConfig`` (a model is built, randomly initialised from torch's global RNG).
        state_dict: optional weights to load right away, by HF checkpoint names (or live parameter names).
        dtype: the rollout dtype (``torch.bfloat16`` reproduces a bf16 inference engine against an fp32 trainer).
        device: where the model runs (default: where the given model is, else CPU).
        max_batch_size: most sequences decoded together.
        progress: show a tqdm bar during :meth:`generate`.
        seed: seed of the generator used by calls whose ``SamplingParams.seed`` is None.
    """

    generate_config = HFEngineConfig()  # the decode loop (--hf-static-decode ...); `build` sets the run's

    def __init__(
        self,
        model_or_config,
        *,
        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        dtype: Union[torch.dtype, str] = torch.bfloat16,
        device: Union[str, torch.device, None] = None,
        max_batch_size: int = 64,
        progress: bool = True,
        seed: int = 0,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        model = _build_model(model_or_config)
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        _cast_keep_fp32_buffers(model, self.dtype, self.device)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.config = model.config
        self.moe_layers = moe_layer_map(self.config)
        self.max_batch_size = int(max_batch_size)
        self.progress = progress
        self.weight_version = 0
        self.last_stats: dict[str, float] = {}
        self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._capture = RouteCapture(model)
        # transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is deprecated)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._loader = family_of(model.config).weight_loader(model)
        self._closed = False
        if state_dict is not None:
            self.update_weights(state_dict.items())
            self.weight_version = 0

    @classmethod
    def build(cls, setup: EngineSetup) -> "HFRolloutEngine":
        """``--rollout-engine hf``: a freshly initialised model of the policy's architecture (the trainer's first
        weight sync loads the policy into it), on the GPU when there is one."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(setup.hf_config, dtype=torch.float32)
        engine = cls(model, dtype=setup.rollout.rollout_dtype, device="cuda" if torch.cuda.is_available() else "cpu",
                     max_batch_size=max(1, setup.max_batch_size), progress=setup.progress, seed=setup.seed)
        if setup.config is not None:
            engine.generate_config = setup.config
        return engine

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, strict: bool = False) -> int:
        """Copy ``(name, tensor)`` pairs into the model in place (dtype-cast); names are HF checkpoint names.

        Per-expert names (``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``) are written into
        transformers' fused ``gate_up_proj`` / ``down_proj``; the live fused names are accepted as well. Unknown
        names and shape mismatches raise. With ``strict=True`` every weight of the model must be given (tied
        aliases count once), else ValueError lists what is missing. Returns the number of tensors loaded.
        """
        self._check_open()
        if isinstance(named_tensors, Mapping):
            named_tensors = named_tensors.items()
        seen: set[str] = set()
        count = self._loader.load(named_tensors, on_loaded=lambda name: seen.update(self._loader.covers(name)))
        if strict:
            missing = [name for name in self._loader.expected_names() if name not in seen]
            if missing:
                shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
                raise ValueError(f"update_weights(strict=True): weights not given: {shown}")
        self.weight_version += 1
        return count

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
        """Sample ``samples_per_prompt`` responses per prompt; samples come back grouped by prompt, in prompt order.

        ``routes_start_len`` (per prompt): routes cover rows ``start_len .. T-2`` only, as SGLang returns them for
        ``routed_experts_start_len`` (the rows are captured in the same forwards; the earlier ones are left out)."""
        self._check_open()
        request = check_generate_request(prompts, sampling, samples_per_prompt, routes_start_len,
                                         vocab_size=self.config.vocab_size,
                                         max_positions=self.config.max_position_embeddings)
        checked, starts = request.prompts, request.routes_start_len
        sequences = [(index, prompt) for index, prompt in enumerate(checked) for _ in range(samples_per_prompt)]
        generator = self._generator
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(sampling.seed))

        from tqdm.auto import tqdm

        samples: list[RolloutSample] = []
        start = time.perf_counter()
        with tqdm(total=len(sequences), desc="rollout", unit="seq", disable=not self.progress, leave=False) as bar:
            for begin in range(0, len(sequences), self.max_batch_size):
                chunk = sequences[begin : begin + self.max_batch_size]
                try:
                    samples += self._generate_batch(chunk, begin, sampling, generator, return_routes, bar)
                finally:
                    self._capture.stop()
        if return_routes and any(starts):
            samples = [sample if not starts[sample.prompt_index] else dataclasses.replace(sample, routes=Routes(
                sample.routes.expert_ids[starts[sample.prompt_index]:], num_experts=sample.routes.num_experts,
                start_row=starts[sample.prompt_index], source="hf")) for sample in samples]
        seconds = time.perf_counter() - start
        new_tokens = sum(sample.response_length for sample in samples)
        self.last_stats = {
            "sequences": float(len(samples)),
            "new_tokens": float(new_tokens),
            "seconds": seconds,
            "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
        }
        return RolloutResult(samples=samples)

    @torch.inference_mode()
    def _generate_batch(self, chunk, first: int, sampling: SamplingParams, generator, return_routes: bool, bar):
        """Generate one batch; ``first`` is the index of its first sequence in the whole call (for error messages)."""
        if self.generate_config.static_decode(self.device.type):  # static KV cache, no per-token host sync: rollout/hf_generate.py
            return generate_batch_static(self.model, chunk, first, sampling, generator, return_routes, bar,
                                         self.generate_config)
        from transformers import DynamicCache

        device = self.device
        batch = len(chunk)
        lengths = torch.tensor([prompt.numel() for _, prompt in chunk], dtype=torch.int64, device=device)
        width = int(lengths.max())
        limit = self.config.max_position_embeddings
        max_new = torch.clamp(limit - lengths, max=sampling.max_new_tokens)  # >= 1: prompts are < limit
        max_steps = int(max_new.max())
        pad_id = self.config.pad_token_id if self.config.pad_token_id is not None else 0

        input_ids = torch.full((batch, width), pad_id, dtype=torch.int64, device=device)
        mask = torch.zeros((batch, width), dtype=torch.int64, device=device)
        for row, (_, prompt) in enumerate(chunk):
            input_ids[row, width - prompt.numel() :] = prompt.to(device)
            mask[row, width - prompt.numel() :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        active = torch.arange(batch, device=device)  # model batch row -> sequence of the chunk

        routes_buffer = None
        if return_routes:
            routes_buffer = self._capture.start(batch, width + max_steps - 1, device)
            self._capture.expect(torch.where(mask.bool(), positions, -1), active)
        cache = DynamicCache(config=self.config)
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        if return_routes:
            self._capture.finish_step()

        response = torch.zeros((batch, max_steps), dtype=torch.int64, device=device)
        logprobs = torch.zeros((batch, max_steps), dtype=torch.float32, device=device)
        response_length = torch.zeros(batch, dtype=torch.int64, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.int64, device=device)
        step = 0
        while True:
            tokens, token_logprobs = sample_tokens(
                out.logits[:, -1, :], temperature=sampling.temperature, top_k=sampling.top_k,
                top_p=sampling.top_p, generator=generator,
            )
            response[active, step] = tokens
            logprobs[active, step] = token_logprobs
            response_length[active] = step + 1
            hit_stop = torch.isin(tokens, stop_ids)
            stopped[active] = hit_stop
            done = hit_stop | (step + 1 >= max_new[active])
            finished = int(done.sum())
            if finished:
                bar.update(finished)
            if finished == active.numel():
                break
            if finished:  # retire finished sequences from the batch and the KV cache
                keep = torch.nonzero(~done).flatten()
                cache.batch_select_indices(keep)
                active, tokens, mask = active[keep], tokens[keep], mask[keep]
            mask = torch.cat([mask, torch.ones((active.numel(), 1), dtype=mask.dtype, device=device)], dim=1)
            fed_positions = (lengths[active] + step).unsqueeze(1)  # response token `step` sits at P + step
            if return_routes:
                self._capture.expect(fed_positions, active)
            out = self.model(
                input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=fed_positions, use_cache=True,
                **{self._cache_kwarg: cache},
            )
            if return_routes:
                self._capture.finish_step()
            step += 1

        response, logprobs, response_length = response.cpu(), logprobs.cpu(), response_length.cpu()
        stopped = stopped.cpu().tolist()
        if routes_buffer is not None:
            routes_buffer = routes_buffer.cpu()
        samples = []
        for row, (prompt_index, prompt) in enumerate(chunk):
            length = int(response_length[row])
            prompt_length = prompt.numel()
            routes = None
            if routes_buffer is not None:
                routes = routes_from_array(
                    routes_buffer[row, : prompt_length + length - 1],
                    num_experts=self._capture.num_experts, source="hf", sample_id=first + row,
                )
            samples.append(sample_of_row(prompt_index, prompt, response[row], logprobs[row], length, stopped[row],
                                         routes))
        return samples

    # ------------------------------------------------------------------ lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HFRolloutEngine is closed")

    def close(self) -> None:
        """Remove the capture hooks and release the model; further calls raise."""
        if self._closed:
            return
        self._capture.remove()
        self._closed = True
        self.model = None
        self._loader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

