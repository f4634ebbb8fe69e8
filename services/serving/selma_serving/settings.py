"""Settings of the serving service (``SELMA_SERVING_*``): base model, request limits, queue, caches."""

from __future__ import annotations

from pydantic import Field

from selma.config import SelmaSettings

GiB = 1024**3


class ServingSettings(SelmaSettings):
    """Everything the ServingService reads from its environment."""

    serving_base_model: str = Field("", description="Base model: hub id, local directory or s3:// / file:// prefix. Required to serve.")
    serving_base_revision: str = Field("", description="Hub revision of the base model; '' = main.")
    serving_base_variant: str = Field("", description="Weight variant of the base model, e.g. fp16; '' = default.")
    serving_base_vae: str = Field("", description="Optional replacement VAE for the base model.")
    serving_max_concurrent: int = Field(1, ge=1, description="Generations denoising at once (1 per GPU is typical).")
    serving_max_queue: int = Field(8, ge=0, description="Generate requests allowed to wait for a slot; more are RESOURCE_EXHAUSTED.")
    serving_max_batch_size: int = Field(
        0, ge=0, description="Most images in one batched pipeline call (requests for the same model and settings share it); "
        "1 = no batching, 0 = the device's default (8 on an accelerator, 1 on CPU: byte-identical re-renders of one seed)."
    )
    serving_batch_wait_ms: float | None = Field(
        None, ge=0, description="How long a new batch waits for companions before its first call; unset = the device's default (5 ms accelerator, 20 ms CPU)."
    )
    serving_mixed_batch_min_mixes: int = Field(
        0, ge=0, description="With batching on: requests with different per-request expert mixes (mean_delta at exact rank) "
        "share a batch, and a call runs them unfused, each image with its own mix, when at least this many of its distinct "
        "mixes have no fused merge cached (else one fused call per mix); 0 = never (each mix batches only with itself)."
    )
    serving_max_prompts: int = Field(16, ge=1, description="Prompts per Generate request.")
    serving_max_images_per_prompt: int = Field(8, ge=1, description="Images per prompt per Generate request.")
    serving_max_steps: int = Field(150, ge=1, description="Largest denoising step count a request may ask for.")
    serving_max_resolution: int = Field(1024, ge=8, description="Largest image width or height in pixels.")
    serving_max_size_factor: float = Field(
        2.0, ge=1, description="Per-model maximum: width and height at most this multiple of the base model's native size (a step's cost grows with its square)."
    )
    serving_max_prompt_tokens: int = Field(
        512, ge=1, description="Most tokenizer tokens in one prompt (the text encoder reads its first 77; the rest is dropped with a warning)."
    )
    serving_max_merge_weight: float = Field(100.0, gt=0, description="Largest |weight| of an expert in a merge or per-request mix.")
    serving_max_adapter_value: float = Field(
        1e4, gt=0, description="Largest |value| in an expert's or merged model's LoRA tensors (and merged deltas); larger ones are refused."
    )
    serving_merge_cache_bytes: int = Field(2 * GiB, ge=0, description="Memory for fused per-request expert mixes (LRU by bytes).")
    serving_expert_cache: int = Field(32, ge=1, description="Expert adapters kept parsed in memory (LRU by count).")
    serving_default_density: float = Field(0.5, gt=0, le=1, description="Density of TIES/DARE/magnitude merges when a request gives 0.")
    serving_merge_workers: int = Field(1, ge=1, description="Merge jobs running at once.")
    serving_gc_grace_seconds: float = Field(
        3600.0, ge=0, description="CollectGarbage leaves unreferenced artifacts, staging leftovers and job scratch younger than this."
    )
