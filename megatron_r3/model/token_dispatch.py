"""A sync-free, atomics-free alltoall token dispatcher for the TE-free MoE layer.

Without TransformerEngine (`moe_permute_fusion=False`) megatron-core's `MoEAlltoAllTokenDispatcher` spends a step's
time on bookkeeping rather than experts (profile of issue 17, one H200, Qwen3-30B-A3B-shaped layers):

- "permutation 2" (`sort_chunks_by_idxs`) runs even when EP x expert-TP = 1, where its order is the IDENTITY: it
  splits the tokens into `num_local_experts` chunks with host sizes and concatenates them back (copies forward and
  backward), and to get those host sizes it makes a host sync per layer (`cuda_sync_point="before_permutation_2"`).
- unfused `permute` is an `index_select` whose backward is `index_add_` (bf16 atomics), and `unpermute` is a
  `scatter_add_` (bf16 atomics): slow, and NONDETERMINISTIC on the GPU -- the order in which a token's k expert
  outputs are summed varies from run to run, so replaying a model's own routes is not bitwise reproducible.

`GatherPermuteAlltoAllDispatcher` keeps megatron's row order (expert-major, tokens ascending within an expert: the
row order of `moe_utils.permute`, computed by the same device-side argsort) and replaces the data movement with
gathers:

- permutation 1: forward `index_select` by token id; backward sums each token's k rows, gathered through the inverse
  permutation as a `[tokens, topk, hidden]` tensor reduced over `topk` (deterministic; bf16 accumulates in fp32 inside
  the reduction instead of rounding after every atomic add).
- unpermutation 1: the same gather + sum forward, `index_select` by token id backward.
- permutation 2 / unpermutation 2 with EP x expert-TP = 1: skipped, and `tokens_per_expert` is returned as the device
  tensor it was computed as -- no DtoH copy and no event synchronize (the experts module decides whether it needs it
  on the host: `GroupedExperts` computes its offsets on the device, `SequentialMLP` calls `.tolist()` itself). With
  EP x expert-TP > 1 megatron's permutation 2 runs unchanged (its all-to-all needs host split sizes anyway).

The gather path applies to dropless routing only (no `moe_permute_fusion`, no drop-and-pad, no capacity factor, no
`moe_router_padding_for_quantization`); otherwise every method defers to megatron's dispatcher unchanged.

Invariant (dropless top-k, also under router replay): every token has exactly `moe_router_topk` experts in its
routing-map row, so the permuted tensor has tokens x topk rows and each token owns exactly topk of them. It is not
checked here -- a check would be a host sync per layer. megatron's own dropless path relies on it as well: with a
row of fewer experts (e.g. a replayed route naming one expert twice, which the router's scatter collapses) its
`num_out_tokens = tokens * topk` rows end in (token, expert) pairs that were never routed and `tokens_per_expert` sums
to fewer rows than it permutes (`tests/unit/test_token_dispatch.py` shows it); here the inverse permutation would
then pair rows with the wrong tokens. Routes must therefore name topk distinct experts per token.

`GatherDispatchMoELayer` is megatron's `MoELayer` with this dispatcher; the local (TE-free) layer spec selects it
for `moe_token_dispatcher_type == "alltoall"` (`specs.replay_decoder_block_spec`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec


@dataclasses.dataclass(frozen=True)
class GatherPermutation:
    """Where each permuted row comes from, and where each token's rows went (all on the routing map's device).

    `row_token` [tokens*topk]: token id of each permuted row (megatron's `sorted_indices`).
    `row_expert` [tokens*topk]: expert id of each permuted row (non-decreasing).
    `token_rows` [tokens, topk]: the permuted rows of each token, experts ascending (the inverse permutation)."""

    row_token: torch.Tensor
    row_expert: torch.Tensor
    token_rows: torch.Tensor

    @classmethod
    def of(cls, routing_map: torch.Tensor, topk: int) -> "GatherPermutation":
        """The permutation of a dropless top-k `routing_map` [tokens, experts] (bool), on its device, no host sync.

        Rows are ordered as megatron's `moe_utils.permute` orders them (the same stable argsort of the expert-major
        flattened map); the inverse is a stable argsort of the rows' token ids, which lists each token's rows in
        ascending row (= expert) order."""
        num_tokens = routing_map.shape[0]
        expert_major = routing_map.bool().T.contiguous().reshape(-1)
        flat_index = expert_major.argsort(descending=True, stable=True)[: num_tokens * topk]
        row_token = flat_index % num_tokens
        token_rows = row_token.argsort(stable=True).view(num_tokens, topk)
        return cls(row_token=row_token, row_expert=flat_index // num_tokens, token_rows=token_rows)

    def gather_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [tokens, experts] -> [tokens*topk] at each row's (token, expert): megatron's permuted probs (the
        same values), read by `index_select` so the backward is an `index_add_` onto distinct positions."""
        index = self.row_token * probs.shape[1] + self.row_expert
        return probs.reshape(-1).index_select(0, index)


def sum_token_rows(rows: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
    """[tokens*topk, hidden] permuted rows -> [tokens, hidden]: each token's rows gathered and summed over topk.

    One gather and one reduction, no atomics: the order of a token's terms is fixed (experts ascending), and a bf16
    sum accumulates in fp32 inside the reduction."""
    num_tokens, topk = token_rows.shape
    gathered = rows.index_select(0, token_rows.reshape(-1))
    return gathered.view(num_tokens, topk, rows.shape[-1]).sum(dim=1)


class GatherPermute(torch.autograd.Function):
    """Permutation 1: tokens [tokens, hidden] -> rows [tokens*topk, hidden]. Backward: each token's k row gradients
    summed by `sum_token_rows` (megatron's `index_select` backward is an atomic `index_add_`)."""

    @staticmethod
    def forward(ctx, tokens, row_token, token_rows):
        ctx.save_for_backward(token_rows)
        return tokens.index_select(0, row_token)

    @staticmethod
    def backward(ctx, grad_rows):
        (token_rows,) = ctx.saved_tensors
        return sum_token_rows(grad_rows, token_rows), None, None


class GatherUnpermute(torch.autograd.Function):
    """Unpermutation 1: rows [tokens*topk, hidden] -> tokens [tokens, hidden], each token's rows summed by
    `sum_token_rows` (megatron's is an atomic `scatter_add_`). Backward: the token gradient gathered to its rows."""

    @staticmethod
    def forward(ctx, rows, row_token, token_rows):
        ctx.save_for_backward(row_token)
        return sum_token_rows(rows, token_rows)

    @staticmethod
    def backward(ctx, grad_tokens):
        (row_token,) = ctx.saved_tensors
        return grad_tokens.index_select(0, row_token), None, None


def gather_permute_applies(config) -> bool:
    """Whether the gather permutation replaces megatron's: dropless top-k routing without TE's fused permutation
    (token dropping, drop-and-pad and quantization padding make the row count data dependent)."""
    return not (
        config.moe_permute_fusion
        or config.moe_pad_expert_input_to_capacity
        or config.moe_expert_capacity_factor is not None
        or config.moe_router_padding_for_quantization
    )


class GatherPermuteAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's alltoall dispatcher with gather-based permutation 1 (deterministic, no atomics) and, with
    EP x expert-TP = 1, no permutation 2 and no host sync. See the module docstring."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None) -> None:
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        self.gather_permute = gather_permute_applies(config)
        # EP x expert-TP = 1: permutation 2's order is the identity and nothing needs host split sizes
        self.skip_permutation_2 = self.gather_permute and self.ep_size * self.tp_size == 1
        # [tokens, topk] rows of each token (the inverse of `reversed_local_input_permutation_mapping`)
        self.token_rows: torch.Tensor | None = None
        if self.gather_permute:
            self.cudagraph_attrs.append("token_rows")

    # ------------------------------------------------------------------ metadata and host syncs
    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """EP x expert-TP = 1: `tokens_per_expert` is the routing map's column sum, left on its device, and no sync
        point is registered. Otherwise megatron's preprocess."""
        if not self.skip_permutation_2:
            return super().preprocess(routing_map)
        self.num_out_tokens = routing_map.size(0) * self.config.moe_router_topk
        tokens_per_expert = routing_map.sum(dim=0).long()
        # what megatron's preprocess keeps (on the device; permutation 2, its only reader, does not run)
        self.num_global_tokens_per_local_expert = tokens_per_expert.view(-1, self.num_local_experts)
        self.cuda_sync_point = "no_sync"
        return tokens_per_expert

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert=None):
        """EP x expert-TP = 1: nothing is copied to the host (a DtoH copy started here and later read without the
        event synchronize would be a race), nothing waits. Otherwise megatron's DtoH copies and sync."""
        if self.skip_permutation_2:
            return tokens_per_expert
        return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)

    # ------------------------------------------------------------------ permutation 1
    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """megatron's dispatch_preprocess with permutation 1 done by `GatherPermute` and the permuted probs by
        `GatherPermutation.gather_probs`."""
        if not self.gather_permute:
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        if probs.dim() != 2 or routing_map.dim() != 2 or routing_map.dtype != torch.bool:
            raise ValueError(
                f"GatherPermuteAlltoAllDispatcher: expected 2-D probs and a 2-D bool routing map, got probs "
                f"{tuple(probs.shape)} and routing map {tuple(routing_map.shape)} {routing_map.dtype}"
            )
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_per_expert = self.preprocess(routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1", self.tokens_per_expert)
        self.hidden_shape_before_permute = hidden_states.shape
        permutation = GatherPermutation.of(routing_map, self.config.moe_router_topk)
        self.reversed_local_input_permutation_mapping = permutation.row_token
        self.token_rows = permutation.token_rows
        permuted_tokens = GatherPermute.apply(hidden_states, permutation.row_token, permutation.token_rows)
        permuted_probs = permutation.gather_probs(probs)
        return permuted_tokens, permuted_probs

    # ------------------------------------------------------------------ permutation 2
    def dispatch_postprocess(self, global_input_tokens, global_probs):
        """EP x expert-TP = 1: the rows are already grouped by local expert; `tokens_per_expert` stays on device."""
        if not self.skip_permutation_2:
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        """EP x expert-TP = 1: unpermutation 2 is the identity too (and there is no TP reduce-scatter)."""
        if not self.skip_permutation_2:
            return super().combine_preprocess(hidden_states)
        return hidden_states

    # ------------------------------------------------------------------ unpermutation 1
    def combine_postprocess(self, permutated_local_input_tokens):
        """megatron's combine_postprocess with unpermutation 1 done by `GatherUnpermute`."""
        if not self.gather_permute:
            return super().combine_postprocess(permutated_local_input_tokens)
        output = GatherUnpermute.apply(
            permutated_local_input_tokens, self.reversed_local_input_permutation_mapping, self.token_rows
        )
        output = output.view(self.hidden_shape)
        if self.shared_experts is not None:
            output = output + self.shared_experts.get_output()
        return output


class GatherDispatchMoELayer(MoELayer):
    """megatron's `MoELayer` whose alltoall dispatcher is `GatherPermuteAlltoAllDispatcher`.

    `MoELayer.__init__` builds `MoEAlltoAllTokenDispatcher` from `config.moe_token_dispatcher_type`; it is replaced
    here, built with the same arguments, everywhere the layer refers to it: `token_dispatcher`, the shared experts
    wired into it for overlap (`set_shared_experts`) and `_training_token_dispatcher` (inference-optimized mode,
    which swaps dispatchers per forward). Other dispatcher types are left as megatron builds them."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None, is_mtp_layer=False,
                 name=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        old = self.token_dispatcher
        if type(old) is not MoEAlltoAllTokenDispatcher:
            return
        new = GatherPermuteAlltoAllDispatcher(
            self.num_local_experts, self.local_expert_indices, config=self.config, pg_collection=pg_collection
        )
        if old.shared_experts is not None:
            new.set_shared_experts(old.shared_experts)
        self.token_dispatcher = new
        if getattr(self, "_training_token_dispatcher", None) is old:
            self._training_token_dispatcher = new


def with_gather_dispatch_layer(mlp_spec):
    """`mlp_spec` with megatron's `MoELayer` replaced by `GatherDispatchMoELayer` (its submodules kept); dense MLP
    specs and other MoE layer classes are returned unchanged. Handles megatron 0.19's `functools.partial(MoELayer,
    submodules=...)` form and the `ModuleSpec` form."""
    if isinstance(mlp_spec, functools.partial) and mlp_spec.func is MoELayer:
        return functools.partial(GatherDispatchMoELayer, *mlp_spec.args, **mlp_spec.keywords)
    if isinstance(mlp_spec, ModuleSpec) and mlp_spec.module is MoELayer:
        return dataclasses.replace(mlp_spec, module=GatherDispatchMoELayer)
    return mlp_spec
