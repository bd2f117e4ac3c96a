"""Rank-aware console messages: what megatron_r3 tells the user, said once (rank 0) unless asked of every rank.

`get_logger(__name__)` returns a `RankLogger`. `info` prints on rank 0's console (stdout) and, on every rank that
speaks, goes to the stdlib logger of that name as well, so `train/launch.RunLog` writes it into the rank's log file.
`all_ranks=True` lets every rank speak, prefixed with `[rank R]`. `debug` reaches the console only under --verbose
(`set_verbose`). Warnings go through the stdlib logger (the run's console handler shows megatron_r3's warnings).

The rank is torch.distributed's when a process group exists, else torchrun's RANK (0 outside torchrun); this module
imports no torch.
"""

from __future__ import annotations

import logging
import os
import sys

CONSOLE_ATTRIBUTE = "megatron_r3_console"
"""Set on records already printed to the console, so a console log handler does not print them twice."""

_ROOT = "megatron_r3"


def rank() -> int:
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def set_verbose(verbose: bool) -> None:
    """--verbose: `debug` messages reach the console too."""
    logging.getLogger(_ROOT).setLevel(logging.DEBUG if verbose else logging.NOTSET)


def is_verbose() -> bool:
    return logging.getLogger(_ROOT).level == logging.DEBUG


class RankLogger:
    def __init__(self, name: str):
        self.name = name
        self._logger = logging.getLogger(name)

    def info(self, message: str, *, all_ranks: bool = False) -> None:
        """A console line (stdout) from rank 0, or from every rank with `all_ranks`."""
        self._say(logging.INFO, message, all_ranks)

    def debug(self, message: str, *, all_ranks: bool = False) -> None:
        """Like `info`, on the console under --verbose only (always in the log file)."""
        self._say(logging.DEBUG, message, all_ranks)

    def warning(self, message: str, *, all_ranks: bool = False) -> None:
        """A warning from rank 0 (or every rank) through the stdlib logger: the run's console and log file."""
        me = rank()
        if all_ranks or me == 0:
            self._logger.warning(f"[rank {me}] {message}" if all_ranks else message)

    def _say(self, level: int, message: str, all_ranks: bool) -> None:
        me = rank()
        if not all_ranks and me != 0:
            return
        text = f"[rank {me}] {message}" if all_ranks else message
        if level >= logging.INFO or is_verbose():
            print(text, file=sys.stdout, flush=True)
        self._logger.log(max(level, logging.INFO), text, extra={CONSOLE_ATTRIBUTE: True})


def get_logger(name: str) -> RankLogger:
    return RankLogger(name)
