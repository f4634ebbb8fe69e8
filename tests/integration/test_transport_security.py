"""TLS and mutual TLS on a real SelmaServer on 127.0.0.1, with certificates made in the test (trustme).

The right CA completes the handshake and another CA does not; mutual TLS refuses a client without a
certificate; certificate files replaced on disk serve the next connection without a restart; a
plaintext port is refused on an address other machines can reach unless explicitly allowed.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from selma.config import SelmaSettings
from selma.errors import FailedPrecondition, InvalidArgument
from selma.security import ClientSecurity, check_transport, make_channel
from selma.server import SelmaServer

pytestmark = pytest.mark.integration

# a fresh connection per channel: never a pooled one made with earlier credentials
FRESH = [("grpc.use_local_subchannel_pool", 1)]


def write_server_cert(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    # replaced atomically, as a Kubernetes Secret volume does
    for path, blob in ((cert_path, cert.cert_chain_pems), (key_path, [cert.private_key_pem])):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(b"".join(b.bytes() for b in blob))
        tmp.replace(path)
    return cert_path, key_path


def write_ca(ca: trustme.CA, path: Path) -> Path:
    path.write_bytes(ca.cert_pem.bytes())
    return path


def health(address: str, security: ClientSecurity) -> grpc.StatusCode:
    """The code of one health check over a new connection (OK when the handshake and call succeed)."""
    with make_channel(address, security, options=FRESH) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.fixture
def tls_server(tmp_path):
    servers: list[SelmaServer] = []

    def start(**overrides) -> SelmaServer:
        settings = SelmaSettings(data_dir=tmp_path / "data", grpc_workers=4, **overrides)
        server = SelmaServer(settings, [], name="tls-test").start()
        server.set_ready(True)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop(0)


def test_the_right_ca_completes_the_handshake_and_another_ca_or_plaintext_does_not(tls_server, tmp_path):
    ca, other = trustme.CA(), trustme.CA()
    cert, key = write_server_cert(ca, tmp_path / "server")
    server = tls_server(tls_cert_file=cert, tls_key_file=key)
    assert server.tls
    assert health(server.address, ClientSecurity(ca_cert=write_ca(ca, tmp_path / "ca.crt"))) == grpc.StatusCode.OK
    assert health(server.address, ClientSecurity(ca_cert=write_ca(other, tmp_path / "other.crt"))) == grpc.StatusCode.UNAVAILABLE
    assert health(server.address, ClientSecurity()) == grpc.StatusCode.UNAVAILABLE  # a plaintext client gets nowhere


def test_mutual_tls_refuses_a_client_without_a_certificate_or_with_one_from_another_ca(tls_server, tmp_path):
    server_ca, client_ca, stranger = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key = write_server_cert(server_ca, tmp_path / "server")
    server = tls_server(tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=write_ca(client_ca, tmp_path / "clients.crt"))
    ca_file = write_ca(server_ca, tmp_path / "ca.crt")

    def client_files(ca: trustme.CA, name: str) -> tuple[Path, Path]:
        issued = ca.issue_cert(f"{name}.selma.test")
        c, k = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        c.write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
        k.write_bytes(issued.private_key_pem.bytes())
        return c, k

    good_cert, good_key = client_files(client_ca, "evaluation")
    bad_cert, bad_key = client_files(stranger, "intruder")
    assert health(server.address, ClientSecurity(ca_cert=ca_file)) == grpc.StatusCode.UNAVAILABLE
    assert health(server.address, ClientSecurity(ca_cert=ca_file, client_cert=bad_cert, client_key=bad_key)) == grpc.StatusCode.UNAVAILABLE
    assert health(server.address, ClientSecurity(ca_cert=ca_file, client_cert=good_cert, client_key=good_key)) == grpc.StatusCode.OK


def test_certificate_files_replaced_on_disk_serve_the_next_connection_without_a_restart(tls_server, tmp_path):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = write_server_cert(old_ca, tmp_path / "server")
    server = tls_server(tls_cert_file=cert, tls_key_file=key)
    old = ClientSecurity(ca_cert=write_ca(old_ca, tmp_path / "old.crt"))
    new = ClientSecurity(ca_cert=write_ca(new_ca, tmp_path / "new.crt"))
    assert health(server.address, old) == grpc.StatusCode.OK
    assert health(server.address, new) == grpc.StatusCode.UNAVAILABLE

    write_server_cert(new_ca, tmp_path / "server")  # the renewed Secret: same paths, new certificate and key

    assert health(server.address, new) == grpc.StatusCode.OK
    assert health(server.address, old) == grpc.StatusCode.UNAVAILABLE
    assert server.grpc_port and not server.wait(0)  # the same server process, never restarted


def test_a_half_rotated_pair_keeps_the_previous_certificate(tls_server, tmp_path):
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = write_server_cert(old_ca, tmp_path / "server")
    server = tls_server(tls_cert_file=cert, tls_key_file=key)
    old = ClientSecurity(ca_cert=write_ca(old_ca, tmp_path / "old.crt"))
    fresh = new_ca.issue_cert("127.0.0.1")
    cert.write_bytes(b"".join(b.bytes() for b in fresh.cert_chain_pems))  # the key is not written yet
    assert health(server.address, old) == grpc.StatusCode.OK


def test_plaintext_is_refused_on_a_reachable_address_unless_allowed(tmp_path):
    with pytest.raises(FailedPrecondition) as e:
        check_transport(SelmaSettings(host="0.0.0.0"))
    assert "SELMA_TLS_CERT_FILE" in str(e.value) and "SELMA_ALLOW_PLAINTEXT" in str(e.value)
    with pytest.raises(FailedPrecondition):
        SelmaServer(SelmaSettings(host="0.0.0.0", data_dir=tmp_path), [], name="refused")
    check_transport(SelmaSettings(host="0.0.0.0", allow_plaintext=True))
    for loopback in ("127.0.0.1", "localhost", "::1", "[::1]"):
        check_transport(SelmaSettings(host=loopback))
    with pytest.raises(InvalidArgument) as e:
        check_transport(SelmaSettings(tls_cert_file=tmp_path / "tls.crt"))
    assert "SELMA_TLS_KEY_FILE" in str(e.value)


def test_grpcurl_with_the_ca_and_a_bearer_token_as_the_readme_shows(tls_server, tmp_path):
    """grpcurl -cacert CA -H 'authorization: Bearer TOKEN': the call shape the README documents (health and reflection closed to anonymous)."""
    import json
    import shutil
    import subprocess
    import sys

    from selma.auth import mint_token, token_entry

    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    ca = trustme.CA()
    cert, key = write_server_cert(ca, tmp_path / "server")
    token = mint_token()
    (tmp_path / "tokens.yaml").write_text(json.dumps({"tokens": [token_entry("probe", token, ["read"])]}))
    server = tls_server(tls_cert_file=cert, tls_key_file=key, auth_tokens_file=str(tmp_path / "tokens.yaml"), auth_open_health=False)
    ca_file = write_ca(ca, tmp_path / "ca.crt")
    def grpcurl_check(*headers: str) -> subprocess.CompletedProcess:
        return subprocess.run([grpcurl, "-cacert", str(ca_file), *headers, server.address, "grpc.health.v1.Health/Check"],
                              capture_output=True, text=True, timeout=60)

    ok = grpcurl_check("-H", f"authorization: Bearer {token}")
    assert ok.returncode == 0 and '"SERVING"' in ok.stdout, ok.stderr
    anonymous = grpcurl_check()
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr, anonymous.stderr


def test_the_cli_names_the_ca_setting_when_the_handshake_fails(tls_server, tmp_path, capsys):
    from selma.app.cli import main
    from selma.client import Endpoints

    ca, other = trustme.CA(), trustme.CA()
    cert, key = write_server_cert(ca, tmp_path / "server")
    server = tls_server(tls_cert_file=cert, tls_key_file=key)
    endpoints = tmp_path / "endpoints.json"
    Endpoints(serving=server.address).save(endpoints)
    code = main(["lineage", "some-model", "--endpoints", str(endpoints), "--ca-cert", str(write_ca(other, tmp_path / "other.crt"))])
    err = capsys.readouterr().err
    assert code == 2 and "UNAVAILABLE" in err and "SELMA_TLS_CA" in err, err
