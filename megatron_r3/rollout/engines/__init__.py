"""The rollout engine registry: `--rollout-engine NAME` -> the engine class, imported on first use.

Adding an engine (e.g. vLLM) is one module and one line here:

    megatron_r3/rollout/engines/vllm.py        class VLLMEngine(RolloutEngine) with config_class = VLLMEngineConfig
    ENGINES["vllm"] = "megatron_r3.rollout.engines.vllm:VLLMEngine"

The engine's config dataclass gives its flags (`add_rollout_arguments` adds every registered engine's group, so
`--help` lists them all and a YAML key of any engine is known); `--rollout-engine` offers exactly the registered
names. The trainer builds the chosen engine through `engine_class(name)` and `EngineSetup` (train/components.py)
and never names an engine itself.
"""

from __future__ import annotations

import argparse
import importlib

from megatron_r3.platform.typed_config import add_config_arguments
from megatron_r3.rollout.base import RolloutConfig, RolloutEngine

ENGINES: dict[str, str] = {
    "hf": "megatron_r3.rollout.engines.hf:HFRolloutEngine",
    "sglang": "megatron_r3.rollout.engines.sglang.engine:SGLangEngine",
}
"""Engine name -> "module:Class" of its RolloutEngine subclass (imported lazily)."""


def engine_class(name: str) -> type[RolloutEngine]:
    """The RolloutEngine subclass registered as `name` (ValueError naming the registered ones otherwise)."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; registered: {', '.join(sorted(ENGINES))} "
                         "(megatron_r3.rollout.engines.ENGINES)")
    module_name, _, class_name = ENGINES[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
        raise TypeError(f"rollout engine {name!r} ({ENGINES[name]}) is not a RolloutEngine subclass")
    return cls


def add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared rollout flags (`--rollout-engine` with the registered names as choices, `--rollout-dtype`,
    `--rollout-failure-policy`) and one group per registered engine that has flags."""
    group = add_config_arguments(parser, RolloutConfig, "rollout engine")
    for action in group._group_actions:
        if action.dest == "rollout_engine":
            action.choices = tuple(ENGINES)
    for name in ENGINES:
        cls = engine_class(name)
        if cls.config_class is not None:
            add_config_arguments(parser, cls.config_class, f"rollout engine {name}")
