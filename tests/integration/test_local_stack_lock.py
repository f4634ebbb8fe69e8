"""One `selma up` per directory: a second is refused naming the PID and endpoints, a stale lock is taken
over, and a stack only ever removes the files it wrote."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from selma.app.local_stack import LocalStack, StackLock
from selma.errors import Aborted

pytestmark = pytest.mark.integration


def test_a_second_stack_on_the_same_directory_is_refused_and_does_not_delete_the_first_ones_files(tmp_path):
    first = LocalStack(tmp_path, services=())
    first.start(timeout=10)
    endpoints_file = tmp_path / "endpoints.json"
    assert endpoints_file.exists()
    second = LocalStack(tmp_path, services=())
    with pytest.raises(Aborted) as e:
        second.start(timeout=10)
    assert f"pid {os.getpid()}" in str(e.value)
    second.stop()  # what a failed `selma up` does on its way out: it must not touch the first stack's files
    assert endpoints_file.exists() and (tmp_path / "up.lock").exists()
    first.stop()
    assert not endpoints_file.exists() and not (tmp_path / "up.lock").exists()


def test_stop_leaves_an_endpoints_file_it_did_not_write(tmp_path):
    stack = LocalStack(tmp_path, services=())
    stack.start(timeout=10)
    (tmp_path / "endpoints.json").write_text(json.dumps({"serving": "10.0.0.1:50051"}))
    stack.stop()
    assert json.loads((tmp_path / "endpoints.json").read_text()) == {"serving": "10.0.0.1:50051"}


def test_a_live_lock_is_refused_naming_pid_and_endpoints_and_a_stale_one_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "up.lock").write_text(json.dumps({"pid": holder.pid, "endpoints": {"serving": "127.0.0.1:4242"}}))
        with pytest.raises(Aborted) as e:
            StackLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(e.value) and "127.0.0.1:4242" in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    lock = StackLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="selma.app.local_stack"):
        lock.acquire()  # the holder is dead now: its lock is stale
    assert "stale" in caplog.text and str(holder.pid) in caplog.text
    assert json.loads((tmp_path / "up.lock").read_text())["pid"] == os.getpid()
    (tmp_path / "up.lock").write_text(json.dumps({"pid": holder.pid}))  # someone else's now
    lock.release()
    assert (tmp_path / "up.lock").exists()


@pytest.mark.slow
def test_a_second_selma_up_exits_2_naming_the_first_and_the_first_keeps_its_endpoints(tmp_path):
    selma_dir = tmp_path / ".selma"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
    env["OMP_NUM_THREADS"] = "1"
    first = subprocess.Popen([sys.executable, "-m", "selma.app.cli", "up", "--dir", str(selma_dir), "--timeout", "600"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and first.poll() is None:
            lock = selma_dir / "up.lock"
            if lock.exists() and json.loads(lock.read_text() or "{}").get("endpoints"):
                break
            time.sleep(1)
        assert first.poll() is None, first.stdout.read() if first.stdout else ""
        endpoints = json.loads((selma_dir / "endpoints.json").read_text())
        second = subprocess.run([sys.executable, "-m", "selma.app.cli", "up", "--dir", str(selma_dir)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and f"pid {first.pid}" in line and endpoints["serving"] in line
        assert "starting" not in second.stdout
        assert json.loads((selma_dir / "endpoints.json").read_text()) == endpoints  # the first stack's file is intact
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    assert not (selma_dir / "endpoints.json").exists() and not (selma_dir / "up.lock").exists()
