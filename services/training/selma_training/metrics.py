"""Prometheus metrics of the training service and of the trainer process (labels bounded: launcher, skill, phase, API verb/code).

``selma_training_*`` are the service's view (read from the trainer's progress object);
``selma_trainer_*`` are exported by the trainer process itself (``selma train`` with a metrics
port: Kubernetes trainer pods, scraped by the chart's PodMonitor; the pod label comes from the scrape).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TRAINING_STEP = Gauge("selma_training_step", "Optimizer steps completed by the latest training job of a skill.", ["skill"])
TRAINING_MAX_STEPS = Gauge("selma_training_max_steps", "Optimizer steps planned for the latest training job of a skill.", ["skill"])
TRAINING_LOSS = Gauge("selma_training_loss", "Latest training loss of a skill's expert.", ["skill"])
TRAINING_STEPS_PER_SECOND = Gauge("selma_training_steps_per_second", "Recent optimizer steps per second of a skill's trainer.", ["skill"])
TRAINING_ETA = Gauge("selma_training_eta_seconds", "Estimated time to completion of a skill's trainer.", ["skill"])
TRAINING_VALIDATION_LOSS = Gauge("selma_training_validation_loss", "Latest validation loss of a skill's expert (early stopping on).", ["skill"])
CHECKPOINT_FALLBACKS = Counter("selma_training_checkpoint_fallbacks_total", "Resumes that skipped a corrupt checkpoint.")

# --- exported by the trainer process (``selma train``), not by the service
TRAINER_STEP = Gauge("selma_trainer_step", "Optimizer steps completed by this trainer.", ["skill"])
TRAINER_MAX_STEPS = Gauge("selma_trainer_max_steps", "Optimizer steps this trainer will run in all.", ["skill"])
TRAINER_LOSS = Gauge("selma_trainer_loss", "Loss of this trainer's latest optimizer step.", ["skill"])
TRAINER_STEPS_PER_SECOND = Gauge("selma_trainer_steps_per_second", "Optimizer steps per second of this trainer since it (re)started.", ["skill"])
TRAINER_VALIDATION_LOSS = Gauge("selma_trainer_validation_loss", "Validation loss of this trainer's latest evaluation (early stopping on).", ["skill"])
TRAINER_CHECKPOINTS = Counter("selma_trainer_checkpoints_total", "Checkpoints this trainer process saved.", ["skill"])
TRAINER_LAST_CHECKPOINT_STEP = Gauge("selma_trainer_last_checkpoint_step", "Step of the newest checkpoint (0: none yet).", ["skill"])
