"""What every batch worker process (``selma train``, ``selma eval execute``) does the same way."""

from __future__ import annotations

import signal
import threading


def exit_with_parent(parent_pid: int, stop: threading.Event) -> None:
    """Local workers: get SIGTERM when the launching service dies (Linux), so no orphan keeps working.

    ``parent_pid`` is the service's pid (``SELMA_BATCH_PARENT_PID``); if the service is already gone
    by the time this is armed, ``stop`` is set at once.
    """
    import ctypes
    import os

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the service died before we armed it
        stop.set()
