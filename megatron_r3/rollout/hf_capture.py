"""Capture the expert ids a transformers Qwen3-MoE model actually used, in SGLang's routed-experts layout.

In transformers 5.x, ``Qwen3MoeSparseMoeBlock.forward`` calls its router ``self.gate`` (a ``Qwen3MoeTopKRouter``)
on the flattened hidden states ``[tokens, hidden]``; the router returns ``(router_logits, routing_weights,
selected_experts)`` where ``selected_experts = topk(softmax(router_logits), top_k).indices`` (``[tokens, top_k]``,
ordered by descending probability), and the block passes exactly that tensor to ``self.experts``. A forward hook on
the router therefore sees the very ids that selected the experts, in the model's top-k order.

:class:`RouteCapture` hooks every MoE block's router and writes the ids straight into a per-batch buffer
``[batch, rows, num_hidden_layers, top_k]`` (compact dtype, on the model's device, zero-initialised so dense layers
stay zero as SGLang sends them). The engine tells it, before each forward, which buffer row each fed position of
each batch row goes to (:meth:`RouteCapture.expect`); positions mapped to ``-1`` (left padding) are dropped.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_r3.model.families import family_of
from megatron_r3.replay.routes import compact_index_dtype


def moe_layer_map(config) -> list[bool]:
    """Which decoder layers are MoE blocks under an HF config (its model family's rule)."""
    return list(family_of(config).moe_layers(config))


def find_routers(model) -> dict[int, torch.nn.Module]:
    """Global decoder layer index -> the router module of that layer's MoE block (the model family's finder, which
    refuses a model whose MoE layers disagree with its config)."""
    return family_of(model.config).find_routers(model)


class RouteCapture:
    """Forward hooks on every MoE router of a transformers Qwen3-MoE model, writing top-k ids into a buffer."""

    def __init__(self, model):
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.topk = config.num_experts_per_tok
        self.num_experts = family_of(config).arch(config).num_experts  # Qwen: num_experts, DeepSeek: n_routed_experts
        self.dtype = compact_index_dtype(self.num_experts)
        self.moe_layers = moe_layer_map(config)
        self._routers = find_routers(model)
        self._buffer: Optional[torch.Tensor] = None  # [batch, rows, layers, K]
        self._target_rows: Optional[torch.Tensor] = None  # [batch, seq] int64 buffer row of each fed position
        self._batch_rows: Optional[torch.Tensor] = None  # [batch] buffer batch index of each fed batch row
        self._seen: set[int] = set()
        self._handles = [
            router.register_forward_hook(self._make_hook(index)) for index, router in self._routers.items()
        ]

    def start(self, batch: int, rows: int, device) -> torch.Tensor:
        """Allocate (and return) a zeroed buffer ``[batch, rows, num_layers, topk]`` for one generation batch."""
        self._buffer = torch.zeros(batch, rows, self.num_layers, self.topk, dtype=self.dtype, device=device)
        return self._buffer

    def expect(self, target_rows: torch.Tensor, batch_rows: torch.Tensor) -> None:
        """Announce the next forward: fed position ``[b, s]`` goes to buffer ``[batch_rows[b], target_rows[b, s]]``.

        ``target_rows`` is ``[fed_batch, fed_seq]`` int64 with ``-1`` for positions to drop (padding).
        """
        self._target_rows = target_rows
        self._batch_rows = batch_rows
        self._seen = set()

    def finish_step(self) -> None:
        """Check that every MoE layer reported exactly once during the announced forward."""
        if self._target_rows is not None and len(self._seen) != len(self._routers):
            missing = sorted(set(self._routers) - self._seen)
            raise RuntimeError(f"route capture: MoE layers {missing} did not report their expert ids this step")
        self._target_rows = None

    def stop(self) -> None:
        self._buffer = None
        self._target_rows = None
        self._batch_rows = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.stop()

    def _make_hook(self, layer: int):
        def hook(module, inputs, output):
            if self._target_rows is None or self._buffer is None:
                return  # a forward the engine did not announce (e.g. a user's own call): nothing to record
            if not (isinstance(output, tuple) and len(output) == 3):
                raise RuntimeError(
                    "route capture: the Qwen3-MoE router returned "
                    f"{type(output).__name__} instead of (router_logits, routing_weights, selected_experts); "
                    "this transformers version changed the router and hf_capture must be updated"
                )
            ids = output[2]
            fed_batch, fed_seq = self._target_rows.shape
            if ids.shape != (fed_batch * fed_seq, self.topk):
                raise RuntimeError(
                    f"route capture: layer {layer} router returned ids of shape {tuple(ids.shape)}, expected "
                    f"{(fed_batch * fed_seq, self.topk)}"
                )
            if layer in self._seen:
                raise RuntimeError(f"route capture: layer {layer} reported twice in one forward")
            self._seen.add(layer)
            rows = self._target_rows.reshape(-1)
            keep = rows >= 0
            batch_index = self._batch_rows.repeat_interleave(fed_seq)
            self._buffer[batch_index[keep], rows[keep], layer] = ids[keep].to(self.dtype)

        return hook
