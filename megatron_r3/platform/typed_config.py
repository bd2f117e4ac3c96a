"""Typed configuration: dataclasses with per-field docstrings are the only place a default is written.

Each part that takes settings (an engine, weight sync, the GRPO loss, replay, the trainer) owns one dataclass next to
its code. A field's docstring is its `--help` text; its default is the flag's default. The command line is generated
from the dataclass with megatron-core's own `ArgumentGroupFactory` (megatron/training/argument_utils.py), and the part
receives the dataclass, never the argparse namespace: `config_from_args(Config, args)` is called once, at the top.

    @dataclass
    class HFEngineConfig:
        rollout_dtype: Literal["bf16", "fp32"] = "bf16"
        '''dtype of the embedded hf rollout engine.'''

Field-name rules are megatron's: `foo_bar` becomes `--foo-bar`; a `bool` defaulting to False is `store_true`, one
defaulting to True is spelled `--no-foo-bar`; `Optional[T]` takes T; `list[T]` takes one or more values; `Literal`
gives choices. Anything else goes in `metadata={"argparse_meta": {...}}` (argparse keyword arguments, and
`arg_names` for other spellings), which takes precedence over what is inferred.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import typing
from typing import Any, Optional, TypeVar

from megatron_r3.platform.python_compat import apply_python_compat

ConfigT = TypeVar("ConfigT")


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, title: str,
                         exclude: Optional[list[str]] = None) -> argparse._ArgumentGroup:
    """Add one argument group generated from `config_class` (its docstring describes the group)."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"{config_class!r} is not a dataclass")
    apply_python_compat()
    from megatron.training.argument_utils import ArgumentGroupFactory

    class _ResolvedTypes(ArgumentGroupFactory):
        """Modules written with `from __future__ import annotations` leave field types as strings; megatron's
        factory needs the types themselves."""

        def _build_argparse_kwargs_from_field(self, attribute):
            resolved = copy.copy(attribute)
            resolved.type = hints[attribute.name]
            return super()._build_argparse_kwargs_from_field(resolved)

    hints = typing.get_type_hints(config_class)
    return _ResolvedTypes(config_class, exclude=exclude).build_group(parser, title=title)


def config_from_args(config_class: type[ConfigT], args: Any, **overrides) -> ConfigT:
    """The dataclass filled from a parsed namespace (every init field must be present), plus `overrides`."""
    values = {}
    for field in dataclasses.fields(config_class):
        if not field.init or field.name in overrides:
            continue
        if not hasattr(args, field.name):
            raise AttributeError(f"{config_class.__name__}.{field.name} has no value in the parsed arguments: "
                                 f"was add_config_arguments({config_class.__name__}) called on the parser?")
        values[field.name] = getattr(args, field.name)
    values.update(overrides)
    return config_class(**values)


def config_defaults(config_class: type) -> dict[str, Any]:
    """Field name -> default of every init field that has one (for set_defaults / YAML key checks)."""
    out = {}
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
    return out
