"""The Kubernetes Job manifest of a trainer: schema-valid (strict) and carrying what the issue lists."""

from __future__ import annotations

import kubernetes_validate
import pytest

from selma.batch.kube import METRICS_PORT_NAME, build_job, job_name, job_state, validate_placement
from selma.batch.launchers import LaunchRequest
from selma.errors import InvalidArgument
from selma_training.settings import TrainingSettings

K8S_VERSION = "1.33.0"


def settings(**kw) -> TrainingSettings:
    base = dict(storage_uri="s3://selma/root", s3_endpoint="http://minio.selma:9000", batch_namespace="selma",
                batch_image="registry.example/selma:1.0", batch_service_account="selma-trainer",
                batch_storage_secret="selma-s3", batch_model_cache_pvc="selma-models")
    base.update(kw)
    return TrainingSettings(**base)


def request(**placement) -> LaunchRequest:
    return LaunchRequest(job_id="expert-training-0123456789abcdef", idempotency_key="run-1/train/spatial", run="run-1",
                         skill="spatial", config_uri="s3://selma/root/artifacts/training-config-x/files/job.json",
                         expert_id="expert-abc", placement=placement, labels={"team": "vision"})


def strict_validate(manifest: dict) -> None:
    with _no_warnings():
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


class _no_warnings:
    """Fail on any warning the validator emits (strict means strict)."""

    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings(record=True)
        self.caught = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        assert not self.caught, [str(w.message) for w in self.caught]


def test_cpu_job_manifest_is_schema_valid_and_complete():
    job = build_job(request(), settings())
    strict_validate(job)
    md, spec = job["metadata"], job["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert md["name"] == job_name("run-1", "spatial", "expert-training-0123456789abcdef")
    assert md["labels"]["selma.dev/run"] == "run-1" and md["labels"]["selma.dev/skill"] == "spatial"
    assert md["labels"]["app.kubernetes.io/managed-by"] == "selma-training" and md["labels"]["team"] == "vision"
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "selma-trainer"
    assert spec["backoffLimit"] == 3 and spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert c["command"] == ["selma", "train", "--config", "s3://selma/root/artifacts/training-config-x/files/job.json"]
    assert c["image"] == "registry.example/selma:1.0"
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secret_env == {"SELMA_S3_ACCESS_KEY": {"name": "selma-s3", "key": "access-key"},
                          "SELMA_S3_SECRET_KEY": {"name": "selma-s3", "key": "secret-key"}}
    assert not any("value" in e and "KEY" in e["name"] for e in c["env"]), "credentials must never be inline"
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["model-cache"]["persistentVolumeClaim"]["claimName"] == "selma-models"
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_gpu_job_manifest_with_scheduling_constraints_is_schema_valid():
    placement = {
        "gpus": 2, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "TOLERATION_OPERATOR_EXISTS", "effect": "TAINT_EFFECT_NO_SCHEDULE"},
                        {"key": "spot", "operator": "TOLERATION_OPERATOR_EQUAL", "value": "true", "effect": "TAINT_EFFECT_NO_EXECUTE", "toleration_seconds": "300"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["eu-west-1a"]}]}]}}},
        "priority_class_name": "batch-low", "runtime_class_name": "nvidia", "active_deadline": "7200s", "max_retries": 5,
        "resources": {"cpu_request": "8", "memory_request": "32Gi", "memory_limit": "64Gi", "shm_size": "16Gi"},
    }
    job = build_job(request(**placement), settings())
    strict_validate(job)
    pod = job["spec"]["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2" and isinstance(limits["nvidia.com/gpu"], str)
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod["tolerations"][1]["tolerationSeconds"] == 300
    assert pod["priorityClassName"] == "batch-low" and pod["runtimeClassName"] == "nvidia"
    assert job["spec"]["activeDeadlineSeconds"] == 7200 and job["spec"]["backoffLimit"] == 5
    assert {"name": "SELMA_DEVICE", "value": "cuda"} in pod["containers"][0]["env"]


def test_kueue_job_manifest_carries_the_queue_label_and_is_schema_valid():
    job = build_job(request(gpus=1, queue_name="gpu-queue"), settings(batch_model_cache_pvc="", batch_storage_secret=""))
    strict_validate(job)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True, "Kueue admits the Job whole: no pod may start before it unsuspends it"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    assert "emptyDir" in {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["model-cache"]


@pytest.mark.parametrize("completions", [0, 3])
def test_the_operators_kueue_queue_labels_every_job_and_creates_it_suspended(completions):
    from dataclasses import replace

    queued = settings(batch_policy_default_queue="team-gpus")
    job = build_job(replace(request(gpus=1), completions=completions), queued)
    strict_validate(job)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus" and job["spec"]["suspend"] is True
    if completions:  # an Indexed Job is admitted as one gang: all its completions run at once
        assert job["spec"]["parallelism"] == job["spec"]["completions"] == completions
    plain = build_job(replace(request(gpus=1), completions=completions), settings())
    assert "suspend" not in plain["spec"] and "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_job_name_is_deterministic_dns_safe_and_short():
    a = job_name("A_very_long_Run_Name_" * 3, "Spatial.Relations", "id-1")
    assert a == job_name("A_very_long_Run_Name_" * 3, "Spatial.Relations", "id-1")
    assert len(a) <= 63 and a.replace("-", "").isalnum() and a == a.lower()
    assert a != job_name("A_very_long_Run_Name_" * 3, "Spatial.Relations", "id-2")


@pytest.mark.parametrize(
    ("placement", "field"),
    [
        ({"gpus": 9}, "spec.placement.gpus"),
        ({"resources": {"memory_limit": "lots"}}, "spec.placement.resources.memory_limit"),
        ({"tolerations": [{"key": "a", "operator": "TOLERATION_OPERATOR_EXISTS", "value": "x"}]}, "spec.placement.tolerations[0].value"),
        ({"affinity": {"nodeSelector": {}}}, "spec.placement.affinity"),
        ({"queue_name": "Not_A_Queue"}, "spec.placement.queue_name"),
        ({"max_retries": 50}, "spec.placement.max_retries"),
    ],
)
def test_bad_placement_is_rejected_naming_the_field(placement, field):
    with pytest.raises(InvalidArgument) as e:
        validate_placement(placement)
    assert e.value.field == field


def test_job_state_reads_conditions():
    assert job_state({"status": {}})[0] == "pending"
    assert job_state({"status": {"active": 1}})[0] == "running"
    assert job_state({"spec": {"suspend": True}, "status": {}})[0] == "queued"
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}})[0] == "succeeded"
    st = job_state({"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "m"}]}})
    assert st == ("failed", "DeadlineExceeded", "m")


def test_skill_with_underscore_keeps_its_label_and_gets_a_dns_safe_job_name():
    from dataclasses import replace

    req = replace(request(), skill="commonsense_defying")
    job = build_job(req, settings())
    assert job["metadata"]["labels"]["selma.dev/skill"] == "commonsense_defying"
    name = job["metadata"]["name"]
    assert "_" not in name and len(name) <= 63
    strict_validate(job)


VARIANTS = {
    "cpu": ({}, {}),
    "gpu": ({"gpus": 2, "runtime_class_name": "nvidia"}, {}),
    "kueue": ({"gpus": 1, "queue_name": "gpu-queue"}, {"batch_model_cache_pvc": "", "batch_storage_secret": ""}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainer_pods_are_hardened_like_the_chart_services(variant):
    placement, overrides = VARIANTS[variant]
    job = build_job(request(**placement), settings(batch_instance="selma-prod", **overrides))
    strict_validate(job)
    pod = job["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == psc["runAsGroup"] == psc["fsGroup"] == 10001
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False and sc["runAsNonRoot"] is True
    assert sc["privileged"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    # Every place the trainer writes is a volume: scratch and HOME, data dir, model/HF cache, /dev/shm.
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "emptyDir" in vols[mounts["/tmp"]] and "emptyDir" in vols[mounts["/var/lib/selma"]]
    assert mounts["/models"] == "model-cache" and mounts["/dev/shm"] == "dshm"
    assert env["HOME"] == "/tmp" and env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert env["SELMA_DATA_DIR"] == "/var/lib/selma" and env["SELMA_MODEL_CACHE_DIR"] == env["HF_HOME"] == "/models"
    # The only port: the trainer's /metrics, bound on all interfaces, named as the PodMonitor scrapes it.
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert env["SELMA_HOST"] == "0.0.0.0" and env["SELMA_METRICS_PORT"] == "9400"
    # The release's instance label, on the Job and its pods.
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "selma-prod"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "selma-prod"


def test_metrics_port_is_a_setting():
    job = build_job(request(), settings(batch_metrics_port=9500))
    strict_validate(job)
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["ports"] == [{"name": METRICS_PORT_NAME, "containerPort": 9500, "protocol": "TCP"}]
    assert {"name": "SELMA_METRICS_PORT", "value": "9500"} in c["env"]


def test_local_trainers_bind_no_metrics_port():
    """The service's SELMA_METRICS_PORT is inherited by local trainers; it is reset so they serve no /metrics."""
    from selma.batch.launchers import LocalLauncher

    env = LocalLauncher(settings(), env={"SELMA_METRICS_PORT": "9400", "SELMA_HOST": "0.0.0.0"}).child_env()
    assert env["SELMA_METRICS_PORT"] == "0", "0 = no trainer /metrics server"


def test_instance_label_comes_from_settings_only():
    from dataclasses import replace

    req = replace(request(), labels={"app.kubernetes.io/instance": "someone-else", "team": "vision"})
    job = build_job(req, settings())
    assert "app.kubernetes.io/instance" not in job["metadata"]["labels"], "no instance setting, no instance label"
    assert job["metadata"]["labels"]["team"] == "vision"
    job = build_job(req, settings(batch_instance="selma"))
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "selma"


def test_instance_setting_must_be_a_label_value():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        settings(batch_instance="not a label!")
    with pytest.raises(ValidationError):
        settings(batch_instance="x" * 64)


def test_an_evaluation_job_runs_the_eval_worker_with_its_own_name_label_and_settings():
    from selma_evaluation.settings import EvaluationSettings

    # the launcher is shared with training (its settings); the evaluation service hands its own with the request
    settings = TrainingSettings(storage_uri="s3://b/p")
    eval_settings = EvaluationSettings(eval_serving_endpoint="selma-serving:50051", eval_vqa_model="org/vqa", storage_uri="s3://b/p")
    req = LaunchRequest(job_id="evaluation-0123456789abcdef", idempotency_key="run-1/eval", run="run-1", skill="evaluation",
                        config_uri="s3://b/p/evaluation/evaluation-0123456789abcdef/job.json", expert_id="eval_report-x", task="eval",
                        service_settings=eval_settings)
    job = build_job(req, settings)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["selma", "eval", "execute", "--config", req.config_uri]
    assert job["metadata"]["name"].startswith("selma-eval-run-1-evaluation-")
    assert job["metadata"]["labels"]["selma.dev/task"] == "eval"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SELMA_EVAL_SERVING_ENDPOINT"] == "selma-serving:50051" and env["SELMA_EVAL_VQA_MODEL"] == "org/vqa"
    train = build_job(LaunchRequest(job_id="j", idempotency_key="k", run="r", skill="s", config_uri="s3://b/c", expert_id="e"), settings)
    assert train["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["selma", "train"]
    assert not any(e["name"].startswith("SELMA_EVAL_") for e in train["spec"]["template"]["spec"]["containers"][0]["env"])
    assert train["metadata"]["labels"]["selma.dev/task"] == "train"


def test_worker_settings_skip_unset_values_and_keep_every_secret_out_of_jobs():
    from pydantic import SecretStr

    from selma_evaluation.settings import EvaluationSettings

    s = EvaluationSettings(eval_api_keys={"openai": SecretStr("sk-live")}, llm_openai_api_key=SecretStr("sk-llm"), eval_vqa_model="org/vqa")
    assert s.eval_secrets_dir is None
    job_env = s.worker_env(secrets=False)
    assert job_env["SELMA_EVAL_VQA_MODEL"] == "org/vqa"
    assert "SELMA_EVAL_SECRETS_DIR" not in job_env  # unset stays unset, not the text "None"
    assert "SELMA_EVAL_API_KEYS" not in job_env and "SELMA_LLM_OPENAI_API_KEY" not in job_env
    assert "sk-" not in repr(job_env) and "*" not in repr(job_env)
    local_env = s.worker_env(secrets=True)  # a local worker shares the service's environment anyway
    assert local_env["SELMA_EVAL_API_KEYS"] == '{"openai": "sk-live"}' and local_env["SELMA_LLM_OPENAI_API_KEY"] == "sk-llm"


def test_workers_get_their_token_and_client_tls_from_secrets_never_as_values():
    """SELMA_BATCH_TOKEN_SECRET / SELMA_BATCH_TLS_SECRET: a secretKeyRef and a read-only mount, no secret in the manifest."""
    plain = build_job(request(), settings())
    (c,) = plain["spec"]["template"]["spec"]["containers"]
    assert not {"SELMA_TOKEN", "SELMA_TLS_CA"} & {e["name"] for e in c["env"]}

    job = build_job(request(), settings(batch_token_secret="selma-worker-token", batch_tls_secret="selma-client-tls"))
    strict_validate(job)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["SELMA_TOKEN"] == {"name": "SELMA_TOKEN", "valueFrom": {"secretKeyRef": {"name": "selma-worker-token", "key": "token"}}}
    assert env["SELMA_TLS_CA"]["value"] == "/etc/selma/client-tls/ca.crt"
    assert env["SELMA_TLS_CLIENT_CERT"]["value"] == "/etc/selma/client-tls/tls.crt"
    assert env["SELMA_TLS_CLIENT_KEY"]["value"] == "/etc/selma/client-tls/tls.key"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/selma/client-tls"]
    assert mount["readOnly"] is True
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "selma-client-tls"


def test_a_sharded_render_is_one_schema_valid_indexed_job_and_a_new_attempt_gets_a_new_name():
    from selma_render.settings import RenderSettings

    render = RenderSettings(storage_uri="s3://selma/root", render_default_model="org/model", render_max_shards=8)
    req = LaunchRequest(job_id="dataset_render-0123456789abcdef", idempotency_key="run-1/render/count", run="run-1", skill="count",
                        config_uri="s3://selma/root/render/dataset_render-0123456789abcdef/work.json", expert_id="image_dataset-x",
                        placement={"gpus": 1, "max_retries": 2}, task="render", completions=4, service_settings=render)
    job = build_job(req, settings())
    strict_validate(job)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"]) == ("Indexed", 4, 4, 2)
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == ["selma", "render", "shard", "--config", req.config_uri]  # the pod's index picks the shard
    env = {e["name"]: e for e in container["env"]}
    assert env["SELMA_BATCH_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"].endswith("['batch.kubernetes.io/job-completion-index']")
    assert env["SELMA_RENDER_DEFAULT_MODEL"]["value"] == "org/model" and env["SELMA_RENDER_MAX_SHARDS"]["value"] == "8"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert job["metadata"]["name"].startswith("selma-render-run-1-count-")
    assert job["metadata"]["labels"]["selma.dev/task"] == "render"
    # a restarted service adopts the same Job (same attempt); a client's re-start of a failed render is a new Job
    assert build_job(req, settings())["metadata"]["name"] == job["metadata"]["name"]
    req.attempt = 1
    assert build_job(req, settings())["metadata"]["name"] != job["metadata"]["name"]
    # a plain (training) Job is not indexed
    assert "completionMode" not in build_job(request(), settings())["spec"]
