"""Checks of `pretrain_grpo.py`'s command line that need no torch, run before the ~10-20 s of heavy imports.

A misspelled YAML key, a missing --config / --hf-checkpoint / --prompt-data, or a model-parallel layout started
without torchrun are answered in well under a second with one line naming the problem and the fix. The full parse
(`arguments.parse_grpo_args`) still checks everything again; this module only answers the common mistakes early.

Megatron's own flag names come from `megatron_flags.txt`, a snapshot of megatron-core's parser (its first line is the
megatron-core version it was taken from; `tests/unit/test_preflight.py` checks it against the installed parser, and
`python -m megatron_r3.train.preflight --write-megatron-flags` rewrites it). When the installed megatron-core is
another version the unknown-key check is left to the full parse.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

FLAGS_FILE = os.path.join(os.path.dirname(__file__), "megatron_flags.txt")


class UsageError(ValueError):
    """A bad command line or config, found before anything was imported or built."""


def megatron_version() -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return None


def megatron_flag_dests() -> Optional[set[str]]:
    """Megatron's argparse dests from the snapshot, or None when it was taken from another megatron-core version."""
    try:
        with open(FLAGS_FILE) as handle:
            version, *dests = handle.read().split()
    except OSError:
        return None
    return set(dests) if version == megatron_version() else None


def write_megatron_flags() -> None:
    from megatron_r3.platform.python_compat import apply_python_compat

    apply_python_compat()
    from megatron.training.arguments import add_megatron_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_megatron_arguments(parser)
    dests = sorted({action.dest for action in parser._actions})
    with open(FLAGS_FILE, "w") as handle:
        handle.write("\n".join([megatron_version() or "unknown", *dests]) + "\n")


def _light_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--config", "--hf-checkpoint", "--hf-config", "--prompt-data", "--tokenizer-dir", "--load"):
        parser.add_argument(flag, default=None)
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size",
                 "--expert-model-parallel-size", "--expert-tensor-parallel-size"):
        parser.add_argument(flag, default=None)
    return parser


def preflight(argv: Sequence[str], environ=os.environ) -> None:
    """Raise UsageError (one line) for the mistakes that can be seen without importing torch or megatron."""
    from megatron_r3.rollout.engines import rollout_flag_dests
    from megatron_r3.train.arguments import grpo_flag_dests, read_yaml_config, unknown_key_message

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        return
    cli, _ = _light_parser().parse_known_args(argv)
    values = {}
    if cli.config is not None:
        try:
            values = read_yaml_config(cli.config)
        except ValueError as error:
            raise UsageError(str(error)) from None
        megatron = megatron_flag_dests()
        if megatron is not None:
            known = megatron | grpo_flag_dests() | rollout_flag_dests()
            unknown = sorted(key.replace("-", "_") for key in values if key.replace("-", "_") not in known)
            if unknown:
                raise UsageError(unknown_key_message(cli.config, unknown, sorted(known)))
    merged = {key.replace("-", "_"): value for key, value in values.items()}
    merged.update({key: value for key, value in vars(cli).items() if value is not None})
    _check_paths(merged)
    _check_world_size(merged, environ)


def _check_paths(values: dict) -> None:
    checkpoint = values.get("hf_checkpoint")
    if checkpoint:
        if not os.path.isdir(checkpoint):
            raise UsageError(f"--hf-checkpoint {checkpoint}: no such directory")
        if not os.path.isfile(os.path.join(checkpoint, "config.json")):
            raise UsageError(f"--hf-checkpoint {checkpoint}: no config.json there (a Hugging Face checkpoint "
                             f"directory holds config.json, the tokenizer and *.safetensors)")
    config = values.get("hf_config")
    if config and not os.path.exists(config):
        raise UsageError(f"--hf-config {config}: no such file or directory")
    if config and os.path.isdir(config) and not os.path.isfile(os.path.join(config, "config.json")):
        raise UsageError(f"--hf-config {config}: no config.json in this directory")
    for key in ("prompt_data", "tokenizer_dir"):
        path = values.get(key)
        if path and not os.path.exists(path):
            raise UsageError(f"--{key.replace('_', '-')} {path}: no such file or directory")
    load = values.get("load")
    if load and not os.path.isdir(load):
        raise UsageError(f"--load {load}: no such directory")


def _size(values: dict, key: str, default: int) -> int:
    value = values.get(key)
    if value is None:
        return default
    try:
        size = int(str(value))
    except ValueError:
        raise UsageError(f"--{key.replace('_', '-')} {value!r}: not an integer") from None
    if size < 1:
        raise UsageError(f"--{key.replace('_', '-')} {size}: must be at least 1")
    return size


def _check_world_size(values: dict, environ) -> None:
    tp = _size(values, "tensor_model_parallel_size", 1)
    pp = _size(values, "pipeline_model_parallel_size", 1)
    cp = _size(values, "context_parallel_size", 1)
    ep = _size(values, "expert_model_parallel_size", 1)
    etp = _size(values, "expert_tensor_parallel_size", tp)
    need = math.lcm(tp * pp * cp, etp * ep * pp)  # the smallest world megatron's groups fit into
    world = int(environ.get("WORLD_SIZE", "1"))
    if world % need == 0:
        return
    layout = (f"tensor x pipeline x context parallel = {tp} x {pp} x {cp}"
              + (f", expert tensor x expert x pipeline parallel = {etp} x {ep} x {pp}" if ep > 1 else ""))
    if "RANK" not in environ:
        raise UsageError(f"{layout} needs {need} processes (or a multiple): use torchrun --nproc-per-node {need} "
                         f"pretrain_grpo.py ...")
    raise UsageError(f"{layout} needs a multiple of {need} processes, but torchrun started {world}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-megatron-flags"]:
        write_megatron_flags()
        print(f"wrote {FLAGS_FILE}")
    else:
        sys.exit("usage: python -m megatron_r3.train.preflight --write-megatron-flags")
