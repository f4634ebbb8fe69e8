"""Typed settings, read once from ``SELMA_*`` environment variables in each service's ``main()``.

Business code receives a settings object and never reads ``os.environ`` itself.  Field names
avoid the ``<SERVICE>_PORT`` / ``<SERVICE>_SERVICE_HOST`` variables Kubernetes injects for
Services (e.g. a Service ``selma-prompts`` injects ``SELMA_PROMPTS_PORT``): ports are
``grpc_port`` / ``metrics_port`` and unknown variables are ignored.

Credentials are ``SecretStr``: they never appear in ``repr``, logs or ``safe_dump()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class SelmaSettings(BaseSettings):
    """Settings every selma process shares: server, logging, storage, devices."""

    model_config = SettingsConfigDict(env_prefix="SELMA_", extra="ignore", validate_default=True)

    # --- logging
    log_level: str = Field("INFO", description="Python logging level name.")
    log_format: Literal["text", "json"] = Field("text", description="text for terminals, json for log pipelines.")

    # --- gRPC server
    host: str = Field("127.0.0.1", description="Address the gRPC and metrics servers bind; 0.0.0.0 in a pod.")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 picks a free port.")
    max_message_bytes: int = Field(64 * MiB, ge=4 * MiB, description="gRPC send/receive limit, sized for PNG batches.")
    grpc_workers: int = Field(16, ge=1, description="Thread pool size of the gRPC server.")
    max_concurrent_rpcs: int = Field(64, ge=1, description="RPCs beyond this are refused with RESOURCE_EXHAUSTED.")
    drain_seconds: float = Field(30.0, ge=0, description="Grace period for in-flight RPCs after SIGTERM.")
    job_watchdog_seconds: float = Field(
        60.0, ge=0, description="A PENDING/RUNNING job without a worker for this long is failed, naming why (0: never)."
    )

    # --- transport security and access control (selma.server, selma.auth)
    tls_cert_file: Path | None = Field(None, description="PEM server certificate chain; with tls_key_file the gRPC port serves TLS (re-read when it changes).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (re-read when it changes).")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle: set = mutual TLS, client certificates required and verified against it.")
    allow_plaintext: bool = Field(False, description="Serve plaintext gRPC on a non-loopback address (without TLS files only loopback binds are allowed).")
    auth_tokens_file: str = Field("", description="Comma-separated YAML/JSON files of bearer tokens {tokens: [{name, sha256, scopes}]}; set = auth on.")
    auth_jwks_file: Path | None = Field(None, description="JWKS file of the identity provider's keys: set = JWT bearer tokens accepted (auth on).")
    auth_jwt_issuer: str = Field("", description="Required `iss` of JWT bearer tokens (needed with auth_jwks_file).")
    auth_jwt_audience: str = Field("", description="Required `aud` of JWT bearer tokens (needed with auth_jwks_file).")
    auth_open_health: bool = Field(True, description="grpc.health.v1 and server reflection answer without a token when auth is on.")

    # --- limits: every request is held to these at the API boundary (selma.limits); over one is INVALID_ARGUMENT naming it
    max_receive_message_bytes: int = Field(
        8 * MiB, ge=64 * 1024, description="Largest request message a server accepts; larger ones are refused by gRPC (RESOURCE_EXHAUSTED)."
    )
    max_id_chars: int = Field(1024, ge=64, description="Longest id, name, key, URI or other short string field of a request.")
    max_prompt_chars: int = Field(4096, ge=16, description="Longest prompt (positive, negative or example) a request may carry.")
    max_text_chars: int = Field(16384, ge=64, description="Longest free-text field of a request (skill rules, descriptions, reasons).")
    max_repeated_items: int = Field(10000, ge=16, description="Most entries of one repeated or map field of a request.")

    # --- storage
    data_dir: Path = Field(Path(".selma"), description="Local working directory (embedded storage, caches).")
    storage_uri: str = Field("", description="Artifact root: s3://bucket/prefix or file:///dir; default <data_dir>/storage.")
    s3_endpoint: str = Field("", description="S3/MinIO endpoint, host:port or http(s)://host:port.")
    s3_access_key: SecretStr = Field(SecretStr(""), description="S3 access key (from a Kubernetes Secret).")
    s3_secret_key: SecretStr = Field(SecretStr(""), description="S3 secret key (from a Kubernetes Secret).")
    s3_region: str = Field("", description="S3 region; empty lets the client discover it.")
    s3_secure: bool = Field(True, description="Use TLS to the S3 endpoint (an http:// endpoint turns it off).")
    s3_create_buckets: bool = Field(True, description="Create missing buckets on first use.")
    storage_retries: int = Field(5, ge=0, le=20, description="Retries of a transient storage error.")
    storage_backoff_seconds: float = Field(0.2, ge=0, description="First retry delay; doubles each retry.")
    s3_part_size: int = Field(16 * MiB, ge=5 * MiB, description="Multipart part size for streamed uploads.")

    # --- models and devices
    cache_dir: Path | None = Field(
        None, description="Per-user cache shared by every data directory (converted and mirrored models); "
        "default $XDG_CACHE_HOME/selma, else ~/.cache/selma.")
    model_cache_dir: Path | None = Field(
        None, description="Model cache: Hugging Face downloads, mirrors, converted and tiny models (a PVC on a cluster); "
        "default <cache_dir>/models, shared by every data directory.")
    hf_offline: bool = Field(False, description="Never reach a model hub; load from cache/local paths only.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto = fp16 on CUDA, fp32 on CPU.")
    model_allowed_dirs: str = Field(
        "",
        description="Comma-separated absolute directories a request may name as a local or file:// model, dataset or "
        "adapter source (checked after resolving symlinks and '..'); empty = none. The service's own settings are not restricted.",
    )
    model_allowed_buckets: str = Field(
        "",
        description="Comma-separated S3 buckets a request may name s3:// sources in, besides the storage bucket; empty = the storage bucket only.",
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL; got {v!r}")
        return v

    @field_validator("model_allowed_dirs")
    @classmethod
    def _allowed_dirs(cls, v: str) -> str:
        for item in _split_list(v):
            if not Path(item).expanduser().is_absolute():
                raise ValueError(f"model_allowed_dirs takes absolute directories; got {item!r}")
        return v

    @property
    def allowed_model_dirs(self) -> tuple[Path, ...]:
        """``model_allowed_dirs`` as resolved absolute paths (symlinks followed)."""
        return tuple(Path(item).expanduser().resolve() for item in _split_list(self.model_allowed_dirs))

    @property
    def allowed_model_buckets(self) -> frozenset[str]:
        """``model_allowed_buckets`` as a set of bucket names."""
        return frozenset(_split_list(self.model_allowed_buckets))

    @property
    def tls_enabled(self) -> bool:
        """Both server certificate files are set: the gRPC port serves TLS."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def auth_enabled(self) -> bool:
        """A tokens file or a JWKS file is configured: every RPC needs a bearer token (selma.auth)."""
        return bool(self.auth_tokens_file.strip()) or self.auth_jwks_file is not None

    @property
    def resolved_storage_uri(self) -> str:
        """The artifact root URI, defaulting to ``file://<data_dir>/storage``."""
        if self.storage_uri:
            return self.storage_uri.rstrip("/")
        return (self.data_dir.resolve() / "storage").as_uri()

    @property
    def resolved_cache_dir(self) -> Path:
        """The per-user cache: ``cache_dir``, else ``$XDG_CACHE_HOME/selma``, else ``~/.cache/selma``."""
        if self.cache_dir is not None:
            return self.cache_dir.expanduser().resolve()
        import os

        xdg = os.environ.get("XDG_CACHE_HOME", "")  # the platform's setting, read where settings are read
        return ((Path(xdg) if xdg else Path.home() / ".cache") / "selma").resolve()

    @property
    def resolved_model_cache_dir(self) -> Path:
        """Where models are cached: ``model_cache_dir``, else ``<cache_dir>/models`` (one cache for every data directory,
        so a second ``selma up`` elsewhere does not convert or download again)."""
        return (self.model_cache_dir or self.resolved_cache_dir / "models").resolve()

    def safe_dump(self) -> dict[str, Any]:
        """Settings as a dict for logging: secrets masked."""
        out = self.model_dump(mode="json")
        for k, v in list(out.items()):
            if isinstance(getattr(self, k), SecretStr):
                out[k] = "**********" if v else ""
        return out


def _split_list(value: str) -> list[str]:
    """A comma-separated setting as its non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


class ClientSettings(BaseSettings):
    """How a client reaches the services: bearer token and TLS (``SELMA_TOKEN``, ``SELMA_TLS_CA``, ...).

    Read by the CLI, :mod:`selma.client` and every service or worker that calls another service
    (see :class:`selma.security.ClientSecurity`, which also takes the CLI's flags).
    """

    model_config = SettingsConfigDict(env_prefix="SELMA_", extra="ignore")

    token: SecretStr = Field(SecretStr(""), description="Bearer token sent as `authorization: Bearer <token>` on every call.")
    token_file: Path | None = Field(None, description="File holding the bearer token (a mounted Secret); used when SELMA_TOKEN is empty.")
    tls_ca: Path | None = Field(None, description="PEM CA bundle that signed the servers' certificates: set = TLS channels.")
    tls_client_cert: Path | None = Field(None, description="PEM client certificate chain for mutual TLS.")
    tls_client_key: Path | None = Field(None, description="PEM private key of tls_client_cert.")
    tls_server_name: str = Field("", description="Name checked in the server certificate instead of the address's host.")
    retry_max_attempts: int = Field(5, ge=1, description="Calls of a serving request refused RESOURCE_EXHAUSTED or UNAVAILABLE before it fails; 1 = no retry.")
    retry_max_seconds: float = Field(60.0, ge=0, description="No retry starts whose wait would end later than this after the first call.")
    retry_initial_backoff_seconds: float = Field(0.25, ge=0, description="First back-off without a server hint; doubles per retry, jittered.")
    retry_max_backoff_seconds: float = Field(10.0, ge=0, description="Longest back-off without a server hint (retry-after-ms is honoured as sent).")
    serving_resolve_seconds: float = Field(30.0, ge=0, description="How often a dns:/// serving endpoint is resolved again (replicas come and go).")


DEFAULT_SECRET_KEY = "api-key"


def resolve_secret(
    name: str,
    key: str,
    *,
    default: SecretStr,
    named: dict[str, SecretStr],
    secrets_dir: Path | None,
    env_prefix: str,
    prefix: str,
    field: str,
) -> SecretStr | None:
    """The credential a ``SecretRef {name, key}`` names, for services that take API keys from settings.

    No name: the service's ``default`` key (None when empty).  A name is looked up, in order, in
    ``named`` (``<name>/<key>`` then ``<name>``; the ``<prefix>_api_keys`` setting), a mounted
    Secret file ``<secrets_dir>/<name>/<key or api-key>``, then the environment variable
    ``<env_prefix><NAME>[_<KEY>]``.  A name found nowhere is INVALID_ARGUMENT saying where to put it.
    Values are never logged.
    """
    import os
    import re

    from selma.errors import InvalidArgument

    if not name:
        if key:
            raise InvalidArgument("api_key.key needs api_key.name", field=f"{field}.name")
        value = default.get_secret_value()
        return SecretStr(value) if value else None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}", name) or (key and not re.fullmatch(r"[A-Za-z0-9._-]{1,253}", key)):
        raise InvalidArgument("secret names and keys use letters, digits, '.', '_' and '-'", field=f"{field}.name")
    for candidate in (f"{name}/{key}" if key else None, name):
        if candidate and candidate in named:
            return named[candidate]
    if secrets_dir is not None:
        path = secrets_dir / name / (key or DEFAULT_SECRET_KEY)
        if path.is_file():
            return SecretStr(path.read_text(encoding="utf-8").strip())

    def env_name(k: str) -> str:
        return env_prefix + re.sub(r"[^A-Za-z0-9]", "_", f"{name}_{k}" if k else name).upper()

    env_names = [env_name(key)] if key else [env_name(""), env_name(DEFAULT_SECRET_KEY)]
    for env in env_names:
        value = os.environ.get(env)
        if value:
            return SecretStr(value.strip())
    raise InvalidArgument(
        f"no secret {name!r}{f' with key {key!r}' if key else ''} is configured on the service; mount it under "
        f"{prefix}_secrets_dir/<name>/<key>, add it to SELMA_{prefix.upper()}_API_KEYS, or set {env_names[0]}",
        field=f"{field}.name",
    )
