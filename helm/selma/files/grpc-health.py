"""Check services over the standard grpc.health.v1 API: the chart's `helm test` pod runs this.

Arguments are ``host:port=service.Name``; every one must answer SERVING (retried for a while, as
models may still be loading). Exit status 0 only when all do; each result is printed on one line.
"""

from __future__ import annotations

import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, service: str, timeout: float) -> str:
    """One health check; returns the status name or the gRPC error code."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: grpc-health.py host:port=service.Name ...\n")
        return 2
    deadline = time.monotonic() + float(os.environ.get("SELMA_HEALTH_WAIT_SECONDS", "120"))
    pending = dict(arg.split("=", 1) for arg in argv)
    while True:
        for target, service in list(pending.items()):
            status = check(target, service, timeout=5.0)
            print(f"{target} {service}: {status}", flush=True)
            if status == "SERVING":
                del pending[target]
        if not pending:
            return 0
        if time.monotonic() > deadline:
            print(f"not SERVING: {', '.join(sorted(pending))}", flush=True)
            return 1
        time.sleep(5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
