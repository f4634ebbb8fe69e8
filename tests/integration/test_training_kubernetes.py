"""The Kubernetes launcher with the real ``kubernetes`` client against a loopback fake API server."""

from __future__ import annotations

import socket
import time

import pytest
from fake_kube_api import FakeKubeApi, complete
from kubernetes import client

from selma.artifacts import ArtifactKind, ArtifactStore
from selma.batch.kube import ANN_ATTEMPT, ANN_CONFIG, LABEL_JOB_ID, KubernetesLauncher
from selma.errors import InvalidArgument, PermissionDenied, Unavailable
from selma.jobs import JobPhase
from selma.storage import open_storage
from selma_training.core import TrainingCore
from selma_training.samples import publish_shapes_dataset
from selma_training.settings import TrainingSettings
from selma_training.trainer import load_job_document, run_job

NS = "selma"


@pytest.fixture
def fake():
    with FakeKubeApi() as api:
        yield api


@pytest.fixture
def settings(tmp_path, tiny_models):
    return TrainingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), device="cpu",
                            training_default_model=str(tiny_models.sd), batch_launcher="kubernetes", batch_namespace=NS,
                            batch_watch_timeout_seconds=1, batch_progress_interval_seconds=0, log_level="WARNING")


def api_client(url: str) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = url
    cfg.retries = 1
    return client.ApiClient(cfg)


@pytest.fixture
def make_core(settings, fake):
    cores = []

    def make(url: str | None = None) -> TrainingCore:
        launcher = KubernetesLauncher(settings, api_client=api_client(url or fake.url))
        core = TrainingCore(settings, launchers={"kubernetes": launcher})
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.shutdown()


@pytest.fixture
def dataset(settings):
    return publish_shapes_dataset(ArtifactStore(open_storage(settings)), 4)


def spec(dataset_id: str, skill: str = "spatial") -> dict:
    return {"run": "run-1", "skill": skill, "dataset": {"id": dataset_id},
            "config": {"max_steps": 2, "checkpoint_every": 1, "resolution": 32},
            "placement": {"gpus": 1, "queue_name": "gpu"}, "labels": {"team": "a"}}


def wait_phase(core: TrainingCore, job_id: str, phases: set[JobPhase]):
    for rec in core.watch(job_id, min_interval=0.0, heartbeat=1.0):
        if rec.phase in phases:
            return rec
    return core.get(job_id)


def wait_details(core: TrainingCore, job_id: str, key: str):
    for rec in core.watch(job_id, min_interval=0.0, heartbeat=1.0):
        if key in rec.details or rec.phase.terminal:
            return rec
    raise AssertionError("watch ended")


@pytest.mark.slow
def test_idempotent_create_then_watch_to_completion(make_core, fake, settings, dataset):
    core = make_core()
    rec, created = core.start("run-1/train/spatial", spec(dataset.id))[:2]
    assert created
    job = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    again, created_again = core.start("run-1/train/spatial", spec(dataset.id))[:2]
    assert not created_again and again.job_id == rec.job_id
    assert fake.count("POST") == 1 and len(fake.jobs) == 1
    fake.set_job_status(NS, job["metadata"]["name"], {"active": 1, "ready": 1})
    wait_details(core, rec.job_id, "kubernetes.state")
    # the pod: the real trainer, from the document URI the Job carries
    pod_settings = settings.model_copy(update={"batch_pod_name": job["metadata"]["name"] + "-x7k2p", "batch_node_name": "gpu-node-1"})
    run_job(load_job_document(job["metadata"]["annotations"][ANN_CONFIG], pod_settings), pod_settings)
    fake.set_job_status(NS, job["metadata"]["name"], complete(True))
    done = wait_phase(core, rec.job_id, {JobPhase.SUCCEEDED, JobPhase.FAILED})
    assert done.phase == JobPhase.SUCCEEDED, done.message
    assert done.output is not None and done.output.kind == "expert"
    assert done.details["kubernetes.job"] == job["metadata"]["name"] and done.details["kubernetes.namespace"] == NS
    assert done.details["kubernetes.pod"].endswith("-x7k2p") and done.details["kubernetes.node"] == "gpu-node-1"
    assert done.stats["step"] == 2 and done.stats["resolved_config"]["lora"]["rank"] == 4


def test_a_multi_node_training_gets_a_rendezvous_service_and_a_failed_rank_restarts_the_whole_run(settings, fake, dataset):
    settings = settings.model_copy(update={"batch_policy_max_nodes": 2})
    core = TrainingCore(settings, launchers={"kubernetes": KubernetesLauncher(settings, api_client=api_client(fake.url))})
    try:
        body = {**spec(dataset.id), "distributed": {"nodes": 2}, "config": {"max_steps": 2, "resolution": 32, "gradient_accumulation_steps": 2}}
        rec = core.start("run-1/train/ddp", body)[0]
        first = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")
        name = first["metadata"]["name"]
        assert (first["spec"]["completions"], first["spec"]["parallelism"], first["spec"]["backoffLimit"]) == (2, 2, 0)
        fake.wait_until(lambda api: (NS, name) in api.services, "the rendezvous Service")
        svc = fake.services[(NS, name)]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"], "collected with its Job"
        # a rank failed: the Job fails as a whole; the launcher ends its Service and starts the run again
        fake.set_job_status(NS, name, complete(False))
        fake.wait_until(lambda api: len(api.jobs) == 2 and len(api.services) == 1 and (NS, name) not in api.services, "the second attempt")
        (second,) = [j for (_, n), j in fake.jobs.items() if n != name]
        again = second["metadata"]["name"]
        assert second["metadata"]["labels"][LABEL_JOB_ID] == rec.job_id and second["metadata"]["annotations"][ANN_CONFIG]
        assert fake.services[(NS, again)]["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]
        fake.set_job_status(NS, again, {"active": 2})
        wait_details(core, rec.job_id, "kubernetes.state")
        core.cancel(rec.job_id, "enough")  # reaches the current attempt's Job, not the first one's name
        done = wait_phase(core, rec.job_id, {JobPhase.CANCELLED, JobPhase.FAILED, JobPhase.SUCCEEDED})
        assert done.phase == JobPhase.CANCELLED
        fake.wait_until(lambda api: not api.services, "the Service of the cancelled Job deleted")
        assert (NS, again) not in fake.jobs and ("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{again}") in fake.requests
    finally:
        core.shutdown()


def test_a_restarted_service_follows_a_distributed_runs_newest_job_even_when_the_first_was_collected(settings, fake, dataset):
    """A pod retry or a relaunch must not make a restarted service launch a second Job beside the running one."""
    settings = settings.model_copy(update={"batch_policy_max_nodes": 2})
    launcher = KubernetesLauncher(settings, api_client=api_client(fake.url))
    core = TrainingCore(settings, launchers={"kubernetes": launcher})
    body = {**spec(dataset.id), "distributed": {"nodes": 2}, "config": {"max_steps": 2, "resolution": 32, "gradient_accumulation_steps": 2}}
    try:
        rec = core.start("run-1/train/ddp-restart", body)[0]
        first = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")["metadata"]["name"]
        fake.set_job_status(NS, first, complete(False))  # a rank failed: the launcher relaunches the run
        fake.wait_until(lambda api: len(api.jobs) == 2, "the relaunch")
        (second,) = [n for (_, n) in fake.jobs if n != first]
        assert fake.jobs[(NS, second)]["metadata"]["annotations"][ANN_ATTEMPT] == "1"
        fake.set_job_status(NS, second, {"active": 2})
        wait_details(core, rec.job_id, "kubernetes.state")
    finally:
        core.shutdown()  # the service goes away; the relaunched Job keeps running
    fake.delete(NS, first)  # the failed first Job is collected (ttlSecondsAfterFinished)
    core2 = TrainingCore(settings, launchers={"kubernetes": KubernetesLauncher(settings, api_client=api_client(fake.url))})
    try:
        core2.recover()
        rec2 = wait_details(core2, rec.job_id, "kubernetes.job")
        assert rec2.details["kubernetes.job"].endswith(second), rec2.details
        assert {n for (_, n) in fake.jobs} == {second}, "no Job re-created beside the running relaunch"
    finally:
        core2.shutdown()


def test_a_multi_node_request_over_the_node_policy_launches_nothing(make_core, fake, dataset):
    core = make_core()
    body = {**spec(dataset.id), "distributed": {"nodes": 2}, "config": {"max_steps": 2, "resolution": 32, "gradient_accumulation_steps": 2}}
    with pytest.raises(InvalidArgument) as e:
        core.start("run-1/train/ddp", body)
    assert e.value.field == "spec.distributed.nodes" and "SELMA_BATCH_POLICY_MAX_NODES=1" in str(e.value)
    assert fake.count("POST") == 0


def test_watch_to_failure_reports_the_reason(make_core, fake, dataset):
    core = make_core()
    rec = core.start("run-1/train/spatial", spec(dataset.id))[0]
    job = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")
    fake.set_job_status(NS, job["metadata"]["name"], complete(False))
    done = wait_phase(core, rec.job_id, {JobPhase.FAILED, JobPhase.SUCCEEDED})
    assert done.phase == JobPhase.FAILED and "BackoffLimitExceeded" in done.message
    assert done.error is not None


def test_cancel_deletes_the_job(make_core, fake, dataset):
    core = make_core()
    rec = core.start("run-1/train/spatial", spec(dataset.id))[0]
    job = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")
    fake.set_job_status(NS, job["metadata"]["name"], {"active": 1})
    wait_details(core, rec.job_id, "kubernetes.job")
    core.cancel(rec.job_id, "changed my mind")
    done = wait_phase(core, rec.job_id, {JobPhase.CANCELLED, JobPhase.FAILED, JobPhase.SUCCEEDED})
    assert done.phase == JobPhase.CANCELLED
    assert not fake.jobs
    assert ("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/{job['metadata']['name']}") in fake.requests


def test_restart_rebuilds_state_from_job_labels_without_a_second_job(make_core, fake, settings, dataset):
    core = make_core()
    rec = core.start("run-1/train/spatial", spec(dataset.id))[0]
    job = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")
    fake.set_job_status(NS, job["metadata"]["name"], {"active": 1})
    wait_details(core, rec.job_id, "kubernetes.state")
    core.shutdown()  # the service goes away; the Job keeps running
    assert len(fake.jobs) == 1
    storage = open_storage(settings)
    storage.delete_prefix("jobs/")  # even the service's own records are gone
    core2 = make_core()
    assert rec.job_id in core2.recover()
    wait_details(core2, rec.job_id, "kubernetes.job")
    assert len(fake.jobs) == 1, "a restart must adopt the Job, never launch a second one"
    listed, _ = core2.list(run="run-1")
    assert [r.job_id for r in listed] == [rec.job_id]
    fake.set_job_status(NS, job["metadata"]["name"], complete(False))
    assert wait_phase(core2, rec.job_id, {JobPhase.FAILED, JobPhase.SUCCEEDED}).phase == JobPhase.FAILED


def test_unreachable_api_is_unavailable_and_forbidden_is_permission_denied(make_core, fake, dataset):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    core = make_core(closed)
    with pytest.raises(Unavailable):
        core.start("k1", spec(dataset.id))
    fake.forbid = True
    core2 = make_core()
    with pytest.raises(PermissionDenied) as e:
        core2.start("k2", spec(dataset.id))
    assert "jobs.batch" in str(e.value) and "Role" in str(e.value)
    assert not core2.list()[0] and fake.count("POST") == 0


def test_an_expired_watch_resource_version_is_recovered(make_core, fake, dataset, caplog):
    caplog.set_level("INFO", logger="selma.batch.kube")
    fake.expire_watches = 2  # the API server compacted history: "410 Gone" twice
    core = make_core()
    rec = core.start("run-1/train/spatial", spec(dataset.id))[0]
    job = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")
    fake.set_job_status(NS, job["metadata"]["name"], complete(False))
    assert wait_phase(core, rec.job_id, {JobPhase.FAILED, JobPhase.SUCCEEDED}).phase == JobPhase.FAILED
    assert caplog.text.count("restarted from a fresh resourceVersion") >= 1


# --- limits and the operator's placement policy (issue #18): refused before anything is stored or created


def _no_job_was_started(core: TrainingCore, fake: FakeKubeApi) -> None:
    assert fake.count("POST") == 0 and not fake.jobs, "a Job was created"
    assert core.list()[0] == [], "a job record was stored"
    assert not ArtifactStore(core.storage).list(ArtifactKind.TRAINING_CONFIG), "a job document was published"


@pytest.mark.parametrize(
    ("config", "setting"),
    [
        ({"resolution": 100000}, "SELMA_TRAINING_MAX_RESOLUTION=2048"),
        ({"batch_size": 1000000}, "SELMA_TRAINING_MAX_BATCH_SIZE=256"),
        ({"max_steps": 10**9}, "SELMA_TRAINING_MAX_STEPS=200000"),
        ({"gradient_accumulation_steps": 100000}, "SELMA_TRAINING_MAX_GRADIENT_ACCUMULATION_STEPS=256"),
    ],
)
def test_training_sizes_over_the_limits_are_refused_before_any_job_launches(make_core, fake, dataset, config, setting):
    core = make_core()
    body = spec(dataset.id)
    body["config"].update(config)
    with pytest.raises(InvalidArgument) as e:
        core.start("run-1/train/spatial", body)
    assert setting in str(e.value) and e.value.field == f"config.{next(iter(config))}"
    _no_job_was_started(core, fake)


@pytest.mark.parametrize(
    ("placement", "error", "setting"),
    [
        ({"tolerations": [{"operator": "TOLERATION_OPERATOR_EXISTS"}]}, PermissionDenied, "SELMA_BATCH_POLICY_TOLERATIONS"),
        ({"priority_class_name": "system-cluster-critical"}, PermissionDenied, "SELMA_BATCH_POLICY_PRIORITY_CLASSES"),
        ({"gpus": 8}, InvalidArgument, "SELMA_BATCH_POLICY_MAX_GPUS=1"),
        ({"resources": {"memory_limit": "1Ti"}}, InvalidArgument, "SELMA_BATCH_POLICY_MAX_MEMORY=64Gi"),
    ],
)
def test_placement_outside_the_operator_policy_is_refused_before_any_job(make_core, fake, dataset, placement, error, setting):
    core = make_core()
    body = spec(dataset.id)
    body["placement"] = placement
    with pytest.raises(error) as e:
        core.start("run-1/train/spatial", body)
    assert setting in str(e.value) and str(e.value).startswith("spec.placement.")
    _no_job_was_started(core, fake)


@pytest.mark.slow
def test_an_operator_policy_lets_its_placements_through_to_the_job(settings, fake, dataset):
    policy = settings.model_copy(update={"batch_policy_priority_classes": ["batch-low"], "batch_policy_max_gpus": 2,
                                         "batch_policy_tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                                         "batch_policy_default_queue": "team-a"})
    core = TrainingCore(policy, launchers={"kubernetes": KubernetesLauncher(policy, api_client=api_client(fake.url))})
    try:
        body = spec(dataset.id)
        body["placement"] = {"gpus": 2, "priority_class_name": "batch-low",
                             "tolerations": [{"key": "nvidia.com/gpu", "operator": "TOLERATION_OPERATOR_EXISTS",
                                              "effect": "TAINT_EFFECT_NO_SCHEDULE"}]}
        rec = core.start("run-1/train/spatial", body)[0]
        job = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")
        pod = job["spec"]["template"]["spec"]
        assert pod["priorityClassName"] == "batch-low" and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        core.cancel(rec.job_id)
        wait_phase(core, rec.job_id, {JobPhase.CANCELLED, JobPhase.FAILED})
    finally:
        core.shutdown()


def test_pod_retries_do_not_make_a_restarted_service_launch_a_second_job(make_core, fake, dataset):
    core = make_core()
    rec = core.start("run-1/train/retried", spec(dataset.id))[0]
    name = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")["metadata"]["name"]
    fake.set_job_status(NS, name, {"active": 1, "failed": 2})  # two pods failed; the Job's third pod runs
    for r in core.watch(rec.job_id, min_interval=0.0, heartbeat=1.0):
        if r.attempt >= 3 or r.phase.terminal:
            break
    assert core.get(rec.job_id).attempt >= 3  # pod retries count as attempts (executions)...
    core.shutdown()
    core2 = make_core()
    core2.recover()
    rec2 = wait_details(core2, rec.job_id, "kubernetes.job")
    assert rec2.details["kubernetes.job"].endswith(name) and len(fake.jobs) == 1  # ...but never rename the running Job


def test_a_client_restart_of_a_failed_training_launches_a_new_job_instead_of_adopting_the_failed_one(make_core, fake, dataset):
    """A re-start of a FAILED job is a new attempt: adopting the failed Job (same name) would fail it at once."""
    core = make_core()
    rec = core.start("run-1/train/spatial", spec(dataset.id))[0]
    first = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={rec.job_id}")["metadata"]["name"]
    fake.set_job_status(NS, first, complete(False))
    assert wait_phase(core, rec.job_id, {JobPhase.FAILED, JobPhase.SUCCEEDED}).phase == JobPhase.FAILED
    again, created, _ = core.start("run-1/train/spatial", spec(dataset.id))
    assert created and again.attempt > 1  # (pod retries inside the failed Job count as attempts too)
    deadline = time.monotonic() + 120  # generous: only bounds a broken launcher
    while len(fake.jobs) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    names = {name for (_, name) in fake.jobs}
    assert first in names and len(names) == 2, "the new attempt must create its own Job beside the failed one"
    (second,) = names - {first}
    fake.set_job_status(NS, second, {"active": 1})
    rec2 = wait_details(core, rec.job_id, "kubernetes.state")
    assert rec2.phase == JobPhase.RUNNING and rec2.details["kubernetes.job"].endswith(second), rec2.details
