"""Admission in the job layer: at most N jobs hold a slot, FIFO within a run, round robin between runs.

Every job here blocks until the test releases it, and records when it starts and ends, so the
order and the overlap are read from what the jobs did, never from timings: each step releases one
job and waits (with a generous deadline) for the start it lets through.  Jobs admitted together
(the first two, with two free slots) start in their worker threads in either order: those are
compared as sets.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable

import pytest

from selma import api
from selma.errors import ResourceExhausted
from selma.jobs import JobContext, JobManager, JobPhase, JobResult
from selma.storage import FileStorage

DEADLINE = 30.0


class Jobs:
    """Job functions that log ("start"|"end", key) and hold until released (or cancelled / interrupted)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.gates: dict[str, threading.Event] = {}
        self.running = 0
        self.most_running = 0
        self._cond = threading.Condition()

    def __call__(self, ctx: JobContext) -> JobResult:
        key = ctx.idempotency_key
        with self._cond:
            self.events.append(("start", key))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            gate = self.gates.setdefault(key, threading.Event())
            self._cond.notify_all()
        try:
            while not gate.wait(0.01):
                ctx.check_cancelled()
            return JobResult(message=f"{key} done")
        finally:
            with self._cond:
                self.running -= 1
                self.events.append(("end", key))
                self._cond.notify_all()

    def started(self) -> list[str]:
        with self._cond:
            return [k for e, k in self.events if e == "start"]

    def release(self, key: str) -> None:
        with self._cond:
            self.gates.setdefault(key, threading.Event()).set()

    def wait_for(self, what: Callable[[], bool]) -> None:
        with self._cond:
            assert self._cond.wait_for(what, timeout=DEADLINE), f"still waiting; events so far: {self.events}"


def wait_phase(mgr: JobManager, job_id: str, phases: set[JobPhase]) -> None:
    deadline = time.monotonic() + DEADLINE
    while mgr.get(job_id).phase not in phases:
        assert time.monotonic() < deadline, f"{job_id} still {mgr.get(job_id).phase}"
        time.sleep(0.01)


@pytest.fixture
def storage(tmp_path):
    return FileStorage(tmp_path / "store")


def manager(storage, jobs: Jobs, limit: int, **kw) -> JobManager:
    return JobManager(storage, "expert_training", jobs, max_concurrent=8, max_admitted=limit, persist_interval=0, **kw)


def positions(mgr: JobManager, ids: dict[str, str]) -> dict[str, int]:
    return {key: mgr.get(job_id).queue_position for key, job_id in ids.items()}


def test_five_experts_train_two_at_a_time_in_the_declared_order(storage):
    jobs = Jobs()
    mgr = manager(storage, jobs, limit=2)
    skills = ["color", "count", "shape", "spatial", "texture"]
    ids = {f"r/{s}": mgr.start(f"r/{s}", {"skill": s}, run="r", skill=s)[0].job_id for s in skills}
    try:
        jobs.wait_for(lambda: len(jobs.started()) == 2)
        assert sorted(jobs.started()) == ["r/color", "r/count"]
        assert positions(mgr, ids) == {"r/color": 0, "r/count": 0, "r/shape": 1, "r/spatial": 2, "r/texture": 3}
        waiting = mgr.get(ids["r/texture"])
        assert waiting.phase == JobPhase.PENDING and waiting.message == "queued: 2 ahead, 2 running (at most 2 at once)"
        assert api.job_status(waiting).queue_position == 3
        for n, key in enumerate(["r/color", "r/count", "r/shape", "r/spatial", "r/texture"]):
            jobs.release(key)
            wait_phase(mgr, ids[key], {JobPhase.SUCCEEDED})
            jobs.wait_for(lambda n=n: len(jobs.started()) == min(n + 3, 5))
        # each new expert started only after one ended: never more than two at once, in the declared order
        assert sorted(jobs.events[:2]) == [("start", "r/color"), ("start", "r/count")]
        assert jobs.events[2:] == [("end", "r/color"), ("start", "r/shape"),
                               ("end", "r/count"), ("start", "r/spatial"),
                               ("end", "r/shape"), ("start", "r/texture"),
                               ("end", "r/spatial"), ("end", "r/texture")]
        assert jobs.most_running == 2
        assert all(mgr.get(i).queue_position == 0 and mgr.get(i).admitted_at is not None for i in ids.values())
    finally:
        for key in ids:
            jobs.release(key)
        mgr.shutdown()


def test_runs_take_turns_fifo_within_each_run(storage):
    jobs = Jobs()
    mgr = manager(storage, jobs, limit=1)
    keys = ["a/1", "a/2", "a/3", "b/1", "b/2"]  # run a asked first, for more
    ids = {k: mgr.start(k, {}, run=k.split("/")[0])[0].job_id for k in keys}
    try:
        jobs.wait_for(lambda: jobs.started() == ["a/1"])
        # run b never had a slot: it goes next, then the runs alternate
        assert positions(mgr, ids) == {"a/1": 0, "b/1": 1, "a/2": 2, "b/2": 3, "a/3": 4}
        order = ["a/1", "b/1", "a/2", "b/2", "a/3"]
        for n, key in enumerate(order[:-1]):
            jobs.release(key)
            jobs.wait_for(lambda n=n: len(jobs.started()) == n + 2)
        assert jobs.started() == order
        assert jobs.most_running == 1
    finally:
        for key in keys:
            jobs.release(key)
        mgr.shutdown()


def test_cancelling_a_run_frees_its_slots_for_the_next_run(storage):
    jobs = Jobs()
    mgr = manager(storage, jobs, limit=2)
    keys = ["a/1", "a/2", "a/3", "b/1", "b/2"]
    ids = {k: mgr.start(k, {}, run=k.split("/")[0])[0].job_id for k in keys}
    try:
        jobs.wait_for(lambda: sorted(jobs.started()) == ["a/1", "a/2"])
        assert positions(mgr, ids)["b/2"] == 3
        recs, _ = mgr.list(run="a", page_size=10)
        for rec in recs:  # what `selma` does for a run: cancel each of its jobs
            mgr.cancel(rec.job_id, "run a cancelled")
        assert mgr.get(ids["a/3"]).phase == JobPhase.CANCELLED  # it was waiting: it ends at once, never starts
        jobs.wait_for(lambda: sorted(jobs.started()) == ["a/1", "a/2", "b/1", "b/2"])
        for key in ("a/1", "a/2", "a/3"):
            wait_phase(mgr, ids[key], {JobPhase.CANCELLED})
        assert sorted(jobs.started()[2:]) == ["b/1", "b/2"]
        assert {mgr.get(ids[k]).phase for k in ("b/1", "b/2")} == {JobPhase.RUNNING}
        assert jobs.most_running == 2
    finally:
        for key in keys:
            jobs.release(key)
        mgr.shutdown()


def test_a_restart_reattaches_the_admitted_jobs_and_keeps_the_queue_order(storage, tmp_path):
    jobs = Jobs()
    mgr = manager(storage, jobs, limit=2)
    keys = ["a/1", "a/2", "a/3", "b/1", "b/2"]
    ids = {k: mgr.start(k, {}, run=k.split("/")[0])[0].job_id for k in keys}
    jobs.wait_for(lambda: sorted(jobs.started()) == ["a/1", "a/2"])
    before = positions(mgr, ids)
    assert before == {"a/1": 0, "a/2": 0, "b/1": 1, "a/3": 2, "b/2": 3}
    # a crash: the store as it is while two run (their records say RUNNING), read by a new process
    crashed = FileStorage(tmp_path / "crashed")
    shutil.copytree(tmp_path / "store", tmp_path / "crashed", dirs_exist_ok=True)
    mgr.shutdown()  # a clean stop: running jobs go back to PENDING but keep their slots
    assert {mgr.get(ids[k]).phase for k in ("a/1", "a/2")} == {JobPhase.PENDING}

    for store in (storage, crashed):
        again = Jobs()
        mgr2 = manager(store, again, limit=2)
        try:
            assert set(mgr2.recover()) == set(ids.values())
            # the two that held slots are re-attached (and hold them); the others keep their places
            again.wait_for(lambda again=again: sorted(again.started()) == ["a/1", "a/2"])
            assert positions(mgr2, ids) == before
            order = ["a/1", "a/2", "b/1", "a/3", "b/2"]
            for n, key in enumerate(order[:3]):
                again.release(key)
                again.wait_for(lambda n=n, again=again: len(again.started()) == min(n + 3, 5))
            assert again.started()[2:] == ["b/1", "a/3", "b/2"]
            assert again.most_running == 2
        finally:
            for key in keys:
                again.release(key)
            mgr2.shutdown()


def test_a_restart_over_the_limit_keeps_every_admitted_job_and_admits_no_more(storage):
    jobs = Jobs()
    mgr = manager(storage, jobs, limit=3)
    ids = {k: mgr.start(k, {}, run="r")[0].job_id for k in ["r/1", "r/2", "r/3", "r/4"]}
    jobs.wait_for(lambda: len(jobs.started()) == 3)
    mgr.shutdown()

    again = Jobs()
    mgr2 = manager(storage, again, limit=2)  # the operator lowered the limit
    try:
        mgr2.recover()
        again.wait_for(lambda: sorted(again.started()) == ["r/1", "r/2", "r/3"])  # running work is not dropped
        assert mgr2.get(ids["r/4"]).queue_position == 1
        again.release("r/1")
        wait_phase(mgr2, ids["r/1"], {JobPhase.SUCCEEDED})
        assert mgr2.get(ids["r/4"]).phase == JobPhase.PENDING  # 2 still hold slots: at the limit
        again.release("r/2")
        again.wait_for(lambda: again.started()[-1] == "r/4")
    finally:
        for key in ids:
            again.release(key)
        mgr2.shutdown()


def test_the_waiting_room_is_bounded_and_says_which_setting(storage):
    jobs = Jobs()
    mgr = manager(storage, jobs, limit=1, max_waiting=2, waiting_setting="training_max_queued_jobs")
    try:
        mgr.start("r/1", {}, run="r")
        jobs.wait_for(lambda: jobs.started() == ["r/1"])
        mgr.start("r/2", {}, run="r")
        mgr.start("r/3", {}, run="r")
        with pytest.raises(ResourceExhausted, match="SELMA_TRAINING_MAX_QUEUED_JOBS=2"):
            mgr.start("r/4", {}, run="r")
        assert mgr.start("r/2", {}, run="r")[1] is False  # an existing job is still answered
    finally:
        for key in ("r/1", "r/2", "r/3"):
            jobs.release(key)
        mgr.shutdown()


def test_a_restart_with_a_free_slot_gives_it_by_turn_not_by_age(storage):
    jobs = Jobs()
    mgr = manager(storage, jobs, limit=2)
    ids = {k: mgr.start(k, {}, run=k.split("/")[0])[0].job_id for k in ["a/1", "a/2", "a/3", "a/4", "b/1"]}
    jobs.wait_for(lambda: sorted(jobs.started()) == ["a/1", "a/2"])
    mgr.shutdown()

    again = Jobs()
    mgr2 = manager(storage, again, limit=3)  # one more slot than before
    try:
        mgr2.recover()
        # a/3 waited longest, but run a holds both other slots: run b's turn
        again.wait_for(lambda: sorted(again.started()) == ["a/1", "a/2", "b/1"])
        assert positions(mgr2, ids) == {"a/1": 0, "a/2": 0, "b/1": 0, "a/3": 1, "a/4": 2}
    finally:
        for key in ids:
            again.release(key)
        mgr2.shutdown()


def test_the_services_admit_as_many_as_their_local_workers_unless_told_otherwise():
    from selma_evaluation.settings import EvaluationSettings
    from selma_training.settings import TrainingSettings

    for cls, limit, setting in ((TrainingSettings, "training_admission_limit", "training_max_concurrent_jobs"),
                                (EvaluationSettings, "eval_admission_limit", "eval_max_concurrent_jobs")):
        assert getattr(cls(batch_launcher="local", batch_max_local_jobs=2), limit) == 2  # `selma up`: queued, not waiting on a slot
        assert getattr(cls(batch_launcher="kubernetes", batch_max_local_jobs=2), limit) == 0  # bounded by the jobs followed
        assert getattr(cls(batch_launcher="kubernetes", **{setting: 3}), limit) == 3
        assert getattr(cls(batch_launcher="local", batch_max_local_jobs=2, **{setting: 1}), limit) == 1
