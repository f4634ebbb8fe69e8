"""``selma up --tls``: a throw-away local CA, a server certificate for 127.0.0.1 and fresh tokens.

Everything lives under ``<dir>/tls/``: ``ca.crt`` (what clients trust), ``server.crt``/``server.key``
(every service's certificate, for ``127.0.0.1``, ``::1`` and ``localhost``) and ``tokens.yaml``
(sha256 digests only).  The CA's private key is never written: it signs the server certificate and
is dropped, so nothing else can be issued under it.  Each start mints new tokens: an ``admin`` one
kept mode 0600 in ``<dir>/token`` (the CLI's default, like a kubeconfig), a ``generate``-only one
for applications (printed once, never stored) and one for the services' calls to each other
(``<dir>/tls/services.token``, 0600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from selma.auth import mint_token, token_entry

VALID_DAYS = 30


@dataclass(frozen=True)
class LocalCredentials:
    """What ``selma up --tls`` made; the tokens are in memory only to be printed once."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    tokens_file: Path
    admin_token_file: Path
    services_token_file: Path
    admin_token: str
    generate_token: str

    def server_env(self) -> dict[str, str]:
        """SELMA_* settings of every service: TLS on, auth on, and their own token and CA for calling each other."""
        return {
            "SELMA_TLS_CERT_FILE": str(self.server_cert),
            "SELMA_TLS_KEY_FILE": str(self.server_key),
            "SELMA_AUTH_TOKENS_FILE": str(self.tokens_file),
            "SELMA_TLS_CA": str(self.ca_cert),
            "SELMA_TOKEN_FILE": str(self.services_token_file),
        }


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (created 0600, never world-readable for a moment)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "selma local stack"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh CA and a server certificate for the loopback names; returns (ca.crt, server.crt, server.key)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("selma local CA")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def prepare(data_dir: Path) -> LocalCredentials:
    """Certificates, tokens and the tokens file for a TLS local stack in ``data_dir``."""
    import yaml

    tls_dir = data_dir / "tls"
    ca, cert, key = make_certificates(tls_dir)
    admin, generate, services = mint_token(), mint_token(), mint_token()
    entries = [token_entry("local-admin", admin, ["admin"]), token_entry("local-app", generate, ["generate"]),
               token_entry("local-services", services, ["generate", "read", "run"])]  # evaluation renders and merges
    tokens_file = tls_dir / "tokens.yaml"
    _write_private(tokens_file, yaml.safe_dump({"tokens": entries}, sort_keys=False).encode())
    admin_file, services_file = data_dir / "token", tls_dir / "services.token"
    _write_private(admin_file, (admin + "\n").encode())
    _write_private(services_file, (services + "\n").encode())
    return LocalCredentials(ca, cert, key, tokens_file, admin_file, services_file, admin, generate)
