"""Worker processes that end with the process that started them, however it ends (kill -9 included).

Kept free of heavy imports: a spawned worker arms its lifeline before it imports torch and the model, so a
coordinator killed while its workers are still starting leaves nothing running.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import threading
import time
from typing import Any


def die_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Make this (worker) process end when ``parent_pid`` ends.

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``). Everywhere: a
    daemon thread checks every ``poll_s`` seconds that the parent is still ours, and exits if not, so no
    worker writes outputs after its coordinator (and the run lock it held) is gone.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="pdseg-parent-watchdog", daemon=True).start()


def run_as_child(parent_pid: int, target: str, *args: Any) -> Any:
    """A process target: arm :func:`die_with_parent`, then import ``"module:function"`` and call it."""
    die_with_parent(parent_pid)
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args)
