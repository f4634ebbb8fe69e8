"""The scripts the chart runs in pods, run here for real: the bucket hook against an S3 server
(moto) and the `helm test` health check against a live selma gRPC server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _chart_tools import CHART
from minio import Minio

pytestmark = pytest.mark.integration

CREATE_BUCKETS = CHART / "files" / "create-buckets.py"
GRPC_HEALTH = CHART / "files" / "grpc-health.py"


def _run(script: Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
    return subprocess.run([sys.executable, str(script), *args], env={**base, **env}, capture_output=True, text=True, timeout=timeout)


def test_bucket_hook_creates_buckets_idempotently(s3_server: str) -> None:
    env = {
        "SELMA_S3_ENDPOINT": f"http://{s3_server}",  # as the chart sets it for the bundled MinIO
        "SELMA_S3_SECURE": "false",
        "SELMA_S3_ACCESS_KEY": "testing",
        "SELMA_S3_SECRET_KEY": "testing",
        "SELMA_S3_REGION": "us-east-1",
        "SELMA_BUCKETS": "selma-hook-a,selma-hook-b",
    }
    first = _run(CREATE_BUCKETS, env=env)
    assert first.returncode == 0, first.stderr
    client = Minio(s3_server, "testing", "testing", secure=False, region="us-east-1")
    assert client.bucket_exists("selma-hook-a") and client.bucket_exists("selma-hook-b")
    assert "bucket selma-hook-a created" in first.stderr
    again = _run(CREATE_BUCKETS, env=env)
    assert again.returncode == 0 and "bucket selma-hook-a exists" in again.stderr


def test_bucket_hook_fails_cleanly_on_an_invalid_bucket(s3_server: str) -> None:
    env = {"SELMA_S3_ENDPOINT": s3_server, "SELMA_S3_SECURE": "false", "SELMA_BUCKETS": "Not_A_Bucket"}
    proc = _run(CREATE_BUCKETS, env=env)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_bucket_hook_gives_up_on_an_unreachable_endpoint() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"SELMA_S3_ENDPOINT": f"127.0.0.1:{port}", "SELMA_S3_SECURE": "false", "SELMA_BUCKETS": "selma", "SELMA_BUCKET_ATTEMPTS": "1"}
    proc = _run(CREATE_BUCKETS, env=env)
    assert proc.returncode == 1 and "unreachable after 1 attempts" in proc.stderr


def test_helm_test_health_check_waits_for_serving(tmp_path: Path) -> None:
    from selma.config import SelmaSettings
    from selma.server import SelmaServer, ServiceRegistration

    settings = SelmaSettings(host="127.0.0.1", grpc_port=0, metrics_port=0, data_dir=tmp_path, drain_seconds=0)
    server = SelmaServer(settings, [ServiceRegistration(name="selma.v1.RenderService")], name="render").start()
    try:
        target = f"{server.address}=selma.v1.RenderService"
        not_ready = _run(GRPC_HEALTH, target, env={"SELMA_HEALTH_WAIT_SECONDS": "0"})
        assert not_ready.returncode == 1 and "NOT_SERVING" in not_ready.stdout
        unknown = _run(GRPC_HEALTH, f"{server.address}=selma.v1.NoSuchService", env={"SELMA_HEALTH_WAIT_SECONDS": "0"})
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout
        server.set_ready(True)
        ready = _run(GRPC_HEALTH, target, env={"SELMA_HEALTH_WAIT_SECONDS": "0"})
        assert ready.returncode == 0 and f"{server.address} selma.v1.RenderService: SERVING" in ready.stdout
    finally:
        server.stop(0)
