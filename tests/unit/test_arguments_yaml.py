"""YAML values go through exactly the argparse type and choices of their flag (issue 14.6), --help works (11.3),
and values under which a run cannot train are refused at parse time (14.9, 14.10)."""

from __future__ import annotations

import argparse

import pytest

from megatron_r3.train.arguments import build_parser, check_training_values, yaml_defaults


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("route_fallback: nativ", "route_fallback: invalid choice 'nativ' for --route-fallback (choose from 'raise', "
                              "'native')"),
    ("rollout_failure_policy: skipp", "rollout_failure_policy: invalid choice 'skipp' for --rollout-failure-policy "
                                      "(choose from 'raise', 'skip')"),
    ("rollout_engine: HF", "rollout_engine: invalid choice 'HF' for --rollout-engine (choose from 'hf', 'sglang')"),
    ("rollout_dtype: fp16", "rollout_dtype: invalid choice 'fp16' for --rollout-dtype (choose from 'bf16', 'fp32')"),
    ("seq_length: 32.5", "seq_length: invalid int value 32.5 for --seq-length"),
    ('collect_routing_agreement: "no"', "collect_routing_agreement: --collect-routing-agreement is a switch; give "
                                        "true or false, not 'no'"),
    ("micro_batch_size: [1, 2]", "micro_batch_size: --micro-batch-size takes one value, not a list [1, 2]"),
    ("lr: true", "lr: --lr takes a float, not true"),
    ("router_replay: {a: 1}", "router_replay: a mapping is not a value of --router-replay"),
])
def test_yaml_value_rejected_like_the_command_line(parser, tmp_path, text, message):
    with pytest.raises(ValueError) as error:
        yaml_defaults(parser, _yaml(tmp_path, text))
    assert str(error.value) == f"{tmp_path / 'c.yaml'}: {message}"


def test_yaml_values_converted_like_the_command_line(parser, tmp_path):
    values = yaml_defaults(parser, _yaml(tmp_path, (
        "reference_replay: off\nrouter_replay: R3\nseq_length: 32\nlr: 1e-5\ncollect_routing_agreement: false\n"
        "sglang_url: http://a:1\nmasked_softmax_fusion: false\ntask: null\n")))
    assert values == {"reference_replay": "off", "router_replay": "R3", "seq_length": 32, "lr": 1e-5,
                      "collect_routing_agreement": False, "sglang_url": ["http://a:1"],
                      "masked_softmax_fusion": False, "task": None}
    assert type(values["lr"]) is float  # PyYAML reads 1e-5 as a string; the flag's type makes it a float


def test_yaml_on_off_stay_strings_through_the_full_parse(parser, tmp_path):
    parser.set_defaults(**yaml_defaults(parser, _yaml(tmp_path, "reference_replay: off\n")))
    assert parser.parse_args([]).reference_replay == "off"
    parser.set_defaults(reference_replay="on")


def test_unknown_key_names_the_closest_flag(parser, tmp_path):
    with pytest.raises(ValueError, match=r"unknown config keys 'route_fallbak' \(did you mean 'route_fallback'\?\)"):
        yaml_defaults(parser, _yaml(tmp_path, "route_fallbak: native\n"))


def test_help_lists_every_flag(parser):
    text = parser.format_help()  # megatron-core 0.19.2's bare '%' raised "unsupported format character ')'"
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            for option in action.option_strings:
                assert option in text, option
    assert "--moe-paged-stash-buffer-size-factor-cuda" in text and "--router-replay" in text


@pytest.mark.parametrize("flag, value, message", [
    ("lr", 1e39, "--lr 1e+39: the learning rate must be a finite number in (0, 1]"),
    ("lr", -1.0, "--lr -1.0: the learning rate must be a finite number in (0, 1]"),
    ("lr", float("nan"), "--lr nan: the learning rate must be a finite number in (0, 1]"),
    ("train_iters", 0, "--train-iters 0: give at least 1 training step"),
    ("grpo_group_size", 1, "--grpo-group-size 1: GRPO needs at least 2 samples per prompt (a group of one has "
                           "advantage 0 everywhere and trains nothing)"),
    ("max_fallback_fraction", 1.5, "--max-fallback-fraction 1.5: a fraction in [0, 1]"),
])
def test_values_that_cannot_train_are_refused(parser, flag, value, message):
    args = parser.parse_args([])
    setattr(args, flag, value)
    with pytest.raises(ValueError) as error:
        check_training_values(args)
    assert str(error.value) == message


def test_default_values_pass(parser):
    check_training_values(parser.parse_args([]))
