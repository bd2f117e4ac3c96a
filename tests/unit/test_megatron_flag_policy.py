"""Every megatron flag pretrain_grpo.py does not honour is refused with one line naming it (megatron_flag_policy)."""

from __future__ import annotations

import argparse
import pathlib
import re

import pytest

from megatron_r3.train.arguments import build_parser
from megatron_r3.train.megatron_flag_policy import (
    DERIVED, HINTS, READ_BY_TRAINER, SFT_WARMUP_READS, check_ignored_flags, honoured_flags, ignored_flags,
    megatron_actions, megatron_defaults,
)

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_r3"


def _source() -> str:
    return "".join(path.read_text() for path in PACKAGE.rglob("*.py") if path.name != "megatron_flag_policy.py")


def _non_default_argv(action: argparse.Action) -> list[str]:
    """A command line giving `action` a value other than its default."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        value = next(str(choice) for choice in action.choices if choice != action.default)
    elif action.type in (int, float):
        value = str((action.default or 0) + 3)
    else:
        value = "somewhere"
    return [flag, value]


@pytest.fixture(scope="module")
def parser():
    return build_parser()


IGNORED = sorted(ignored_flags())
DEFAULTS = megatron_defaults()


def test_the_flags_the_issue_names_are_ignored():
    for dest in ("wandb_entity", "yaml_cfg", "async_save", "ckpt_format", "eval_interval", "exit_interval"):
        assert (dest in IGNORED) == (dest != "wandb_entity"), dest


@pytest.mark.parametrize("dest", IGNORED)
def test_each_ignored_flag_is_refused(parser, dest):
    action = megatron_actions()[dest]
    argv = _non_default_argv(action)
    try:
        args = parser.parse_args(argv)
    except (SystemExit, KeyError, ValueError):  # an enum- or format-typed flag: "somewhere" is no value of it
        pytest.skip(f"{argv} is not a parsable value")
    with pytest.raises(ValueError) as error:
        check_ignored_flags(args, defaults=DEFAULTS)
    hint = HINTS.get(dest, "pretrain_grpo.py runs its own data, rollout and training loop and never reads it; remove it "
                           "(megatron_r3/train/megatron_flag_policy.py lists the megatron flags it honours)")
    parsed = getattr(args, dest)
    value = "" if action.nargs == 0 else f" {' '.join(map(str, parsed)) if isinstance(parsed, list) else parsed}"
    assert str(error.value) == f"{argv[0]}{value}: not supported by pretrain_grpo.py; {hint}"


@pytest.mark.parametrize("argv, message", [
    (["--yaml-cfg", "x.yaml"], "--yaml-cfg x.yaml: not supported by pretrain_grpo.py; use --config FILE.yaml "
                               "(keys are the flag names with '_')"),
    (["--async-save"], "--async-save: not supported by pretrain_grpo.py; checkpoints are saved synchronously in "
                       "megatron's torch_dist format (megatron_r3/train/checkpoint.py)"),
    (["--ckpt-format", "torch"], "--ckpt-format torch: not supported by pretrain_grpo.py; checkpoints are saved "
                                 "synchronously in megatron's torch_dist format (megatron_r3/train/checkpoint.py)"),
    (["--eval-interval", "5"], "--eval-interval 5: not supported by pretrain_grpo.py; GRPO has no evaluation loop: "
                               "reward/mean of every step's rollout is logged in metrics.jsonl"),
    (["--exit-interval", "5"], "--exit-interval 5: not supported by pretrain_grpo.py; stop after N steps with "
                               "--train-iters N"),
    (["--mtp-num-layers", "1"], "--mtp-num-layers 1: not supported by pretrain_grpo.py; no model family builds MTP "
                                "layers (the model is the checkpoint's decoder); a checkpoint's MTP tensors are "
                                "refused on load unless --mtp-checkpoint-tensors skip, and HF exports then contain "
                                "no MTP layers"),
])
def test_named_flags_give_their_hint(parser, argv, message):
    with pytest.raises(ValueError) as error:
        check_ignored_flags(parser.parse_args(argv))
    assert str(error.value) == message


def test_defaults_and_honoured_values_pass(parser):
    check_ignored_flags(parser.parse_args([]))
    check_ignored_flags(parser.parse_args(["--ckpt-format", "torch_dist", "--wandb-project", "p", "--lr", "0.1",
                                           "--sgd-momentum", "0.0", "--recompute-activations"]))
    check_ignored_flags(parser.parse_args(["--eval-interval", "5"]), SFT_WARMUP_READS)
    check_ignored_flags(parser.parse_args(["--mtp-num-layers", "0", "--mtp-checkpoint-tensors", "skip"]))


def test_every_honoured_name_is_read_by_the_package():
    source = _source()
    for dest in READ_BY_TRAINER | SFT_WARMUP_READS:
        assert re.search(rf"args\.{dest}\b|\"{dest}\"", source), f"{dest} is listed as read but nothing reads it"


def test_every_megatron_flag_the_package_reads_is_honoured():
    read = set(re.findall(r"args\.(\w+)", _source()))
    missed = sorted((read & set(megatron_actions())) - honoured_flags(SFT_WARMUP_READS))
    assert not missed, f"the package reads these megatron flags, which the policy would refuse: {missed}"


def test_hints_and_derived_name_megatron_flags():
    flags = set(megatron_actions())
    assert set(HINTS) <= flags and set(DERIVED) <= flags
    assert not set(HINTS) & honoured_flags() - SFT_WARMUP_READS


def test_the_resolved_config_holds_no_ignored_megatron_flag(tmp_path, monkeypatch):
    """config.yaml (what the run resolved, megatron's validate_args included) leaves out the megatron flags the run
    ignores, though validate_args fills some (--encoder-seq-length, --dataloader-type): reused with --config, it
    passes the ignored-flag check."""
    import yaml

    from megatron_r3.train.arguments import parse_grpo_args, save_resolved_config

    monkeypatch.setenv("WORLD_SIZE", "1")
    args = parse_grpo_args(["--config", "configs/demo_tiny.yaml", "--run-dir", str(tmp_path / "a")])
    assert args.encoder_seq_length == args.seq_length and args.dataloader_type == "single"
    save_resolved_config(args, str(tmp_path / "config.yaml"))
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "encoder_seq_length" not in saved and saved["seq_length"] == args.seq_length
    reused = build_parser().parse_args([])
    for key, value in saved.items():
        setattr(reused, key, value)
    check_ignored_flags(reused)
