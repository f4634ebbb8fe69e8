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
