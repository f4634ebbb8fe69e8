"""PromptService settings (``SELMA_PROMPTS_*`` environment variables), on top of the shared ones.

LLM credentials never travel in requests.  A request names one with a ``SecretRef``
(``name``, ``key``) and the service resolves it here, in this order:

1. ``prompts_api_keys`` (``SELMA_PROMPTS_API_KEYS='{"openai": "sk-…"}'``), by ``name`` or ``name/key``;
2. a Kubernetes Secret mounted as files under ``prompts_secrets_dir``: ``<dir>/<name>/<key>``
   (``key`` defaults to ``api-key``);
3. an environment variable ``SELMA_PROMPTS_SECRET_<NAME>`` (or ``…_<NAME>_<KEY>``), upper-cased
   with non-alphanumerics as ``_``, e.g. from a Secret through ``envFrom``/``secretKeyRef``.

Only these places are searched, so a request cannot make the service send any other
credential (say, its S3 keys) to an endpoint.  An empty ``SecretRef`` means
``prompts_openai_api_key``, the default credential (empty = no ``Authorization`` header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from selma.config import SelmaSettings, resolve_secret

BackendKind = Literal["embedded", "tiny_test", "openai_compatible", "local_causal_lm"]
SECRET_ENV_PREFIX = "SELMA_PROMPTS_SECRET_"


class PromptSettings(SelmaSettings):
    """Settings of the prompt service; every field is ``SELMA_<FIELD>`` in the environment."""

    # --- limits
    prompts_max_count: int = Field(100_000, ge=1, description="Largest `count` a job may ask for.")
    prompts_preview_limit: int = Field(50, ge=1, description="Largest `count` PreviewPrompts runs (larger counts are capped).")
    prompts_preview_max_rejected: int = Field(200, ge=0, description="Rejected candidates returned by a preview, at most.")
    prompts_max_prompt_chars: int = Field(1000, ge=16, description="Candidates longer than this are rejected as TOO_LONG.")
    prompts_max_concurrent_jobs: int = Field(2, ge=1, description="Generation jobs running at once; more wait in PENDING.")
    prompts_checkpoint_seconds: float = Field(
        5.0, ge=0, description="Persist accepted prompts at most this often (0 = after every round of LLM requests)."
    )

    # --- skills
    prompts_skill_paths: list[Path] = Field(
        default_factory=list, description="YAML skill files or directories of them (JSON list), added to the built-in skills."
    )

    # --- LLM backends
    prompts_default_backend: BackendKind = Field("embedded", description="Backend for requests that name none.")
    prompts_openai_base_url: str = Field("", description="Default OpenAI-compatible base URL, up to and including /v1.")
    prompts_openai_model: str = Field("", description="Default model name for the OpenAI-compatible backend.")
    prompts_openai_api: Literal["chat", "completions"] = Field("chat", description="Default OpenAI API flavour.")
    prompts_openai_api_key: SecretStr = Field(SecretStr(""), description="Default API key (from a Kubernetes Secret); empty = none.")
    prompts_api_keys: dict[str, SecretStr] = Field(default_factory=dict, description="Named API keys a SecretRef may select (JSON).")
    prompts_allowed_base_urls: list[str] = Field(
        default_factory=list,
        description="Endpoints (besides prompts_openai_base_url) that may receive a configured API key (JSON list).",
    )
    prompts_secrets_dir: Path | None = Field(None, description="Directory of mounted Secrets: <dir>/<name>/<key>.")
    prompts_request_timeout_seconds: float = Field(60.0, gt=0, description="Default HTTP timeout per LLM request.")
    prompts_max_concurrency: int = Field(4, ge=1, le=64, description="Default LLM requests in flight per job.")
    prompts_max_retries: int = Field(3, ge=0, le=10, description="Default retries per LLM request (transport errors, 429, 5xx).")
    prompts_retry_backoff_seconds: float = Field(1.0, ge=0, description="First retry delay; doubles each retry.")
    prompts_retry_max_backoff_seconds: float = Field(30.0, ge=0, description="Longest delay between retries (also caps Retry-After).")
    prompts_max_tokens: int = Field(1024, ge=16, description="Default max_tokens per LLM request.")
    prompts_local_model: str = Field("", description="Default model path or hub id for the local_causal_lm backend.")
    prompts_local_batch_size: int = Field(8, ge=1, le=256, description="Requests generated together by a local model.")
    prompts_max_loaded_models: int = Field(2, ge=1, description="Local LLMs / embedding models kept in memory at once.")
    prompts_preload_default_backend: bool = Field(
        True, description="Load the default local backend before reporting SERVING (server only)."
    )
    prompts_embedding_device: str = Field("cpu", description="Default device of the embedding filter's model.")

    def api_key(self, name: str = "", key: str = "", *, field: str = "spec.backend.openai_compatible.api_key") -> SecretStr | None:
        """The credential a SecretRef names (see the module docstring); None for no credential."""
        return resolve_secret(name, key, default=self.prompts_openai_api_key, named=self.prompts_api_keys, secrets_dir=self.prompts_secrets_dir,
                              env_prefix=SECRET_ENV_PREFIX, prefix="prompts", field=field)

