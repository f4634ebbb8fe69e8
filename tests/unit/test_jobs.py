"""The shared job manager: idempotent start, watch, cancel, failure mapping, durable resume."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from selma import api
from selma.errors import AlreadyExists, InvalidArgument, NotFound
from selma.jobs import JobContext, JobManager, JobPhase, JobResult, OutputRef
from selma.storage import FileStorage
from selma.v1 import common_pb2


@pytest.fixture()
def storage(tmp_path):
    return FileStorage(tmp_path / "store")


def _counting_job(steps: int = 5, delay: float = 0.01, calls: list | None = None):
    """A job that counts to ``steps``, storing each finished step so a rerun resumes."""

    def run(ctx: JobContext) -> JobResult:
        if calls is not None:
            calls.append(ctx.attempt)
        done = ctx.stats.get("done_steps", 0)
        for i in range(done, steps):
            ctx.check_cancelled()
            time.sleep(delay)
            ctx.progress(i + 1, steps, unit="steps", stats={"done_steps": i + 1})
        return JobResult(output=OutputRef(id="prompt-set-abc", kind="prompt_set"), stats={"final": True})

    return run


def _wait(mgr: JobManager, job_id: str, timeout: float = 10) -> JobPhase:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = mgr.get(job_id)
        if rec.phase.terminal:
            return rec.phase
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {mgr.get(job_id).phase}")


def test_same_key_same_spec_returns_the_existing_job(storage):
    calls: list[int] = []
    mgr = JobManager(storage, "prompt_generation", _counting_job(calls=calls))
    rec1, created1 = mgr.start("key-1", {"count": 5}, run="r1", skill="counting")
    rec2, created2 = mgr.start("key-1", {"count": 5})
    assert created1 and not created2
    assert rec1.job_id == rec2.job_id
    assert _wait(mgr, rec1.job_id) == JobPhase.SUCCEEDED
    assert calls == [1]
    final = mgr.get(rec1.job_id)
    assert final.output.id == "prompt-set-abc"
    assert final.progress.done == final.progress.total == 5
    assert final.stats == {"done_steps": 5, "final": True}


def test_same_key_different_spec_is_refused(storage):
    mgr = JobManager(storage, "render", _counting_job())
    mgr.start("key-1", {"count": 5})
    with pytest.raises(AlreadyExists, match="different parameters"):
        mgr.start("key-1", {"count": 6})


def test_watch_streams_until_terminal(storage):
    mgr = JobManager(storage, "render", _counting_job(steps=5, delay=0.02))
    rec, _ = mgr.start("k", {})
    seen = list(mgr.watch(rec.job_id))
    assert seen[-1].phase == JobPhase.SUCCEEDED
    dones = [r.progress.done for r in seen]
    assert dones == sorted(dones) and len(seen) >= 2
    assert all(not r.phase.terminal for r in seen[:-1])


def test_cancel_running_job_ends_cancelled(storage):
    started = threading.Event()

    def run(ctx: JobContext) -> JobResult:
        started.set()
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    mgr = JobManager(storage, "train", run)
    rec, _ = mgr.start("k", {})
    assert started.wait(5)
    assert mgr.cancel(rec.job_id, "user asked").phase == JobPhase.CANCELLING
    assert _wait(mgr, rec.job_id) == JobPhase.CANCELLED


def test_cancel_queued_job_never_runs(storage):
    gate = threading.Event()
    ran: list[str] = []

    def run(ctx: JobContext) -> JobResult:
        ran.append(ctx.job_id)
        gate.wait(5)
        return JobResult()

    mgr = JobManager(storage, "train", run, max_concurrent=1)
    first, _ = mgr.start("a", {})
    queued, _ = mgr.start("b", {})
    assert mgr.cancel(queued.job_id).phase == JobPhase.CANCELLED
    gate.set()
    assert _wait(mgr, first.job_id) == JobPhase.SUCCEEDED
    time.sleep(0.05)
    assert ran == [first.job_id]


def test_domain_error_fails_job_with_its_code_and_unexpected_is_internal(storage):
    def bad(ctx: JobContext) -> JobResult:
        if ctx.spec["what"] == "domain":
            raise InvalidArgument("count must be > 0", field="count")
        raise ZeroDivisionError("secret")

    mgr = JobManager(storage, "x", bad, max_concurrent=2)
    a, _ = mgr.start("a", {"what": "domain"})
    b, _ = mgr.start("b", {"what": "crash"})
    assert _wait(mgr, a.job_id) == JobPhase.FAILED and _wait(mgr, b.job_id) == JobPhase.FAILED
    ea, eb = mgr.get(a.job_id).error, mgr.get(b.job_id).error
    assert ea.code == "INVALID_ARGUMENT" and "count must be > 0" in ea.message
    assert eb.code == "INTERNAL" and "secret" not in eb.message and "ref" in eb.message
    status = api.job_status(mgr.get(a.job_id))
    assert status.phase == common_pb2.JOB_PHASE_FAILED
    assert status.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_restarting_failed_job_resumes_from_stored_stats(storage):
    attempts: list[int] = []

    def flaky(ctx: JobContext) -> JobResult:
        attempts.append(ctx.attempt)
        done = ctx.stats.get("done", 0)
        for i in range(done, 4):
            if ctx.attempt == 1 and i == 2:
                raise InvalidArgument("transient-looking failure")
            ctx.progress(i + 1, 4, stats={"done": i + 1})
        return JobResult(stats={"resumed_at": done})

    mgr = JobManager(storage, "x", flaky)
    rec, _ = mgr.start("k", {"n": 4})
    assert _wait(mgr, rec.job_id) == JobPhase.FAILED
    again, created = mgr.start("k", {"n": 4})
    assert created and again.attempt == 2
    assert _wait(mgr, rec.job_id) == JobPhase.SUCCEEDED
    assert attempts == [1, 2]
    assert mgr.get(rec.job_id).stats["resumed_at"] == 2


def test_worker_relaunches_count_as_attempts_once_each_and_a_job_restart_starts_counting_again(storage):
    # by the record's attempt when the job function starts: a launcher re-reports the launch it is on at every poll
    reports = {1: [(1, ""), (1, ""), (2, "exit -9"), (2, ""), (3, "exit -9 again")], 4: [(1, ""), (2, "oom")]}

    def launching(ctx: JobContext) -> JobResult:
        for n, cause in reports[ctx.attempt]:
            ctx.launched(n, cause)
        raise InvalidArgument("the worker failed")

    mgr = JobManager(storage, "x", launching)
    rec, _ = mgr.start("k", {})
    assert _wait(mgr, rec.job_id) == JobPhase.FAILED
    first = mgr.get(rec.job_id)
    assert first.attempt == 3
    assert first.warnings == ["worker relaunched (attempt 2): exit -9", "worker relaunched (attempt 3): exit -9 again"]
    mgr.start("k", {})  # the restarted job's first launch is attempt 4, its relaunch 5
    assert _wait(mgr, rec.job_id) == JobPhase.FAILED
    assert mgr.get(rec.job_id).attempt == 5 and mgr.get(rec.job_id).warnings[-1] == "worker relaunched (attempt 5): oom"
    assert api.job_status(mgr.get(rec.job_id)).attempt == 5


def test_new_manager_resumes_unfinished_jobs_after_shutdown(storage):
    started = threading.Event()

    def slow(ctx: JobContext) -> JobResult:
        done = ctx.stats.get("done", 0)
        for i in range(done, 50):
            ctx.check_cancelled()
            started.set()
            time.sleep(0.01)
            ctx.progress(i + 1, 50, stats={"done": i + 1})
        return JobResult(stats={"resumed_from": done})

    first = JobManager(storage, "render", slow, persist_interval=0)
    rec, _ = first.start("k", {})
    assert started.wait(5)
    time.sleep(0.05)
    first.shutdown(wait=True)
    stored = first.get(rec.job_id)
    assert stored.phase == JobPhase.PENDING and "resumes" in stored.message

    second = JobManager(storage, "render", slow)
    assert second.recover() == [rec.job_id]
    assert _wait(second, rec.job_id) == JobPhase.SUCCEEDED
    assert second.get(rec.job_id).stats["resumed_from"] > 0


def test_list_filters_and_paginates(storage):
    mgr = JobManager(storage, "x", _counting_job(steps=1), max_concurrent=2)
    for i in range(5):
        mgr.start(f"k{i}", {"i": i}, run="r1" if i < 3 else "r2", labels={"team": "a" if i % 2 else "b"})
    for r in mgr.list()[0]:
        _wait(mgr, r.job_id)
    assert len(mgr.list(run="r1")[0]) == 3
    assert {r.labels["team"] for r in mgr.list(labels={"team": "a"})[0]} == {"a"}
    page1, token = mgr.list(page_size=2)
    page2, token2 = mgr.list(page_size=2, page_token=token)
    page3, token3 = mgr.list(page_size=2, page_token=token2)
    ids = [r.job_id for r in page1 + page2 + page3]
    assert len(ids) == len(set(ids)) == 5 and token3 == ""
    assert mgr.list(phases={JobPhase.SUCCEEDED})[0].__len__() == 5
    with pytest.raises(InvalidArgument):
        mgr.list(page_token="garbage")


def test_unknown_job_is_not_found(storage):
    mgr = JobManager(storage, "x", _counting_job())
    with pytest.raises(NotFound):
        mgr.get("x-0000")
    with pytest.raises(NotFound):
        mgr.cancel("x-0000")
