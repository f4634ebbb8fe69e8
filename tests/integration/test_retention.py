"""Retention on both backends: garbage collection keeps everything reachable from the roots and
removes only orphans, a dry run removes nothing and reports the same set, a collection that
crashes half-way leaves every retained artifact intact and a rerun finishes, and deleting a run
respects its dependants and refuses while one of its jobs runs.

Artifacts are published with the real writer into a real store; job records are written by a
real :class:`~selma.jobs.JobManager` (a job that blocks keeps its record RUNNING).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import _processes
import pytest

from selma.artifacts import ArtifactStore, Manifest, Producer, new_artifact_id
from selma.config import SelmaSettings
from selma.errors import FailedPrecondition, NotFound
from selma.jobs import JobContext, JobManager, JobPhase, JobResult, OutputRef
from selma.retention import collect_garbage, delete_run, load_jobs, plan_gc
from selma.storage import Storage

pytestmark = pytest.mark.integration

NO_GRACE = timedelta(0)


@pytest.fixture
def store(storage: Storage) -> ArtifactStore:
    return ArtifactStore(storage, producer=Producer(name="selma-test", version="1"))


def publish(store: ArtifactStore, kind: str, key: str, parents: tuple[str, ...] = (), run: str = "", **labels: str) -> Manifest:
    if run:
        labels["selma.dev/run"] = run
    with store.writer(kind, key=key, parents=parents, labels=labels) as w:
        w.put_bytes("data.bin", f"{kind} {key}".encode() * 50)
        w.put_bytes("meta/info.json", b'{"key": "%s"}' % key.encode())
    assert w.manifest is not None
    return w.manifest


def verify(store: ArtifactStore, artifact_id: str) -> None:
    """Every file of the artifact reads back whole with its recorded sha256."""
    m = store.get(artifact_id)
    for f in m.files:
        assert len(store.read_bytes(m, f.path)) == f.size  # read_bytes verifies the sha256


class Jobs:
    """Real job managers whose records land in the store: finished jobs, and jobs held RUNNING."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.release = threading.Event()
        self.managers: list[JobManager] = []

    def finished(self, kind: str, key: str, spec: dict, *, run: str, output: str | None = None, fail: bool = False) -> str:
        def fn(ctx: JobContext) -> JobResult:
            if fail:
                raise FailedPrecondition("failed on purpose")
            return JobResult(output=OutputRef(id=output) if output else None)

        mgr = JobManager(self.storage, kind, fn)
        self.managers.append(mgr)
        rec, _ = mgr.start(key, spec, run=run)
        rec = list(mgr.watch(rec.job_id, heartbeat=0.5))[-1]
        assert rec.phase == (JobPhase.FAILED if fail else JobPhase.SUCCEEDED)
        return rec.job_id

    def running(self, kind: str, key: str, spec: dict, *, run: str) -> str:
        started = threading.Event()

        def fn(ctx: JobContext) -> JobResult:
            started.set()
            self.release.wait(60)
            return JobResult()

        mgr = JobManager(self.storage, kind, fn)
        self.managers.append(mgr)
        rec, _ = mgr.start(key, spec, run=run)
        assert started.wait(30)
        return rec.job_id

    def stop(self) -> None:
        self.release.set()
        for mgr in self.managers:
            mgr.shutdown(wait=True, timeout=10)


@pytest.fixture
def jobs(storage: Storage) -> Iterator[Jobs]:
    j = Jobs(storage)
    yield j
    j.stop()


@dataclass
class Graph:
    keep: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    gone_prefixes: set[str] = field(default_factory=set)
    kept_prefixes: set[str] = field(default_factory=set)


def build_graph(store: ArtifactStore, jobs: Jobs) -> Graph:
    """Two runs' worth of lineage, some of it retained, some orphaned, plus leftovers."""
    g = Graph()
    storage = store.storage
    # run a: a registered merged model keeps its whole lineage
    p_a = publish(store, "prompt_set", "a/prompts", run="a")
    d_a = publish(store, "image_dataset", "a/render", (p_a.id,), run="a")
    c_a = publish(store, "latent_cache", "a/cache", (d_a.id,), run="a")
    e_a = publish(store, "expert", "a/train", (d_a.id, c_a.id), run="a")
    m_a = publish(store, "merged_model", "a/merge", (e_a.id,), run="a")
    store.set_alias("model-a", m_a.id)
    g.keep |= {p_a.id, d_a.id, c_a.id, e_a.id, m_a.id}
    # a superseded cache of the same dataset, and a failed attempt's expert with a child merge
    c_old = publish(store, "latent_cache", "a/cache-old", (d_a.id,), run="a")
    e_fail = publish(store, "expert", "a/train-failed", (d_a.id, c_old.id), run="a")
    m_orphan = publish(store, "merged_model", "a/merge-orphan", (e_fail.id,), run="a")
    g.gone |= {c_old.id, e_fail.id, m_orphan.id}
    # run b: a succeeded training job's record keeps its output and (through lineage) its inputs
    p_b = publish(store, "prompt_set", "b/prompts", run="b")
    d_b = publish(store, "image_dataset", "b/render", (p_b.id,), run="b")
    e_b = publish(store, "expert", "b/train", (d_b.id,), run="b")
    job_b = jobs.finished("expert_training", "b/train", {"dataset": {"id": d_b.id}}, run="b", output=e_b.id)
    g.keep |= {p_b.id, d_b.id, e_b.id}
    storage.put_bytes(f"training/{job_b}/progress.json", b"{}")  # scratch of an existing job stays
    g.kept_prefixes.add(f"training/{job_b}/")
    # leftovers: an upload whose writer died, and the scratch of a job whose record is gone
    w = store.writer("expert", key="crashed-writer")
    w.put_bytes("adapter.bin", b"partial" * 100)
    w.checkpoint()
    g.gone_prefixes |= {f"artifacts/{w.id}/"}
    storage.put_bytes("training/expert-training-00112233aabbccdd/checkpoints/step-1/state.bin", b"ckpt" * 100)
    storage.put_bytes("prompts/state/prompt-generation-00112233aabbccdd/state.json", b"{}")
    g.gone_prefixes |= {"training/expert-training-00112233aabbccdd/", "prompts/state/prompt-generation-00112233aabbccdd/"}
    # the gate's score journals live as long as their dataset: a retained dataset's stay, an orphaned
    # dataset's go with it, a journal whose dataset is already gone goes too
    d_orphan = publish(store, "image_dataset", "a/render-round-1", (p_a.id,), run="a")
    g.gone.add(d_orphan.id)
    journals = {
        "kept": f"{d_b.id}.{d_b.digest[:16]}",  # its dataset is retained: the scores stay
        "orphan": f"{d_orphan.id}.{d_orphan.digest[:16]}",  # its dataset is collected now: they go with it
        "gone": f"image-dataset-00112233445566778899.{'0' * 16}",  # its dataset no longer exists
        "stale": f"{d_b.id}.{'f' * 16}",  # the same id once held other images (a deleted run rendered again)
    }
    for folder in journals.values():
        storage.put_bytes(f"gate/scores/0123abcd/{folder}/images_000000-0.png.json", b'{"score": 1.0}')
    g.kept_prefixes.add(f"gate/scores/0123abcd/{journals['kept']}/")
    g.gone_prefixes |= {f"gate/scores/0123abcd/{journals[k]}/" for k in ("orphan", "gone", "stale")}
    return g


def published(store: ArtifactStore) -> set[str]:
    return {m.id for m in store.list()}


def prefix_exists(storage: Storage, prefix: str) -> bool:
    return bool(storage.list(prefix))


def test_gc_keeps_everything_reachable_and_removes_only_orphans(store: ArtifactStore, jobs: Jobs) -> None:
    g = build_graph(store, jobs)
    dry = collect_garbage(store, dry_run=True, grace=NO_GRACE)
    assert published(store) == g.keep | g.gone, "a dry run removes nothing"
    assert all(prefix_exists(store.storage, p) for p in g.gone_prefixes)

    report = collect_garbage(store, grace=NO_GRACE)
    assert {r.key for r in report.removals} == {r.key for r in dry.removals}, "the dry run reported the same set"
    assert {r.key for r in report.removals if r.what == "artifact"} == g.gone
    assert {r.key for r in report.removals if r.what != "artifact"} == g.gone_prefixes
    assert published(store) == g.keep
    for aid in g.keep:
        verify(store, aid)
    assert store.get_alias("model-a").artifact_id in g.keep
    assert not any(prefix_exists(store.storage, p) for p in g.gone_prefixes)
    assert all(prefix_exists(store.storage, p) for p in g.kept_prefixes)
    # children go before their parents, so no published artifact ever lacks a parent
    order = [r.key for r in report.removals if r.what == "artifact"]
    m_orphan_first = [k for k in order if k.startswith("merged-model-")]
    assert order.index(m_orphan_first[0]) < min(order.index(k) for k in order if k.startswith("expert-"))
    assert collect_garbage(store, grace=NO_GRACE).removals == [], "a second collection finds nothing"


def test_gc_leaves_what_is_younger_than_the_grace_period(store: ArtifactStore, jobs: Jobs) -> None:
    build_graph(store, jobs)
    removals, retained = plan_gc(store, grace=timedelta(hours=1))
    assert removals == [] and retained == len(published(store))


def test_gc_never_touches_what_a_running_job_uses(store: ArtifactStore, jobs: Jobs) -> None:
    orphan = publish(store, "latent_cache", "superseded")
    used = publish(store, "image_dataset", "c/render", run="c")
    key = "c/train"
    writing = store.writer("expert", id=new_artifact_id("expert", key))  # the job's output, being written
    writing.put_bytes("adapter.bin", b"in flight" * 100)
    jobs.running("expert_training", key, {"dataset": {"id": used.id}}, run="c")
    written_meanwhile = publish(store, "latent_cache", "c/cache", (used.id,), run="c")  # not recorded anywhere yet

    report = collect_garbage(store, grace=NO_GRACE)
    assert [r.key for r in report.removals] == [orphan.id], "only what existed before the job and nothing references"
    assert store.exists(used.id) and store.exists(written_meanwhile.id)
    assert prefix_exists(store.storage, f"artifacts/{writing.id}/files/")
    verify(store, used.id)

    jobs.stop()  # the job ends without an output: its staging and the unreferenced cache become collectable
    assert [j.phase for j in load_jobs(store.storage)] == ["SUCCEEDED"]
    removed = {r.key for r in collect_garbage(store, grace=NO_GRACE).removals}
    assert removed == {written_meanwhile.id, f"artifacts/{writing.id}/"}
    assert store.exists(used.id), "the finished job's record still references its input"


class Crash(BaseException):
    """The process dying: not an Exception, so nothing on the way up handles it."""


class CrashingStorage:
    """A storage that dies after ``n`` deletions (each object or prefix delete counts one)."""

    def __init__(self, inner: Storage, n: int) -> None:
        self._inner, self._left = inner, n

    def __getattr__(self, name: str):  # noqa: ANN204 - delegate everything else
        return getattr(self._inner, name)

    def _count(self) -> None:
        if self._left <= 0:
            raise Crash("killed mid-collection")
        self._left -= 1

    def delete(self, key: str) -> None:
        self._count()
        self._inner.delete(key)

    def delete_prefix(self, prefix: str) -> int:
        self._count()
        return self._inner.delete_prefix(prefix)


@pytest.mark.parametrize("deletions", [1, 3])
def test_a_collection_killed_half_way_leaves_retained_artifacts_intact_and_a_rerun_finishes(
    store: ArtifactStore, jobs: Jobs, deletions: int
) -> None:
    g = build_graph(store, jobs)
    crashing = ArtifactStore(CrashingStorage(store.storage, deletions), producer=store.producer)  # type: ignore[arg-type]
    with pytest.raises(Crash):
        collect_garbage(crashing, grace=NO_GRACE)
    # killed between an artifact's manifest and its files (1) or one artifact further (3)
    assert g.keep <= published(store)
    for aid in g.keep:
        verify(store, aid)
    for m in store.list():  # every artifact still published has all its parents
        assert all(store.exists(p) for p in m.parents), m.id
    report = collect_garbage(store, grace=NO_GRACE)
    assert report.removals, "the rerun finishes the work"
    assert published(store) == g.keep
    assert not any(prefix_exists(store.storage, p) for p in g.gone_prefixes)
    for aid in g.keep:
        verify(store, aid)
    assert collect_garbage(store, grace=NO_GRACE).removals == []


def storage_env(settings: SelmaSettings) -> dict[str, str]:
    """The SELMA_* variables that give a child process the same storage."""
    env = {}
    for name in ("data_dir", "storage_uri", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_region", "s3_secure", "s3_create_buckets"):
        value = getattr(settings, name)
        value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        env[f"SELMA_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


@pytest.mark.parametrize("deletions", [1, 2])
def test_a_gc_process_killed_with_sigkill_leaves_retained_artifacts_intact_and_a_rerun_finishes(
    store: ArtifactStore, jobs: Jobs, storage_settings: SelmaSettings, deletions: int
) -> None:
    g = build_graph(store, jobs)
    jobs.stop()  # the job managers of this process are done writing
    script = Path(__file__).parent / "_gc_process.py"
    shared = str(Path(__file__).resolve().parents[2] / "shared")
    env = {**os.environ, **storage_env(storage_settings)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (shared, env.get("PYTHONPATH", "")) if p)
    proc = _processes.popen([sys.executable, str(script), str(deletions)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else b""  # type: ignore[union-attr]
        assert line.strip() == b"ready", proc.stderr.read().decode(errors="replace")[-2000:] if line == b"" else line  # type: ignore[union-attr]
    finally:
        _processes.stop_tree(proc, first=signal.SIGKILL, grace=10)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()
    # killed after the first manifest (1: that artifact's files are still there) or one artifact in (2)
    assert g.keep <= published(store) and len(published(store)) == len(g.keep | g.gone) - 1
    for aid in g.keep:
        verify(store, aid)
    for m in store.list():
        assert all(store.exists(p) for p in m.parents), m.id
    collect_garbage(store, grace=NO_GRACE)
    assert published(store) == g.keep
    assert not any(prefix_exists(store.storage, p) for p in g.gone_prefixes)
    assert not any(store.storage.list(f"artifacts/{aid}/") for aid in g.gone), "the half-deleted artifact's files went too"
    for aid in g.keep:
        verify(store, aid)


# --- deleting a run -------------------------------------------------------------------------------


def test_delete_run_removes_its_jobs_and_artifacts_and_keeps_what_others_depend_on(store: ArtifactStore, jobs: Jobs) -> None:
    p_a = publish(store, "prompt_set", "a/prompts", run="a")
    d_a = publish(store, "image_dataset", "a/render", (p_a.id,), run="a")
    e_a = publish(store, "expert", "a/train", (d_a.id,), run="a")
    m_a = publish(store, "merged_model", "a/merge", (e_a.id,), run="a")
    jobs.finished("prompt_generation", "a/prompts", {"skill": "x"}, run="a", output=p_a.id)
    jobs.finished("dataset_render", "a/render", {"prompt_set": {"id": p_a.id}}, run="a", output=d_a.id)
    train_job = jobs.finished("expert_training", "a/train", {"dataset": {"id": d_a.id}}, run="a", output=e_a.id)
    jobs.finished("merge", "a/merge", {"merge": {"experts": [{"expert_id": e_a.id}]}}, run="a", output=m_a.id)
    store.storage.put_bytes(f"training/{train_job}/checkpoints/step-1/x.bin", b"x")
    # run b trained on run a's dataset: the dataset and its prompts must stay
    e_b = publish(store, "expert", "b/train", (d_a.id,), run="b")
    jobs.finished("expert_training", "b/train", {"dataset": {"id": d_a.id}}, run="b", output=e_b.id)

    dry = delete_run(store, "a", dry_run=True)
    assert published(store) == {p_a.id, d_a.id, e_a.id, m_a.id, e_b.id}
    assert {r.key for r in dry.artifacts} == {e_a.id, m_a.id}
    assert set(dry.kept) == {p_a.id, d_a.id} and "run b" in dry.kept[d_a.id]
    assert len(dry.jobs) == 4 and dry.scratch == [f"training/{train_job}/"]

    done = delete_run(store, "a")
    assert [r.key for r in done.artifacts] == [m_a.id, e_a.id], "children before parents"
    assert published(store) == {p_a.id, d_a.id, e_b.id}
    assert {j.run for j in load_jobs(store.storage)} == {"b"}
    assert not prefix_exists(store.storage, f"training/{train_job}/")
    verify(store, e_b.id)
    verify(store, d_a.id)
    with pytest.raises(NotFound):
        delete_run(store, "nonexistent")


def test_delete_run_keeps_what_a_registered_model_needs(store: ArtifactStore, jobs: Jobs) -> None:
    d = publish(store, "image_dataset", "a/render", run="a")
    e = publish(store, "expert", "a/train", (d.id,), run="a")
    m = publish(store, "merged_model", "a/merge", (e.id,), run="a")
    jobs.finished("merge", "a/merge", {}, run="a", output=m.id)
    store.set_alias("served", m.id)
    result = delete_run(store, "a")
    assert result.artifacts == [] and set(result.kept) == {d.id, e.id, m.id}
    assert all("registered model served" == why for why in result.kept.values())
    assert load_jobs(store.storage) == []
    # once the model is deleted too, garbage collection takes the rest
    store.delete_alias("served")
    assert {r.key for r in collect_garbage(store, grace=NO_GRACE).removals} == {d.id, e.id, m.id}


def test_delete_run_refuses_while_one_of_its_jobs_runs(store: ArtifactStore, jobs: Jobs) -> None:
    d = publish(store, "image_dataset", "a/render", run="a")
    job = jobs.running("expert_training", "a/train", {"dataset": {"id": d.id}}, run="a")
    with pytest.raises(FailedPrecondition) as e:
        delete_run(store, "a")
    assert job in str(e.value) and "running" in str(e.value)
    assert store.exists(d.id) and len(load_jobs(store.storage)) == 1


def test_a_service_forgets_finished_jobs_of_a_deleted_run(store: ArtifactStore) -> None:
    runs: list[str] = []

    def fn(ctx: JobContext) -> JobResult:
        runs.append(ctx.job_id)
        return JobResult(output=OutputRef(id=publish(store, "prompt_set", f"{ctx.idempotency_key}/{len(runs)}", run="a").id))

    mgr = JobManager(store.storage, "prompt_generation", fn)
    try:
        rec, _ = mgr.start("a/prompts", {"skill": "x"}, run="a")
        rec = list(mgr.watch(rec.job_id, heartbeat=0.5))[-1]
        assert rec.phase == JobPhase.SUCCEEDED
        delete_run(store, "a")  # as another service would: through storage only
        with pytest.raises(NotFound):
            mgr.get(rec.job_id)
        assert mgr.list()[0] == []
        again, created = mgr.start("a/prompts", {"skill": "x"}, run="a")
        assert created, "a deleted run's job starts afresh instead of returning its deleted output"
        assert list(mgr.watch(again.job_id, heartbeat=0.5))[-1].phase == JobPhase.SUCCEEDED and len(runs) == 2
    finally:
        mgr.shutdown()


def test_gc_refuses_to_guess_when_an_alias_is_unreadable(store: ArtifactStore) -> None:
    model = publish(store, "merged_model", "m")
    store.storage.put_bytes("aliases/broken.json", b"{not json")
    with pytest.raises(FailedPrecondition) as e:
        collect_garbage(store, grace=NO_GRACE)
    assert "aliases/broken.json" in str(e.value) and store.exists(model.id)
