"""Admission across a run: the TrainingService launches at most SELMA_TRAINING_MAX_CONCURRENT_JOBS Jobs.

The real Kubernetes launcher against the loopback fake API server (tests play the Job controller
and Kueue, and run each trainer in-process like its pod would): the fake's ADDED events record
which Jobs were created, in which order, and how many were unfinished at once; nothing here
depends on timing.  Jobs admitted together (two free slots) are created by their worker threads in
either order: those are compared as sets.
"""

from __future__ import annotations

import pytest
from fake_kube_api import FakeKubeApi, complete
from kubernetes import client

from selma.artifacts import ArtifactStore
from selma.batch.kube import ANN_CONFIG, KUEUE_LABEL, LABEL_JOB_ID, LABEL_SKILL, KubernetesLauncher
from selma.jobs import JobPhase, run_stage_key
from selma.storage import open_storage
from selma_training.core import TrainingCore
from selma_training.samples import publish_shapes_dataset
from selma_training.server import to_job
from selma_training.settings import TrainingSettings
from selma_training.trainer import load_job_document, run_job

pytestmark = pytest.mark.slow
NS = "selma"
SKILLS = ["color", "count", "shape", "spatial", "texture"]


@pytest.fixture
def fake():
    with FakeKubeApi() as api:
        yield api


@pytest.fixture
def settings(tmp_path, tiny_models):
    return TrainingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), device="cpu",
                            training_default_model=str(tiny_models.sd), batch_launcher="kubernetes", batch_namespace=NS,
                            batch_watch_timeout_seconds=1, batch_progress_interval_seconds=0, log_level="WARNING",
                            training_max_concurrent_jobs=2, batch_policy_default_queue="team-gpus")


@pytest.fixture
def make_core(settings, fake):
    cores = []

    def make() -> TrainingCore:
        cfg = client.Configuration()
        cfg.host, cfg.retries = fake.url, 1
        core = TrainingCore(settings, launchers={"kubernetes": KubernetesLauncher(settings, api_client=client.ApiClient(cfg))})
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.shutdown()


@pytest.fixture
def dataset(settings):
    return publish_shapes_dataset(ArtifactStore(open_storage(settings)), 4)


def start(core: TrainingCore, dataset_id: str, run: str, skill: str) -> str:
    spec = {"run": run, "skill": skill, "dataset": {"id": dataset_id}, "config": {"max_steps": 2, "checkpoint_every": 1, "resolution": 32}}
    return core.start(run_stage_key(run, skill, "training"), spec)[0].job_id


def created(fake: FakeKubeApi) -> list[str]:
    """The run/skill of every Job created so far, in creation order."""
    with fake.cond:
        return [f"{o['metadata']['labels']['selma.dev/run']}/{o['metadata']['labels'][LABEL_SKILL]}" for _, kind, o in fake.events if kind == "ADDED"]


def most_unfinished(fake: FakeKubeApi) -> int:
    """The most Jobs that existed unfinished at once (created, not yet complete, failed or deleted)."""
    live: set[str] = set()
    most = 0
    with fake.cond:
        for _, kind, o in fake.events:
            name = o["metadata"]["name"]
            ended = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in (o.get("status") or {}).get("conditions") or [])
            if kind == "DELETED" or ended:
                live.discard(name)
            elif kind == "ADDED":
                live.add(name)
            most = max(most, len(live))
    return most


def wait_phase(core: TrainingCore, job_id: str, phases: set[JobPhase]):
    for rec in core.watch(job_id, min_interval=0.0, heartbeat=1.0):
        if rec.phase in phases:
            return rec
    return core.get(job_id)


def train_and_complete(core: TrainingCore, fake: FakeKubeApi, settings: TrainingSettings, job_id: str) -> None:
    """Play Kueue (admit: unsuspend), the pod (the real trainer, in-process) and the Job controller (Complete)."""
    job = fake.wait_for_job(NS, f"{LABEL_JOB_ID}={job_id}")
    name = job["metadata"]["name"]
    assert job["spec"]["suspend"] is True and job["metadata"]["labels"][KUEUE_LABEL] == "team-gpus"
    fake.patch(NS, name, {"spec": {"suspend": False}})
    fake.set_job_status(NS, name, {"active": 1})
    run_job(load_job_document(job["metadata"]["annotations"][ANN_CONFIG], settings), settings)
    fake.set_job_status(NS, name, complete(True))
    done = wait_phase(core, job_id, {JobPhase.SUCCEEDED, JobPhase.FAILED})
    assert done.phase == JobPhase.SUCCEEDED, done.message


def test_five_experts_train_two_at_a_time_in_the_declared_order(make_core, fake, settings, dataset):
    core = make_core()
    ids = {s: start(core, dataset.id, "run-1", s) for s in SKILLS}
    for s in SKILLS[:2]:
        fake.wait_for_job(NS, f"{LABEL_JOB_ID}={ids[s]}")
    assert sorted(created(fake)) == ["run-1/color", "run-1/count"]
    statuses = {s: to_job(core.get(ids[s])).status for s in SKILLS}  # what GetExpertTraining answers
    assert {s: st.queue_position for s, st in statuses.items()} == {"color": 0, "count": 0, "shape": 1, "spatial": 2, "texture": 3}
    assert statuses["texture"].message == "queued: 2 ahead, 2 running (at most 2 at once)"
    for n, s in enumerate(SKILLS):
        train_and_complete(core, fake, settings, ids[s])
        if n + 2 < len(SKILLS):  # its slot went to the next waiting expert: that Job exists before the next one ends
            fake.wait_for_job(NS, f"{LABEL_JOB_ID}={ids[SKILLS[n + 2]]}")
    order = created(fake)
    assert sorted(order[:2]) == ["run-1/color", "run-1/count"] and order[2:] == [f"run-1/{s}" for s in SKILLS[2:]]
    assert most_unfinished(fake) == 2
    assert all(core.get(ids[s]).output is not None for s in SKILLS)


def test_cancelling_a_run_frees_its_slots_and_the_next_run_starts(make_core, fake, dataset):
    core = make_core()
    a = [start(core, dataset.id, "run-a", s) for s in ("color", "count", "shape")]
    b = [start(core, dataset.id, "run-b", s) for s in ("color", "count")]
    for job_id in a[:2]:
        fake.wait_for_job(NS, f"{LABEL_JOB_ID}={job_id}")
    assert [core.get(j).queue_position for j in (b[0], a[2], b[1])] == [1, 2, 3]  # run-b takes its turn before run-a's third
    for job_id in a:
        core.cancel(job_id, "run-a cancelled")
    for job_id in a:
        assert wait_phase(core, job_id, {JobPhase.CANCELLED, JobPhase.FAILED, JobPhase.SUCCEEDED}).phase == JobPhase.CANCELLED
    for job_id in b:
        fake.wait_for_job(NS, f"{LABEL_JOB_ID}={job_id}")
    order = created(fake)
    assert sorted(order[:2]) == ["run-a/color", "run-a/count"] and sorted(order[2:]) == ["run-b/color", "run-b/count"]  # not run-a/shape
    assert {name for _, name in fake.jobs} == {o["metadata"]["name"] for _, kind, o in fake.events if kind == "ADDED"} - {
        o["metadata"]["name"] for _, kind, o in fake.events if kind == "DELETED"}
    assert most_unfinished(fake) == 2
    for job_id in b:
        core.cancel(job_id)


def test_a_restarted_service_reattaches_its_running_jobs_and_keeps_the_queue(make_core, fake, settings, dataset):
    core = make_core()
    ids = {s: start(core, dataset.id, "run-1", s) for s in SKILLS}
    for s in SKILLS[:2]:
        fake.wait_for_job(NS, f"{LABEL_JOB_ID}={ids[s]}")
    before = {s: core.get(ids[s]).queue_position for s in SKILLS}
    core.shutdown()  # the Jobs keep running in the cluster

    again = make_core()
    assert set(again.recover()) == set(ids.values())
    assert {s: again.get(ids[s]).queue_position for s in SKILLS} == before == {"color": 0, "count": 0, "shape": 1, "spatial": 2, "texture": 3}
    for s in SKILLS[:2]:
        assert wait_phase(again, ids[s], {JobPhase.RUNNING}).phase == JobPhase.RUNNING
    train_and_complete(again, fake, settings, ids["color"])
    fake.wait_for_job(NS, f"{LABEL_JOB_ID}={ids['shape']}")
    order = created(fake)  # the running two re-attached, not created again
    assert sorted(order[:2]) == ["run-1/color", "run-1/count"] and order[2:] == ["run-1/shape"]
    assert again.get(ids["texture"]).queue_position == 2
    for s in SKILLS:
        again.cancel(ids[s])


def test_jobs_found_running_without_their_records_hold_their_slots(make_core, fake, settings, dataset):
    core = make_core()
    ids = {s: start(core, dataset.id, "run-1", s) for s in SKILLS[:4]}
    for s in SKILLS[:2]:
        fake.wait_for_job(NS, f"{LABEL_JOB_ID}={ids[s]}")
    core.shutdown()
    storage = open_storage(settings)
    for s in SKILLS[:2]:  # the store lost the running two's records; their Jobs still run in the cluster
        storage.delete(f"jobs/expert_training/{ids[s]}.json")

    again = make_core()
    assert set(again.recover()) == set(ids.values())  # two waiting, two adopted from their Jobs' labels
    # the adopted Jobs hold both slots: the waiting two keep waiting, in their order
    assert [again.get(ids[s]).queue_position for s in SKILLS[:4]] == [0, 0, 1, 2]
    assert {again.get(ids[s]).phase for s in SKILLS[2:4]} == {JobPhase.PENDING}
    train_and_complete(again, fake, settings, ids["color"])
    fake.wait_for_job(NS, f"{LABEL_JOB_ID}={ids['shape']}")
    order = created(fake)
    assert sorted(order[:2]) == ["run-1/color", "run-1/count"] and order[2:] == ["run-1/shape"]
    for s in SKILLS[1:4]:
        again.cancel(ids[s])
