"""Prometheus metrics of the batch platform, counted by the service that launches workers.

Labels are bounded: ``result`` (ready, failed), ``task`` (the worker's ``selma`` subcommand: train, eval), ``launcher``
(local, kubernetes), ``outcome`` and the Kubernetes API verb/status.
"""

from __future__ import annotations

from prometheus_client import Counter

LAUNCHES = Counter("selma_batch_launches_total", "Workers launched (Kubernetes Jobs created, local processes started).", ["task", "launcher"])
ADOPTIONS = Counter("selma_batch_adoptions_total", "Existing Kubernetes Jobs adopted instead of created (restarts, retries).", ["task", "launcher"])
KUBE_API_ERRORS = Counter("selma_batch_kubernetes_api_errors_total", "Failed Kubernetes API calls, by verb and HTTP status.", ["verb", "code"])
OUTCOMES = Counter("selma_batch_outcomes_total", "Finished launches by task, launcher and outcome.", ["task", "launcher", "outcome"])
WARM_STARTS = Counter("selma_batch_warm_worker_starts_total", "Starts of the local launcher's warm worker (selma.batch.zygote), by result (ready, failed).", ["result"])
