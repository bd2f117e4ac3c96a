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

Parameters: one per projection
  `linear_fc1.weight` `[E_local, 2·ffn/etp, h]` (GLU: `[gate_r; up_r]` of this expert-TP rank per expert) and
  `linear_fc2.weight` `[E_local, h, ffn/etp]`, the stacked operands of the grouped matmul, read as they are (no copy
  per forward). One parameter instead of one per expert: at 128 experts a 4-layer step had 1024 more AccumulateGrad
  nodes, DDP grad hooks and optimizer tensors than it needed, all host work on the critical path of a GPU step.
  Each carries megatron's tensor-parallel attributes with `partition_dim` 1 (fc1) / 2 (fc2) and `allreduce=False`
  under expert parallelism, so DDP reduces its gradient over the expert-data-parallel group.

Checkpoints: every consumer still sees per-expert tensors
  - HF mapping / weight sync: `hf_mapping.chunk_param_mappings` expands each stacked weight into its experts' views
    under TE `GroupedLinear`'s names `...mlp.experts.linear_fc{1,2}.weight{l}`, which the families map to
    `model.layers.{i}.mlp.experts.{e}.*`; loading writes through those views.
  - dist checkpoints: `sharded_state_dict` emits, per projection, a `ShardedTensorFactory` that builds per local
    expert the ShardedTensors `SequentialMLP` writes (key `...mlp.experts.experts.linear_fc{1,2}.weight`, expert
    axis = global expert id, expert-TP axis 0 / 1, megatron's SwiGLU split for fc1, replica id over
    expert-data-parallel) and stacks them back on load; optimizer states go through the same factory. Checkpoints
    are therefore interchangeable with `SequentialMLP`'s and across EP / ETP layouts.
  - torch state dicts: key `linear_fc{1,2}.weight` (stacked); the per-expert keys `linear_fc{1,2}.weight{l}` that
    earlier versions of this module wrote still load.

`torch._grouped_mm` backward needs a contiguous incoming gradient (an expanded one fails with "Invalid strides/sizes,
got [0, 0]"); `_contiguous_grad` makes it so. Unsupported configs (biases, non-GLU activations other than megatron's
`activation_func`, fp8/fp4, `moe_apply_probs_on_input` with top-k > 1) fail at construction, naming the fix.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensorFactory
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
    """`weight` `[num_local_experts, out, in]`: one projection of all local experts (see the module doc).
    `partition_dim`: the expert-TP split dim of one expert's weight (0 fc1, 1 fc2)."""

    def __init__(self, num_local_experts: int, out_features: int, in_features: int, *, config, init_method,
                 partition_dim: int, use_expert_pgs: bool):
        super().__init__()
        self.num_local_experts = num_local_experts
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.empty(num_local_experts, out_features, in_features, dtype=config.params_dtype, device=device))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=partition_dim + 1, stride=1)
        setattr(self.weight, "allreduce", not use_expert_pgs)
        if config.perform_initialization:
            for index in range(num_local_experts):  # expert by expert: the RNG stream SequentialMLP's experts use
                with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                    init_method(self.weight.data[index])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Also accept the per-expert keys `{prefix}weight{l}` that earlier versions wrote (stacked here)."""
        per_expert = [f"{prefix}weight{index}" for index in range(self.num_local_experts)]
        if f"{prefix}weight" not in state_dict and all(key in state_dict for key in per_expert):
            state_dict[f"{prefix}weight"] = torch.stack([state_dict.pop(key) for key in per_expert])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
        w1, w2 = self.linear_fc1.weight, self.linear_fc2.weight  # [E, fc1_out, h], [E, h, ffn]
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
        """Per projection, a factory of the per-expert ShardedTensors `SequentialMLP` writes (see the module doc),
        under this module's state-dict keys `{prefix}linear_fc{1,2}.weight`; plus the per-expert extra-state
        objects under `{prefix}linear_fc{1,2}._extra_state`."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        singleton = metadata.get("singleton_local_shards", False)
        out = {}
        for name, module, axis in (("linear_fc1", self.linear_fc1, 0), ("linear_fc2", self.linear_fc2, 1)):
            experts = _ExpertShards(self, prefix, name, axis, sharded_offsets, singleton, metadata["dp_cp_group"])
            first = experts.build_expert(experts.key, module.weight.detach()[0], 0)
            replica_id = (first[0] if isinstance(first, list) else first).replica_id
            out[f"{prefix}{name}.weight"] = ShardedTensorFactory(
                experts.key, module.weight, experts.build, experts.merge, replica_id)
            out[f"{prefix}{name}._extra_state"] = experts.extra_states()
        return out


_EXPERT_SUFFIX = re.compile(r"experts\.(linear_fc[12]\.weight)$")


class _ExpertShards:
    """Build/merge functions of one projection's `ShardedTensorFactory`: stacked `[E_local, ...]` tensor (the
    weight, or an optimizer state of its shape, under a key ending in `experts.linear_fc{1,2}.weight`) <-> the
    per-expert ShardedTensors of `SequentialMLP` (fc1 through megatron's SwiGLU factory under GLU)."""

    def __init__(self, experts: GroupedExperts, prefix: str, name: str, axis: int, sharded_offsets: tuple,
                 singleton: bool, dp_cp_group):
        self.experts, self.name, self.axis = experts, name, axis
        self.sharded_offsets, self.singleton, self.dp_cp_group = tuple(sharded_offsets), singleton, dp_cp_group
        self.first_global = experts.ep_group.rank() * experts.num_local_experts
        self.num_global = experts.ep_group.size() * experts.num_local_experts
        self.glu = name == "linear_fc1" and experts.config.gated_linear_unit
        self.key = f"{prefix}experts.{name}.weight"  # SequentialMLP's key (its experts live in `.experts`)

    def _key_and_offsets(self, key: str, expert: int):
        if self.singleton:  # one key per expert: `...experts.{expert}.linear_fc1.weight`
            return _EXPERT_SUFFIX.sub(rf"experts.{expert}.\1", key), self.sharded_offsets
        axis = len(self.sharded_offsets)
        return key, (*self.sharded_offsets, (axis, expert, self.num_global))

    def _sharded(self, key: str, tensor: torch.Tensor, expert: int, extra: bool = False):
        expert_key, offsets = self._key_and_offsets(key, expert)
        holder = "expert."
        sharded = make_sharded_tensors_for_checkpoint({"weight": tensor, "_extra_state": None}, holder,
                                                      {"weight": self.axis}, offsets,
                                                      tp_group=self.experts.tp_group, dp_cp_group=self.dp_cp_group)
        item = sharded[f"{holder}_extra_state" if extra else f"{holder}weight"]
        item = replace(item, key=expert_key[: -len("weight")] + "_extra_state" if extra else expert_key)
        item.replica_id = (*item.replica_id[:2], self.experts.dp_group.rank())
        return item, offsets

    def build_expert(self, key: str, tensor: torch.Tensor, local: int):
        sharded, offsets = self._sharded(key, tensor, self.first_global + local)
        if not self.glu:
            return sharded
        glu = apply_swiglu_sharded_factory(sharded, offsets, self.singleton, tp_group=self.experts.tp_group,
                                           dp_group=self.dp_cp_group)
        self.glu_merge = glu.merge_fn
        return glu.build()

    def build(self, key: str, data: torch.Tensor, replica_id, flattened_range):
        if flattened_range is not None:
            raise ValueError(f"{key}: flattened optimizer states are not supported for stacked expert weights "
                             "(use the distributed optimizer's dp_reshardable checkpoint format)")
        return [self.build_expert(key, data[local], local) for local in range(data.shape[0])]

    def merge(self, loaded: list) -> torch.Tensor:
        """Inverse of `build`: per expert, [gate; up] merged by megatron's SwiGLU factory; stacked over experts."""
        return torch.stack([self.glu_merge(part) if self.glu else part for part in loaded])

    def extra_states(self) -> list:
        module = getattr(self.experts, self.name)
        return [self._sharded(self.key, module.weight.detach()[local], self.first_global + local, extra=True)[0]
                for local in range(self.experts.num_local_experts)]
