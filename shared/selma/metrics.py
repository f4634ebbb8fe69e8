"""Prometheus metrics shared by every service, and the /metrics HTTP endpoint.

Conventions: ``selma_`` prefix, base units (``_seconds``, ``_bytes``), ``_total`` counters,
and bounded label values only (service, method, status code, skill name — never an id or
a prompt).  Metric objects are module-level singletons on the default registry so several
servers in one process (tests, ``selma up``) share them without double registration.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Latency buckets from 1 ms to 10 min: unary RPCs are fast, watch streams and renders are long.
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)

RPC_STARTED = Counter(
    "selma_grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_service", "grpc_method", "grpc_type"],
)
RPC_HANDLED = Counter(
    "selma_grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "selma_grpc_server_handling_seconds",
    "Time from receiving an RPC to its last response, by method.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=RPC_BUCKETS,
)
RPC_IN_FLIGHT = Gauge(
    "selma_grpc_server_in_flight_requests",
    "RPCs being handled right now.",
    ["grpc_service"],
)
AUTH_CALLS = Counter(
    "selma_grpc_server_auth_total",
    "Calls checked by the auth interceptor, by token name (never the token; `anonymous` without a valid one), method and status code.",
    ["token", "grpc_service", "grpc_method", "grpc_code"],
)
SERVICE_READY = Gauge(
    "selma_service_ready",
    "1 once the service reports SERVING on its health check, else 0.",
    ["service"],
)
STARTUP_PHASE_SECONDS = Gauge(
    "selma_startup_phase_seconds",
    "Seconds this process spent in a start-up phase before it could load a model: imports (diffusers, transformers), "
    "model_materialize (mirroring a model into the cache, cumulative; also part of the model load that needed it). "
    "Model loading is each service's *_model_load_seconds, which no longer includes the imports.",
    ["phase"],
)


class MetricsServer:
    """The Prometheus exposition endpoint on ``http://host:port/metrics``; port 0 picks one."""

    def __init__(self, host: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=REGISTRY)
        self.host = host
        self.port: int = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


JOBS_ACTIVE = Gauge(
    "selma_jobs_active",
    "Long-running jobs executing right now, by kind.",
    ["kind"],
)
JOBS_FINISHED = Counter(
    "selma_jobs_finished_total",
    "Jobs that reached a terminal phase, by kind and phase.",
    ["kind", "phase"],
)
JOB_DURATION = Histogram(
    "selma_job_duration_seconds",
    "Wall time of one job attempt, by kind.",
    ["kind"],
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400),
)

STORAGE_ERRORS = Counter(
    "selma_storage_errors_total",
    "Storage operations that failed (after retries), by backend (s3, file) and status code; NOT_FOUND is not counted.",
    ["backend", "code"],
)
# Create the label sets up front so the first error is a visible increase for rate() and alerts.
for _backend in ("s3", "file"):
    for _code in ("UNAVAILABLE", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "INVALID_ARGUMENT"):
        STORAGE_ERRORS.labels(_backend, _code)
