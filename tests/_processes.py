"""The processes the test suite starts: started in their own process group, stopped as a tree, checked at the end.

Every helper and fixture that starts a process goes through :func:`popen` / :func:`run` (or calls
:func:`track` on what it started), so:

* each child leads its own process group (``start_new_session=True``): stopping it is
  ``os.killpg(pid, ...)``, which also reaches what it spawned in the same group;
* :func:`stop_tree` snapshots the child's descendants *before* signalling it (a child such as
  ``selma demo`` starts its services in sessions of their own: the group alone misses them),
  asks it to stop (SIGINT: ``selma demo``/``up`` drain their services), and SIGKILLs every group
  and descendant left after a grace period;
* :func:`run` is ``subprocess.run`` with that stop in a ``finally``: a pytest-timeout (which raises
  inside the test), a failure or Ctrl-C stops the whole tree, not just the child;
* :func:`leaked` lists every tracked process still alive; ``pytest_sessionfinish`` in
  tests/conftest.py fails the run on any (and kills them).

Processes are identified by (pid, start time), so a reused PID is never mistaken for ours, and
nothing is ever looked up or killed by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Tracked", "descendants", "kill_all", "leak_report", "leaked", "popen", "run", "stop_tree", "track", "track_tree"]


@dataclass(frozen=True)
class Tracked:
    pid: int
    start: int  # /proc/<pid>/stat start time (clock ticks since boot): tells a reused PID apart
    what: str


_lock = threading.Lock()
_tracked: dict[tuple[int, int], Tracked] = {}


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start time) of ``pid``, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _alive(t: Tracked) -> bool:
    st = _stat(t.pid)
    return st is not None and st[3] == t.start and st[0] not in ("Z", "X")


def track(pid: int, what: str) -> Tracked | None:
    """Record ``pid`` as started by the suite (None if it is already gone)."""
    st = _stat(pid)
    if st is None:
        return None
    t = Tracked(pid, st[3], what)
    with _lock:
        _tracked.setdefault((pid, t.start), t)
    return t


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), whatever its process group or session."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[1], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def track_tree(pid: int, what: str) -> list[Tracked]:
    """Track ``pid``'s current descendants (a child may reparent them to init when it dies)."""
    return [t for d in descendants(pid) if (t := track(d, f"descendant of {what}")) is not None]


def popen(args: Sequence[str], *, what: str = "", **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session (its own process group), tracked until the end of the run."""
    kwargs["start_new_session"] = True
    proc = subprocess.Popen(args, **kwargs)
    track(proc.pid, what or " ".join(map(str, args))[:200])
    return proc


def stop_tree(proc: subprocess.Popen, *, grace: float = 10.0, first: signal.Signals = signal.SIGINT) -> None:
    """Stop ``proc`` (started by :func:`popen`), its process group and every descendant.

    ``first`` goes to the group and the child gets ``grace`` seconds to clean up after itself;
    then every group and descendant still alive is SIGKILLed.  Safe to call twice.
    """
    what = " ".join(map(str, proc.args))[:200] if isinstance(proc.args, list | tuple) else str(proc.args)
    tree = track_tree(proc.pid, what)  # before any signal: the child may orphan them when it dies
    if proc.poll() is None:
        _killpg(proc.pid, first)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    tree += track_tree(proc.pid, what) if proc.poll() is None else []
    _killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader if a member ignores the signal
    kill_all(tree)
    proc.wait()


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all(processes: Sequence[Tracked], timeout: float = 10.0) -> None:
    """SIGKILL each process (and the group it leads) if it is still the one tracked; wait until they are gone."""
    for t in processes:
        if _alive(t):
            st = _stat(t.pid)
            if st is not None and st[2] == t.pid:
                _killpg(t.pid, signal.SIGKILL)
            try:
                os.kill(t.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while any(_alive(t) for t in processes) and time.monotonic() < deadline:
        for t in processes:  # our own children stay zombies until reaped
            try:
                os.waitpid(t.pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.05)


def run(args: Sequence[str], *, timeout: float, what: str = "", grace: float = 10.0, input: str | bytes | None = None,
        capture_output: bool = False, check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose child runs in its own session and whose whole tree is stopped however the call ends.

    ``timeout`` is required and must be below the test's pytest timeout, so the child's own
    limit fires first (a clean failure with its output); if pytest-timeout (or anything else)
    interrupts the call, the ``finally`` still stops the tree.  Descendants are tracked while it
    runs, so services a child leaves behind when it exits are caught by the end-of-run check.
    """
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    proc = popen(args, what=what, **kwargs)
    label = what or " ".join(map(str, args))[:200]
    deadline = time.monotonic() + timeout
    try:
        pending = input
        while True:
            try:
                out, err = proc.communicate(pending, timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
                break
            except subprocess.TimeoutExpired:
                pending = None
                track_tree(proc.pid, label)
                if time.monotonic() >= deadline:
                    stop_tree(proc, grace=grace)
                    out, err = proc.communicate()
                    raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    finally:
        if proc.poll() is None:
            stop_tree(proc, grace=grace)
        else:  # what is left of its group (a PID in use as a group id is never reused: this is still ours)
            _killpg(proc.pid, signal.SIGKILL)
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def leaked() -> list[Tracked]:
    """Tracked processes still alive."""
    with _lock:
        return [t for t in _tracked.values() if _alive(t)]


def leak_report(only: Sequence[Tracked] | None = None) -> list[str]:
    """The tracked processes still alive (of ``only``, if given), as ``pid N: what`` lines; kills them (and the groups they lead).

    Without ``only`` it reaches every tracked process, session fixtures' servers included: the end-of-run
    check calls it after they have shut down; a test in the middle of the run must pass ``only``.
    """
    leaks = [t for t in (only if only is not None else leaked()) if _alive(t)]
    kill_all(leaks)
    return [f"pid {t.pid}: {t.what}" for t in leaks]
