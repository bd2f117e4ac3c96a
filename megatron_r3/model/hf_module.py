"""Hugging Face *checkpoint* names <-> a live transformers 5.x Qwen-MoE module (the in-process rollout engine, tests).

Checkpoint names (what ``save_pretrained`` writes to disk, what hub checkpoints hold and what SGLang's weight-sync
endpoints use) differ from the in-memory parameter names for the routed experts. In transformers 5.x,
``Qwen3MoeExperts`` holds all experts of a layer fused in two 3-D parameters:

====================================================  ===============================================================
checkpoint name (on disk, per expert)                 live parameter (in memory)
====================================================  ===============================================================
``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``  ``model.layers.{i}.mlp.experts.gate_up_proj[e, :I, :]`` (I x H)
``model.layers.{i}.mlp.experts.{e}.up_proj.weight``    ``model.layers.{i}.mlp.experts.gate_up_proj[e, I:, :]`` (I x H)
``model.layers.{i}.mlp.experts.{e}.down_proj.weight``  ``model.layers.{i}.mlp.experts.down_proj[e]`` (H x I)
====================================================  ===============================================================

(``gate_up_proj`` is ``[E, 2I, H]``, gate rows first; ``down_proj`` is ``[E, H, I]``; I = ``moe_intermediate_size``.)
Every other name is the same on disk and in memory (``...mlp.gate.weight`` is the router ``[E, H]``; dense layers
keep ``mlp.{gate,up,down}_proj.weight``; ``lm_head.weight`` aliases ``model.embed_tokens.weight`` when tied).
The live names are accepted too, so a caller holding a transformers model's ``state_dict()`` can load it directly.

Each tensor is copied into the existing storage (``copy_``, cast to the model's dtype and device): no parameter is
reallocated, so hooks, caches of parameter pointers and the engine's view of the model stay valid.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

import torch

from megatron_r3.model.hf_mapping import MappingError

_FUSED_EXPERTS_RE = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<which>gate_up_proj|down_proj)$")
_EXPERT_CKPT_RE = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<which>gate_proj|up_proj|down_proj)\.weight$"
)


class WeightLoader:
    """Resolves checkpoint names against one model and copies tensors into its parameters."""

    def __init__(self, model):
        self.model = model
        self._params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
        first_name: dict[int, str] = {}
        for name, param in self._params.items():
            first_name.setdefault(id(param), name)
        self._alias = {name: first_name[id(param)] for name, param in self._params.items()}  # tied weights
        self._experts: dict[str, torch.nn.Module] = {}
        for name, module in model.named_modules():
            if name.endswith(".mlp.experts") and hasattr(module, "gate_up_proj"):
                if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
                    raise NotImplementedError(
                        f"{name}: expert weights are stored transposed or interleaved; only transformers' default "
                        "concatenated [E, 2I, H] gate_up_proj layout is supported"
                    )
                self._experts[name] = module

    def _expert_names(self, prefix: str, leaf: str) -> list[str]:
        projs = ("gate_proj", "up_proj") if leaf == "gate_up_proj" else ("down_proj",)
        num_experts = self._experts[prefix].gate_up_proj.shape[0]
        return [f"{prefix}.{e}.{proj}.weight" for e in range(num_experts) for proj in projs]

    def covers(self, name: str) -> list[str]:
        """The checkpoint names (as listed by :meth:`expected_names`) that loading ``name`` overwrites."""
        if name in self._params:
            prefix, _, leaf = name.rpartition(".")
            if prefix in self._experts and leaf in ("gate_up_proj", "down_proj"):
                return self._expert_names(prefix, leaf)  # a fused live name covers all its experts
            return [self._alias[name]]  # resolves tied aliases (lm_head.weight -> model.embed_tokens.weight)
        return [name]

    def expected_names(self) -> list[str]:
        """Every checkpoint name a full update consists of (per-expert names for fused experts, tied once)."""
        names = []
        for name in self._params:
            if self._alias[name] == name:
                names += self.covers(name)
        return names

    def target(self, name: str) -> torch.Tensor:
        """The live tensor (a parameter or a view into one) that checkpoint tensor ``name`` is copied into."""
        if name in self._params:
            return self._params[name].data
        match = _EXPERT_CKPT_RE.match(name)
        if match is None:
            raise MappingError(f"update_weights: unknown weight name {name!r} (not a parameter of this model)")
        prefix, expert, proj = match["prefix"], int(match["e"]), match["which"]
        module = self._experts.get(prefix)
        if module is None:
            raise MappingError(f"update_weights: {name!r} names experts of a layer that has no MoE block")
        num_experts = module.gate_up_proj.shape[0]
        if not 0 <= expert < num_experts:
            raise MappingError(f"update_weights: {name!r}: expert {expert} out of range [0, {num_experts})")
        if proj == "down_proj":
            return module.down_proj.data[expert]
        inter = module.gate_up_proj.shape[1] // 2
        rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
        return module.gate_up_proj.data[expert, rows]

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]], on_loaded: Callable[[str], None] = None) -> int:
        """Copy every ``(name, tensor)`` into the model; return how many were loaded.

        Unknown names and shape mismatches raise before the offending tensor is copied (tensors earlier in the
        stream have been loaded by then: a sync that fails half-way must be redone, as with SGLang).
        """
        count = 0
        for name, tensor in named_tensors:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"update_weights: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            dst = self.target(name)
            if tuple(tensor.shape) != tuple(dst.shape):
                raise ValueError(
                    f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dst.shape)}"
                )
            dst.copy_(tensor)  # casts dtype and moves device as needed; never reallocates
            count += 1
            if on_loaded is not None:
                on_loaded(name)
        return count


def hf_state_dict_to_checkpoint_names(model_or_state_dict, *, tie_word_embeddings: Optional[bool] = None):
    """Yield (checkpoint name, tensor) from a live HF model (or its state dict): fused expert tensors are split into
    per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` views (no copies), exactly the names `save_pretrained`
    writes; `lm_head.weight` is skipped for tied embeddings, as `save_pretrained` does."""
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
        if tie_word_embeddings is None:
            config = getattr(model_or_state_dict, "config", None)
            tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    else:
        state = model_or_state_dict
    for name, tensor in state.items():
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        fused = _FUSED_EXPERTS_RE.match(name)
        if fused and tensor.dim() == 3:
            prefix = fused["prefix"]
            if fused["which"] == "gate_up_proj":
                half = tensor.shape[1] // 2
                for e in range(tensor.shape[0]):
                    yield f"{prefix}.{e}.gate_proj.weight", tensor[e, :half]
                    yield f"{prefix}.{e}.up_proj.weight", tensor[e, half:]
            else:
                for e in range(tensor.shape[0]):
                    yield f"{prefix}.{e}.down_proj.weight", tensor[e]
            continue
        yield name, tensor
