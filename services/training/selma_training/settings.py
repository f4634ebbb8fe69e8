"""Settings of the training service and of the trainer process (``SELMA_TRAINING_*``, on top of ``SELMA_BATCH_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from selma.batch.settings import BatchSettings


class TrainingSettings(BatchSettings):
    """The batch platform's settings plus the training service's own."""

    WORKER_SETTING_PREFIXES: ClassVar[tuple[str, ...]] = ("training_",)
    WORKER_PRELOAD: ClassVar[tuple[str, ...]] = ("selma_training.trainer",)

    training_default_model: str = Field("", description="Base model used when a request names none.")
    training_max_jobs: int = Field(64, ge=1, description="Training jobs the service follows at once (Kubernetes Jobs are only watched).")
    # --- admission (selma.jobs.JobManager): how many expert Jobs run at once in the service's namespace/queue
    training_max_concurrent_jobs: int = Field(
        0, ge=0, description="Training jobs admitted (launched) at once, e.g. the GPUs the cluster gives training; the others wait "
        "PENDING with their queue position, FIFO within a run and round robin between runs. 0 = batch_max_local_jobs with the "
        "local launcher, else training_max_jobs.")
    training_max_queued_jobs: int = Field(1000, ge=1, description="Training jobs that may wait for a slot; one more Start is RESOURCE_EXHAUSTED.")

    @property
    def training_admission_limit(self) -> int:
        """Training jobs admitted at once (0 = as many as the service follows); see ``training_max_concurrent_jobs``."""
        return self.training_max_concurrent_jobs or (self.batch_max_local_jobs if self.batch_launcher == "local" else 0)
    # --- request limits (a config over one is INVALID_ARGUMENT naming the setting, before anything is stored or launched)
    training_max_resolution: int = Field(2048, ge=8, description="Largest training resolution (pixels) a request may ask for.")
    training_max_batch_size: int = Field(256, ge=1, description="Largest batch size a request may ask for.")
    training_max_gradient_accumulation_steps: int = Field(256, ge=1, description="Most gradient-accumulation steps a request may ask for.")
    training_max_steps: int = Field(200_000, ge=1, description="Most optimizer steps a request may ask for.")
    training_max_rank: int = Field(1024, ge=1, description="Largest LoRA rank a request may ask for.")
    training_max_workers: int = Field(64, ge=1, description="Most trainer processes (nodes x processes_per_node) one distributed training job may ask for.")
    # --- distributed training (the trainer processes read it)
    training_distributed_timeout_seconds: int = Field(
        3600, ge=60, description="Longest wait of a trainer process on the others (a collective, or rank 0 building the latent cache) before the run fails."
    )
