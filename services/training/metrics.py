"""Prometheus metrics of the training service (labels bounded: launcher, skill, phase, API verb/code)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TRAINING_STEP = Gauge("selma_training_step", "Optimizer steps completed by the latest training job of a skill.", ["skill"])
TRAINING_MAX_STEPS = Gauge("selma_training_max_steps", "Optimizer steps planned for the latest training job of a skill.", ["skill"])
TRAINING_LOSS = Gauge("selma_training_loss", "Latest training loss of a skill's expert.", ["skill"])
TRAINING_STEPS_PER_SECOND = Gauge("selma_training_steps_per_second", "Recent optimizer steps per second of a skill's trainer.", ["skill"])
TRAINING_ETA = Gauge("selma_training_eta_seconds", "Estimated time to completion of a skill's trainer.", ["skill"])
LAUNCHES = Counter("selma_training_launches_total", "Trainers launched (Kubernetes Jobs created, local processes started).", ["launcher"])
ADOPTIONS = Counter("selma_training_adoptions_total", "Existing Kubernetes Jobs adopted instead of created (restarts, retries).", ["launcher"])
CHECKPOINT_FALLBACKS = Counter("selma_training_checkpoint_fallbacks_total", "Resumes that skipped a corrupt checkpoint.")
KUBE_API_ERRORS = Counter("selma_training_kubernetes_api_errors_total", "Failed Kubernetes API calls, by verb and HTTP status.", ["verb", "code"])
OUTCOMES = Counter("selma_training_outcomes_total", "Finished launches by launcher and outcome.", ["launcher", "outcome"])
