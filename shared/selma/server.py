"""The gRPC server bootstrap every selma service uses.

One call builds a server with:
- the standard ``grpc.health.v1`` health service, NOT_SERVING until the service says it is
  ready (e.g. its model is loaded) and again while draining;
- server reflection (grpcurl and friends can list and describe the API);
- transport security (:mod:`selma.security`): TLS or mutual TLS from certificate files that are
  re-read when they change; a plaintext port only on a loopback address unless ``allow_plaintext``;
- when auth is configured, :class:`selma.auth.AuthInterceptor`: bearer tokens and per-RPC scopes;
- one interceptor that refuses requests the wire allows but the API does not (an unknown enum
  number, an out-of-range Duration/Timestamp: :func:`selma.api.check_request`, INVALID_ARGUMENT
  naming the field), maps :mod:`selma.errors` to gRPC status codes, turns anything
  unexpected into INTERNAL (logged with its traceback here, never sent to the client) and
  records RPC metrics (count, latency, in-flight) by service, method and code;
- Prometheus ``/metrics`` on its own HTTP port;
- message-size limits sized for PNG batches (answers) and requests, a bound on concurrent RPCs
  (beyond it gRPC answers RESOURCE_EXHAUSTED), and every request checked against the
  ``SELMA_MAX_*`` limits (:mod:`selma.limits`) before its servicer runs;
- graceful drain on SIGTERM/SIGINT: health goes NOT_SERVING, new RPCs are refused and
  in-flight ones get ``drain_seconds`` to finish.

Servicers stay glue: they convert protobuf to domain types, call core logic and convert back.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from selma import auth, security
from selma.api import check_request
from selma.config import SelmaSettings
from selma.errors import SelmaError
from selma.limits import Limits, RequestLimitsInterceptor
from selma.metrics import RPC_HANDLED, RPC_IN_FLIGHT, RPC_SECONDS, RPC_STARTED, SERVICE_READY, MetricsServer
from selma.security import ClientSecurity, make_channel

log = logging.getLogger(__name__)

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = reflection.SERVICE_NAME


@dataclass(frozen=True)
class ServiceRegistration:
    """A servicer and how to add it: ``add_fn`` is the generated ``add_XxxServicer_to_server``.

    ``name`` is the fully-qualified service name (``selma.v1.PromptService``), used for health
    status and reflection.  ``handlers`` may replace ``servicer``/``add_fn`` with generic handlers.
    """

    name: str
    servicer: Any = None
    add_fn: Callable[[Any, grpc.Server], None] | None = None
    handlers: Sequence[grpc.GenericRpcHandler] = field(default_factory=tuple)


def _status_code(err: SelmaError) -> grpc.StatusCode:
    return grpc.StatusCode[err.code.value]


def _split_method(full_method: str) -> tuple[str, str]:
    # "/selma.v1.PromptService/GetPromptGeneration" -> ("selma.v1.PromptService", "GetPromptGeneration")
    _, service, method = full_method.split("/", 2) if full_method.count("/") >= 2 else ("", "unknown", full_method)
    return service, method


class ErrorAndMetricsInterceptor(grpc.ServerInterceptor):
    """Maps domain errors to status codes and records RPC metrics for every handler."""

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001 (grpc API)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, service, method, "unary"))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, service, method, "server_stream"))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, service, method, "client_stream"))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, service, method, "bidi_stream"))
        return handler

    def _wrap_unary(self, fn, service: str, method: str, kind: str):  # noqa: ANN001
        def wrapper(request, context):  # noqa: ANN001
            rec = _Recorder(service, method, kind)
            try:
                response = fn(request, context)
            except Exception as e:  # noqa: BLE001 - every failure must be mapped and counted
                _fail(e, context, rec)
            rec.finish(_context_code(context) or grpc.StatusCode.OK)
            return response

        return wrapper

    def _wrap_stream(self, fn, service: str, method: str, kind: str):  # noqa: ANN001
        def wrapper(request, context):  # noqa: ANN001
            rec = _Recorder(service, method, kind)
            try:
                yield from fn(request, context)
            except GeneratorExit:
                # The client went away or cancelled; gRPC closed the generator.
                rec.finish(grpc.StatusCode.CANCELLED)
                raise
            except Exception as e:  # noqa: BLE001
                _fail(e, context, rec)
            rec.finish(_context_code(context) or grpc.StatusCode.OK)

        return wrapper


def _check(request: Any) -> None:
    """Every request message through :func:`selma.api.check_request` before its handler sees it
    (client-streaming requests, an iterator, are checked by their handler)."""
    if isinstance(request, Message):
        check_request(request)


class RequestCheckInterceptor(grpc.ServerInterceptor):
    """Refuses what the wire allows but the API does not (:func:`_check`), innermost: after
    authentication, so an anonymous caller learns nothing about a request's validity; its errors
    reach the client through :class:`ErrorAndMetricsInterceptor`."""

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001 (grpc API)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            fn = handler.unary_unary

            def unary(request, context):  # noqa: ANN001
                _check(request)
                return fn(request, context)

            return handler._replace(unary_unary=unary)
        if handler.unary_stream:
            sfn = handler.unary_stream

            def stream(request, context):  # noqa: ANN001
                _check(request)
                yield from sfn(request, context)

            return handler._replace(unary_stream=stream)
        return handler


class _Recorder:
    """Counts one RPC: started, in flight, then handled with its code and latency."""

    def __init__(self, service: str, method: str, kind: str) -> None:
        self.labels = (service, method, kind)
        self.service = service
        self.t0 = time.perf_counter()
        self.done = False
        RPC_STARTED.labels(*self.labels).inc()
        RPC_IN_FLIGHT.labels(service).inc()

    def finish(self, code: grpc.StatusCode) -> None:
        if self.done:
            return
        self.done = True
        RPC_IN_FLIGHT.labels(self.service).dec()
        RPC_SECONDS.labels(*self.labels).observe(time.perf_counter() - self.t0)
        RPC_HANDLED.labels(*self.labels, code.name).inc()


def _context_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else None


# A status message travels as a header (grpc-message, percent-encoded: up to 3 bytes per UTF-8 byte);
# a client drops a response whose headers pass 16 KiB (8 KiB soft limit), and then sees only
# "received metadata size exceeds hard limit", not the error.  A message quoting a huge request
# value (an id of MBs) is cut to this many UTF-8 bytes, so that the client gets the error.
MAX_STATUS_DETAILS_BYTES = 2048


def bounded_details(details: str, limit: int = MAX_STATUS_DETAILS_BYTES) -> str:
    """``details`` cut to ``limit`` UTF-8 bytes (on a character boundary), saying how much was cut."""
    data = details.encode("utf-8")
    if len(data) <= limit:
        return details
    head = data[: limit - 64].decode("utf-8", errors="ignore")
    return f"{head}... ({len(details) - len(head)} more characters)"


def _fail(e: Exception, context: grpc.ServicerContext, rec: _Recorder) -> None:
    """End the RPC for exception ``e``: a domain error gets its status and message, anything
    else INTERNAL with a reference to the server log.  Always raises (``context.abort`` does).
    """
    already = _context_code(context)
    if already is not None and already != grpc.StatusCode.OK:
        rec.finish(already)  # the servicer called context.abort() itself
        raise e
    service, method, _ = rec.labels
    if isinstance(e, SelmaError):
        code, details = _status_code(e), bounded_details(str(e))
        if getattr(e, "trailers", ()):
            context.set_trailing_metadata(e.trailers)
        log.info("%s/%s -> %s: %s", service, method, code.name, details)
    else:
        ref = uuid.uuid4().hex[:12]
        log.error("%s/%s failed unexpectedly (ref %s)", service, method, ref, exc_info=e)
        code, details = grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details"
    rec.finish(code)
    context.abort(code, details)


class SelmaServer:
    """A started gRPC server plus its health, reflection and metrics endpoints."""

    def __init__(self, settings: SelmaSettings, services: Iterable[ServiceRegistration], *, name: str) -> None:
        self.settings = settings
        self.name = name
        self.services = list(services)
        security.check_transport(settings)
        credentials = security.server_credentials(settings)
        options = [
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_receive_message_length", min(settings.max_receive_message_bytes, settings.max_message_bytes)),
            ("grpc.so_reuseport", 0),
        ]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix=f"{name}-rpc"),
            # auth runs inside the error/metrics interceptor (its refusals are mapped and counted), and the
            # request checks (limits, then the API's value rules) run after auth: an anonymous caller learns nothing
            interceptors=[ErrorAndMetricsInterceptor(), *auth.interceptors(settings), RequestLimitsInterceptor(Limits.from_settings(settings)),
                          RequestCheckInterceptor()],
            options=options,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        for svc in self.services:
            if svc.add_fn is not None:
                svc.add_fn(svc.servicer, self._server)
            if svc.handlers:
                self._server.add_generic_rpc_handlers(tuple(svc.handlers))
        reflection.enable_server_reflection(
            [svc.name for svc in self.services] + [HEALTH_SERVICE, REFLECTION_SERVICE], self._server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        bind = f"{settings.host}:{settings.grpc_port}"
        self.tls = credentials is not None
        self.grpc_port = self._server.add_secure_port(bind, credentials) if credentials else self._server.add_insecure_port(bind)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind gRPC port {settings.host}:{settings.grpc_port}; is it in use?")
        self.metrics: MetricsServer | None = None
        self._stopped = threading.Event()
        self._ready = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> SelmaServer:
        self.metrics = MetricsServer(self.settings.host, self.settings.metrics_port)
        self._server.start()
        log.info("%s: gRPC on %s (%s%s), metrics on %s", self.name, self.address,
                 "mutual TLS" if self.settings.tls_client_ca_file else "TLS" if self.tls else "plaintext",
                 ", auth on" if self.settings.auth_enabled else "", self.metrics.url)
        return self

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return self.metrics.url if self.metrics else ""

    @property
    def ready(self) -> bool:
        return self._ready

    def set_ready(self, ready: bool = True) -> None:
        """Report SERVING (ready) or NOT_SERVING on the health service, overall and per service."""
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        self._set_health(status)
        SERVICE_READY.labels(self.name).set(1 if ready else 0)

    def _set_health(self, status: int) -> None:
        self._health.set("", status)
        for svc in self.services:
            self._health.set(svc.name, status)

    def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, give in-flight ones ``grace`` seconds, then stop."""
        if self._stopped.is_set():
            return
        grace = self.settings.drain_seconds if grace is None else grace
        log.info("%s: draining (grace %.1f s)", self.name, grace)
        self.set_ready(False)
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        if self.metrics:
            self.metrics.stop()
        self._stopped.set()
        log.info("%s: stopped", self.name)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped; returns True if it stopped within ``timeout``."""
        return self._stopped.wait(timeout)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT start a graceful drain (from the main thread only)."""

        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("%s: received %s", self.name, signal.Signals(signum).name)
            threading.Thread(target=self.stop, name=f"{self.name}-drain", daemon=True).start()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def serve(
    settings: SelmaSettings,
    services: Iterable[ServiceRegistration],
    *,
    name: str,
    on_start: Callable[[SelmaServer], None] | None = None,
) -> None:
    """Run a service until SIGTERM: start, run ``on_start`` (load models...), go SERVING, drain on exit.

    ``on_start`` runs after the ports are open so liveness probes pass while a model loads;
    readiness (health SERVING) only follows once it returns.
    """
    server = SelmaServer(settings, services, name=name).start()
    server.install_signal_handlers()
    if on_start is not None:
        on_start(server)
    server.set_ready(True)
    server.wait()


@dataclass
class Hosted:
    """One service as a process hosts it: its registration, what to do once the ports are open
    (recover jobs, load models) and on the way out.  A process may host several (``selma serve``)."""

    registration: ServiceRegistration
    on_start: Callable[[], Any] = lambda: None
    on_stop: Callable[[], Any] = lambda: None
    core: Any = None

    def start_server(self, settings: SelmaSettings, *, name: str) -> SelmaServer:
        """This service alone on a started, ready server (tests, benchmarks); ``server.core`` is its core."""
        server = start_hosted(settings, [self], name=name)
        server.core = self.core  # type: ignore[attr-defined]
        return server


def start_hosted(settings: SelmaSettings, hosted: Sequence[Hosted], *, name: str) -> SelmaServer:
    """The hosted services on one started, ready server, not blocking (tests, benchmarks).

    The caller stops the server and then each ``hosted[i].on_stop()``.
    """
    server = SelmaServer(settings, [h.registration for h in hosted], name=name).start()
    for h in hosted:
        h.on_start()
    server.set_ready(True)
    return server


def serve_hosted(settings: SelmaSettings, hosted: Sequence[Hosted], *, name: str) -> None:
    """Run the hosted services in one server until SIGTERM (see :func:`serve`), then stop each."""
    try:
        serve(settings, [h.registration for h in hosted], name=name, on_start=lambda _server: [h.on_start() for h in hosted])
    finally:
        for h in reversed(hosted):
            h.on_stop()


def wait_for_serving(address: str, service: str = "", timeout: float = 30.0, *, security: ClientSecurity | None = None) -> None:
    """Block until ``address`` answers SERVING for ``service`` on the health service (client helper).

    ``security``: how to reach it (TLS, token); None = from ``SELMA_TOKEN``/``SELMA_TLS_*``.
    """
    deadline = time.monotonic() + timeout
    with make_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        last: str = "no answer"
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            # Watch would avoid polling, but it needs the server up first; a short backoff is bounded.
            time.sleep(0.1)
    raise TimeoutError(f"{address} did not report SERVING for {service!r} within {timeout:.0f} s (last: {last})")


def stream_chunks(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    """Split bytes into chunks under the message limit (for streamed downloads)."""
    for i in range(0, len(data), chunk_bytes):
        yield data[i : i + chunk_bytes]
