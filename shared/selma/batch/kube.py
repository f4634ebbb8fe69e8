"""The Kubernetes launcher: one ``batch/v1`` Job per expert, built by a pure function.

* :func:`build_job` turns a launch request + settings into the Job manifest (a plain dict,
  schema-valid for Kubernetes 1.33): deterministic DNS-safe name from run and skill (plus a
  short hash of the job id, so two keys for one skill never collide), ``app.kubernetes.io/*``
  and ``selma.dev/*`` labels (the service rebuilds its view from them), restartPolicy Never,
  ``backoffLimit``, a ``podFailurePolicy`` that ignores pod disruptions (pre-emption, node
  drain: condition ``DisruptionTarget``) so they do not use up the retry budget and that fails
  the Job at once on exit code 2 (bad input: retrying cannot help), ``activeDeadlineSeconds``,
  ``ttlSecondsAfterFinished``, image and service account from settings, storage credentials
  from a Secret (``valueFrom.secretKeyRef``, never inline), GPU limits, node selector,
  tolerations, affinity, priority class, runtime class, the optional Kueue queue label (the
  policy's default queue when a request names none; such a Job is created ``suspend: true``, so
  Kueue admits it whole, all its pods or none, when its ClusterQueue has the quota), the
  model-cache volume (a PVC) and a memory-backed ``/dev/shm``.  Pods are hardened like the
  chart's services: non-root as the image's user (10001), read-only root filesystem with
  writable emptyDirs where the trainer writes (``/tmp``, which is also ``HOME`` and the
  XDG/torch caches, and the data dir ``/var/lib/selma``; Hugging Face caches live on the
  model-cache volume), seccomp RuntimeDefault, no privilege escalation, all capabilities
  dropped, no service links and no API token (trainers never call the Kubernetes API).
  Trainers expose Prometheus metrics (``selma_trainer_*{skill}``) on a container port named
  ``metrics`` (:data:`METRICS_PORT_NAME`, ``batch_metrics_port``, bound on 0.0.0.0), which the
  chart's PodMonitor scrapes; the service's ``selma_training_*{skill}`` gauges carry the same
  progress from the progress object.
* A **distributed training** request (``LaunchRequest.nodes`` > 0) is an Indexed Job of one pod
  per node, all at once, ``backoffLimit`` 0 (a rank cannot be replaced alone), pods in the
  subdomain of :func:`build_rendezvous_service` — a headless Service named like the Job and owned
  by it — with torchrun-style ``MASTER_ADDR`` (pod 0's DNS name), ``MASTER_PORT``
  (``batch_rendezvous_port``), ``WORLD_SIZE``, ``NNODES``, ``NPROC_PER_NODE`` and ``NODE_RANK``
  (the completion index); the pod's ``selma train`` starts the node's processes
  (:mod:`selma_training.distributed`).  :meth:`KubernetesLauncher.run` creates the Service beside
  the Job, deletes it when the Job ends, and runs a failed Job again as a new attempt (new Job and
  Service names) up to the placement's ``max_retries``: every rank resumes from the last checkpoint.
* :func:`check_policy` holds every request's placement to the operator's policy
  (``SELMA_BATCH_POLICY_*``, the chart's ``placementPolicy``): allowed priority classes,
  tolerations, node selectors, runtime classes, GPU resource names, affinity, and maxima of GPUs,
  CPU, memory and deadline; :meth:`KubernetesLauncher.validate` runs it before any Job exists.
* :class:`KubernetesLauncher` creates it idempotently (409 → adopt the existing Job if it
  carries our job id), follows it with a watch (``resourceVersion`` + server-side
  ``timeoutSeconds``, re-listing on 410 Gone; no sleep-polling), cancels by deleting with
  background propagation, and lists our Jobs by label after a restart.  API unreachable →
  UNAVAILABLE; 401/403 → PERMISSION_DENIED saying which RBAC rule is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
from typing import Any

from selma.batch import metrics
from selma.batch.launchers import ATTEMPT_STRIDE, EXIT_BAD_INPUT, Launcher, LaunchRequest, Monitor, Outcome
from selma.batch.settings import BatchSettings, parse_quantity
from selma.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    SelmaError,
    Unavailable,
    quote,
)
from selma.limits import check_at_most, setting_name

log = logging.getLogger(__name__)

CONTAINER = "trainer"
METRICS_PORT_NAME = "metrics"  # the chart's PodMonitor scrapes the port by this name
MANAGED_BY = "selma-training"
LABEL_JOB_ID = "selma.dev/job-id"
LABEL_RUN = "selma.dev/run"
LABEL_SKILL = "selma.dev/skill"
LABEL_TASK = "selma.dev/task"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ANN_KEY = "selma.dev/idempotency-key"
ANN_CONFIG = "selma.dev/config-uri"
ANN_EXPERT = "selma.dev/expert-id"
ANN_ATTEMPT = "selma.dev/attempt"  # LaunchRequest.attempt: which of a job's Jobs this is
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # the Job controller puts it on every pod of the Job
RENDEZVOUS_PORT_NAME = "rendezvous"
INSTANCE_LABEL = "app.kubernetes.io/instance"
# The image's user and group (Dockerfile ARG SELMA_UID); the chart's podSecurityContext uses the same.
TRAINER_UID = 10001
DATA_DIR = "/var/lib/selma"
MODEL_CACHE_DIR = "/models"
CLIENT_TLS_DIR = "/etc/selma/client-tls"  # SELMA_BATCH_TLS_SECRET, mounted read-only

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[mkMGTPE]|u|n)?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_OPERATORS = {"TOLERATION_OPERATOR_EQUAL": "Equal", "TOLERATION_OPERATOR_EXISTS": "Exists"}
_EFFECTS = {"TAINT_EFFECT_NO_SCHEDULE": "NoSchedule", "TAINT_EFFECT_PREFER_NO_SCHEDULE": "PreferNoSchedule", "TAINT_EFFECT_NO_EXECUTE": "NoExecute"}


def dns_part(text: str) -> str:
    """Lower-case DNS-label characters only, runs of others collapsed to '-'."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def _label_value(text: str) -> str:
    """The name itself when it is a valid label value (so state rebuilt from labels keeps it), else its DNS form."""
    return text if len(text) <= 63 and _LABEL_VALUE.match(text) else dns_part(text)[:63]


def job_name(run: str, skill: str, job_id: str, task: str = "train", attempt: int = 0) -> str:
    """``selma-<task>-<run>-<skill>-<hash>``, at most 63 characters, stable for a job id (and ``attempt``, when > 0)."""
    h = hashlib.sha256((f"{job_id}#{attempt}" if attempt else job_id).encode()).hexdigest()[:8]
    base = dns_part(f"selma-{task}-{run}-{skill}")[: 63 - 9].strip("-")
    return f"{base}-{h}"


def _duration_seconds(value: Any) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value)
    if text.endswith("s"):
        return int(float(text[:-1]))
    raise InvalidArgument(f"active_deadline must be a duration like '3600s'; got {value!r}", field="spec.placement.active_deadline")


def validate_placement(p: dict[str, Any]) -> None:
    """Placement checks a Job needs, before anything is created."""
    f = "spec.placement"
    gpus = int(p.get("gpus", 0))
    if not 0 <= gpus <= 8:
        raise InvalidArgument(f"gpus must be in 0..8; got {gpus}", field=f"{f}.gpus")
    retries = p.get("max_retries")
    if retries is not None and not 0 <= int(retries) <= 20:
        raise InvalidArgument(f"max_retries must be in 0..20; got {retries}", field=f"{f}.max_retries")
    for k, v in (p.get("resources") or {}).items():
        if v and not _QUANTITY.match(str(v)):
            raise InvalidArgument(f"{k} {v!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')", field=f"{f}.resources.{k}")
    for k, v in (p.get("node_selector") or {}).items():
        if not _LABEL_KEY.match(k) or not _LABEL_VALUE.match(v) or len(v) > 63:
            raise InvalidArgument(f"node_selector {k}={v} is not a valid label", field=f"{f}.node_selector")
    for i, t in enumerate(p.get("tolerations") or []):
        op = _OPERATORS.get(t.get("operator", ""), "Equal")
        if op == "Exists" and t.get("value"):
            raise InvalidArgument("a toleration with operator EXISTS must not have a value", field=f"{f}.tolerations[{i}].value")
        if op == "Equal" and not t.get("key"):
            raise InvalidArgument("a toleration with operator EQUAL needs a key", field=f"{f}.tolerations[{i}].key")
        if "toleration_seconds" in t and t.get("effect") != "TAINT_EFFECT_NO_EXECUTE":
            raise InvalidArgument("toleration_seconds is only allowed with effect NO_EXECUTE", field=f"{f}.tolerations[{i}].toleration_seconds")
    aff = p.get("affinity") or {}
    extra = set(aff) - {"nodeAffinity", "podAffinity", "podAntiAffinity"}
    if extra:
        raise InvalidArgument(f"affinity may only hold nodeAffinity, podAffinity, podAntiAffinity; got {sorted(extra)}", field=f"{f}.affinity")
    for name in ("priority_class_name", "runtime_class_name"):
        v = p.get(name, "")
        if v and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", v):
            raise InvalidArgument(f"{name} {v!r} is not a valid Kubernetes name", field=f"{f}.{name}")
    q = p.get("queue_name", "")
    if q and (not _DNS_LABEL.match(q) or len(q) > 63):
        raise InvalidArgument(f"queue_name {q!r} is not a valid LocalQueue name", field=f"{f}.queue_name")
    _duration_seconds(p.get("active_deadline"))


# --- the operator's placement policy --------------------------------------------------------------


def _allowed(value: str, allowed: list[str], fld: str, what: str, setting: str) -> None:
    if value and value not in allowed:
        offer = f"allowed: {', '.join(sorted(allowed))}" if allowed else "none is allowed beyond the cluster default"
        raise PermissionDenied(f"{what} {quote(value)} is not allowed by the placement policy ({offer}; {setting_name(setting)})", field=fld)


def _covers(allowed: dict[str, Any], t: dict[str, Any]) -> bool:
    """Whether an allowed toleration (Kubernetes form) tolerates at least everything requested toleration ``t`` (proto form) does."""
    op = _OPERATORS.get(t.get("operator", ""), "Equal")
    a_op = str(allowed.get("operator") or "Equal")
    a_key, a_effect = str(allowed.get("key") or ""), str(allowed.get("effect") or "")
    if a_key and t.get("key", "") != a_key:  # an empty allowed key (with Exists) covers every key
        return False
    if a_op == "Equal" and (op != "Equal" or t.get("value", "") != str(allowed.get("value") or "") or not a_key):
        return False
    return not a_effect or _EFFECTS.get(t.get("effect", ""), "") == a_effect


def _quantity(value: Any, fld: str) -> Any:
    try:
        return parse_quantity(str(value))
    except ValueError as e:
        raise InvalidArgument(str(e), field=fld) from None


def check_policy(p: dict[str, Any], settings: BatchSettings) -> None:
    """The operator's placement policy (``SELMA_BATCH_POLICY_*``, the chart's ``placementPolicy``), before any Job is created.

    Asking for what the policy does not allow (a priority class, toleration, node selector, runtime
    class, GPU resource or affinity) is PERMISSION_DENIED; asking for more than a maximum (GPUs, CPU,
    memory, deadline) is INVALID_ARGUMENT.  Both name the setting that would allow it.
    """
    f = "spec.placement"
    _allowed(p.get("priority_class_name", ""), settings.batch_policy_priority_classes, f"{f}.priority_class_name", "priority class",
             "batch_policy_priority_classes")
    _allowed(p.get("runtime_class_name", ""), settings.batch_policy_runtime_classes, f"{f}.runtime_class_name", "runtime class",
             "batch_policy_runtime_classes")
    _allowed(p.get("gpu_resource_name", ""), settings.batch_policy_gpu_resource_names, f"{f}.gpu_resource_name", "GPU resource",
             "batch_policy_gpu_resource_names")
    for i, t in enumerate(p.get("tolerations") or []):
        if not any(_covers(a, t) for a in settings.batch_policy_tolerations):
            shown = _tolerations([t])[0]
            raise PermissionDenied(
                f"toleration {quote(json.dumps(shown, sort_keys=True), 160)} is not allowed by the placement policy "
                f"({'; '.join(json.dumps(a, sort_keys=True) for a in settings.batch_policy_tolerations)[:400] or 'no toleration is allowed'}; "
                f"{setting_name('batch_policy_tolerations')})",
                field=f"{f}.tolerations[{i}]",
            )
    for k, v in (p.get("node_selector") or {}).items():
        values = settings.batch_policy_node_selectors.get(k)
        if values is None or (values and v not in values):
            raise PermissionDenied(
                f"node_selector {quote(f'{k}={v}')} is not allowed by the placement policy (allowed keys: "
                f"{', '.join(sorted(settings.batch_policy_node_selectors)) or 'none'}; {setting_name('batch_policy_node_selectors')})",
                field=f"{f}.node_selector",
            )
    if p.get("affinity") and not settings.batch_policy_allow_affinity:
        raise PermissionDenied(f"affinity is not allowed by the placement policy ({setting_name('batch_policy_allow_affinity')})",
                               field=f"{f}.affinity")
    check_at_most(int(p.get("gpus", 0) or 0), f"{f}.gpus", settings.batch_policy_max_gpus, "batch_policy_max_gpus", "gpus")
    res = p.get("resources") or {}
    for key, setting in (("cpu_request", "batch_policy_max_cpu"), ("cpu_limit", "batch_policy_max_cpu"),
                         ("memory_request", "batch_policy_max_memory"), ("memory_limit", "batch_policy_max_memory"),
                         ("shm_size", "batch_policy_max_memory")):
        if res.get(key) and _quantity(res[key], f"{f}.resources.{key}") > parse_quantity(getattr(settings, setting)):
            raise InvalidArgument(f"{key} {quote(res[key])} is over the placement policy's maximum "
                                  f"{setting_name(setting)}={getattr(settings, setting)}", field=f"{f}.resources.{key}")
    deadline = _duration_seconds(p.get("active_deadline"))
    if deadline is not None:
        check_at_most(deadline, f"{f}.active_deadline", settings.batch_policy_max_active_deadline_seconds,
                      "batch_policy_max_active_deadline_seconds", "active_deadline (s)")


def _tolerations(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in items:
        tol: dict[str, Any] = {}
        if t.get("key"):
            tol["key"] = t["key"]
        tol["operator"] = _OPERATORS.get(t.get("operator", ""), "Equal")
        if t.get("value"):
            tol["value"] = t["value"]
        if t.get("effect") in _EFFECTS:
            tol["effect"] = _EFFECTS[t["effect"]]
        if "toleration_seconds" in t:
            tol["tolerationSeconds"] = int(t["toleration_seconds"])
        out.append(tol)
    return out


def job_labels(req: LaunchRequest, settings: BatchSettings | None = None) -> dict[str, str]:
    """Labels of the Job (its pods get the same minus the Kueue queue); ours override the request's."""
    labels = {k: v for k, v in req.labels.items() if _LABEL_KEY.match(k) and _LABEL_VALUE.match(v) and len(v) <= 63}
    labels.update({
        "app.kubernetes.io/name": "selma",
        "app.kubernetes.io/component": "trainer",  # every batch worker (selma.dev/task tells them apart): the chart's NetworkPolicy selects them so
        "app.kubernetes.io/part-of": "selma",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB_ID: req.job_id,
        LABEL_RUN: _label_value(req.run),
        LABEL_SKILL: _label_value(req.skill),
        LABEL_TASK: req.task,
    })
    # The instance is the service's (the Helm release, whose NetworkPolicy selects its trainer pods
    # by it); a request's labels must not claim some release's identity.
    labels.pop(INSTANCE_LABEL, None)
    if settings is not None and settings.batch_instance:
        labels[INSTANCE_LABEL] = settings.batch_instance
    queue = req.placement.get("queue_name", "") or (settings.batch_policy_default_queue if settings is not None else "")
    if queue:
        labels[KUEUE_LABEL] = queue
    return labels


def build_job(req: LaunchRequest, settings: BatchSettings) -> dict[str, Any]:
    """The ``batch/v1`` Job manifest that runs ``selma train --config <uri>`` (pure: no API calls)."""
    p = req.placement
    name = job_name(req.run, req.skill, req.job_id, req.task, req.attempt)
    labels = job_labels(req, settings)
    annotations = {ANN_KEY: req.idempotency_key, ANN_CONFIG: req.config_uri, ANN_EXPERT: req.expert_id, ANN_ATTEMPT: str(req.attempt)}
    res = p.get("resources") or {}
    gpus = int(p.get("gpus", 0))  # proto: 0 = CPU only
    gpu_name = p.get("gpu_resource_name") or "nvidia.com/gpu"
    requests = {"cpu": res.get("cpu_request") or settings.batch_cpu_request, "memory": res.get("memory_request") or settings.batch_memory_request}
    limits: dict[str, str] = {"memory": res.get("memory_limit") or settings.batch_memory_limit}
    if res.get("cpu_limit"):
        limits["cpu"] = res["cpu_limit"]
    if gpus:
        limits[gpu_name] = str(gpus)  # extended resources: limits only, as strings (client models are typed)
    env: list[dict[str, Any]] = [
        {"name": "SELMA_STORAGE_URI", "value": settings.resolved_storage_uri},
        {"name": "SELMA_MODEL_CACHE_DIR", "value": MODEL_CACHE_DIR},
        {"name": "SELMA_DATA_DIR", "value": DATA_DIR},
        {"name": "SELMA_HF_OFFLINE", "value": str(settings.hf_offline).lower()},
        {"name": "SELMA_LOG_FORMAT", "value": "json"},
        {"name": "SELMA_LOG_LEVEL", "value": settings.log_level},
        {"name": "SELMA_DEVICE", "value": "cuda" if gpus else "cpu"},
        {"name": "SELMA_BATCH_PROGRESS_INTERVAL_SECONDS", "value": str(settings.batch_progress_interval_seconds)},
        # the trainer's /metrics server (selma_trainer_*): reachable by the pod IP, scraped by the PodMonitor
        {"name": "SELMA_HOST", "value": "0.0.0.0"},
        {"name": "SELMA_METRICS_PORT", "value": str(settings.batch_metrics_port)},
        {"name": "SELMA_BATCH_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "SELMA_BATCH_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        *([{"name": "SELMA_BATCH_COMPLETION_INDEX", "valueFrom": _completion_index_ref()}] if req.completions or req.nodes else []),
        *_rendezvous_env(req, name, settings),
        {"name": "HF_HOME", "value": MODEL_CACHE_DIR},
        # The root filesystem is read-only: libraries that cache under $HOME or XDG dirs
        # (torch inductor/triton, matplotlib, fontconfig) write to the /tmp emptyDir instead.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
    ]
    # the launching service's own settings (eval_*: VQA defaults, serving endpoint); secret ones are not
    # copied into the Job: they stay in the service's Secret
    env += [{"name": k, "value": v} for k, v in (req.service_settings or settings).worker_env(secrets=False).items()]
    if settings.s3_endpoint:
        env.append({"name": "SELMA_S3_ENDPOINT", "value": settings.s3_endpoint})
        env.append({"name": "SELMA_S3_SECURE", "value": str(settings.s3_secure).lower()})
    if settings.s3_region:
        env.append({"name": "SELMA_S3_REGION", "value": settings.s3_region})
    if settings.batch_storage_secret:
        for var, key in (("SELMA_S3_ACCESS_KEY", settings.batch_storage_secret_access_key_key),
                         ("SELMA_S3_SECRET_KEY", settings.batch_storage_secret_secret_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": settings.batch_storage_secret, "key": key}}})
    shm = res.get("shm_size") or settings.batch_shm_size
    volumes: list[dict[str, Any]] = [
        {"name": "model-cache", **({"persistentVolumeClaim": {"claimName": settings.batch_model_cache_pvc}}
                                   if settings.batch_model_cache_pvc else {"emptyDir": {}})},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "data", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = []
    # Workers that call other services (evaluation -> serving) authenticate with the chart's worker token
    # and verify the services with its CA: both from Secrets, never a value in the manifest or job record.
    if settings.batch_token_secret:
        env.append({"name": "SELMA_TOKEN", "valueFrom": {"secretKeyRef": {"name": settings.batch_token_secret, "key": "token"}}})
    if settings.batch_tls_secret:
        volumes.append({"name": "client-tls", "secret": {"secretName": settings.batch_tls_secret, "defaultMode": 0o440}})
        mounts.append({"name": "client-tls", "mountPath": CLIENT_TLS_DIR, "readOnly": True})
        env += [{"name": "SELMA_TLS_CA", "value": f"{CLIENT_TLS_DIR}/ca.crt"},
                {"name": "SELMA_TLS_CLIENT_CERT", "value": f"{CLIENT_TLS_DIR}/tls.crt"},
                {"name": "SELMA_TLS_CLIENT_KEY", "value": f"{CLIENT_TLS_DIR}/tls.key"}]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.batch_image,
        "imagePullPolicy": settings.batch_image_pull_policy,
        "command": ["selma", *req.args],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": settings.batch_metrics_port, "protocol": "TCP"},
                  *([{"name": RENDEZVOUS_PORT_NAME, "containerPort": settings.batch_rendezvous_port, "protocol": "TCP"}] if req.nodes else [])],
        "env": env,
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "model-cache", "mountPath": MODEL_CACHE_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "data", "mountPath": DATA_DIR},
            *mounts,
        ],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,  # the model-cache PVC is writable by the trainer
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # No SELMA_<SERVICE>_PORT=tcp://... variables injected into the trainer's settings.
        "enableServiceLinks": False,
        # Trainers never call the Kubernetes API.
        "automountServiceAccountToken": False,
        # the trainer checkpoints on SIGTERM; give it time to finish a step and upload
        "terminationGracePeriodSeconds": 120,
    }
    if settings.batch_service_account:
        pod_spec["serviceAccountName"] = settings.batch_service_account
    if req.nodes:
        pod_spec["subdomain"] = name  # pod <job>-<index> is <job>-<index>.<job> through the headless Service
    if p.get("node_selector"):
        pod_spec["nodeSelector"] = dict(p["node_selector"])
    if p.get("tolerations"):
        pod_spec["tolerations"] = _tolerations(p["tolerations"])
    if p.get("affinity"):
        pod_spec["affinity"] = json.loads(json.dumps(p["affinity"]))
    if p.get("priority_class_name"):
        pod_spec["priorityClassName"] = p["priority_class_name"]
    if p.get("runtime_class_name"):
        pod_spec["runtimeClassName"] = p["runtime_class_name"]
    deadline = _duration_seconds(p.get("active_deadline")) or settings.batch_active_deadline_seconds
    retries = int(p["max_retries"]) if p.get("max_retries") is not None else settings.batch_backoff_limit
    pod_labels = {k: v for k, v in labels.items() if k != KUEUE_LABEL}
    # An Indexed Job: one pod per shard (completion index), all at once; a failed index is retried on its own,
    # up to the retries per index, while the others go on.
    indexed: dict[str, Any] = (
        {"completionMode": "Indexed", "completions": req.completions, "parallelism": req.completions, "backoffLimitPerIndex": retries}
        if req.completions else {}
    )
    backoff = retries * req.completions if req.completions else retries
    if req.nodes:
        # Distributed training: one pod per node, all at once. A rank cannot be replaced alone (the others
        # would wait on it), so any failed pod fails the Job and the launcher starts the whole run again
        # as a new attempt, which resumes from the last checkpoint (KubernetesLauncher.run).
        indexed = {"completionMode": "Indexed", "completions": req.nodes, "parallelism": req.nodes}
        backoff = 0
    # Queued with Kueue: created suspended, so no pod starts before Kueue admits the whole Job (gang
    # admission: every pod of it, or none) and unsuspends it; without Kueue running it stays suspended.
    suspended: dict[str, Any] = {"suspend": True} if KUEUE_LABEL in labels else {}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": settings.batch_namespace, "labels": labels, "annotations": annotations},
        "spec": {
            **indexed,
            **suspended,
            "backoffLimit": backoff,
            "activeDeadlineSeconds": deadline,
            "ttlSecondsAfterFinished": settings.batch_ttl_seconds_after_finished,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                    {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}},
                ]
            },
            "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def _completion_index_ref() -> dict[str, Any]:
    """A pod's completion index (Indexed Jobs), for an env ``valueFrom``: a fresh dict each time (manifests are mutable)."""
    return {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}


def _rendezvous_env(req: LaunchRequest, name: str, settings: BatchSettings) -> list[dict[str, Any]]:
    """torchrun-style variables of a distributed training pod; the trainer's torchrun agent gives each
    process RANK = NODE_RANK × NPROC_PER_NODE + LOCAL_RANK from them (selma_training.distributed)."""
    if not req.nodes:
        return []
    return [
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},  # the first pod, through the headless Service
        {"name": "MASTER_PORT", "value": str(settings.batch_rendezvous_port)},
        {"name": "NNODES", "value": str(req.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(req.processes_per_node)},
        {"name": "WORLD_SIZE", "value": str(req.nodes * req.processes_per_node)},
        {"name": "NODE_RANK", "valueFrom": _completion_index_ref()},
    ]


def build_rendezvous_service(req: LaunchRequest, settings: BatchSettings, job_uid: str) -> dict[str, Any]:
    """The headless Service of a distributed training Job (pure): DNS names ``<job>-<index>.<job>`` for its pods.

    Owned by the Job (``ownerReferences``), so Kubernetes' garbage collector deletes it with the Job;
    the launcher also deletes it as soon as the Job has ended.  It publishes pods before they are
    ready: ranks resolve each other while they start.
    """
    name = job_name(req.run, req.skill, req.job_id, req.task, req.attempt)
    labels = {k: v for k, v in job_labels(req, settings).items() if k != KUEUE_LABEL}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": settings.batch_namespace,
            "labels": labels,
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": job_uid}],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {JOB_NAME_LABEL: name},
            "publishNotReadyAddresses": True,
            "ports": [{"name": RENDEZVOUS_PORT_NAME, "port": settings.batch_rendezvous_port,
                       "targetPort": settings.batch_rendezvous_port, "protocol": "TCP"}],
        },
    }


# --- the launcher ----------------------------------------------------------------------------


def job_state(job: dict[str, Any]) -> tuple[str, str, str]:
    """(state, reason, message) of a Job object: pending, queued, running, succeeded or failed."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet"):
            return "succeeded", cond.get("reason", ""), cond.get("message", "")
        if cond.get("type") in ("Failed", "FailureTarget"):
            return "failed", cond.get("reason", ""), cond.get("message", "")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Suspended" and cond.get("status") == "True":
            return "queued", "Suspended", "waiting for admission (Kueue or suspended)"
    if (job.get("spec") or {}).get("suspend"):
        return "queued", "Suspended", "waiting for admission (Kueue or suspended)"
    if status.get("active"):
        return "running", "", ""
    return "pending", "", ""


class KubernetesLauncher(Launcher):
    """Training Jobs in ``batch_namespace``; see the module docstring."""

    name = "kubernetes"

    def __init__(self, settings: BatchSettings, *, api_client: Any = None) -> None:
        self.settings = settings
        self.namespace = settings.batch_namespace
        self._api_client = api_client
        self._lock = threading.Lock()
        self._names: dict[str, str] = {}  # job id -> the Job of its current attempt (distributed runs start new ones)

    # -- client

    def _client(self) -> Any:
        with self._lock:
            if self._api_client is None:
                from kubernetes import client, config

                cfg = client.Configuration()
                try:
                    if self.settings.batch_kubeconfig:
                        config.load_kube_config(config_file=self.settings.batch_kubeconfig, context=self.settings.batch_kube_context or None, client_configuration=cfg)
                    else:
                        try:
                            config.load_incluster_config(client_configuration=cfg)
                        except config.ConfigException:
                            config.load_kube_config(context=self.settings.batch_kube_context or None, client_configuration=cfg)
                except (config.ConfigException, OSError, TypeError) as e:
                    raise Unavailable(f"no Kubernetes configuration: {e}; run in a pod with a service account, or set SELMA_BATCH_KUBECONFIG") from None
                cfg.retries = self.settings.batch_api_retries
                self._api_client = client.ApiClient(cfg)
            return self._api_client

    def _batch(self) -> Any:
        from kubernetes import client

        return client.BatchV1Api(self._client())

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._client())

    def _call(self, what: str, fn: Any, *args: Any, resource: str = "batch/v1 jobs", **kwargs: Any) -> Any:
        """Run one API call, turning transport and HTTP errors into domain errors."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            metrics.KUBE_API_ERRORS.labels(what, str(e.status or 0)).inc()
            raise self._map(e, what, resource) from None
        except (HTTPError, OSError) as e:
            metrics.KUBE_API_ERRORS.labels(what, "unreachable").inc()
            host = getattr(getattr(self._api_client, "configuration", None), "host", "?")
            raise Unavailable(f"Kubernetes API at {host} is unreachable ({type(e).__name__}); check the cluster and the service's network policy") from None

    def _map(self, e: Any, what: str, resource: str = "batch/v1 jobs") -> SelmaError:
        msg = _status_message(e)
        if e.status in (401, 403):
            sa = self.settings.batch_service_account or "the service's"
            return PermissionDenied(
                f"Kubernetes refused to {what} {resource} in namespace {self.namespace!r} ({msg}); grant the selma-training "
                f"ServiceAccount a Role with get, list, watch, create and delete on jobs.batch and create and delete on services "
                f"there (the Helm chart's rbac.create), and let trainer pods run as {sa} service account"
            )
        if e.status == 404:
            return FailedPrecondition(f"Kubernetes: {msg} (does namespace {self.namespace!r} exist?)")
        if e.status == 409:
            return AlreadyExists(f"Kubernetes: {msg}")
        if e.status == 422:
            return InvalidArgument(f"Kubernetes rejected the Job: {msg}", field="spec.placement")
        if e.status in (429, 500, 502, 503, 504):
            return Unavailable(f"Kubernetes API busy or failing ({e.status}): {msg}; retry later")
        return FailedPrecondition(f"Kubernetes API error {e.status}: {msg}")

    # -- interface

    def validate(self, placement: dict[str, Any]) -> None:
        validate_placement(placement)
        check_policy(placement, self.settings)

    def preflight(self) -> None:
        """List our Jobs (limit 1): proves the API answers and we may read jobs here."""
        if self.settings.resolved_storage_uri.startswith("file://"):
            log.warning("storage is %s: trainer pods cannot reach a path on the service's disk; use s3:// storage with Kubernetes trainers",
                        self.settings.resolved_storage_uri)
        self._call("list", self._batch().list_namespaced_job, self.namespace, label_selector=f"app.kubernetes.io/managed-by={MANAGED_BY}", limit=1)

    def discover(self) -> list[dict[str, str]]:
        """Our Jobs in the namespace, as {job_id, name, idempotency_key, config_uri, expert_id, run, skill, state}."""
        resp = self._call("list", self._batch().list_namespaced_job, self.namespace,
                          label_selector=f"app.kubernetes.io/managed-by={MANAGED_BY}", _preload_content=False)
        out = []
        for item in json.loads(resp.data).get("items", []):
            md = item.get("metadata", {})
            labels, ann = md.get("labels") or {}, md.get("annotations") or {}
            out.append({
                "job_id": labels.get(LABEL_JOB_ID, ""), "name": md.get("name", ""), "run": labels.get(LABEL_RUN, ""),
                "skill": labels.get(LABEL_SKILL, ""), "idempotency_key": ann.get(ANN_KEY, ""),
                "config_uri": ann.get(ANN_CONFIG, ""), "expert_id": ann.get(ANN_EXPERT, ""), "state": job_state(item)[0],
                "task": labels.get(LABEL_TASK, "train"),
            })
        return out

    def create_or_adopt(self, req: LaunchRequest) -> tuple[dict[str, Any], bool]:
        """Create the Job, or adopt the one already there for this job id. Returns (job, created)."""
        body = build_job(req, self.settings)
        name = body["metadata"]["name"]
        try:
            resp = self._call("create", self._batch().create_namespaced_job, self.namespace, body, _preload_content=False)
            metrics.LAUNCHES.labels(req.task, "kubernetes").inc()
            return json.loads(resp.data), True
        except AlreadyExists:
            existing = self._read(name)
            if existing is None:
                raise Unavailable(f"Job {name} exists and vanished at once; retry") from None
            owner = ((existing.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB_ID)
            if owner != req.job_id:
                raise AlreadyExists(f"a Job named {name} exists in {self.namespace} but belongs to {owner or 'someone else'}; delete it or use another run/skill") from None
            metrics.ADOPTIONS.labels(req.task, "kubernetes").inc()
            log.info("adopted existing Job %s/%s for %s", self.namespace, name, req.job_id)
            return existing, False

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            resp = self._call("get", self._batch().read_namespaced_job, name, self.namespace, _preload_content=False)
        except FailedPrecondition:
            return None  # 404
        return json.loads(resp.data)

    def run(self, req: LaunchRequest, monitor: Monitor) -> Outcome:
        if not req.nodes:
            return self._follow(req, monitor)
        # distributed training: a failed pod fails its Job (backoffLimit 0); the whole run starts again as a
        # new attempt, every rank resuming from the last checkpoint, up to the placement's max_retries
        retries = int(req.placement["max_retries"]) if req.placement.get("max_retries") is not None else self.settings.batch_backoff_limit
        # A restarted service picks up at this start's newest Job: earlier failed ones may already be
        # collected (ttlSecondsAfterFinished), and re-creating one beside a running relaunch would duplicate it.
        attempt = self._latest_attempt(req)
        while True:
            outcome = self._follow(dataclasses.replace(req, attempt=attempt), monitor)
            if outcome.state != "failed" or outcome.reason != "BackoffLimitExceeded" or attempt - req.attempt >= retries:
                return outcome
            attempt += 1
            log.warning("distributed training %s failed (%s); starting attempt %d from the last checkpoint", req.job_id, outcome.message, attempt)

    def _latest_attempt(self, req: LaunchRequest) -> int:
        """The newest launch attempt of this job's current start that has a Job in the cluster (else its first)."""
        resp = self._call("list", self._batch().list_namespaced_job, self.namespace, label_selector=f"{LABEL_JOB_ID}={req.job_id}",
                          _preload_content=False)
        found = [req.attempt]
        for item in json.loads(resp.data).get("items") or []:
            raw = ((item.get("metadata") or {}).get("annotations") or {}).get(ANN_ATTEMPT, "")
            if raw.isdigit() and req.attempt <= int(raw) < req.attempt + ATTEMPT_STRIDE:
                found.append(int(raw))
        return max(found)

    def _follow(self, req: LaunchRequest, monitor: Monitor) -> Outcome:
        job, created = self.create_or_adopt(req)
        name = job["metadata"]["name"]
        with self._lock:
            self._names[req.job_id] = name
        if req.nodes:
            self._create_service(req, job)
        try:
            outcome = self._watch(req, job, monitor)
        finally:
            with self._lock:
                self._names.pop(req.job_id, None)
        if req.nodes and outcome.state != "interrupted":  # the Job has ended: no more rendezvous
            self._delete_service(name)
        return outcome

    def _create_service(self, req: LaunchRequest, job: dict[str, Any]) -> None:
        body = build_rendezvous_service(req, self.settings, job["metadata"].get("uid", ""))
        try:
            self._call("create", self._core().create_namespaced_service, self.namespace, body, resource="services", _preload_content=False)
        except AlreadyExists:
            pass  # an adopted Job's Service, created by the launch that created the Job

    def _delete_service(self, name: str) -> None:
        try:
            self._call("delete", self._core().delete_namespaced_service, name, self.namespace, resource="services", _preload_content=False)
        except FailedPrecondition:
            pass  # already gone (404), e.g. collected with its Job
        except SelmaError as e:  # the owner reference collects it with the Job anyway
            log.warning("could not delete rendezvous Service %s: %s", name, e)

    def _watch(self, req: LaunchRequest, job: dict[str, Any], monitor: Monitor) -> Outcome:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        name = job["metadata"]["name"]
        details = {"kubernetes.namespace": self.namespace, "kubernetes.job": name, "launcher": "kubernetes"}
        while True:
            rv = (job.get("metadata") or {}).get("resourceVersion", "")
            outcome = self._observe(job, details, monitor)
            if outcome is not None:
                return outcome
            w = watch.Watch()
            gone = False
            try:
                stream = w.stream(self._batch().list_namespaced_job, self.namespace, label_selector=f"{LABEL_JOB_ID}={req.job_id}",
                                  resource_version=rv, timeout_seconds=self.settings.batch_watch_timeout_seconds,
                                  _request_timeout=self.settings.batch_watch_timeout_seconds + 30)
                for event in self._guard(stream):
                    obj = event.get("raw_object") or {}
                    if event.get("type") == "ERROR":
                        gone = True
                        break
                    if (obj.get("metadata") or {}).get("name") != name:
                        continue
                    if event.get("type") == "DELETED":
                        st = monitor.state()
                        monitor.poll(details)
                        if st == "cancelled":
                            return Outcome("cancelled", "cancelled; the Job was deleted")
                        return Outcome("failed", f"Job {name} was deleted outside selma", "JOB_DELETED")
                    job = obj
                    outcome = self._observe(job, details, monitor)
                    if outcome is not None:
                        return outcome
            except ApiException as e:
                if e.status != 410:
                    raise self._map(e, "watch") from None
                gone = True
            finally:
                w.stop()
            # watch timed out (or resourceVersion expired): re-read the Job and watch again
            fresh = self._read(name)
            if fresh is None:
                st = monitor.state()
                if st == "cancelled":
                    return Outcome("cancelled", "cancelled; the Job was deleted")
                return Outcome("failed", f"Job {name} disappeared", "JOB_DELETED")
            job = fresh
            if gone:
                log.info("watch of %s restarted from a fresh resourceVersion", name)

    def _guard(self, stream: Any) -> Any:
        from urllib3.exceptions import HTTPError

        try:
            yield from stream
        except (HTTPError, OSError) as e:
            raise Unavailable(f"lost the Kubernetes watch ({type(e).__name__}); check the API server") from None

    def _observe(self, job: dict[str, Any], details: dict[str, str], monitor: Monitor) -> Outcome | None:
        state, reason, message = job_state(job)
        status = job.get("status") or {}
        details = {**details, "kubernetes.state": state, "kubernetes.failed_pods": str(status.get("failed", 0) or 0)}
        if reason:
            details["kubernetes.reason"] = reason
        text = {"queued": "queued: " + message, "pending": "Job created, waiting for its pod"}.get(state)
        monitor.poll(details, message=text, attempt=int(status.get("failed", 0) or 0) + 1)
        if state == "succeeded":
            return Outcome("succeeded", "Job complete")
        if state == "failed":
            return Outcome("failed", f"Job failed: {reason}: {message}".rstrip(": "), reason or "JOB_FAILED", retryable=False)
        st = monitor.state()
        if st == "cancelled":
            self.cancel_by_name(details["kubernetes.job"])
            return Outcome("cancelled", "cancelled; the Job was deleted")
        if st == "stopping":
            return Outcome("interrupted", "service stopping; the Job keeps running and is re-adopted on restart")
        return None

    def cancel_by_name(self, name: str) -> None:
        from kubernetes import client

        try:
            self._call("delete", self._batch().delete_namespaced_job, name, self.namespace,
                       body=client.V1DeleteOptions(propagation_policy="Background"), _preload_content=False)
        except FailedPrecondition:
            pass  # already gone

    def cancel(self, req: LaunchRequest) -> None:
        with self._lock:
            name = self._names.get(req.job_id)
        self.cancel_by_name(name or job_name(req.run, req.skill, req.job_id, req.task, req.attempt))


def _status_message(e: Any) -> str:
    try:
        body = json.loads(e.body or "{}")
        return body.get("message") or e.reason or str(e.status)
    except (ValueError, TypeError):
        return e.reason or str(e.status)
