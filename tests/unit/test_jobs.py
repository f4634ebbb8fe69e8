"""The shared job manager: idempotent start, watch, cancel, failure mapping, durable resume."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from selma import api
from selma.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from selma.jobs import JobContext, JobManager, JobPhase, JobRecord, JobResult, OutputRef
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


class FlakyStore(FileStorage):
    """The real file store, whose next writes of keys containing ``fail_on`` raise Unavailable (``failures`` times)."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.fail_on = ""
        self.failures = 0

    def put_bytes(self, key: str, data: bytes, **kw):
        if self.failures and self.fail_on and self.fail_on in key:
            self.failures -= 1
            raise Unavailable(f"injected: storage refused {key}")
        return super().put_bytes(key, data, **kw)


def test_a_failed_save_during_restart_leaves_the_job_as_it_was_and_the_next_start_restarts_it(tmp_path):
    store = FlakyStore(tmp_path / "store")
    attempts: list[int] = []

    def fails_first(ctx: JobContext) -> JobResult:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise InvalidArgument("first attempt fails")
        return JobResult(output=OutputRef(id="out"))

    mgr = JobManager(store, "x", fails_first)
    rec, _ = mgr.start("k", {})
    assert _wait(mgr, rec.job_id) == JobPhase.FAILED
    stored_before = store.get_bytes(f"jobs/x/{rec.job_id}.json")

    store.fail_on, store.failures = rec.job_id, 1
    with pytest.raises(Unavailable, match="injected"):
        mgr.start("k", {})
    after = mgr.get(rec.job_id)  # exactly as it was: FAILED, attempt 1, no worker started
    assert after.phase == JobPhase.FAILED and after.attempt == 1 and after.error.message == "first attempt fails"
    assert store.get_bytes(f"jobs/x/{rec.job_id}.json") == stored_before
    assert attempts == [1]

    again, created = mgr.start("k", {})  # the store works again: a clean restart
    assert created and again.attempt == 2 and again.phase == JobPhase.PENDING
    assert _wait(mgr, rec.job_id) == JobPhase.SUCCEEDED
    assert attempts == [1, 2] and mgr.get(rec.job_id).output.id == "out"


def test_a_new_job_whose_first_save_fails_does_not_exist(tmp_path):
    store = FlakyStore(tmp_path / "store")
    store.fail_on, store.failures = "jobs/x/", 1
    mgr = JobManager(store, "x", _counting_job())
    with pytest.raises(Unavailable):
        mgr.start("k", {})
    assert mgr.list()[0] == []
    rec, created = mgr.start("k", {})
    assert created and _wait(mgr, rec.job_id) == JobPhase.SUCCEEDED


def test_a_job_whose_running_record_cannot_be_saved_fails_naming_the_save_instead_of_staying_pending(tmp_path):
    store = FlakyStore(tmp_path / "store")
    calls: list[int] = []
    gate = threading.Event()

    def blocker(ctx: JobContext) -> JobResult:
        gate.wait(10)
        return JobResult()

    # one worker slot: the second job is queued, then its RUNNING save fails when it gets the slot
    mgr = JobManager(store, "x", lambda ctx: blocker(ctx) if ctx.spec["n"] == 1 else _counting_job(calls=calls)(ctx))
    first, _ = mgr.start("a", {"n": 1})
    second, _ = mgr.start("b", {"n": 2})
    store.fail_on, store.failures = second.job_id, 1
    gate.set()
    assert _wait(mgr, second.job_id) == JobPhase.FAILED
    failed = mgr.get(second.job_id)
    assert failed.error.code == "UNAVAILABLE" and "saving the job record failed" in failed.message and "injected" in failed.message
    assert calls == []
    mgr.start("b", {"n": 2})
    assert _wait(mgr, second.job_id) == JobPhase.SUCCEEDED and calls == [2]


def test_the_watchdog_fails_a_job_whose_worker_was_never_started_and_start_restarts_it(storage):
    mgr = JobManager(storage, "x", _counting_job(), watchdog_seconds=0.2)
    mgr._pool.shutdown()  # the worker pool is gone (as if its threads died): nothing can run the job
    rec, _ = mgr.start("k", {})
    watched = list(mgr.watch(rec.job_id, heartbeat=0.5))  # ends: the watchdog ends the job
    final = watched[-1]
    assert final.phase == JobPhase.FAILED
    assert final.error.reason == "WorkerLost" and "without a worker" in final.message and "could not be queued" in final.message
    assert mgr.get(rec.job_id).phase == JobPhase.FAILED  # saved, not only in memory
    assert JobRecord.model_validate_json(storage.get_bytes(f"jobs/x/{rec.job_id}.json")).phase == JobPhase.FAILED
    mgr.shutdown()


def test_the_watchdog_leaves_queued_and_running_jobs_alone(storage):
    gate = threading.Event()

    def blocker(ctx: JobContext) -> JobResult:
        gate.wait(10)
        return JobResult()

    mgr = JobManager(storage, "x", blocker, watchdog_seconds=0.01)
    running, _ = mgr.start("a", {"n": 1})
    queued, _ = mgr.start("b", {"n": 2})
    for _ in range(3):
        assert mgr.check_workers() == []
        time.sleep(0.02)
    gate.set()
    assert _wait(mgr, running.job_id) == JobPhase.SUCCEEDED and _wait(mgr, queued.job_id) == JobPhase.SUCCEEDED
    mgr.shutdown()


def test_a_succeeded_job_reports_what_it_did_not_what_was_asked(storage):
    def short(ctx: JobContext) -> JobResult:
        ctx.progress(2, 4, unit="prompts")
        return JobResult(message="accepted 2 prompts")

    mgr = JobManager(storage, "x", short)
    rec, _ = mgr.start("k", {})
    assert _wait(mgr, rec.job_id) == JobPhase.SUCCEEDED
    p = mgr.get(rec.job_id).progress
    assert (p.done, p.total) == (2, 4)
