"""platform/typed_config: a dataclass's fields become flags (megatron's ArgumentGroupFactory), docstrings become help,
and the parsed namespace goes back into the dataclass."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_r3.platform.typed_config import add_config_arguments, config_defaults, config_from_args


@dataclass
class ExampleConfig:
    """Example group."""

    max_new_tokens: int = 32
    """Most tokens generated per sample."""
    rollout_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype of the engine."""
    deadline: Optional[float] = None
    """Seconds a rollout may take."""
    progress: bool = True
    """Show a progress bar."""
    urls: list[str] = field(default_factory=list, metadata={"argparse_meta": {"arg_names": ["--sglang-url"],
                                                                                 "nargs": "*"}})
    """Server URLs."""


def _parser():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig, "example")
    return parser


def test_defaults_types_choices_and_help_come_from_the_dataclass():
    parser = _parser()
    args = parser.parse_args([])
    assert config_from_args(ExampleConfig, args) == ExampleConfig()
    args = parser.parse_args(["--max-new-tokens", "7", "--rollout-dtype", "fp32", "--deadline", "2.5",
                              "--no-progress", "--sglang-url", "a", "b"])
    assert config_from_args(ExampleConfig, args) == ExampleConfig(7, "fp32", 2.5, False, ["a", "b"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--rollout-dtype", "fp16"])
    assert "Most tokens generated per sample." in parser.format_help()
    assert config_defaults(ExampleConfig)["max_new_tokens"] == 32


def test_missing_field_names_the_config_and_the_fix():
    with pytest.raises(AttributeError, match=r"ExampleConfig.max_new_tokens has no value in the parsed arguments: "
                                             r"was add_config_arguments\(ExampleConfig\) called on the parser\?"):
        config_from_args(ExampleConfig, argparse.Namespace())
