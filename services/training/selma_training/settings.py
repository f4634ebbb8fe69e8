"""Settings of the training service and of the trainer process (``SELMA_TRAINING_*``, on top of ``SELMA_BATCH_*``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from selma.batch.settings import BatchSettings


class TrainingSettings(BatchSettings):
    """The batch platform's settings plus the training service's own."""

    WORKER_SETTING_PREFIXES: ClassVar[tuple[str, ...]] = ("training_",)

    training_default_model: str = Field("", description="Base model used when a request names none.")
    training_max_jobs: int = Field(64, ge=1, description="Training jobs the service follows at once (Kubernetes Jobs are only watched).")
