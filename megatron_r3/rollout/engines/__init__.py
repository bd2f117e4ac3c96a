"""The rollout engine registry: `--rollout-engine NAME` -> the engine class and its config, imported on first use.

Adding an engine (e.g. vLLM) is one module and one line here:

    megatron_r3/rollout/engines/vllm.py    class VLLMEngine(RolloutEngine); @dataclass class VLLMEngineConfig
    "vllm": Engine("megatron_r3.rollout.engines.vllm:VLLMEngine", "megatron_r3.rollout.engines.vllm:VLLMEngineConfig"),

The config dataclass gives the engine's flags (`add_rollout_arguments` adds every registered engine's group, so
`--help` lists them all and a YAML key of any engine is known) and may define `check()` for parse-time checks;
`--rollout-engine` offers exactly the registered names. The trainer builds the chosen engine through
`engine_class(name)` and an `EngineSetup` (train/components.py) and never names an engine itself.

This module and the config modules it names import no torch: the command line is checked before the heavy imports
(`rollout_flag_dests`, train/preflight.py); an engine module is imported only when the engine is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import NamedTuple, Optional

from megatron_r3.rollout.config import RolloutConfig


class Engine(NamedTuple):
    """A registry entry: "module:Class" of the RolloutEngine subclass, and of its config dataclass (None: no flags)."""

    engine: str
    config: Optional[str] = None


ENGINES: dict[str, Engine] = {
    "hf": Engine("megatron_r3.rollout.engines.hf:HFRolloutEngine", "megatron_r3.rollout.engines.hf_config:HFEngineConfig"),
    "sglang": Engine("megatron_r3.rollout.engines.sglang.engine:SGLangEngine",
                     "megatron_r3.rollout.engines.sglang.config:SGLangEngineConfig"),
}
"""Engine name -> where its class and config live (both imported lazily)."""


def _load(path: str):
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _entry(name: str) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; registered: {', '.join(sorted(ENGINES))} "
                         "(megatron_r3.rollout.engines.ENGINES)")
    return ENGINES[name]


def engine_class(name: str):
    """The RolloutEngine subclass registered as `name` (ValueError naming the registered ones otherwise)."""
    from megatron_r3.rollout.base import RolloutEngine

    entry = _entry(name)
    cls = _load(entry.engine)
    if not (isinstance(cls, type) and issubclass(cls, RolloutEngine)):
        raise TypeError(f"rollout engine {name!r} ({entry.engine}) is not a RolloutEngine subclass")
    return cls


def engine_config_class(name: str) -> Optional[type]:
    """The config dataclass registered for engine `name` (None: the engine has no flags of its own)."""
    entry = _entry(name)
    if entry.config is None:
        return None
    cls = _load(entry.config)
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"rollout engine {name!r}: config {entry.config} is not a dataclass")
    return cls


def rollout_config_classes() -> list[type]:
    """RolloutConfig, then every registered engine's config dataclass, in registry order."""
    classes = [RolloutConfig]
    for name in ENGINES:
        config = engine_config_class(name)
        if config is not None and config not in classes:
            classes.append(config)
    return classes


def rollout_flag_dests() -> set[str]:
    """Every rollout flag's argparse dest (for YAML key checks before argparse and torch are involved)."""
    return {field.name for cls in rollout_config_classes() for field in dataclasses.fields(cls) if field.init}


def add_rollout_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared rollout flags (`--rollout-engine` with the registered names as choices, `--rollout-dtype`,
    `--rollout-failure-policy`) and one group per registered engine that has flags."""
    from megatron_r3.platform.typed_config import add_config_arguments

    group = add_config_arguments(parser, RolloutConfig, "rollout engine")
    for action in group._group_actions:
        if action.dest == "rollout_engine":
            action.choices = tuple(ENGINES)
    for name in ENGINES:
        config = engine_config_class(name)
        if config is not None:
            add_config_arguments(parser, config, f"rollout engine {name}")
