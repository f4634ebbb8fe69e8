"""Settings of the render service (``SELMA_RENDER_*`` variables on top of the shared ``SELMA_*`` ones).

Field names start with ``render_`` and never end in ``_port`` / ``_service_host``: Kubernetes
injects ``SELMA_RENDER_PORT`` and friends for a Service called ``selma-render``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from selma.batch.settings import BatchSettings


class RenderSettings(BatchSettings):
    """Render service settings: default model, request limits, concurrency, and sharded renders (``SELMA_BATCH_*``: where shard workers run)."""

    # shard workers see the render limits and defaults the service validated the spec against
    WORKER_SETTING_PREFIXES: ClassVar[tuple[str, ...]] = ("render_",)
    WORKER_PRELOAD: ClassVar[tuple[str, ...]] = ("selma_render.shards",)

    render_default_model: str = Field(
        "",
        description="Model used when a request leaves model.source empty: hub id, local path or s3:// prefix; '' = none (requests must name one).",
    )
    render_preload_default_model: bool = Field(
        True, description="Load the default model before reporting SERVING, so the first job does not pay for it."
    )
    render_max_resolution: int = Field(2048, ge=8, description="Largest width or height a request may ask for, in pixels.")
    render_max_size_factor: float = Field(
        2.0, ge=1, description="Per-model maximum: width and height at most this multiple of the model's native size."
    )
    render_max_steps: int = Field(150, ge=1, le=10000, description="Most denoising steps a request may ask for.")
    render_default_batch_size: int = Field(4, ge=1, le=256, description="Images per pipeline call when a request says 0.")
    render_max_batch_size: int = Field(256, ge=1, description="Largest batch_size (images per pipeline call) a request may ask for.")
    render_max_images_per_prompt: int = Field(16, ge=1, description="Most images per prompt a request may ask for.")
    render_preview_max_prompts: int = Field(4, ge=1, le=64, description="Most prompts one Preview call may carry.")
    render_preview_max_images: int = Field(8, ge=1, le=256, description="Most images one Preview call may return.")
    render_max_concurrent_jobs: int = Field(1, ge=1, le=64, description="Dataset renders running at once (one per accelerator).")
    render_device_concurrency: int = Field(
        1, ge=1, le=64, description="Pipeline calls running at once on one device (concurrent dataset renders and previews). "
        "1 on an accelerator (memory); on CPU up to cores / OMP_NUM_THREADS, so render_max_concurrent_jobs datasets use more cores."
    )
    render_max_models: int = Field(2, ge=1, le=16, description="Loaded pipelines kept in memory (LRU).")
    render_watch_interval_seconds: float = Field(1.0, ge=0, description="Default minimum time between Watch updates.")
    render_shards: int = Field(
        0, ge=0, le=256,
        description="Shard workers of a dataset render whose request says shards=0; 0 = render in the service's own process (no workers).",
    )
    render_max_shards: int = Field(16, ge=0, le=256, description="Most shard workers one dataset render may ask for; 0 = sharded renders are refused.")
