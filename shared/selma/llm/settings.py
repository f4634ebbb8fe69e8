"""Settings of the LLM layer (``SELMA_LLM_*``), shared by every process that calls an LLM (prompts, evaluation).

LLM credentials never travel in requests.  A request names one with a ``SecretRef``
(``name``, ``key``) and the service resolves it here, in this order:

1. ``llm_api_keys`` (``SELMA_LLM_API_KEYS='{"openai": "sk-…"}'``), by ``name`` or ``name/key``;
2. a Kubernetes Secret mounted as files under ``llm_secrets_dir``: ``<dir>/<name>/<key>``
   (``key`` defaults to ``api-key``);
3. an environment variable ``SELMA_LLM_SECRET_<NAME>`` (or ``…_<NAME>_<KEY>``), upper-cased
   with non-alphanumerics as ``_``, e.g. from a Secret through ``envFrom``/``secretKeyRef``.

Only these places are searched, so a request cannot make the service send any other
credential (say, its S3 keys) to an endpoint.  An empty ``SecretRef`` means
``llm_openai_api_key``, the default credential (empty = no ``Authorization`` header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from selma.config import SelmaSettings, resolve_secret

BackendKind = Literal["embedded", "tiny_test", "openai_compatible", "local_causal_lm"]
SECRET_ENV_PREFIX = "SELMA_LLM_SECRET_"


class LlmSettings(SelmaSettings):
    """The shared settings plus LLM backend defaults; every field is ``SELMA_<FIELD>`` in the environment."""

    llm_default_backend: BackendKind = Field("embedded", description="Backend for requests that name none.")
    llm_openai_base_url: str = Field("", description="Default OpenAI-compatible base URL, up to and including /v1.")
    llm_openai_model: str = Field("", description="Default model name for the OpenAI-compatible backend.")
    llm_openai_api: Literal["chat", "completions"] = Field("chat", description="Default OpenAI API flavour.")
    llm_openai_api_key: SecretStr = Field(SecretStr(""), description="Default API key (from a Kubernetes Secret); empty = none.")
    llm_api_keys: dict[str, SecretStr] = Field(default_factory=dict, description="Named API keys a SecretRef may select (JSON).")
    llm_allowed_base_urls: list[str] = Field(
        default_factory=list,
        description="Endpoints (besides llm_openai_base_url) a request may name as its base_url (JSON list); only these may receive a configured API key.",
    )
    llm_allow_any_base_url: bool = Field(
        False,
        description="Let a request name any base_url (no API key is ever sent to one not configured). Off = a caller cannot make the "
        "service call an address of its choosing (SSRF); selma up turns it on for its single-user loopback stack.",
    )
    llm_secrets_dir: Path | None = Field(None, description="Directory of mounted Secrets: <dir>/<name>/<key>.")
    llm_request_timeout_seconds: float = Field(60.0, gt=0, description="Default HTTP timeout per LLM request.")
    llm_max_concurrency: int = Field(4, ge=1, le=64, description="Default LLM requests in flight per job.")
    llm_max_retries: int = Field(3, ge=0, le=10, description="Default retries per LLM request (transport errors, 429, 5xx).")
    llm_retry_backoff_seconds: float = Field(1.0, ge=0, description="First retry delay; doubles each retry.")
    llm_retry_max_backoff_seconds: float = Field(30.0, ge=0, description="Longest delay between retries (also caps Retry-After).")
    llm_max_tokens: int = Field(1024, ge=16, description="Default max_tokens per LLM request.")
    llm_local_model: str = Field("", description="Default model path or hub id for the local_causal_lm backend.")
    llm_local_batch_size: int = Field(8, ge=1, le=256, description="Requests generated together by a local model.")
    llm_max_loaded_models: int = Field(2, ge=1, description="Local LLMs / embedding models kept in memory at once.")

    def api_key(self, name: str = "", key: str = "", *, field: str = "spec.backend.openai_compatible.api_key") -> SecretStr | None:
        """The credential a SecretRef names (see the module docstring); None for no credential."""
        return resolve_secret(name, key, default=self.llm_openai_api_key, named=self.llm_api_keys, secrets_dir=self.llm_secrets_dir,
                              env_prefix=SECRET_ENV_PREFIX, prefix="llm", field=field)
