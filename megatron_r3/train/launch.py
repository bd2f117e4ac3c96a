"""The top level of `pretrain_grpo.py`: a quiet console, a log file per rank, and one line per expected error.

- Expected errors (a bad flag, file or value; a tripped gate; a route, rollout or checkpoint problem that megatron_r3
  raises on purpose; any ValueError / OSError) end the run with `error: <one line>` on stderr and exit code 1; the
  full traceback goes to RUN_DIR/logs/rank_N.log. Anything else is a bug: its traceback is printed as usual.
- A rank that fails writes its line into torchrun's rendezvous store; a rank that then dies of a broken collective
  (gloo's "Connection closed by peer" when rank 0 fails alone) prints `error: rank R failed: <its line>` instead.
- Megatron's argument dump, its INFO/WARNING logging and third-party warnings go to the log file, not the console
  (`--verbose` puts them back on the console). megatron_r3's own warnings stay on the console.
"""

from __future__ import annotations

import datetime
import io
import logging
import logging.handlers
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from megatron_r3.platform.logging import CONSOLE_ATTRIBUTE, set_verbose
from megatron_r3.platform.process import exit_with_parent
from megatron_r3.train.preflight import UsageError, preflight

LOG_DIR = "logs"
_STORE_KEY = "megatron_r3/failed"


def is_expected(error: BaseException) -> bool:
    """Errors raised on purpose (with a message meant for the user), as opposed to bugs."""
    if isinstance(error, (ValueError, OSError, UsageError)):
        return True
    return any(cls.__module__.startswith("megatron_r3.") for cls in type(error).__mro__)


def one_line(error: BaseException) -> str:
    """The error's message on one line (expected errors carry messages written for the user; no class name)."""
    return " ".join(str(error).split()) or type(error).__name__


class RunLog:
    """Everything that is not for the console goes here: buffered until the run directory is known, then written
    to RUN_DIR/logs/rank_N.log."""

    def __init__(self, verbose: bool, rank: int):
        self.rank = rank
        self.path: Optional[str] = None
        self.buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 10)
        self.buffer.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        self._saved = (root.level, list(root.handlers))
        root.setLevel(logging.INFO)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(self.buffer)
        set_verbose(verbose)
        console = logging.StreamHandler(sys.stderr)
        console.addFilter(lambda record: not getattr(record, CONSOLE_ATTRIBUTE, False))  # printed by RankLogger
        if not verbose:
            console.addFilter(lambda record: record.name.startswith("megatron_r3") and record.levelno >= logging.WARNING)
        else:
            console.setLevel(logging.INFO)
        root.addHandler(console)
        logging.captureWarnings(True)  # third-party warnings -> the "py.warnings" logger -> the log file

    def attach(self, run_dir: str) -> str:
        os.makedirs(os.path.join(run_dir, LOG_DIR), exist_ok=True)
        self.path = os.path.join(run_dir, LOG_DIR, f"rank_{self.rank}.log")
        handler = logging.FileHandler(self.path)
        handler.setFormatter(self.buffer.formatter)
        self.buffer.setTarget(handler)
        self.buffer.flush()
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        root.addHandler(handler)
        return self.path

    def close(self) -> None:
        """Undo what __init__ and attach did (a process may run several runs, e.g. the fault-matrix driver)."""
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler is not self.buffer:
                handler.close()
        logging.captureWarnings(False)
        set_verbose(False)
        level, handlers = self._saved
        root.setLevel(level)
        for handler in handlers:
            root.addHandler(handler)

    def write(self, text: str) -> None:
        logging.getLogger("megatron_r3.run").info(text)


def _store():
    """torchrun's rendezvous store (it outlives the ranks), or None outside torchrun."""
    if "MASTER_ADDR" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    try:
        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=3))
    except Exception:  # noqa: BLE001 - the store is a courtesy for a better message, never a new failure
        return None


def _key() -> str:
    return f"{_STORE_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"


def report_failure(line: str) -> None:
    store = _store()
    if store is not None:
        try:
            store.compare_set(_key(), "", line)  # the first rank to fail is the one the others name
        except Exception:  # noqa: BLE001
            pass


def peer_failure(own_rank: int) -> Optional[str]:
    store = _store()
    if store is None:
        return None
    try:
        if not store.check([_key()]):
            return None
        line = store.get(_key()).decode()
    except Exception:  # noqa: BLE001
        return None
    return None if line.startswith(f"rank {own_rank}: ") else line


def run_main(main: Callable, argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv, run_log)` under the handler; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    verbose = "--verbose" in argv
    exit_with_parent()
    try:
        preflight(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    run_log = RunLog(verbose, rank)
    try:
        main(argv, run_log)
        return 0
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as error:  # noqa: BLE001 - the one place that decides how a run ends
        text = "".join(traceback.format_exception(error))
        logging.getLogger("megatron_r3.run").info("the run failed:\n%s", text)
        peer = peer_failure(rank)
        same = peer is not None and is_expected(error) and peer.split(": ", 1)[-1] == one_line(error)
        if peer is not None and not same:  # another rank failed first: its error is the cause, ours the effect
            print(f"error: stopped because {peer}", file=sys.stderr, flush=True)
            return 1
        if not is_expected(error):
            report_failure(f"rank {rank}: {type(error).__name__}: {one_line(error)}")
            raise
        line = one_line(error)
        report_failure(f"rank {rank}: {line}")
        where = f" (traceback in {run_log.path})" if run_log.path else ""
        print(f"error: {line}{where}", file=sys.stderr, flush=True)
        if verbose:
            print(text, file=sys.stderr, flush=True)
        return 1
    finally:
        run_log.close()


def capture_stdout(run_log: RunLog, function: Callable, *args, **kwargs):
    """Call `function` with its prints (megatron's argument dump) going to the log file instead of the console."""
    buffer = io.StringIO()
    stdout, sys.stdout = sys.stdout, buffer
    try:
        return function(*args, **kwargs)
    finally:
        sys.stdout = stdout
        if buffer.getvalue():
            run_log.write(buffer.getvalue())
