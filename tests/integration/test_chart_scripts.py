"""The scripts the chart runs in pods, run here for real: the bucket hook against an S3 server
(moto), the `helm test` health check against a live selma gRPC server, and, as the chart renders
them (command, arguments, SELMA_* environment, the TLS Secret's file layout), the probes and the
`helm test` Generate call against TLS gRPC servers with certificates made here (cryptography)."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from _chart_tools import CHART, by_kind, objects, render
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from minio import Minio

from selma.v1 import common_pb2, serving_service_pb2, serving_service_pb2_grpc

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


# --- the probe and `helm test` scripts over TLS, with the chart's certificate layout and token -------

TLS_DIR = "/etc/selma/tls"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


class _Pki:
    """A CA and the certificates it signs, written as a kubernetes.io/tls Secret's files would be."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    @property
    def ca_pem(self) -> bytes:
        return self.cert.public_bytes(Encoding.PEM)

    def issue(self, *dns_names: str) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) for these names, usable as server and client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])])
        cert = (
            self._builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), cert.public_bytes(Encoding.PEM)

    def secret_dir(self, path: Path, *dns_names: str) -> Path:
        """tls.crt, tls.key and ca.crt in ``path``, as the chart mounts the TLS Secret."""
        path.mkdir(parents=True, exist_ok=True)
        key, cert = self.issue(*dns_names)
        (path / "tls.key").write_bytes(key)
        (path / "tls.crt").write_bytes(cert)
        (path / "ca.crt").write_bytes(self.ca_pem)
        return path


def _bearer(context: Any) -> str:
    return dict(context.invocation_metadata()).get("authorization", "")


class _FakeServer:
    """A TLS gRPC server with the standard health service and a ServingService whose Generate streams
    one PNG; ``token`` makes Generate (and, with ``token_on_health``, the health check) require it."""

    def __init__(self, key: bytes, cert: bytes, *, client_ca: bytes | None = None, token: str = "", token_on_health: bool = False) -> None:
        self.requests: list[Any] = []
        outer = self

        class Health(health.HealthServicer):
            def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
                if token_on_health and _bearer(context) != f"Bearer {token}":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")
                return super().Check(request, context)

        class Serving(serving_service_pb2_grpc.ServingServiceServicer):
            def Generate(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method name)
                if token and _bearer(context) != f"Bearer {token}":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid token is required")
                outer.requests.append(request)
                image = common_pb2.GeneratedImage(png=PNG, seed=request.seed, prompt=request.prompts[0])
                yield serving_service_pb2.GenerateResponse(image=image, index=0, total=1)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        checker = Health()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        checker.set("selma.v1.ServingService", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self.server)
        serving_service_pb2_grpc.add_ServingServiceServicer_to_server(Serving(), self.server)
        credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def _chart_container(scenario: str, kind: str, name: str, container: str) -> dict[str, Any]:
    docs = objects(render((CHART / "ci" / f"{scenario}-values.yaml",)))
    obj = by_kind(docs, kind)[name]
    spec = obj["spec"]["template"]["spec"] if kind == "Deployment" else obj["spec"]
    (c,) = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container]
    return c


def _as_in_the_pod(container: dict[str, Any], secret_dir: Path, port: int, token: str = "") -> tuple[list[str], dict[str, str]]:
    """The container's script command and SELMA_* environment, pointed at this machine: the TLS Secret's
    files in ``secret_dir``, the scripts from the chart, the server on ``port``, the token for SELMA_TOKEN."""
    command = container.get("command", []) + container.get("args", [])
    assert command[0] == "python", command
    args = command[2:]
    script = CHART / "files" / Path(command[1]).name
    args = [re.sub(r"^(127\.0\.0\.1|selma-serving):50051", f"127.0.0.1:{port}", a) for a in args]
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if e["name"] == "SELMA_TOKEN":
            assert "secretKeyRef" in e["valueFrom"], "the token comes from a Secret"
            env["SELMA_TOKEN"] = token
        elif e["name"].startswith("SELMA_") and "value" in e:
            env[e["name"]] = e["value"].replace(TLS_DIR, str(secret_dir))
    return [str(script), *args], env


def _probe(scenario: str, component: str, probe: str = "readinessProbe") -> dict[str, Any]:
    """A probe of a rendered Deployment as a container-like dict: its exec command and the pod's env."""
    c = _chart_container(scenario, "Deployment", f"selma-{component}", component)
    return {"command": c[probe]["exec"]["command"], "env": c["env"]}


def test_probe_over_tls_reports_serving_with_the_right_ca_and_fails_with_another(tmp_path: Path) -> None:
    """The readiness and liveness commands the chart renders for serving, run against real TLS servers:
    SERVING with a certificate from the CA in the Secret, UNAVAILABLE from another CA's."""
    ours, theirs = _Pki("selma-ca"), _Pki("another-ca")
    secret = ours.secret_dir(tmp_path / "tls", "selma-serving", "selma-serving.selma.svc")
    good = _FakeServer((secret / "tls.key").read_bytes(), (secret / "tls.crt").read_bytes())
    forged = _FakeServer(*theirs.issue("selma-serving"))
    try:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            argv, env = _as_in_the_pod(_probe("default", "serving", probe), secret, good.port)
            assert env["SELMA_TLS_CA"] == str(secret / "ca.crt")
            ok = _run(Path(argv[0]), *argv[1:], env=env)
            assert ok.returncode == 0 and ": SERVING" in ok.stdout, ok.stdout + ok.stderr
        argv, env = _as_in_the_pod(_probe("default", "serving"), secret, forged.port)
        refused = _run(Path(argv[0]), *argv[1:], env=env)
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stdout and "SERVING" not in refused.stdout.replace("not SERVING", "")
        # our CA, but a certificate for another name than the Service's
        other_name = _FakeServer(*ours.issue("selma-render"))
        try:
            argv, env = _as_in_the_pod(_probe("default", "serving"), secret, other_name.port)
            assert _run(Path(argv[0]), *argv[1:], env=env).returncode == 1
        finally:
            other_name.stop()
    finally:
        good.stop()
        forged.stop()


def test_probe_with_mutual_tls_presents_the_pods_certificate(tmp_path: Path) -> None:
    """cert-manager scenario (tls.mutual): the server requires a client certificate from the CA; the
    probe presents the pod's own, and without it the handshake fails."""
    pki = _Pki("selma-ca")
    secret = pki.secret_dir(tmp_path / "tls", "selma-serving")
    server = _FakeServer((secret / "tls.key").read_bytes(), (secret / "tls.crt").read_bytes(), client_ca=pki.ca_pem)
    try:
        argv, env = _as_in_the_pod(_probe("cert-manager", "serving"), secret, server.port)
        assert env["SELMA_TLS_CLIENT_CERT"] == str(secret / "tls.crt") and env["SELMA_TLS_CLIENT_KEY"] == str(secret / "tls.key")
        ok = _run(Path(argv[0]), *argv[1:], env=env)
        assert ok.returncode == 0 and ": SERVING" in ok.stdout, ok.stdout + ok.stderr
        anonymous = {k: v for k, v in env.items() if k not in ("SELMA_TLS_CLIENT_CERT", "SELMA_TLS_CLIENT_KEY")}
        assert _run(Path(argv[0]), *argv[1:], env=anonymous).returncode == 1
    finally:
        server.stop()


def test_probe_sends_the_token_when_health_checks_need_one(tmp_path: Path) -> None:
    pki = _Pki("selma-ca")
    secret = pki.secret_dir(tmp_path / "tls", "selma-serving")
    server = _FakeServer((secret / "tls.key").read_bytes(), (secret / "tls.crt").read_bytes(), token="t0ken-for-test", token_on_health=True)
    try:
        argv, env = _as_in_the_pod(_probe("default", "serving"), secret, server.port, token="t0ken-for-test")
        ok = _run(Path(argv[0]), *argv[1:], env=env)
        assert ok.returncode == 0 and ": SERVING" in ok.stdout, ok.stdout + ok.stderr
        denied = _run(Path(argv[0]), *argv[1:], env={**env, "SELMA_TOKEN": ""})
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stdout
    finally:
        server.stop()


def test_helm_test_generate_calls_generate_with_the_token_over_tls(tmp_path: Path) -> None:
    """The `helm test` pod's generate container as rendered: TLS verified with the Secret's CA, the
    token as bearer metadata, the prompt and steps from values; a wrong token fails the test."""
    pki = _Pki("selma-ca")
    secret = pki.secret_dir(tmp_path / "tls", "selma-serving")
    server = _FakeServer((secret / "tls.key").read_bytes(), (secret / "tls.crt").read_bytes(), token="t0ken-for-test")
    try:
        container = _chart_container("default", "Pod", "selma-test-health", "generate")
        argv, env = _as_in_the_pod(container, secret, server.port, token="t0ken-for-test")
        assert Path(argv[0]).name == "grpc-generate.py" and env["SELMA_TLS_CA"] == str(secret / "ca.crt")
        # the pod dials selma-serving, which the certificate names; here that name is 127.0.0.1's
        env["SELMA_TLS_SERVER_NAME"] = "selma-serving"
        ok = _run(Path(argv[0]), *argv[1:], env=env)
        assert ok.returncode == 0 and "Generate: image 1/1" in ok.stdout, ok.stdout + ok.stderr
        (request,) = server.requests
        assert list(request.prompts) == ["a red apple on a wooden table"] and request.diffusion.steps == 4
        denied = _run(Path(argv[0]), *argv[1:], env={**env, "SELMA_TOKEN": "wrong"})
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stdout and "wrong" not in denied.stdout
        health = _chart_container("default", "Pod", "selma-test-health", "grpc-health")
        argv, env = _as_in_the_pod(health, secret, server.port, token="t0ken-for-test")
        argv = [argv[0], *[a for a in argv[1:] if a.startswith(f"127.0.0.1:{server.port}=selma.v1.ServingService")]]
        ok = _run(Path(argv[0]), "--wait=0", *argv[1:], env={**env, "SELMA_TLS_SERVER_NAME": "selma-serving"})
        assert ok.returncode == 0 and ": SERVING" in ok.stdout, ok.stdout + ok.stderr
    finally:
        server.stop()
