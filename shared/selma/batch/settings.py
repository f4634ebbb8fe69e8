"""Settings of the batch platform (``SELMA_BATCH_*``): where and how workers run, for every service that launches them.

A service that runs work as batch workers (training: ``selma train``; evaluation: ``selma eval
execute``) extends :class:`BatchSettings` and names, in ``WORKER_SETTING_PREFIXES``, the prefixes of
its own settings that its workers must see; the launchers hand those (never secrets) to every
worker they start, locally or as a Kubernetes Job.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from selma.config import SelmaSettings


class BatchSettings(SelmaSettings):
    """The shared settings plus launcher, Kubernetes Job and worker options."""

    # The service's own setting prefixes its workers inherit (e.g. ("eval_",)); batch_* always travel.
    WORKER_SETTING_PREFIXES: ClassVar[tuple[str, ...]] = ()
    # Modules of the service's own workers the local launcher's warm worker imports ahead of jobs (besides batch_warm_preload).
    WORKER_PRELOAD: ClassVar[tuple[str, ...]] = ()

    batch_launcher: Literal["local", "kubernetes"] = Field("local", description="Default launcher: local subprocess or Kubernetes Job.")
    batch_max_local_jobs: int = Field(1, ge=1, description="Local worker subprocesses running at once; others wait PENDING.")
    batch_progress_interval_seconds: float = Field(2.0, ge=0, description="Workers: least time between progress writes.")
    batch_poll_seconds: float = Field(2.0, gt=0, description="Local launcher: how often a running worker's progress is read.")
    batch_python: str = Field("", description="Python interpreter for local workers; empty = the service's own.")
    batch_warm_worker: bool = Field(
        True, description="Local launcher: fork each worker from a warm process that has already imported the heavy libraries "
        "(selma.batch.zygote) instead of starting a fresh interpreter; jobs run as plain subprocesses while it starts or restarts.")
    batch_warm_preload: list[str] = Field(
        default_factory=lambda: ["torch", "diffusers", "diffusers.pipelines.auto_pipeline", "transformers", "peft", "safetensors.torch",
                                 "selma.app.cli", "selma.pipelines", "selma.artifacts", "selma.storage"],
        description="Modules the warm worker imports before it serves jobs (JSON list); they must run no torch op and start no thread at import.")
    batch_warm_start_timeout_seconds: float = Field(600.0, gt=0, le=3600, description="Longest the warm worker may take to import its modules.")
    # --- Kubernetes
    batch_namespace: str = Field("default", description="Namespace the worker Jobs are created in.")
    batch_kubeconfig: str = Field("", description="kubeconfig path; empty = in-cluster config, then ~/.kube/config.")
    batch_kube_context: str = Field("", description="kubeconfig context; empty = current.")
    batch_image: str = Field("ghcr.io/selma/selma:latest", description="Worker container image.")
    batch_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Image pull policy.")
    batch_service_account: str = Field("", description="ServiceAccount of worker pods; empty = namespace default.")
    batch_instance: str = Field("", max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
                                description="app.kubernetes.io/instance label of worker Jobs and pods (the Helm release name); empty = no label.")
    batch_storage_secret: str = Field("", description="Secret holding the S3 credentials for worker pods; empty = none (file storage / IRSA).")
    batch_storage_secret_access_key_key: str = Field("access-key", description="Key of the access key in that Secret.")
    batch_storage_secret_secret_key_key: str = Field("secret-key", description="Key of the secret key in that Secret.")
    batch_token_secret: str = Field("", description="Secret whose key `token` worker pods get as SELMA_TOKEN (calls to other services); empty = none.")
    batch_tls_secret: str = Field("", description="Secret with ca.crt, tls.crt and tls.key mounted at /etc/selma/client-tls in worker pods (TLS/mTLS to the services); empty = none.")
    batch_model_cache_pvc: str = Field("", description="PVC mounted at /models as the Hugging Face cache; empty = emptyDir.")
    batch_backoff_limit: int = Field(3, ge=0, le=20, description="Pod retries for genuine failures (pre-emption does not count).")
    batch_active_deadline_seconds: int = Field(2 * 24 * 3600, ge=60, description="Wall-clock limit per Job.")
    batch_ttl_seconds_after_finished: int = Field(7 * 24 * 3600, ge=0, description="Finished Jobs are garbage-collected after this.")
    batch_cpu_request: str = Field("2", description="Default CPU request of a worker pod.")
    batch_memory_request: str = Field("8Gi", description="Default memory request of a worker pod.")
    batch_memory_limit: str = Field("32Gi", description="Default memory limit of a worker pod.")
    batch_shm_size: str = Field("8Gi", description="Default size of the memory-backed /dev/shm.")
    batch_metrics_port: int = Field(9400, ge=1, le=65535, description="Prometheus /metrics port of worker pods (container port `metrics`; the PodMonitor scrapes it).")
    batch_watch_timeout_seconds: int = Field(30, ge=1, description="Server-side timeout of one Job watch; progress is re-read at least this often.")
    batch_rendezvous_port: int = Field(29500, ge=1, le=65535, description="Port of the distributed-training rendezvous (MASTER_PORT) on a multi-node Job's first pod.")
    batch_api_retries: int = Field(3, ge=0, le=10, description="Retries of a Kubernetes API call on connection errors.")
    # --- placement policy (operator-owned; the chart's placementPolicy): what a request's placement may ask of a Kubernetes Job.
    # A request outside it is refused before any Job is created (selma.batch.kube.check_policy).
    batch_policy_priority_classes: list[str] = Field(
        default_factory=list, description="PriorityClass names a request may set (JSON list); [] = none, only the cluster default."
    )
    batch_policy_tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Tolerations a request may set, in Kubernetes form [{key, operator, value, effect}] (JSON); each requested "
        "toleration must be covered by one of them (same key; Exists covers any value; no effect covers every effect). [] = none.",
    )
    batch_policy_node_selectors: dict[str, list[str]] = Field(
        default_factory=dict, description="Node label keys a request's node_selector may use, each with its allowed values ([] = any value), as JSON; {} = none."
    )
    batch_policy_runtime_classes: list[str] = Field(
        default_factory=list, description="RuntimeClass names a request may set (JSON list); [] = none, only the cluster default."
    )
    batch_policy_allow_affinity: bool = Field(False, description="Whether a request may set a pod affinity (it can pin pods to any node).")
    batch_policy_gpu_resource_names: list[str] = Field(
        default_factory=lambda: ["nvidia.com/gpu"], description="Extended resource names a request may ask GPUs as (JSON list)."
    )
    batch_policy_max_gpus: int = Field(1, ge=0, le=64, description="Most GPUs one worker pod may ask for.")
    batch_policy_max_nodes: int = Field(1, ge=1, le=64, description="Most nodes (pods of one Indexed Job) a distributed training job may span.")
    batch_policy_max_cpu: str = Field("16", description="Largest CPU request or limit of a worker pod (Kubernetes quantity).")
    batch_policy_max_memory: str = Field("64Gi", description="Largest memory request, limit or /dev/shm size of a worker pod (Kubernetes quantity).")
    batch_policy_max_active_deadline_seconds: int = Field(7 * 24 * 3600, ge=60, description="Longest active_deadline a request may set.")
    batch_policy_default_queue: str = Field("", description="Kueue LocalQueue of Jobs whose request names none; '' = no queue label.")
    # --- facts about the worker's own pod (downward API), shown in job details
    batch_pod_name: str = Field("", description="Set in worker pods from metadata.name.")
    batch_node_name: str = Field("", description="Set in worker pods from spec.nodeName.")
    batch_parent_pid: int = Field(0, ge=0, description="Set by the local launcher: the worker stops (checkpointing) when this process dies.")
    batch_completion_index: int = Field(-1, ge=-1, description="Set in Indexed Job pods from the completion-index annotation; -1 = not an Indexed Job.")

    @field_validator("batch_warm_preload", "batch_policy_priority_classes", "batch_policy_tolerations", "batch_policy_node_selectors",
                     "batch_policy_runtime_classes", "batch_policy_gpu_resource_names", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        # the environment gives these as JSON (pydantic-settings decodes it); other sources (a ConfigMap's
        # data read as values) may hand over the same JSON text
        return json.loads(v) if isinstance(v, str) else v

    @field_validator("batch_policy_max_cpu", "batch_policy_max_memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        parse_quantity(v)  # ValueError names the value
        return v

    def worker_env(self, *, secrets: bool) -> dict[str, str]:
        """``SELMA_*`` variables of the service's own settings its workers inherit (WORKER_SETTING_PREFIXES).

        ``secrets``: also secret values (local workers, which share the service's environment anyway);
        a Kubernetes Job never carries them: its pods read them from the service's Secret.
        """

        out: dict[str, str] = {}
        for name in type(self).model_fields:
            if not self.WORKER_SETTING_PREFIXES or not name.startswith(self.WORKER_SETTING_PREFIXES):
                continue
            value = getattr(self, name)
            if value is None:  # unset (e.g. no secrets dir): the worker's default is the same None
                continue
            if _is_secret(value):
                if not secrets:
                    continue
                value = _reveal(value)
            text = json.dumps(value, default=str) if isinstance(value, list | dict) else (str(value).lower() if isinstance(value, bool) else str(value))
            out[f"SELMA_{name.upper()}"] = text
        return out


_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))([eE][+-]?\d+|[KMGTPE]i|[mkMGTPE]|u|n)?$")
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Decimal("1e-9"), "u": Decimal("1e-6"),
           "m": Decimal("1e-3"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity ("500m", "16Gi", "1e3") as a number of base units (cores, bytes)."""
    m = _QUANTITY.match(str(text).strip())
    if not m:
        raise ValueError(f"{str(text)[:64]!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E") and suffix not in _SUFFIX:
        return number * Decimal(10) ** int(suffix[1:])
    return number * Decimal(_SUFFIX.get(suffix, 1))


def _is_secret(value: object) -> bool:
    """A SecretStr, or a collection holding one (e.g. ``eval_api_keys``)."""
    if hasattr(value, "get_secret_value"):
        return True
    if isinstance(value, dict):
        return any(_is_secret(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_is_secret(v) for v in value)
    return False


def _reveal(value: object) -> object:
    if hasattr(value, "get_secret_value"):
        return value.get_secret_value()  # type: ignore[union-attr]
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_reveal(v) for v in value]
    return value
