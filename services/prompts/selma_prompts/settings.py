"""PromptService settings (``SELMA_PROMPTS_*``), on top of the LLM layer's (``SELMA_LLM_*``, with the credentials)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from selma.llm.settings import LlmSettings


class PromptSettings(LlmSettings):
    """Settings of the prompt service; every field is ``SELMA_<FIELD>`` in the environment."""

    # --- limits
    prompts_max_count: int = Field(100_000, ge=1, description="Largest `count` a job may ask for.")
    prompts_preview_limit: int = Field(50, ge=1, description="Largest `count` PreviewPrompts runs (larger counts are capped).")
    prompts_preview_max_rejected: int = Field(200, ge=0, description="Rejected candidates returned by a preview, at most.")
    prompts_max_prompt_chars: int = Field(1000, ge=16, description="Candidates longer than this are rejected as TOO_LONG.")
    prompts_max_concurrent_jobs: int = Field(
        8, ge=1, description="Generation jobs running at once; more wait in PENDING.  Jobs on one local model share its "
        "batching queue (SELMA_LLM_LOCAL_MAX_BATCH), so a SkillSet's skills are decoded together.")
    prompts_checkpoint_seconds: float = Field(
        5.0, ge=0, description="Persist accepted prompts at most this often (0 = after every round of LLM requests)."
    )

    # --- skills
    prompts_skill_paths: list[Path] = Field(
        default_factory=list, description="YAML skill files or directories of them (JSON list), added to the built-in skills."
    )

    # --- the LLM backends' defaults and credentials are selma.llm.settings.LlmSettings (SELMA_LLM_*)
    prompts_preload_default_backend: bool = Field(
        True, description="Load the default local backend before reporting SERVING (server only)."
    )
    prompts_embedding_device: str = Field("cpu", description="Default device of the embedding filter's model.")
