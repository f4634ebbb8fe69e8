"""`selma up` supervises: a killed service comes back SERVING on its own port while the others keep
running, and a service that keeps failing stops the stack with an error naming it and its log.

Real service processes (`selma serve NAME`, the cheapest ones: training, render), killed by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import _processes
import pytest

from selma.app.local_stack import LocalStack, RestartPolicy
from selma.client import SERVICE_NAMES
from selma.errors import FailedPrecondition
from selma.server import wait_for_serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

START_TIMEOUT = 300.0  # generous: two cores shared with the rest of the suite


class Supervising:
    """A started stack with its supervisor on a thread; remembers what the supervisor raised."""

    def __init__(self, stack: LocalStack, policy: RestartPolicy) -> None:
        self.stack = stack
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(policy,), name="supervisor", daemon=True)

    def _run(self, policy: RestartPolicy) -> None:
        try:
            self.stack.supervise(self.stop, policy, tick=0.1)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            self.error = e

    def track(self) -> None:
        for sp in self.stack.processes.values():
            _processes.track(sp.proc.pid, f"selma serve {sp.name}")


@pytest.fixture
def supervised(tmp_path) -> Iterator[Callable[..., Supervising]]:
    made: list[Supervising] = []

    def make(services: tuple[str, ...], policy: RestartPolicy) -> Supervising:
        stack = LocalStack(tmp_path / ".selma", services=services)
        s = Supervising(stack, policy)
        made.append(s)
        stack.start(timeout=START_TIMEOUT)
        s.track()
        s.thread.start()
        return s

    yield make
    for s in made:
        s.stop.set()
        s.thread.join(60)
        s.stack.stop(grace=10)


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def test_a_killed_service_comes_back_serving_on_its_port_and_the_others_keep_running(supervised):
    s = supervised(("training", "render"), RestartPolicy(initial_backoff=0.2, start_timeout=START_TIMEOUT))
    stack = s.stack
    endpoints_before = (stack.data_dir / "endpoints.json").read_text()
    victim = stack.processes["training"]
    other_pid = stack.processes["render"].proc.pid

    os.kill(victim.proc.pid, signal.SIGKILL)
    _wait(lambda: stack.processes["training"].proc.pid != victim.proc.pid, 60, "the supervisor to start training again")
    s.track()
    back = stack.processes["training"]
    assert (back.grpc_port, back.metrics_port) == (victim.grpc_port, victim.metrics_port)
    wait_for_serving(back.address, SERVICE_NAMES["training"], timeout=START_TIMEOUT)

    assert s.error is None and s.thread.is_alive()
    assert stack.processes["render"].proc.pid == other_pid and stack.processes["render"].proc.poll() is None
    assert (stack.data_dir / "endpoints.json").read_text() == endpoints_before  # still valid: same ports
    assert json.loads(endpoints_before)["training"] == back.address


def test_a_service_that_keeps_failing_stops_the_stack_naming_it_and_its_log(supervised):
    s = supervised(("training",), RestartPolicy(max_failures=3, initial_backoff=0.2, start_timeout=START_TIMEOUT))
    stack = s.stack
    victim = stack.processes["training"]
    blocker = socket.socket()  # holds the service's port, so every restart fails at start-up
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        os.kill(victim.proc.pid, signal.SIGKILL)

        def take_port() -> bool:
            try:
                blocker.bind(("127.0.0.1", victim.grpc_port))
            except OSError:
                return False
            blocker.listen()
            return True

        _wait(take_port, 60, f"port {victim.grpc_port} to be free")
        s.thread.join(START_TIMEOUT * 3)
        assert not s.thread.is_alive(), "the supervisor kept restarting a service that cannot start"
    finally:
        blocker.close()
    assert isinstance(s.error, FailedPrecondition)
    message = str(s.error)
    assert "the training service failed 3 times" in message and "bind to address" in message  # its log's last lines say why
    assert all(sp.proc.poll() is not None for sp in stack.processes.values())  # everything stopped
    assert not (stack.data_dir / "endpoints.json").exists()
