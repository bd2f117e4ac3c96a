"""replay/config.ReplayConfig: the replay flags are generated from it with the names, defaults, choices and help
they always had, and the parsed namespace goes back into it."""

import argparse
import typing

import pytest

from megatron_r3.platform.typed_config import add_config_arguments, config_defaults, config_from_args
from megatron_r3.replay.config import ReplayConfig
from megatron_r3.replay.policy import REFERENCE_REPLAY, REPLAY_MODES


def _parser():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ReplayConfig, "replay")
    return parser


def _action(parser, dest):
    return next(a for a in parser._actions if a.dest == dest)


def test_flags_keep_their_names_defaults_and_choices():
    parser = _parser()
    flags = {a.dest: (tuple(a.option_strings), a.default, tuple(a.choices) if a.choices else None)
             for a in parser._actions if a.dest != "help"}
    assert flags == {
        "router_replay": (("--router-replay",), "off", ("off", "R2", "R3")),
        "reference_replay": (("--reference-replay",), "on", ("on", "off")),
        "route_fallback": (("--route-fallback",), "raise", ("raise", "native")),
        "collect_routing_agreement": (("--collect-routing-agreement", "--no-collect-routing-agreement"), True, None),
        "max_fallback_fraction": (("--max-fallback-fraction",), 0.01, None),
        "min_routing_agreement": (("--min-routing-agreement",), 0.6, None),
    }
    assert _action(parser, "max_fallback_fraction").type is float
    # the --help text is the field's docstring, on one line
    assert _action(parser, "reference_replay").help == \
        "Whether the reference-model (KL) pass replays the same routes as the policy."
    assert _action(parser, "route_fallback").help == (
        "Bad routes in a sample: raise an error naming it (default), or route those tokens natively and count them "
        "in replay/fallback_tokens.")


def test_parsed_values_fill_the_dataclass():
    parser = _parser()
    assert config_from_args(ReplayConfig, parser.parse_args([])) == ReplayConfig()
    args = parser.parse_args(["--router-replay", "R2", "--reference-replay", "off", "--route-fallback", "native",
                              "--no-collect-routing-agreement", "--max-fallback-fraction", "0.5",
                              "--min-routing-agreement", "0"])
    assert config_from_args(ReplayConfig, args) == ReplayConfig("R2", "off", "native", False, 0.5, 0.0)
    assert parser.parse_args(["--collect-routing-agreement"]).collect_routing_agreement is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--router-replay", "R4"])


def test_choices_are_the_policy_tables_keys():
    hints = typing.get_type_hints(ReplayConfig)
    assert typing.get_args(hints["router_replay"]) == REPLAY_MODES
    assert typing.get_args(hints["reference_replay"]) == REFERENCE_REPLAY
    assert config_defaults(ReplayConfig)["router_replay"] == "off"
