"""The suite's process hygiene (tests/_processes.py, tests/conftest.py): nothing a test starts outlives it.

A child that spawns grandchildren (one in its process group, one in a session of its own, as
``selma demo`` starts its services) is interrupted the way pytest-timeout interrupts a test, and
the whole tree must be gone; a deliberately leaked sleeper must fail the run at its end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _processes
import pytest

TESTS = Path(__file__).resolve().parents[1]

# A child that starts two grandchildren (one in its own group, one in a new session), writes
# "<child> <grandchild> <grandchild-in-new-session>" to argv[1] and sleeps.
FAMILY = textwrap.dedent(
    """
    import os, subprocess, sys, time
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    same_group = subprocess.Popen(sleep)
    own_session = subprocess.Popen(sleep, start_new_session=True)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {same_group.pid} {own_session.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _pids(path: Path, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the child never reported its family"
        time.sleep(0.05)
    return [int(p) for p in path.read_text().split()]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


class _Timeout(Exception):
    pass


def test_an_interrupted_run_stops_the_child_its_group_and_its_grandchildren(tmp_path):
    """pytest-timeout (signal method) raises inside the test, in the middle of the call: the finaliser stops the tree."""
    pid_file = tmp_path / "family"
    pids: list[int] = []

    def on_alarm(*_):
        nonlocal pids
        pids = _pids(pid_file)
        raise _Timeout("Timeout >1s")  # what pytest-timeout's SIGALRM handler does (pytest.fail)

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        with pytest.raises(_Timeout):
            _processes.run([sys.executable, "-c", FAMILY, str(pid_file)], timeout=300, grace=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    try:
        assert len(pids) == 3
        deadline = time.monotonic() + 10
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in pids if _alive(p)] == [], "the child's tree outlived the interrupted test"
    finally:
        _kill(pids)


def test_a_run_past_its_own_timeout_stops_the_whole_tree(tmp_path):
    pid_file = tmp_path / "family"
    with pytest.raises(subprocess.TimeoutExpired):
        _processes.run([sys.executable, "-c", FAMILY, str(pid_file)], timeout=3, grace=2)
    pids = _pids(pid_file, timeout=0)
    try:
        assert [p for p in pids if _alive(p)] == []
    finally:
        _kill(pids)


def test_a_real_pytest_timeout_leaves_no_process_behind(tmp_path):
    """An inner pytest session whose test pytest-timeout kills while `_processes.run` waits on the family."""
    pid_file = tmp_path / "family"
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import _processes, pytest

        @pytest.mark.timeout(3)
        def test_hangs():
            _processes.run([sys.executable, "-c", {FAMILY!r}, {str(pid_file)!r}], timeout=300, grace=2)
        """
    ))
    proc = _processes.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    pids = _pids(pid_file, timeout=0)
    try:
        assert proc.returncode == 1 and "Timeout" in proc.stdout, proc.stdout + proc.stderr
        assert [p for p in pids if _alive(p)] == [], "pytest-timeout left the child's tree running"
    finally:
        _kill(pids)


def test_the_end_of_run_check_reports_and_kills_a_leaked_process():
    sleeper = _processes.popen([sys.executable, "-c", "import time; time.sleep(600)"], what="deliberately leaked sleeper")
    try:
        mine = [t for t in _processes.leaked() if t.pid == sleeper.pid]
        assert mine
        # only this test's process: the session's servers (e.g. the S3 server) are tracked too and must live on
        lines = _processes.leak_report(only=mine)
        assert any(line.startswith(f"pid {sleeper.pid}:") and "deliberately leaked sleeper" in line for line in lines), lines
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert sleeper.pid not in [t.pid for t in _processes.leaked()]
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_the_suite_fails_when_a_test_leaks_a_process(tmp_path):
    """tests/conftest.py's pytest_sessionfinish, loaded as a plugin by an inner session: exit code 1, the leak named and killed."""
    pid_file = tmp_path / "sleeper"
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(
        f"""
        import sys
        import _processes

        def test_leaks():
            p = _processes.popen([sys.executable, "-c", "import time; time.sleep(600)"], what="leaky sleeper")
            open({str(pid_file)!r}, "w").write(str(p.pid))
        """
    ))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)}
    proc = _processes.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_leaky.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    (pid,) = _pids(pid_file, timeout=0)
    try:
        assert "1 passed" in proc.stdout, proc.stdout + proc.stderr
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "still running at the end" in proc.stdout and f"pid {pid}: leaky sleeper" in proc.stdout, proc.stdout
        assert not _alive(pid)
    finally:
        _kill([pid])
