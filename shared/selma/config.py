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
    model_cache_dir: Path | None = Field(None, description="Hugging Face cache directory (a PVC on a cluster).")
    hf_offline: bool = Field(False, description="Never reach a model hub; load from cache/local paths only.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", description="auto = fp16 on CUDA, fp32 on CPU.")

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL; got {v!r}")
        return v

    @property
    def resolved_storage_uri(self) -> str:
        """The artifact root URI, defaulting to ``file://<data_dir>/storage``."""
        if self.storage_uri:
            return self.storage_uri.rstrip("/")
        return (self.data_dir.resolve() / "storage").as_uri()

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "models").resolve()

    def safe_dump(self) -> dict[str, Any]:
        """Settings as a dict for logging: secrets masked."""
        out = self.model_dump(mode="json")
        for k, v in list(out.items()):
            if isinstance(getattr(self, k), SecretStr):
                out[k] = "**********" if v else ""
        return out


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
