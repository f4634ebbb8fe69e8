"""Check services over the standard grpc.health.v1 API: the chart's probes and `helm test` run this.

Arguments are ``host:port=service.Name``; every one must answer SERVING (retried for
``--wait`` seconds, default $SELMA_HEALTH_WAIT_SECONDS or 120, as models may still be loading;
the probes pass ``--wait=0`` for one attempt). Exit status 0 only when all do; each result is
printed on one line.

The connection is configured as every selma client's is: ``SELMA_TLS_CA`` (a CA bundle) turns on
TLS and verifies the server against it, ``SELMA_TLS_CLIENT_CERT``/``SELMA_TLS_CLIENT_KEY`` add a
client certificate for mutual TLS, ``SELMA_TLS_SERVER_NAME`` (or ``--server-name``; a probe dials
127.0.0.1 but the certificate names the Service) is the name the certificate must carry, and
``SELMA_TOKEN`` (or the file ``SELMA_TOKEN_FILE``) is sent as ``authorization: Bearer`` metadata.
The other chart scripts import ``channel`` and ``call_metadata`` from here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def channel(target: str, server_name: str | None = None) -> grpc.Channel:
    """A channel to ``target``: TLS when SELMA_TLS_CA is set (files read now, so a renewed
    certificate is used by the next run), plaintext otherwise."""
    ca = os.environ.get("SELMA_TLS_CA")
    if not ca:
        return grpc.insecure_channel(target)
    cert, key = os.environ.get("SELMA_TLS_CLIENT_CERT"), os.environ.get("SELMA_TLS_CLIENT_KEY")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca),
        private_key=_read(key) if cert and key else None,
        certificate_chain=_read(cert) if cert and key else None,
    )
    name = server_name or os.environ.get("SELMA_TLS_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(target, credentials, options=options)


def call_metadata() -> tuple[tuple[str, str], ...]:
    """The bearer token of SELMA_TOKEN or SELMA_TOKEN_FILE as call metadata; none without one."""
    token = os.environ.get("SELMA_TOKEN", "")
    if not token and os.environ.get("SELMA_TOKEN_FILE"):
        token = Path(os.environ["SELMA_TOKEN_FILE"]).read_text().strip()
    return (("authorization", f"Bearer {token}"),) if token else ()


def check(target: str, service: str, timeout: float, server_name: str | None = None) -> str:
    """One health check; returns the status name or the gRPC error code."""
    with channel(target, server_name) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=call_metadata()
            )
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="gRPC health checks of selma services")
    parser.add_argument("targets", nargs="+", metavar="host:port=service.Name")
    parser.add_argument("--wait", type=float, default=float(os.environ.get("SELMA_HEALTH_WAIT_SECONDS", "120")),
                        help="keep retrying this many seconds (0: one attempt)")
    parser.add_argument("--server-name", default=None, help="name the server's certificate must carry (TLS)")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline of each check, seconds")
    args = parser.parse_args(argv)
    if not all("=" in arg for arg in args.targets):
        parser.error("targets are host:port=service.Name")
    # (target, service) pairs: one Deployment may host several services on one address
    pending = [tuple(arg.split("=", 1)) for arg in dict.fromkeys(args.targets)]
    deadline = time.monotonic() + args.wait
    while True:
        for target, service in list(pending):
            status = check(target, service, timeout=args.timeout, server_name=args.server_name)
            print(f"{target} {service}: {status}", flush=True)
            if status == "SERVING":
                pending.remove((target, service))
        if not pending:
            return 0
        if time.monotonic() >= deadline:
            print(f"not SERVING: {', '.join(f'{t}={s}' for t, s in pending)}", flush=True)
            return 1
        time.sleep(5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
