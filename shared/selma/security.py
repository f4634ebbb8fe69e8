"""Transport security: the one place gRPC channels are built, and the servers' TLS credentials.

Clients (the CLI, :mod:`selma.client`, services and workers calling other services) describe how
they reach a service with a :class:`ClientSecurity` (bearer token, CA bundle, client certificate
for mutual TLS, server-name override), read from ``SELMA_TOKEN``/``SELMA_TLS_*`` (or CLI flags),
and get their channels from :func:`make_channel`.  Servers get their credentials from
:func:`server_credentials`: the certificate, key and client CA files are re-read when they change
on disk (a renewed Kubernetes Secret), so new connections see the new certificate without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

from selma.config import ClientSettings, SelmaSettings
from selma.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"


@dataclass(frozen=True)
class ClientSecurity:
    """How a client authenticates to the services and verifies them (empty = plaintext, no token)."""

    token: str = ""
    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str = ""

    def __repr__(self) -> str:  # never show the token
        return (f"ClientSecurity(token={'set' if self.token else 'unset'}, ca_cert={self.ca_cert}, client_cert={self.client_cert}, "
                f"client_key={self.client_key}, server_name={self.server_name!r})")

    @property
    def tls(self) -> bool:
        """TLS channels: a CA bundle (or a client certificate) is configured."""
        return self.ca_cert is not None or self.client_cert is not None

    @classmethod
    def from_settings(cls, settings: ClientSettings | None = None) -> ClientSecurity:
        """From ``SELMA_TOKEN`` (or ``SELMA_TOKEN_FILE``), ``SELMA_TLS_CA``, ``SELMA_TLS_CLIENT_CERT``/``_KEY``, ``SELMA_TLS_SERVER_NAME``."""
        s = settings if settings is not None else ClientSettings()
        token = s.token.get_secret_value().strip()
        if not token and s.token_file is not None:
            token = _read_token_file(s.token_file, "SELMA_TOKEN_FILE")
        return cls(token=token, ca_cert=s.tls_ca, client_cert=s.tls_client_cert, client_key=s.tls_client_key,
                   server_name=s.tls_server_name)

    def overridden(self, *, token: str = "", ca_cert: str | Path | None = None, client_cert: str | Path | None = None,
                   client_key: str | Path | None = None, server_name: str = "") -> ClientSecurity:
        """This with the given (non-empty) values replacing its own (CLI flags over the environment)."""
        changes: dict[str, Any] = {}
        if token:
            changes["token"] = token.strip()
        for name, value in (("ca_cert", ca_cert), ("client_cert", client_cert), ("client_key", client_key)):
            if value:
                changes[name] = Path(value)
        if server_name:
            changes["server_name"] = server_name
        return replace(self, **changes)

    def with_defaults(self, *, token: str = "", ca_cert: str | Path | None = None) -> ClientSecurity:
        """This with ``token``/``ca_cert`` filled in where it has none (a local stack's token and CA file)."""
        return replace(self, token=self.token or token, ca_cert=self.ca_cert or (Path(ca_cert) if ca_cert else None))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials: the CA bundle (system roots when unset) and, for mutual TLS, the client certificate."""
        if (self.client_cert is None) != (self.client_key is None):
            raise InvalidArgument("mutual TLS needs both a client certificate and its key (SELMA_TLS_CLIENT_CERT and SELMA_TLS_CLIENT_KEY, "
                                  "or --client-cert and --client-key)", field="tls_client_cert")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_cert, "SELMA_TLS_CA") if self.ca_cert else None,
            private_key=_read(self.client_key, "SELMA_TLS_CLIENT_KEY") if self.client_key else None,
            certificate_chain=_read(self.client_cert, "SELMA_TLS_CLIENT_CERT") if self.client_cert else None,
        )


def _read(path: Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {path} ({setting}): {e.strerror or e}", field=setting) from None


def _read_token_file(path: Path, setting: str) -> str:
    token = _read(path, setting).decode("utf-8", errors="replace").strip()
    if not token:
        raise InvalidArgument(f"the token file {path} is empty", field=setting)
    return token


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0].lower() != AUTHORIZATION]
        return _CallDetails(details.method, details.timeout, [*metadata, self._header], details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001 (grpc API)
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: ANN001
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # noqa: ANN001
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # noqa: ANN001
        return continuation(self._details(client_call_details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def make_channel(address: str, security: ClientSecurity | None = None, *, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to ``address``: TLS when ``security`` has a CA (or client certificate), plaintext otherwise;
    its token, if any, goes with every call.  ``security`` None = :meth:`ClientSecurity.from_settings`."""
    security = ClientSecurity.from_settings() if security is None else security
    opts = list(options)
    if security.tls:
        if security.server_name:
            opts.append(("grpc.ssl_target_name_override", security.server_name))
        channel = grpc.secure_channel(address, security.channel_credentials(), options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    if security.token:
        if not security.tls and not is_loopback(address.rpartition(":")[0] or address):
            log.warning("sending a bearer token to %s over plaintext; set SELMA_TLS_CA (or --ca-cert) to use TLS", address)
        channel = grpc.intercept_channel(channel, _TokenInterceptor(security.token))
    return channel


# ----------------------------------------------------------------------------------------------
# server side


def is_loopback(host: str) -> bool:
    """``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(settings: SelmaSettings) -> None:
    """Refuse a plaintext gRPC port that other machines can reach, unless explicitly allowed."""
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise InvalidArgument("TLS needs both SELMA_TLS_CERT_FILE and SELMA_TLS_KEY_FILE; only one is set", field="tls_cert_file")
    if settings.tls_client_ca_file is not None and not settings.tls_enabled:
        raise InvalidArgument("SELMA_TLS_CLIENT_CA_FILE (mutual TLS) needs SELMA_TLS_CERT_FILE and SELMA_TLS_KEY_FILE", field="tls_client_ca_file")
    if not settings.tls_enabled and not settings.allow_plaintext and not is_loopback(settings.host):
        raise FailedPrecondition(
            f"refusing to serve plaintext gRPC on {settings.host}, which other machines can reach: set SELMA_TLS_CERT_FILE and "
            "SELMA_TLS_KEY_FILE (a server certificate and key), bind 127.0.0.1, or set SELMA_ALLOW_PLAINTEXT=true", field="host")


class _CertificateFiles:
    """The server's certificate, key and client CA files; a new configuration whenever one of them changed."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.paths = [Path(cert), Path(key)] + ([Path(client_ca)] if client_ca else [])
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] = ()
        self.initial = self._load(initial=True)
        assert self.initial is not None

    def _stat(self) -> tuple[Any, ...]:
        out = []
        for p in self.paths:
            st = os.stat(p)  # follows the ..data symlink of a mounted Secret
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _load(self, *, initial: bool = False) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            try:
                signature = self._stat()
                if not initial and signature == self._signature:
                    return None
                cert, key = (p.read_bytes() for p in self.paths[:2])
                client_ca = self.paths[2].read_bytes() if len(self.paths) > 2 else None
                _check_pair(cert, key)
            except (OSError, ValueError) as e:
                if initial:
                    raise InvalidArgument(f"cannot use the TLS files {', '.join(map(str, self.paths))}: {e}", field="tls_cert_file") from None
                # Half-way through a rotation (cert written, key not yet): keep serving the old one.
                log.warning("TLS files changed but cannot be used yet (%s); new connections keep the previous certificate", e)
                return None
            self._signature = signature
            if not initial:
                log.info("TLS certificate files changed; new connections use the new certificate")
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks before each handshake: None keeps the current configuration."""
        return self._load()


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """The key belongs to the (first) certificate; ValueError otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        raise ValueError("the private key does not match the certificate")


def server_credentials(settings: SelmaSettings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS) credentials that follow the files on disk; None when no TLS is configured."""
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    files = _CertificateFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=settings.tls_client_ca_file is not None
    )
