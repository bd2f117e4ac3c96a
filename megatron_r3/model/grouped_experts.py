"""Routed experts in one grouped matmul, without TransformerEngine: `GroupedExperts`, injected through
`MoESubmodules.experts` of the local layer spec (`specs.replay_decoder_block_spec` when `config.moe_grouped_gemm`).

Why
  megatron-core's TE-free experts module, `SequentialMLP`, syncs `tokens_per_expert` to the host (`.tolist()`) and
  runs every local expert as its own pair of small matmuls in a Python loop: at Qwen3-30B-A3B layer shape (128
  experts, top-8, 4096 tokens) that is ~180 ms per layer forward+backward on an H200, ~5 TFLOP/s. TE's
  `TEGroupedMLP` is the usual answer; `torch._grouped_mm` (PyTorch >= 2.8, bf16 on Hopper, a reference loop on the
  CPU) computes the same thing in one kernel per projection, forward and backward, with the group boundaries read
  from a *device* tensor, so no host sync per layer.

Input and output
  Exactly `SequentialMLP.forward`'s contract: the dispatcher's permuted tokens `[T, h]` grouped by local expert,
  `tokens_per_expert` `[num_local_experts]` (device or host tensor; never read on the host here) and the permuted
  gate weights `[T]`. Output `[T, h]` (partial sums under expert-tensor parallelism: the dispatcher reduces them, as
  for `SequentialMLP`, whose experts' linears skip their own TP communication as "explicit expert comm").
  Math per expert e: `act(x @ W1_e^T) * prob @ W2_e^T`, with megatron's GLU (`act(gate) * up`, [gate; up] per
  expert-TP shard) and the gate weight applied in the activation dtype, like megatron's `MLP`.

Checkpoint format (the TEGroupedMLP one)
  Parameters `linear_fc1.weight{l}` `[2·ffn/etp, h]` (GLU: `[gate_r; up_r]` of this expert-TP rank) and
  `linear_fc2.weight{l}` `[h, ffn/etp]` for local expert l, i.e. TE's `GroupedLinear` names, which
  `hf_mapping` already maps (`...mlp.experts.linear_fc1.weight{l}` <-> `model.layers.{i}.mlp.experts.{e}.*`) and
  `weights` gathers over ETP/EP. `sharded_state_dict` emits, per local expert, the same ShardedTensors as
  `SequentialMLP` (key `...mlp.experts.experts.linear_fc{1,2}.weight`, expert axis = global expert id, expert-TP
  axis 0 / 1, megatron's SwiGLU factory for fc1, replica id over expert-data-parallel), so dist checkpoints are
  interchangeable between the two modules and across layouts.

No copy of the weights per step
  The local experts' weights of one projection are allocated as views of one `[E_local, out, in]` tensor; the
  forward reads them back as that stacked tensor (`as_strided` on their shared storage, checked by addresses on the
  host: no sync) through an autograd function whose backward hands each parameter its slice of the stacked gradient.
  Megatron's DDP re-homes parameters into its contiguous param buffer when the distributed optimizer is on, in
  reverse registration order; the experts' weights are therefore registered last expert first, so they land there
  back to back in expert order and the view survives (without the distributed optimizer DDP leaves parameters in
  place). Anything else that re-homes them (padding between them, another order) makes the same function stack
  them (one copy per forward), still correct.

`torch._grouped_mm` backward needs a contiguous incoming gradient (an expanded one fails with "Invalid strides/sizes,
got [0, 0]"); `_contiguous_grad` makes it so. Unsupported configs (biases, non-GLU activations other than megatron's
`activation_func`, fp8/fp4, `moe_apply_probs_on_input` with top-k > 1) fail at construction, naming the fix.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from megatron_r3.model.fusions import weighted_swiglu


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs for (device, dtype): CPU (torch >= 2.9) fp32/bf16; CUDA bf16 on
    compute capability >= 9.0 (the CUTLASS kernel; other GPUs and dtypes take the loop path)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    device = torch.device(device)
    if device.type == "cpu":  # torch <= 2.8 has the op but no CPU kernel
        version = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
        return version >= (2, 9) and dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    return False


class _StackedParameters(torch.autograd.Function):
    """`[p_0, ..., p_{n-1}]` (same shape) -> `[n, *shape]`: a view of their storage when they are consecutive in it
    (no copy), else a stacked copy. Backward: slice l of the gradient to p_l."""

    @staticmethod
    def forward(ctx, layout_cache, *params):
        first = params[0].detach()
        if _consecutive_cached(params, layout_cache):
            return first.as_strided((len(params), *first.shape), (first.numel(), *first.stride()),
                                    first.storage_offset())
        return torch.stack([p.detach() for p in params])

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.unbind(0))


def _consecutive_cached(params, layout_cache: Optional[dict]) -> bool:
    """`_consecutive(params)`, remembered in `layout_cache` under the addresses of the first and last parameter and
    their storages: the full check walks every expert in Python (~0.2 ms for 128 experts, twice per layer and
    forward, on the critical path right after the dispatcher's host sync). Whatever re-homes the experts' weights
    (DDP's param buffer, `.to()`, a dtype cast) moves the first and last ones too, so the key changes."""
    if layout_cache is None:
        return _consecutive(params)
    first, last = params[0], params[-1]
    key = (len(params), first.data_ptr(), last.data_ptr(), first.untyped_storage().data_ptr(),
           last.untyped_storage().data_ptr(), tuple(first.shape), first.dtype)
    if layout_cache.get("key") != key:
        layout_cache["key"], layout_cache["consecutive"] = key, _consecutive(params)
    return layout_cache["consecutive"]


def _consecutive(params) -> bool:
    """True when params are contiguous, equally shaped and laid out back to back in one storage (host check only)."""
    first = params[0]
    if not first.is_contiguous():
        return False
    step = first.numel() * first.element_size()
    base, storage = first.data_ptr(), first.untyped_storage().data_ptr()
    for index, param in enumerate(params):
        if (param.shape != first.shape or param.dtype != first.dtype or not param.is_contiguous()
                or param.data_ptr() != base + index * step or param.untyped_storage().data_ptr() != storage):
            return False
    return True


def stacked(params, layout_cache: Optional[dict] = None) -> torch.Tensor:
    """The local experts' weights of one projection as one `[E_local, out, in]` tensor, autograd to each param;
    `layout_cache`: a dict owned by the caller that remembers whether `params` are laid out back to back."""
    return _StackedParameters.apply(layout_cache, *params)


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Identity whose backward makes the incoming gradient contiguous (`torch._grouped_mm` backward needs it)."""
    return _ContiguousGrad.apply(tensor) if tensor.requires_grad else tensor


class ExpertWeights(torch.nn.Module):
    """`weight0 .. weight{n-1}` of one projection of the local experts, views of one `[n, out, in]` allocation
    (TE `GroupedLinear` parameter names). `partition_dim`: the expert-TP split dim of each weight (0 fc1, 1 fc2)."""

    def __init__(self, num_local_experts: int, out_features: int, in_features: int, *, config, init_method,
                 partition_dim: int, use_expert_pgs: bool):
        super().__init__()
        self.num_local_experts = num_local_experts
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        storage = torch.empty(num_local_experts, out_features, in_features, dtype=config.params_dtype, device=device)
        weights = []
        for index in range(num_local_experts):  # initialised in expert order (the RNG stream SequentialMLP uses)
            weight = torch.nn.Parameter(storage[index])
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=partition_dim, stride=1)
            setattr(weight, "allreduce", not use_expert_pgs)
            if config.perform_initialization:
                with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                    init_method(weight.data)
            weights.append(weight)
        # Registered last expert first: megatron's DDP lays parameters into its contiguous param buffer (distributed
        # optimizer) in *reverse* registration order, so this order puts weight0 .. weight{n-1} back to back in
        # ascending order there and `stacked` stays a view (no per-forward copy of the experts' weights).
        for index in reversed(range(num_local_experts)):
            self.register_parameter(f"weight{index}", weights[index])
        self.layout_cache: dict = {}  # see `stacked`

    def weights(self) -> list[torch.nn.Parameter]:
        return [getattr(self, f"weight{index}") for index in range(self.num_local_experts)]

    # SequentialMLP's linears write an (empty) `_extra_state` object per expert into dist checkpoints; this module
    # writes the same objects (a list under its own `_extra_state` key) so those checkpoints load either way.
    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        del state


class GroupedExperts(MegatronModule):
    """All local experts of one MoE layer in two grouped matmuls (`SequentialMLP`'s drop-in); see the module doc."""

    # "auto": torch._grouped_mm where `grouped_mm_supported`, else the loop; tests force "grouped_mm" or "loop".
    backend: str = "auto"

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name: Optional[str] = None):
        super().__init__(config=config)
        if pg_collection is None:
            raise ValueError("GroupedExperts needs the MoE layer's pg_collection (ep, expt_tp, expt_dp groups)")
        if config.add_bias_linear:
            raise ValueError("GroupedExperts has no expert biases: set add_bias_linear=False or use SequentialMLP")
        if getattr(config, "fp8", None) or getattr(config, "fp4", None):
            raise ValueError("GroupedExperts runs bf16/fp32 only: drop --fp8-format/--fp4-format or use TEGroupedMLP")
        if config.moe_apply_probs_on_input and config.moe_router_topk != 1:
            raise ValueError("moe_apply_probs_on_input needs moe_router_topk=1 (as in megatron's experts)")
        if getattr(config, "activation_func_clamp_value", None) is not None or getattr(config, "glu_linear_offset", 0):
            raise ValueError("GroupedExperts does not implement activation_func_clamp_value / glu_linear_offset")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        etp = self.tp_group.size() if self.tp_group is not None else 1
        ffn = config.moe_ffn_hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size {ffn} does not split over expert tensor parallel size {etp}")
        ffn_local = ffn // etp
        use_expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        fc1_out = 2 * ffn_local if config.gated_linear_unit else ffn_local
        output_init = config.output_layer_init_method or config.init_method
        self.linear_fc1 = ExpertWeights(num_local_experts, fc1_out, config.hidden_size, config=config,
                                        init_method=config.init_method, partition_dim=0,
                                        use_expert_pgs=use_expert_pgs)
        self.linear_fc2 = ExpertWeights(num_local_experts, config.hidden_size, ffn_local, config=config,
                                        init_method=output_init, partition_dim=1, use_expert_pgs=use_expert_pgs)

    # ------------------------------------------------------------------------------------------------ forward
    def _activation(self, fc1_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """megatron `MLP`'s activation and per-token gate weight (in the activation's dtype); SwiGLU is fused on GPUs
        under `config.bias_activation_fusion`, as in megatron's `MLP` (`model/fusions.weighted_swiglu`)."""
        if self.config.gated_linear_unit and self.config.activation_func is torch.nn.functional.silu:
            return weighted_swiglu(fc1_out, probs, fused=self.config.bias_activation_fusion)
        if self.config.gated_linear_unit:
            gate, up = torch.chunk(fc1_out, 2, dim=-1)
            hidden = self.config.activation_func(gate) * up
        else:
            hidden = self.config.activation_func(fc1_out)
        return (hidden * probs.unsqueeze(-1)).to(hidden.dtype)

    def _use_grouped_mm(self, tokens: torch.Tensor) -> bool:
        if self.backend == "auto":
            return grouped_mm_supported(tokens.device, tokens.dtype)
        return self.backend == "grouped_mm"

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor, **unused):
        """`SequentialMLP.forward`'s contract: returns (output `[T, h]`, None)."""
        tokens, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            tokens = (probs.unsqueeze(-1) * tokens).to(tokens.dtype)
            probs = torch.ones_like(probs)
        w1 = stacked(self.linear_fc1.weights(), self.linear_fc1.layout_cache)  # [E, fc1_out, h]
        w2 = stacked(self.linear_fc2.weights(), self.linear_fc2.layout_cache)  # [E, h, ffn]
        if self._use_grouped_mm(tokens):
            # int32 cumulative ends on the tokens' device; an asynchronous copy when the dispatcher kept them on host
            offsets = torch.cumsum(tokens_per_expert.to(tokens.device, non_blocking=True), 0, dtype=torch.int32)
            fc1 = torch._grouped_mm(tokens.contiguous(), w1.transpose(1, 2), offs=offsets)
            hidden = self._activation(_contiguous_grad(fc1), probs)
            out = torch._grouped_mm(hidden, w2.transpose(1, 2), offs=offsets)
            return _contiguous_grad(out), None
        return self._loop_forward(tokens, tokens_per_expert, probs, w1, w2), None

    def _loop_forward(self, tokens, tokens_per_expert, probs, w1, w2) -> torch.Tensor:
        """Reference path (where the kernel is missing): one matmul pair per expert, like `SequentialMLP` (host sizes)."""
        sizes = tokens_per_expert.tolist()
        outputs = []
        for expert, (x, p) in enumerate(zip(torch.split(tokens, sizes), torch.split(probs, sizes))):
            hidden = self._activation(torch.matmul(x, w1[expert].t()), p)
            outputs.append(torch.matmul(hidden, w2[expert].t()))
        return torch.cat(outputs, dim=0)

    def backward_dw(self):
        """No delayed weight-gradient computation (megatron's fine-grained overlap hook): nothing to do."""

    # ------------------------------------------------------------------------------------------------ checkpoint
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None) -> ShardedStateDict:
        """Per local expert, the ShardedTensors `SequentialMLP` writes (see the module doc), under this module's
        state-dict keys `{prefix}linear_fc{1,2}.weight{l}`."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = metadata.get("singleton_local_shards", False)
        num_global = self.ep_group.size() * self.num_local_experts
        first_global = self.ep_group.rank() * self.num_local_experts
        out = {f"{prefix}linear_fc1._extra_state": [], f"{prefix}linear_fc2._extra_state": []}
        for local in range(self.num_local_experts):
            expert = first_global + local
            if singleton:
                key_prefix, offsets = f"{prefix}experts.{expert}.", sharded_offsets
            else:
                key_prefix, offsets = f"{prefix}experts.", (*sharded_offsets, (len(sharded_offsets), expert, num_global))
            for name, module, axis in (("linear_fc1", self.linear_fc1, 0), ("linear_fc2", self.linear_fc2, 1)):
                weight = module.weights()[local]
                sharded = make_sharded_tensors_for_checkpoint({"weight": weight, "_extra_state": None},
                                                              f"{key_prefix}{name}.",
                                                              {"weight": axis}, offsets, tp_group=self.tp_group,
                                                              dp_cp_group=metadata["dp_cp_group"])
                tensor = sharded[f"{key_prefix}{name}.weight"]
                if name == "linear_fc1" and self.config.gated_linear_unit:
                    tensor = apply_swiglu_sharded_factory(tensor, offsets, singleton, tp_group=self.tp_group,
                                                          dp_group=metadata["dp_cp_group"])
                extra = sharded[f"{key_prefix}{name}._extra_state"]
                for item in (tensor, extra):
                    item.replica_id = (*item.replica_id[:2], self.dp_group.rank())
                out[f"{prefix}{name}.weight{local}"] = tensor
                out[f"{prefix}{name}._extra_state"].append(extra)
        return out

