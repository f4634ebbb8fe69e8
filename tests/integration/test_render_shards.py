"""Sharded dataset renders: the render service coordinates shard workers (local processes, or a
Kubernetes Indexed Job against the loopback fake API) and publishes one dataset when all are done."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
from fake_kube_api import FakeKubeApi, complete
from kubernetes import client

from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.batch.kube import KubernetesLauncher
from selma.batch.launchers import LocalLauncher
from selma.errors import InvalidArgument, PermissionDenied
from selma.jobs import JobPhase
from selma.v1 import common_pb2, render_service_pb2
from selma_render.core import RenderCore
from selma_render.settings import RenderSettings
from selma_render.shards import render_shard, shard_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NS = "selma"


@pytest.fixture
def settings(make_settings, tiny_models, tmp_path, monkeypatch) -> RenderSettings:
    # CPU float results depend on the thread count: workers (which inherit the environment, as under
    # `selma up`) use one thread like this process (conftest), so in-process images compare byte for byte
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = make_settings().model_dump()
    return RenderSettings(**{
        **base,
        "device": "cpu",
        "render_default_model": str(tiny_models.sd),
        "render_max_resolution": 512,
        "model_allowed_dirs": f"{tiny_models.sd.parent},{tmp_path}",
        "batch_poll_seconds": 0.2,
        "batch_namespace": NS,
        "batch_watch_timeout_seconds": 1,
        "s3_secret_key": "do-not-leak-this-secret",
        "log_level": "WARNING",
    })


@pytest.fixture
def make_core(settings):
    cores: list[RenderCore] = []

    def make(**kwargs) -> RenderCore:  # noqa: ANN003
        core = RenderCore(settings, **kwargs)
        cores.append(core)
        return core

    yield make
    for core in cores:
        core.shutdown(wait=True, timeout=60)


def make_prompt_set(store: ArtifactStore, n: int) -> str:
    lines = [{"id": f"p{i:06d}", "index": i, "text": f"{i + 1} red cubes", "skill": "count"} for i in range(n)]
    with store.writer("prompt_set", key=f"ps-{uuid.uuid4().hex}", labels={"selma.dev/skill": "count"}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    return w.manifest.id


def spec(prompt_set: str, shards: int, batch_size: int, placement: common_pb2.Placement | None = None) -> render_service_pb2.DatasetRenderSpec:
    return render_service_pb2.DatasetRenderSpec(
        run="run-1",
        prompt_set=common_pb2.ArtifactRef(id=prompt_set),
        settings=render_service_pb2.RenderSettings(
            diffusion=common_pb2.DiffusionSettings(steps=2, scheduler=common_pb2.SCHEDULER_DDIM, width=32, height=32),
            batch_size=batch_size,
        ),
        shards=shards,
        placement=placement,
    )


def wait_done(core: RenderCore, job_id: str):
    for _ in core.jobs.watch(job_id, heartbeat=1.0):  # ends when the job is terminal
        pass
    return core.jobs.get(job_id)


def run_to_end(core: RenderCore, key: str, s: render_service_pb2.DatasetRenderSpec):
    rec, _, _ = core.start(key, s)
    return wait_done(core, rec.job_id)


def dataset_files(store: ArtifactStore, dataset_id: str) -> dict[str, tuple[str, bytes]]:
    m = store.get(dataset_id)
    return {f.path: (f.sha256, store.read_bytes(m, f.path)) for f in m.files}


def journal(store: ArtifactStore, job_id: str, i: int) -> dict:
    return json.loads(store.storage.get_bytes(shard_key(job_id, i)))


def test_three_local_shards_equal_one_shard_and_in_process_byte_for_byte(make_core):
    core = make_core()
    ps = make_prompt_set(core.store, 6)
    results = {}
    for shards in (1, 3, 0):  # 0 = in the service's own process (today's path)
        rec = run_to_end(core, f"run-1/render/s{shards}", spec(ps, shards, batch_size=2))
        assert rec.phase == JobPhase.SUCCEEDED, rec.message
        results[shards] = (rec, dataset_files(core.store, rec.output.id))
    one, three, inproc = results[1][1], results[3][1], results[0][1]
    assert len(three) == 7  # 6 images + metadata.jsonl
    assert three == one == inproc  # every file's digest and bytes, metadata.jsonl included
    m1, m3 = core.store.get(results[1][0].output.id), core.store.get(results[3][0].output.id)
    assert m1.digest == m3.digest and m1.parameters == m3.parameters
    rec3 = results[3][0]
    shards = rec3.stats["shards"]
    assert [(s["index"], s["images_total"], s["images_done"], s["attempts"], s["complete"]) for s in shards] == [
        (0, 2, 2, 1, True), (1, 2, 2, 1, True), (2, 2, 2, 1, True)]
    assert rec3.details["render.shards"] == "3"


def test_killed_shard_worker_reruns_alone_and_the_dataset_appears_only_when_all_shards_are_done(make_core, settings):
    core = make_core()
    ps = make_prompt_set(core.store, 12)
    key = "run-1/render/kill"
    placement = common_pb2.Placement(max_retries=0)  # the killed worker fails the job: the restart must resume it
    rec, _, _ = core.start(key, spec(ps, 3, batch_size=1, placement=placement))
    job_id = rec.job_id
    dataset_id = new_artifact_id(ArtifactKind.IMAGE_DATASET, key)
    killed_at = None
    deadline = time.monotonic() + 300
    while killed_at is None and time.monotonic() < deadline:
        pid = core.jobs.get(job_id).details.get("render.shard.1.pid")
        try:
            doc = journal(core.store, job_id, 1)
        except Exception:  # noqa: BLE001 - not written yet
            doc = {}
        if pid and doc.get("files") and not doc.get("complete"):
            os.kill(int(pid), signal.SIGKILL)
            killed_at = len(doc["files"])
        time.sleep(0.01)
    assert killed_at is not None, "shard 1 was never seen mid-shard"
    rec = wait_done(core, job_id)
    assert rec.phase == JobPhase.FAILED and "shard(s) 1 of 3" in rec.message
    # shards 0 and 2 are done, shard 1 is not: nothing is visible to readers
    assert journal(core.store, job_id, 0)["complete"] and journal(core.store, job_id, 2)["complete"]
    assert not journal(core.store, job_id, 1).get("complete")
    assert not core.store.exists(dataset_id)
    assert core.store.list(ArtifactKind.IMAGE_DATASET) == []

    rec = run_to_end(core, key, spec(ps, 3, batch_size=1, placement=placement))  # a client re-starts the failed job
    assert rec.phase == JobPhase.SUCCEEDED, rec.message
    j = [journal(core.store, job_id, i) for i in range(3)]
    assert [len(d["attempts"]) for d in j] == [1, 2, 1]  # only the killed shard ran again
    assert j[1]["attempts"][1]["rendered"] <= 4 - killed_at  # ...and rendered only what its journal lacked
    assert [d["attempts"][0]["rendered"] for d in (j[0], j[2])] == [4, 4]
    assert [s["attempts"] for s in rec.stats["shards"]] == [1, 2, 1]
    reference = run_to_end(core, "run-1/render/ref", spec(ps, 0, batch_size=1))
    assert dataset_files(core.store, rec.output.id) == dataset_files(core.store, reference.output.id)


# --- Kubernetes: one Indexed Job through the loopback API server ---------------------------------------


def api_client(url: str) -> client.ApiClient:
    cfg = client.Configuration()
    cfg.host = url
    cfg.retries = 1
    return client.ApiClient(cfg)


@pytest.fixture
def fake():
    with FakeKubeApi() as api:
        yield api


def test_indexed_job_manifest_policy_and_publish_after_all_indexes(make_core, settings, fake):
    kube_settings = settings.model_copy(update={"batch_launcher": "kubernetes", "batch_policy_max_gpus": 1,
                                                "batch_policy_node_selectors": {"pool": ["gpu"]}})
    launchers = {"kubernetes": KubernetesLauncher(kube_settings, api_client=api_client(fake.url)), "local": LocalLauncher(kube_settings)}
    core = RenderCore(kube_settings, launchers=launchers)
    try:
        ps = make_prompt_set(core.store, 6)
        # outside the operator's policy: refused before any Job exists
        with pytest.raises(PermissionDenied) as e:
            core.start("run-1/render/k8s-denied", spec(ps, 3, 2, common_pb2.Placement(node_selector={"pool": "cpu"})))
        assert e.value.field == "spec.placement.node_selector"
        with pytest.raises(InvalidArgument, match="SELMA_BATCH_POLICY_MAX_GPUS=1"):
            core.start("run-1/render/k8s-denied", spec(ps, 3, 2, common_pb2.Placement(gpus=2)))
        assert fake.count("POST") == 0

        placement = common_pb2.Placement(gpus=1, node_selector={"pool": "gpu"}, max_retries=2)
        rec, _, _ = core.start("run-1/render/k8s", spec(ps, 3, 2, placement))
        job = fake.wait_for_job(NS)
        s = job["spec"]
        assert (s["completionMode"], s["completions"], s["parallelism"], s["backoffLimitPerIndex"]) == ("Indexed", 3, 3, 2)
        pod = s["template"]["spec"]
        assert pod["nodeSelector"] == {"pool": "gpu"}
        (c,) = pod["containers"]
        assert c["command"][:5] == ["selma", "render", "shard", "--config", core.store.storage.uri_for(f"render/{rec.job_id}/work.json")]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        env = {v["name"]: v for v in c["env"]}
        assert env["SELMA_BATCH_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        assert env["SELMA_DEVICE"]["value"] == "cuda"
        assert job["metadata"]["labels"]["selma.dev/task"] == "render"
        assert "do-not-leak-this-secret" not in json.dumps(job)

        # play the pods: each completion index renders its shard (here, in-process, on the CPU)
        work_uri = c["command"][4]
        dataset_id = new_artifact_id(ArtifactKind.IMAGE_DATASET, "run-1/render/k8s")
        for i in range(3):
            assert not core.store.exists(dataset_id)
            render_shard(settings, work_uri, i)
        assert not core.store.exists(dataset_id)  # every shard is done, but the Job is not complete yet
        fake.set_job_status(NS, job["metadata"]["name"], complete())
        rec = wait_done(core, rec.job_id)
        assert rec.phase == JobPhase.SUCCEEDED, rec.message
        assert [x["complete"] for x in rec.stats["shards"]] == [True, True, True]
        assert rec.details["kubernetes.job"] == job["metadata"]["name"]
        local = run_to_end(core, "run-1/render/k8s-ref", spec(ps, 0, 2))
        assert dataset_files(core.store, rec.output.id) == dataset_files(core.store, local.output.id)
        assert fake.count("POST") == 1
    finally:
        core.shutdown(wait=True, timeout=60)



def test_a_restarted_coordinator_attaches_to_the_running_indexed_job(settings, fake):
    kube_settings = settings.model_copy(update={"batch_launcher": "kubernetes"})

    def new_core() -> RenderCore:
        return RenderCore(kube_settings, launchers={"kubernetes": KubernetesLauncher(kube_settings, api_client=api_client(fake.url))})

    first = new_core()
    ps = make_prompt_set(first.store, 4)
    rec, _, _ = first.start("run-1/render/adopt", spec(ps, 2, 2))
    job = fake.wait_for_job(NS)
    first.shutdown(wait=True, timeout=60)  # the service stops; the Job keeps running
    assert not first.jobs.get(rec.job_id).phase.terminal

    second = new_core()
    try:
        assert second.recover() == [rec.job_id]
        for _ in second.jobs.watch(rec.job_id, heartbeat=1.0):
            if second.jobs.get(rec.job_id).details.get("kubernetes.job"):
                break
        jobs = fake.list(NS, "")["items"]
        assert [j["metadata"]["uid"] for j in jobs] == [job["metadata"]["uid"]]  # attached, nothing new created
        work_uri = job["spec"]["template"]["spec"]["containers"][0]["command"][4]
        for i in range(2):
            render_shard(settings, work_uri, i)
        fake.set_job_status(NS, job["metadata"]["name"], complete())
        done = wait_done(second, rec.job_id)
        assert done.phase == JobPhase.SUCCEEDED, done.message
        assert second.store.exists(done.output.id)
        assert len(fake.list(NS, "")["items"]) == 1
    finally:
        second.shutdown(wait=True, timeout=60)


def test_shard_worker_rejects_a_missing_work_document_as_bad_input(settings, tmp_path):
    import sys

    import _processes

    env = {**os.environ, "SELMA_STORAGE_URI": settings.resolved_storage_uri, "SELMA_DATA_DIR": str(tmp_path / "data"), "SELMA_METRICS_PORT": "0"}
    missing = f"{settings.resolved_storage_uri}/render/dataset_render-x/work.json"
    proc = _processes.run([sys.executable, "-m", "selma.app.cli", "render", "shard", "--config", missing, "--shard", "0"],
                          timeout=120, what="selma render shard", env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "no render work document" in proc.stdout + proc.stderr
    proc = _processes.run([sys.executable, "-m", "selma.app.cli", "render", "shard", "--config", missing],
                          timeout=120, what="selma render shard", env={k: v for k, v in env.items() if k != "SELMA_BATCH_COMPLETION_INDEX"},
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no shard index" in proc.stdout + proc.stderr
