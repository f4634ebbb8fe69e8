"""Settings of the training service and of the trainer process (``SELMA_TRAINING_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from selma_evaluation.settings import EvaluationSettings


class TrainingSettings(EvaluationSettings):
    """The shared settings plus launcher, Kubernetes Job and trainer options."""

    training_default_model: str = Field("", description="Base model used when a request names none.")
    training_launcher: Literal["local", "kubernetes"] = Field("local", description="Default launcher: local subprocess or Kubernetes Job.")
    training_max_local_jobs: int = Field(1, ge=1, description="Local trainer subprocesses running at once; others wait PENDING.")
    training_max_jobs: int = Field(64, ge=1, description="Training jobs the service follows at once (Kubernetes Jobs are only watched).")
    training_progress_interval_seconds: float = Field(2.0, ge=0, description="Trainer: least time between progress writes.")
    training_poll_seconds: float = Field(2.0, gt=0, description="Local launcher: how often a running trainer's progress is read.")
    training_python: str = Field("", description="Python interpreter for local trainers; empty = the service's own.")
    # --- Kubernetes
    training_namespace: str = Field("default", description="Namespace the training Jobs are created in.")
    training_kubeconfig: str = Field("", description="kubeconfig path; empty = in-cluster config, then ~/.kube/config.")
    training_kube_context: str = Field("", description="kubeconfig context; empty = current.")
    training_image: str = Field("ghcr.io/selma/selma:latest", description="Trainer container image.")
    training_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Image pull policy.")
    training_service_account: str = Field("", description="ServiceAccount of trainer pods; empty = namespace default.")
    training_instance: str = Field("", max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
                                   description="app.kubernetes.io/instance label of trainer Jobs and pods (the Helm release name); empty = no label.")
    training_storage_secret: str = Field("", description="Secret holding the S3 credentials for trainer pods; empty = none (file storage / IRSA).")
    training_storage_secret_access_key_key: str = Field("access-key", description="Key of the access key in that Secret.")
    training_storage_secret_secret_key_key: str = Field("secret-key", description="Key of the secret key in that Secret.")
    training_model_cache_pvc: str = Field("", description="PVC mounted at /models as the Hugging Face cache; empty = emptyDir.")
    training_backoff_limit: int = Field(3, ge=0, le=20, description="Pod retries for genuine failures (pre-emption does not count).")
    training_active_deadline_seconds: int = Field(2 * 24 * 3600, ge=60, description="Wall-clock limit per Job.")
    training_ttl_seconds_after_finished: int = Field(7 * 24 * 3600, ge=0, description="Finished Jobs are garbage-collected after this.")
    training_cpu_request: str = Field("2", description="Default CPU request of a trainer pod.")
    training_memory_request: str = Field("8Gi", description="Default memory request of a trainer pod.")
    training_memory_limit: str = Field("32Gi", description="Default memory limit of a trainer pod.")
    training_shm_size: str = Field("8Gi", description="Default size of the memory-backed /dev/shm.")
    training_metrics_port: int = Field(9400, ge=1, le=65535, description="Prometheus /metrics port of trainer pods (container port `metrics`; the PodMonitor scrapes it).")
    training_watch_timeout_seconds: int = Field(30, ge=1, description="Server-side timeout of one Job watch; progress is re-read at least this often.")
    training_api_retries: int = Field(3, ge=0, le=10, description="Retries of a Kubernetes API call on connection errors.")
    # --- facts about the trainer's own pod (downward API), shown in job details
    training_pod_name: str = Field("", description="Set in trainer pods from metadata.name.")
    training_node_name: str = Field("", description="Set in trainer pods from spec.nodeName.")
    training_parent_pid: int = Field(0, ge=0, description="Set by the local launcher: the trainer stops (checkpointing) when this process dies.")
