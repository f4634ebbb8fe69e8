"""The gRPC bootstrap, checked from independent clients: grpcurl, the Python health stub, HTTP /metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import _processes
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from selma import errors
from selma.config import SelmaSettings
from selma.server import SelmaServer, ServiceRegistration, wait_for_serving

pytestmark = pytest.mark.integration

TEST_SERVICE = "selma.testing.ErrorService"
GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")

# Each domain error and the status code a client must see.
DOMAIN_ERRORS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Aborted: grpc.StatusCode.ABORTED,
}
_BY_NAME = {cls.__name__: cls for cls in DOMAIN_ERRORS}


def _raise(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Test behaviour: the request names what to do."""
    what = request.decode()
    if what in _BY_NAME:
        raise _BY_NAME[what](f"{what} happened; change the request", field="thing")
    if what == "boom":
        raise RuntimeError("secret internal detail")
    if what.startswith("sleep:"):
        time.sleep(float(what.split(":")[1]))
        return b"slept"
    if what == "abort":
        context.abort(grpc.StatusCode.OUT_OF_RANGE, "servicer aborted itself")
    return b"ok:" + request


def _stream(request: bytes, context: grpc.ServicerContext):
    n = int(request.decode())
    for i in range(n):
        yield str(i).encode()
    raise errors.NotFound("stream ran out of things")


def _registration() -> ServiceRegistration:
    handler = grpc.method_handlers_generic_handler(
        TEST_SERVICE,
        {
            "Raise": grpc.unary_unary_rpc_method_handler(_raise),
            "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        },
    )
    return ServiceRegistration(name=TEST_SERVICE, handlers=(handler,))


@pytest.fixture()
def server():
    settings = SelmaSettings(host="127.0.0.1", grpc_port=0, metrics_port=0, max_message_bytes=4 * 1024 * 1024)
    srv = SelmaServer(settings, [_registration()], name="testsvc").start()
    yield srv
    srv.stop(grace=0)


def _call(address: str, payload: bytes, timeout: float = 10) -> bytes:
    with grpc.insecure_channel(address) as ch:
        return ch.unary_unary(f"/{TEST_SERVICE}/Raise")(payload, timeout=timeout)


def _grpcurl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_health_is_not_serving_until_ready_then_serving_via_grpcurl(server):
    r = _grpcurl(server.address, "grpc.health.v1.Health/Check")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "NOT_SERVING"
    server.set_ready(True)
    for svc in ("", TEST_SERVICE):
        r = _grpcurl("-d", json.dumps({"service": svc}), server.address, "grpc.health.v1.Health/Check")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "SERVING"
    wait_for_serving(server.address, TEST_SERVICE, timeout=5)


def test_reflection_lists_services_to_grpcurl(server):
    r = _grpcurl(server.address, "list")
    assert r.returncode == 0, r.stderr
    listed = set(r.stdout.split())
    assert {TEST_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed
    r = _grpcurl(server.address, "describe", "grpc.health.v1.Health")
    assert r.returncode == 0 and "rpc Check" in r.stdout


@pytest.mark.parametrize("cls", list(DOMAIN_ERRORS), ids=lambda c: c.__name__)
def test_domain_error_maps_to_status_code_with_message(server, cls):
    with pytest.raises(grpc.RpcError) as ei:
        _call(server.address, cls.__name__.encode())
    assert ei.value.code() == DOMAIN_ERRORS[cls]
    assert ei.value.details() == f"thing: {cls.__name__} happened; change the request"


def test_unexpected_exception_is_internal_and_hides_details(server, caplog):
    with caplog.at_level("ERROR", logger="selma.server"):
        with pytest.raises(grpc.RpcError) as ei:
            _call(server.address, b"boom")
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in ei.value.details()
    assert "ref " in ei.value.details()
    ref = ei.value.details().split("ref ")[1].split(")")[0]
    # The traceback stays server-side, findable by the reference the client got.
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)


def test_servicer_abort_keeps_its_own_code(server):
    with pytest.raises(grpc.RpcError) as ei:
        _call(server.address, b"abort")
    assert ei.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert ei.value.details() == "servicer aborted itself"


def test_streaming_error_after_messages_maps_code(server):
    with grpc.insecure_channel(server.address) as ch:
        it = ch.unary_stream(f"/{TEST_SERVICE}/Stream")(b"3", timeout=10)
        got = []
        with pytest.raises(grpc.RpcError) as ei:
            for msg in it:
                got.append(msg)
    assert got == [b"0", b"1", b"2"]
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_rpc_metrics_exposed_by_service_method_and_code(server):
    before = _metrics(server.metrics_url)
    key_nf = (
        "selma_grpc_server_handled_total",
        tuple(sorted({"grpc_service": TEST_SERVICE, "grpc_method": "Raise", "grpc_type": "unary", "grpc_code": "NOT_FOUND"}.items())),
    )
    key_ok = (key_nf[0], tuple(sorted({**dict(key_nf[1]), "grpc_code": "OK"}.items())))
    for _ in range(2):
        with pytest.raises(grpc.RpcError):
            _call(server.address, b"NotFound")
    assert _call(server.address, b"hi") == b"ok:hi"
    after = _metrics(server.metrics_url)
    assert after[key_nf] - before.get(key_nf, 0) == 2
    assert after[key_ok] - before.get(key_ok, 0) == 1
    lat = ("selma_grpc_server_handling_seconds_count", tuple(sorted({"grpc_service": TEST_SERVICE, "grpc_method": "Raise", "grpc_type": "unary"}.items())))
    assert after[lat] - before.get(lat, 0) == 3
    assert after[("selma_grpc_server_in_flight_requests", (("grpc_service", TEST_SERVICE),))] == 0


def test_oversized_message_is_refused(server):
    with pytest.raises(grpc.RpcError) as ei:
        _call(server.address, b"x" * (5 * 1024 * 1024))
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_stop_drains_in_flight_rpc_and_refuses_new_ones(server):
    server.set_ready(True)
    result: dict[str, object] = {}

    def slow() -> None:
        result["slow"] = _call(server.address, b"sleep:1.0")

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)  # let the slow RPC reach the servicer
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 5})
    stopper.start()
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as ei:
        _call(server.address, b"late", timeout=2)
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
    t.join(10)
    stopper.join(10)
    assert result["slow"] == b"slept"
    assert server.wait(0)


def test_sigterm_drains_and_exits_cleanly(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, grpc
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]  # the test module, tests/_processes.py
        from test_grpc_server import _registration
        from selma.config import SelmaSettings
        from selma.server import serve
        def on_start(srv):
            print(srv.address, srv.metrics_url, flush=True)
        serve(SelmaSettings(host="127.0.0.1", drain_seconds=5), [_registration()], name="sig", on_start=on_start)
        print("exited", flush=True)
        """
    )
    proc = _processes.popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        address, metrics_url = proc.stdout.readline().split()
        wait_for_serving(address, TEST_SERVICE, timeout=20)
        assert b"selma_service_ready" in urllib.request.urlopen(metrics_url, timeout=5).read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout.read().strip() == "exited"
    finally:
        _processes.stop_tree(proc, first=signal.SIGKILL)
