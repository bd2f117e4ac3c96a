"""Workers end with their launcher: a torchrun worker whose parent (the torchrun agent) dies must not live on.

kill -9 of torchrun otherwise leaves every worker running (reparented to init): holding GPU memory, or training to
completion unseen. On Linux the kernel delivers SIGTERM to the worker when its parent dies (`prctl(PR_SET_PDEATHSIG)`);
elsewhere a daemon thread polls the parent pid. Only processes started by torchrun (TORCHELASTIC_RUN_ID set) do this:
a plain `nohup python pretrain_grpo.py &` must survive the shell that started it.

Light on purpose (no torch import): `pretrain_grpo.py` calls it before the heavy imports.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from megatron_r3.platform.logging import get_logger

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
log = get_logger(__name__)


def exit_with_parent(environ=os.environ, poll_s: float = 1.0) -> str:
    """Arrange for this process to end when its parent does; returns how ("prctl", "watchdog" or "" when not
    under torchrun)."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return ""
    parent = os.getppid()
    how = _prctl_pdeathsig() and "prctl"
    if not how:
        threading.Thread(target=_watch_parent, args=(parent, poll_s), daemon=True, name="exit-with-parent").start()
        how = "watchdog"
    if os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    return how


def _prctl_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    log.warning(f"the launcher (pid {parent}) died; exiting", all_ranks=True)
    os._exit(1)
