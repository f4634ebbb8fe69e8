"""Long-running jobs with idempotency keys, shared by every service.

Every kind of long work (generate a prompt set, render a dataset, train an expert, merge
experts, evaluate) is a *job* with the same five RPCs: Start (client-supplied idempotency
key), Get, Watch (stream until a terminal phase), Cancel, List.  :class:`JobManager` is the
transport-neutral core behind them:

* **Idempotent start.** The job id is derived from (kind, idempotency key).  Starting again
  with the same key and the same spec returns the existing job; with a different spec it is
  an error (``ALREADY_EXISTS``) that says to use a new key.  Starting a FAILED or CANCELLED
  job again re-runs it (``attempt`` + 1); the job function resumes from what it stored.
* **Durable records.** Each job's record is a small JSON object in storage
  (``jobs/<kind>/<job_id>.json``), replaced atomically.  A restarted service reloads the
  records and re-queues every job that was PENDING or RUNNING, so no work is orphaned.
* **Saved before it takes effect.** Every transition is built on a copy of the record, saved,
  and only then swapped in (and only then is a worker started): a failed save leaves the job
  exactly as it was and the caller gets the storage error, so the next Start retries cleanly.
  The one exception is a job ending while its store is unreachable: it still ends in memory
  (watchers must not wait forever) and says that its record could not be saved.
* **No job waits on a worker that does not exist.** A watchdog fails a PENDING/RUNNING job whose
  worker is gone or was never queued (after ``watchdog_seconds``), naming the cause; Start
  restarts it.  A job whose store lost its contents while it ran (emptied bucket, deleted
  prefix) fails with FAILED_PRECONDITION naming what vanished.
* **Cancellation and shutdown.** Cancel sets the job's cancel event (the job function polls
  :meth:`JobContext.check_cancelled`); shutdown interrupts running jobs without marking them
  terminal, so the next process resumes them.
* **Watch without polling.** Watchers wait on a condition variable that every update
  notifies; a heartbeat interval bounds the wait so a gone client is noticed.
* **Admission.** At most ``max_admitted`` jobs hold a slot at once (a training Job each: GPUs);
  the others wait PENDING with their ``queue_position``.  A free slot goes to the run admitted
  least recently (round robin between runs, a run never admitted first), and within a run to its
  oldest waiting job (FIFO), so one five-skill run cannot starve another.  The order lives in the
  records (``queued_at``, ``admitted_at``): a restarted service re-attaches the jobs that held slots
  (they still count) and keeps the others waiting in the same order.  Ending or cancelling a job
  frees its slot and admits the next.

Job functions receive a :class:`JobContext` and return a :class:`JobResult`.  Domain errors
fail the job with their code; anything unexpected fails it as INTERNAL (logged here).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, Field

from selma.errors import (
    AlreadyExists,
    Cancelled,
    ErrorCode,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SelmaError,
)
from selma.limits import setting_name
from selma.metrics import JOB_DURATION, JOBS_ACTIVE, JOBS_FINISHED
from selma.paging import next_page_token, page_window
from selma.storage import Storage

log = logging.getLogger(__name__)


class JobPhase(str, Enum):
    """Mirrors ``selma.v1.JobPhase``."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CANCELLING = "CANCELLING"

    @property
    def terminal(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED, JobPhase.CANCELLED)


class OutputRef(BaseModel):
    """The artifact a job produced (mirrors ``selma.v1.ArtifactRef``)."""

    id: str
    kind: str = ""
    uri: str = ""
    sha256: str = ""


class JobProgress(BaseModel):
    """Work done so far; ``rate_per_second`` and ``eta_seconds`` are derived by the manager."""

    done: int = 0
    total: int = 0
    unit: str = ""
    rate_per_second: float = 0.0
    eta_seconds: float | None = None


class JobErrorInfo(BaseModel):
    """Why a job failed: a status code name, a machine reason and a message for people."""

    code: str
    reason: str = ""
    message: str


class JobRecord(BaseModel):
    """A job's durable state; serialised to storage after every meaningful change."""

    job_id: str
    kind: str
    idempotency_key: str
    spec: dict[str, Any]
    spec_digest: str
    phase: JobPhase = JobPhase.PENDING
    progress: JobProgress = Field(default_factory=JobProgress)
    message: str = ""
    output: OutputRef | None = None
    created_at: datetime
    started_at: datetime | None = None
    updated_at: datetime
    finished_at: datetime | None = None
    error: JobErrorInfo | None = None
    details: dict[str, str] = Field(default_factory=dict)
    attempt: int = 1
    # Client re-starts of this job after it failed or was cancelled (worker relaunches do not count):
    # what names a re-start's new Kubernetes Jobs (selma.batch.launchers.launch_attempt).
    restarts: int = 0
    # The worker launch of the current job attempt as its launcher counts them (1 = first); 0 = none yet.
    launch: int = 0
    warnings: list[str] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    run: str = ""
    skill: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    # Admission (see JobManager): when this attempt joined the queue (its place: FIFO within its run),
    # when it got one of the manager's slots (kept across a service restart: it is re-attached first
    # and still holds its slot), and its 1-based place among the jobs waiting for a slot (0 = not waiting).
    queued_at: datetime | None = None
    admitted_at: datetime | None = None
    queue_position: int = 0


@dataclass
class JobResult:
    """What a job function returns: the output artifact and final service-specific stats."""

    output: OutputRef | None = None
    stats: dict[str, Any] | None = None
    message: str = "done"


class Interrupted(Exception):
    """Raised inside a job when the service shuts down; the job resumes in the next process."""


def spec_digest(spec: Mapping[str, Any]) -> str:
    """A stable digest of a spec (canonical JSON), used to detect key reuse with other parameters."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def job_id_for(kind: str, idempotency_key: str) -> str:
    """Deterministic, DNS-label-safe job id from the kind and the idempotency key."""
    short = "".join(c for c in kind.lower().replace("_", "-") if c.isalnum() or c == "-")[:30]
    return f"{short}-{hashlib.sha256(f'{kind}:{idempotency_key}'.encode()).hexdigest()[:16]}"


def _now() -> datetime:
    return datetime.now(timezone.utc)


# The kind of the TrainingService's expert jobs: a run's ``<run>/<skill>`` expert is their output.
EXPERT_TRAINING_KIND = "expert_training"


def run_stage_key(run: str, skill: str | None, stage: str) -> str:
    """The idempotency key ``selma run`` gives a run's stage: ``<run>/<skill>/<stage>`` (``<run>/<stage>`` without a skill)."""
    return f"{run}/{skill}/{stage}" if skill else f"{run}/{stage}"


def recorded_expert(storage: Storage, run: str, skill: str) -> str | None:
    """The expert id run ``run`` recorded for ``skill``: the output of its succeeded training job, else None.

    This is what ``<run>/<skill>`` means; the newest expert carrying the run's labels is a different
    question (a later artifact may carry the same labels), asked explicitly through ListExperts.
    """
    job_id = job_id_for(EXPERT_TRAINING_KIND, run_stage_key(run, skill, "training"))
    try:
        rec = JobRecord.model_validate_json(storage.get_bytes(f"jobs/{EXPERT_TRAINING_KIND}/{job_id}.json"))
    except (NotFound, InvalidArgument):
        return None
    if rec.phase != JobPhase.SUCCEEDED or rec.output is None or not rec.output.id:
        return None
    return rec.output.id


class JobContext:
    """Handed to a job function: its spec, progress reporting and cancellation."""

    def __init__(self, manager: JobManager, record: JobRecord, cancel: threading.Event) -> None:
        self._manager = manager
        self._cancel = cancel
        self.job_id = record.job_id
        self.spec = record.spec
        self.attempt = record.attempt
        self.restarts = record.restarts
        self.idempotency_key = record.idempotency_key
        self.run = record.run
        self.skill = record.skill
        self._t0 = time.monotonic()
        self._done0: int | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or self._manager._stopping.is_set()

    def check_cancelled(self) -> None:
        """Raise if the job was cancelled (Cancelled) or the service is stopping (Interrupted)."""
        if self._manager._stopping.is_set():
            raise Interrupted("service shutting down")
        if self._cancel.is_set():
            raise Cancelled("the job was cancelled")

    def progress(
        self,
        done: int,
        total: int | None = None,
        *,
        unit: str | None = None,
        message: str | None = None,
        stats: Mapping[str, Any] | None = None,
        details: Mapping[str, str] | None = None,
    ) -> None:
        """Report progress; rate and ETA are computed from work done in this attempt."""
        if self._done0 is None:
            self._done0 = done
            self._t0 = time.monotonic()

        def apply(rec: JobRecord) -> None:
            p = rec.progress
            p.done = done
            if total is not None:
                p.total = total
            if unit is not None:
                p.unit = unit
            elapsed = time.monotonic() - self._t0
            progressed = done - (self._done0 or 0)
            if elapsed > 0 and progressed > 0:
                p.rate_per_second = progressed / elapsed
                p.eta_seconds = max(p.total - done, 0) / p.rate_per_second if p.total else None
            if message is not None:
                rec.message = message
            if stats:
                rec.stats.update(stats)
            if details:
                rec.details.update(details)

        self._manager._update(self.job_id, apply)

    def update(
        self,
        *,
        message: str | None = None,
        stats: Mapping[str, Any] | None = None,
        details: Mapping[str, str] | None = None,
    ) -> None:
        """Change message, stats or details without touching progress."""

        def apply(rec: JobRecord) -> None:
            if message is not None:
                rec.message = message
            if stats:
                rec.stats.update(stats)
            if details:
                rec.details.update(details)

        self._manager._update(self.job_id, apply)

    def launched(self, n: int, cause: str = "") -> None:
        """The launcher is on launch ``n`` (1-based) of this job attempt's worker.

        Every launch after the first is a new execution, so it counts in ``attempt`` (once, however
        often it is reported) and leaves a warning that says why.
        """

        def apply(rec: JobRecord) -> None:
            if n <= rec.launch:
                return
            if rec.launch:
                rec.attempt += n - rec.launch
                warning = f"worker relaunched (attempt {rec.attempt})" + (f": {cause}" if cause else "")
                rec.warnings.append(warning)
                log.warning("%s: %s", self.job_id, warning)
            rec.launch = n

        self._manager._update(self.job_id, apply)

    def warn(self, warning: str) -> None:
        """Record a warning visible in the job's status (e.g. fell back to an older checkpoint)."""
        log.warning("%s: %s", self.job_id, warning)
        self._manager._update(self.job_id, lambda rec: rec.warnings.append(warning))

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._manager.get(self.job_id).stats)


JobFunction = Callable[[JobContext], JobResult]


@dataclass
class _Live:
    cancel: threading.Event = field(default_factory=threading.Event)
    running: bool = False
    # The queued/running worker of this job in this process (None: none could be queued).
    future: Future[None] | None = None
    # When the watchdog first saw this job without a worker (monotonic), None while it has one.
    orphaned_since: float | None = None


# Written next to the job records when a manager starts; its absence later means the store
# lost its contents (emptied bucket, deleted prefix) under the running jobs.
STORE_MARKER = "store.marker"


class JobManager:
    """Runs one kind of job for a service; records persist in ``storage`` under ``jobs/<kind>/``."""

    def __init__(
        self,
        storage: Storage,
        kind: str,
        run_fn: JobFunction,
        *,
        max_concurrent: int = 1,
        max_admitted: int = 0,
        max_waiting: int = 0,
        waiting_setting: str = "",
        persist_interval: float = 1.0,
        watchdog_seconds: float = 60.0,
    ) -> None:
        """``max_concurrent``: jobs followed at once (worker threads); ``max_admitted``: jobs holding a slot at once
        (0 = ``max_concurrent``; more than it is capped to it); ``max_waiting``: jobs that may wait for a slot, a new
        Start beyond them is RESOURCE_EXHAUSTED naming ``waiting_setting`` (0 = no bound); ``watchdog_seconds``: how
        long a PENDING/RUNNING job may be without a worker before it is failed (0: never)."""
        self.storage = storage
        self.kind = kind
        self._run_fn = run_fn
        self._prefix = f"jobs/{kind}/"
        self._records: dict[str, JobRecord] = {}
        self._live: dict[str, _Live] = {}
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix=f"job-{kind}")
        self._max_concurrent = min(max_admitted, max_concurrent) if max_admitted > 0 else max_concurrent
        self._max_waiting = max_waiting
        self._waiting_setting = waiting_setting
        self._queued: list[str] = []  # waiting for a slot, FIFO by (queued_at, job id); admission order: _admission_order_locked
        # holding a slot: handed to the pool, not yet ended; the value tells this execution from a later one
        self._admitted: dict[str, int] = {}
        self._turns: dict[str, int] = {}  # run -> the admission tick of its latest admitted job (round robin)
        self._turn = 0
        self._stopping = threading.Event()
        self._persist_interval = persist_interval
        self._last_persist: dict[str, float] = {}
        self._watchdog_seconds = watchdog_seconds
        self._watchdog: threading.Thread | None = None
        self._marker_written = False

    # -- lifecycle ---------------------------------------------------------------------------

    def recover(self, *, admit: bool = True) -> list[str]:
        """Load every stored record; re-queue jobs that were PENDING/RUNNING/CANCELLING. Returns their ids.

        Jobs that held a slot (admitted, or RUNNING in a record written before admission existed) are
        re-attached first, in the order they were admitted, and hold their slots again, even beyond
        the limit; the others wait in their stored order (``queued_at``).  ``admit=False`` leaves free
        slots empty until :meth:`admit` (a service first re-attaches work it finds running elsewhere).
        """
        self._write_marker()
        try:
            stored = self.storage.list(self._prefix)
        except NotFound:
            stored = []  # a fresh bucket: nothing was ever stored
        unfinished: list[JobRecord] = []
        for info in stored:
            if not info.key.endswith(".json"):
                continue
            try:
                rec = JobRecord.model_validate_json(self.storage.get_bytes(info.key))
            except (ValueError, SelmaError) as e:
                log.error("ignoring unreadable job record %s: %s", info.uri, e)
                continue
            with self._cond:
                self._records[rec.job_id] = rec
            if rec.phase == JobPhase.CANCELLING:
                self._finish(rec.job_id, JobPhase.CANCELLED, "cancelled (the service restarted while cancelling)")
            elif not rec.phase.terminal:
                unfinished.append(rec)
        held = sorted((r for r in unfinished if r.admitted_at is not None or r.phase == JobPhase.RUNNING),
                      key=lambda r: (r.admitted_at or r.started_at or r.created_at, r.job_id))
        held_ids = {r.job_id for r in held}
        waiting = sorted((r for r in unfinished if r.job_id not in held_ids), key=self._queue_key)
        # every job is in place before the first free slot is given: round robin sees all the runs
        for rec in held:
            self._submit(rec.job_id, message="resuming after a service restart", reattach=True, admit=False)
        for rec in waiting:
            self._submit(rec.job_id, message="resuming after a service restart", admit=False)
        if admit:
            self._admit()
        requeued = [r.job_id for r in held + waiting]
        if requeued:
            log.info("%s: resuming %d unfinished job(s): %s", self.kind, len(requeued), ", ".join(requeued))
        return requeued

    def shutdown(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Interrupt running jobs (they stay resumable) and stop the worker pool."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout)
        if wait:
            deadline = time.monotonic() + timeout
            with self._cond:
                while any(live.running for live in self._live.values()) and time.monotonic() < deadline:
                    self._cond.wait(0.1)

    # -- the five operations ------------------------------------------------------------------

    def start(
        self,
        idempotency_key: str,
        spec: Mapping[str, Any],
        *,
        run: str = "",
        skill: str = "",
        labels: Mapping[str, str] | None = None,
        reattach: bool = False,
    ) -> tuple[JobRecord, bool]:
        """Start (or return) the job for ``idempotency_key``. Returns (record, created).

        ``reattach``: a new record for work already running (a Kubernetes Job found by its labels after
        its record was lost): it takes a slot at once, even beyond the limit, since it holds one anyway.
        """
        if self._stopping.is_set():
            raise Cancelled("the service is shutting down; retry against another replica")
        key = idempotency_key or uuid.uuid4().hex
        if len(key) > 256:
            raise InvalidArgument("idempotency_key must be at most 256 characters", field="idempotency_key")
        spec = dict(spec)
        digest = spec_digest(spec)
        job_id = job_id_for(self.kind, key)
        with self._cond:
            existing = self._known(job_id)
            if existing is not None:
                if existing.spec_digest != digest:
                    raise AlreadyExists(
                        f"idempotency key {key!r} was already used for job {job_id} with different parameters; "
                        "use a new idempotency_key to start a different job",
                        field="idempotency_key",
                    )
                if existing.phase in (JobPhase.FAILED, JobPhase.CANCELLED):
                    self._check_waiting_room_locked(key)
                    restarted = existing.model_copy(deep=True)
                    restarted.attempt += 1
                    restarted.restarts += 1
                    restarted.launch = 0
                    restarted.phase = JobPhase.PENDING
                    restarted.error = None
                    restarted.finished_at = None
                    restarted.message = f"restarted (attempt {restarted.attempt}); resuming from stored work"
                    restarted.updated_at = restarted.queued_at = _now()
                    restarted.admitted_at = None
                    self._persist(restarted, force=True)  # raises, leaving the job as it was, if the save fails
                    self._records[job_id] = restarted
                    self._admitted.pop(job_id, None)  # its last worker ended it and is only tidying up: the slot is free
                    self._cond.notify_all()
                    self._submit(job_id)
                    return restarted.model_copy(deep=True), True
                return existing.model_copy(deep=True), False
            if not reattach:
                self._check_waiting_room_locked(key)
            now = _now()
            rec = JobRecord(
                job_id=job_id,
                kind=self.kind,
                idempotency_key=key,
                spec=spec,
                spec_digest=digest,
                created_at=now,
                updated_at=now,
                run=run,
                skill=skill,
                labels=dict(labels or {}),
                message="re-attached to its running worker" if reattach else "queued",
                queued_at=now,
                admitted_at=now if reattach else None,
            )
            self._persist(rec, force=True)  # a job exists only once its record is saved
            self._records[job_id] = rec
        self._write_marker()
        self._submit(job_id, reattach=reattach, admit=not reattach)  # taking a slot frees none: nothing more to admit
        log.info("%s: started job %s (key %s)", self.kind, job_id, key)
        return rec.model_copy(deep=True), True

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            rec = self._known(job_id)
            if rec is None:
                raise NotFound(f"no {self.kind} job {job_id!r}; `selma status <run>` (or `selma eval list`) shows the job ids", field="job_id")
            return rec.model_copy(deep=True)

    def watch(
        self,
        job_id: str,
        *,
        min_interval: float = 0.0,
        heartbeat: float = 5.0,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Iterator[JobRecord]:
        """Yield the job now and after every change (at most every ``min_interval`` s) until terminal.

        Stops early when ``is_active()`` turns false (the client went away).  A heartbeat
        re-sends the current state every ``heartbeat`` seconds so proxies keep the stream open.
        """
        last_sent: datetime | None = None
        last_time = float("-inf")
        while True:
            with self._cond:
                while True:
                    rec = self._records.get(job_id) or self._load(job_id)
                    if rec is None:
                        raise NotFound(f"no {self.kind} job {job_id!r}", field="job_id")
                    now = time.monotonic()
                    changed = rec.updated_at != last_sent
                    if changed and (rec.phase.terminal or now - last_time >= min_interval):
                        break
                    if now - last_time >= heartbeat:
                        break
                    if self._stopping.is_set() or not is_active():
                        return
                    until = last_time + (min_interval if changed else heartbeat)
                    self._cond.wait(timeout=min(max(until - now, 0.01), 1.0))
                snapshot = rec.model_copy(deep=True)
            if not is_active():
                return
            last_sent, last_time = snapshot.updated_at, time.monotonic()
            yield snapshot
            if snapshot.phase.terminal or self._stopping.is_set():
                return

    def cancel(self, job_id: str, reason: str = "") -> JobRecord:
        with self._cond:
            rec = self._records.get(job_id) or self._load(job_id)
            if rec is None:
                raise NotFound(f"no {self.kind} job {job_id!r}", field="job_id")
            if rec.phase.terminal:
                return rec.model_copy(deep=True)
            live = self._live.setdefault(job_id, _Live())
            live.cancel.set()
            why = f"cancel requested: {reason}" if reason else "cancel requested"
            if live.running:
                cancelling = rec.model_copy(deep=True)
                cancelling.phase = JobPhase.CANCELLING
                cancelling.message = why
                cancelling.updated_at = _now()
                self._persist(cancelling, force=True)
                self._records[job_id] = cancelling
                self._cond.notify_all()
                return cancelling.model_copy(deep=True)
        self._finish(job_id, JobPhase.CANCELLED, why.replace("cancel requested", "cancelled"))
        self._admit()  # the places behind it move up
        return self.get(job_id)

    def list(
        self,
        *,
        run: str = "",
        skill: str = "",
        phases: set[JobPhase] | None = None,
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[JobRecord], str]:
        """Jobs matching every given filter, newest first, paginated by the List rule of :mod:`selma.paging`."""
        offset, page_size = page_window(page_size, page_token)
        self._forget_deleted()
        with self._cond:
            recs = [
                r
                for r in self._records.values()
                if (not run or r.run == run)
                and (not skill or r.skill == skill)
                and (not phases or r.phase in phases)
                and (not idempotency_key or r.idempotency_key == idempotency_key)
                and all(r.labels.get(k) == v for k, v in (labels or {}).items())
            ]
            recs.sort(key=lambda r: (r.created_at, r.job_id), reverse=True)
            page = [r.model_copy(deep=True) for r in recs[offset : offset + page_size]]
        return page, next_page_token(offset, page_size, len(recs))

    # -- internals ----------------------------------------------------------------------------

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}{job_id}.json"

    def _known(self, job_id: str) -> JobRecord | None:
        """The record of ``job_id`` (call under the lock): from memory unless it is finished and its stored
        record was deleted since (its run was deleted: selma.retention), else from storage."""
        rec = self._records.get(job_id)
        # a record missing because the whole store vanished is not a deleted run: keep what memory knows
        if rec is not None and rec.phase.terminal and not self._stored(job_id) and not self._store_lost():
            self._records.pop(job_id, None)
            self._live.pop(job_id, None)
            rec = None
        return rec or self._load(job_id)

    def _stored(self, job_id: str) -> bool:
        try:
            return self.storage.exists(self._key(job_id))
        except SelmaError:  # storage unreachable: trust memory rather than lose the job
            return True

    def _forget_deleted(self) -> None:
        """Drop finished jobs whose stored records were deleted (a deleted run), so List does not show them."""
        try:
            stored = {info.key for info in self.storage.list(self._prefix)}
        except NotFound:
            stored = set()
        except SelmaError:
            return
        if self._store_lost():
            return  # nothing was deleted on purpose: the store itself is gone (jobs name it in their failure)
        with self._cond:
            for job_id, rec in list(self._records.items()):
                if rec.phase.terminal and self._key(job_id) not in stored:
                    self._records.pop(job_id, None)
                    self._live.pop(job_id, None)

    def _load(self, job_id: str) -> JobRecord | None:
        """Load a record written by another process (a previous instance) if it exists."""
        try:
            data = self.storage.get_bytes(self._key(job_id))
        except NotFound:
            return None
        except InvalidArgument:
            return None  # not a valid key at all, so no such job
        rec = JobRecord.model_validate_json(data)
        self._records[job_id] = rec
        return rec

    def _persist(self, rec: JobRecord, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_persist.get(rec.job_id, 0.0) < self._persist_interval:
            return
        self._last_persist[rec.job_id] = now
        self.storage.put_bytes(self._key(rec.job_id), rec.model_dump_json().encode(), content_type="application/json")

    def _update(self, job_id: str, apply: Callable[[JobRecord], None], *, force: bool = False) -> None:
        """Apply a change to a copy of the record, save it, then swap it in (a failed save changes nothing)."""
        with self._cond:
            new = self._records[job_id].model_copy(deep=True)
            apply(new)
            new.updated_at = _now()
            self._persist(new, force=force)
            self._records[job_id] = new
            self._cond.notify_all()

    def _write_marker(self) -> None:
        """Mark the store as holding this kind's records (once per process); see :func:`_store_lost`."""
        if self._marker_written:
            return
        try:
            self.storage.put_bytes(f"{self._prefix}{STORE_MARKER}", b"selma job records live here\n", content_type="text/plain")
        except SelmaError as e:
            log.warning("%s: could not write the store marker: %s", self.kind, e)
            return
        self._marker_written = True

    def _store_lost(self) -> str:
        """What vanished if the store lost its contents since this manager started, else ''."""
        if not self._marker_written:
            return ""
        key = f"{self._prefix}{STORE_MARKER}"
        try:
            if self.storage.exists(key):
                return ""
        except NotFound:
            pass  # the bucket itself is gone
        except SelmaError:
            return ""  # unreachable is not lost: the original error stands
        return f"the store {self.storage.uri} lost its contents under the running service ({self.storage.uri_for(key)}, written when it started, vanished)"

    def _submit(self, job_id: str, message: str | None = None, *, reattach: bool = False, admit: bool = True) -> None:
        """Queue the job for a slot (``reattach``: it holds one already, from before a restart) and (``admit``) admit what fits."""
        with self._cond:
            live = self._live.setdefault(job_id, _Live())
            live.cancel.clear()
            live.orphaned_since = None
            rec = self._records[job_id]
            if message:
                rec.message = message
            if reattach:
                self._admitted[job_id] = token = self._turn
                self._turns[rec.run] = self._turn
                self._turn += 1
            elif job_id not in self._queued and job_id not in self._admitted:
                self._queued.append(job_id)
                self._queued.sort(key=lambda jid: self._queue_key(self._records[jid]))
        if reattach:
            self._dispatch(job_id, token)
        if admit:
            self._admit()
        self._ensure_watchdog()

    # -- admission -----------------------------------------------------------------------------

    @staticmethod
    def _queue_key(rec: JobRecord) -> tuple[datetime, str]:
        return (rec.queued_at or rec.created_at, rec.job_id)

    def _check_waiting_room_locked(self, key: str) -> None:
        if self._max_waiting and len(self._queued) >= self._max_waiting:
            what = setting_name(self._waiting_setting) if self._waiting_setting else "the service's limit"
            raise ResourceExhausted(
                f"{len(self._queued)} {self.kind} jobs are already waiting for a slot ({what}={self._max_waiting}); "
                f"start {key!r} again once some have finished"
            )

    def _admission_order_locked(self) -> list[str]:
        """The waiting jobs in the order they get slots if nothing else changes (call under the lock).

        Round robin between runs: the next slot goes to the run whose latest job was admitted longest ago
        (a run never admitted first, then the one waiting longest); within a run, FIFO.
        """
        by_run: dict[str, list[str]] = {}
        for jid in self._queued:  # FIFO order, so each run's list is too, and runs come in order of their oldest job
            rec = self._records.get(jid)
            if rec is not None and not rec.phase.terminal:
                by_run.setdefault(rec.run, []).append(jid)
        heap = [(self._turns.get(run, -1), i, run) for i, run in enumerate(by_run)]
        heapq.heapify(heap)
        order: list[str] = []
        turn, taken = self._turn, dict.fromkeys(by_run, 0)
        while heap:
            _, i, run = heapq.heappop(heap)
            order.append(by_run[run][taken[run]])
            taken[run] += 1
            if taken[run] < len(by_run[run]):
                heapq.heappush(heap, (turn, i, run))
            turn += 1
        return order

    def admit(self) -> None:
        """Give every free slot to the next waiting job in admission order and start its worker."""
        self._admit()

    def _admit(self) -> None:
        """Give every free slot to the next waiting job in admission order and start its worker."""
        with self._cond:
            if self._stopping.is_set():
                return
            free = self._max_concurrent - len(self._admitted)
            chosen = self._admission_order_locked()[: max(free, 0)]
            tokens = []
            for jid in chosen:
                self._queued.remove(jid)
                self._admitted[jid] = self._turn
                tokens.append(self._turn)
                self._turns[self._records[jid].run] = self._turn
                self._turn += 1
            self._note_queue_locked()
        for jid, token in zip(chosen, tokens, strict=True):
            self._dispatch(jid, token)

    def _dispatch(self, job_id: str, token: int) -> None:
        """Hand an admitted job to the worker pool (it runs at once: the pool has a thread per slot)."""
        try:
            future = self._pool.submit(self._execute, job_id, token)
        except RuntimeError:
            future = None
            log.info("%s: not queuing %s: the worker pool is shut down", self.kind, job_id)
        with self._cond:
            live = self._live.setdefault(job_id, _Live())
            live.future = future
            live.orphaned_since = None
            if future is None and self._admitted.get(job_id) == token:
                del self._admitted[job_id]  # nothing will run it: the watchdog fails it, its slot is free

    # -- the watchdog --------------------------------------------------------------------------

    def _ensure_watchdog(self) -> None:
        if self._watchdog_seconds <= 0 or self._stopping.is_set():
            return
        with self._cond:
            if self._watchdog is not None:
                return
            self._watchdog = threading.Thread(target=self._watch_workers, name=f"job-{self.kind}-watchdog", daemon=True)
        self._watchdog.start()

    def _watch_workers(self) -> None:
        """Fail jobs that wait on a worker that is gone or was never queued (see ``watchdog_seconds``)."""
        period = max(min(self._watchdog_seconds / 4, 5.0), 0.05)
        while not self._stopping.wait(period):
            try:
                self.check_workers()
            except Exception as e:  # noqa: BLE001 - the watchdog must outlive one bad round
                log.error("%s: job watchdog round failed", self.kind, exc_info=e)

    def check_workers(self) -> list[str]:
        """One watchdog round: fail every job orphaned for ``watchdog_seconds``; returns their ids."""
        now = time.monotonic()
        stranded: list[tuple[str, str]] = []
        with self._cond:
            for job_id, live in self._live.items():
                rec = self._records.get(job_id)
                if rec is None or rec.phase.terminal or live.running or job_id in self._queued:
                    live.orphaned_since = None  # ended, running, or waiting for a slot (not for a worker)
                    continue
                if live.future is not None and not live.future.done():
                    live.orphaned_since = None  # queued or running: it has a worker
                    continue
                if live.orphaned_since is None:
                    live.orphaned_since = now
                if now - live.orphaned_since >= self._watchdog_seconds:
                    if live.future is None:
                        cause = "its worker could not be queued (the worker pool is shut down)"
                    elif live.future.cancelled():
                        cause = "its queued worker was cancelled"
                    elif live.future.exception() is not None:
                        cause = f"its worker ended with {type(live.future.exception()).__name__}: {live.future.exception()}"
                    else:
                        cause = "its worker ended without finishing it"
                    stranded.append((job_id, f"{rec.phase.value.lower()} for over {self._watchdog_seconds:g} s without a worker: {cause}"))
        if self._stopping.is_set():
            return []
        for job_id, cause in stranded:
            msg = f"{cause}; start the job again to restart it"
            log.error("%s: job %s failed by the watchdog: %s", self.kind, job_id, msg)
            self._finish(job_id, JobPhase.FAILED, msg, error=JobErrorInfo(code=ErrorCode.ABORTED.value, reason="WorkerLost", message=msg))
        return [job_id for job_id, _ in stranded]

    def _note_queue_locked(self) -> None:
        """Tell every job waiting for a slot its place (``queue_position``, and the message while it is a
        queue note): "queued: 2 ahead, 2 running (at most 2 at once)".

        In memory only: a place is derived from the stored ``queued_at``/``admitted_at`` (a restarted service
        computes the same), and one admission can move every waiting job, so saving each would cost a write
        per waiting job, under the lock, per admission. A record saved for another reason carries its place.
        """
        running = len(self._admitted)
        changed = False
        for ahead, jid in enumerate(self._admission_order_locked()):
            rec = self._records[jid]
            update: dict[str, Any] = {"queue_position": ahead + 1}
            if rec.message.startswith("queued"):  # a restart or interruption note is more useful than the place
                update["message"] = f"queued: {ahead} ahead, {running} running (at most {self._max_concurrent} at once)"
            if all(getattr(rec, k) == v for k, v in update.items()):
                continue
            self._records[jid] = rec.model_copy(update={**update, "updated_at": _now()})
            changed = True
        if changed:
            self._cond.notify_all()

    def _execute(self, job_id: str, token: int) -> None:
        """Run an admitted job; whatever happens, its slot is freed and the next waiting job admitted."""
        try:
            self._execute_admitted(job_id)
        finally:
            with self._cond:
                if self._admitted.get(job_id) == token:  # not if a restart of the ended job took it over
                    del self._admitted[job_id]
            self._admit()

    def _execute_admitted(self, job_id: str) -> None:
        save_error: SelmaError | None = None
        with self._cond:
            rec = self._records[job_id]
            live = self._live.setdefault(job_id, _Live())
            if rec.phase.terminal or self._stopping.is_set():
                return
            if live.cancel.is_set():
                pass  # cancelled while queued: fall through to _finish below
            else:
                running = rec.model_copy(deep=True)
                running.phase = JobPhase.RUNNING
                running.started_at = running.started_at or _now()
                running.admitted_at = running.admitted_at or _now()  # kept until it ends: a restart re-attaches it
                running.queue_position = 0
                running.updated_at = _now()
                running.message = "running" if not running.message.startswith("resuming") else running.message
                try:
                    self._persist(running, force=True)
                except SelmaError as e:
                    save_error = e
                else:
                    live.running = True
                    self._records[job_id] = rec = running
                    self._cond.notify_all()
                    ctx = JobContext(self, rec, live.cancel)
        if save_error is not None and not live.cancel.is_set():
            # The RUNNING record could not be saved: the job must not start, nor stay PENDING for ever.
            msg = f"could not start: saving the job record failed: {save_error}"
            log.warning("%s: job %s %s", self.kind, job_id, msg)
            self._finish(job_id, JobPhase.FAILED, msg, error=JobErrorInfo(code=save_error.code.value, reason=type(save_error).__name__, message=msg))
            return
        if live.cancel.is_set() and not live.running:
            self._finish(job_id, JobPhase.CANCELLED, "cancelled before it started")
            return
        JOBS_ACTIVE.labels(self.kind).inc()
        t0 = time.monotonic()
        try:
            result = self._run_fn(ctx)
        except Interrupted:
            self._interrupt(job_id)
        except Cancelled as e:
            self._finish(job_id, JobPhase.CANCELLED, str(e) if str(e) != "the job was cancelled" else "cancelled")
        except SelmaError as e:
            if live.cancel.is_set():
                self._finish(job_id, JobPhase.CANCELLED, "cancelled")
            else:
                if isinstance(e, NotFound) and (lost := self._store_lost()):
                    e = FailedPrecondition(f"{lost}: {e}; restore the store (or point the service at the right one) and start the job again")
                log.warning("%s: job %s failed: %s", self.kind, job_id, e)
                self._finish(job_id, JobPhase.FAILED, str(e), error=JobErrorInfo(code=e.code.value, reason=type(e).__name__, message=str(e)))
        except Exception as e:  # noqa: BLE001 - a job must never die silently
            ref = uuid.uuid4().hex[:12]
            log.error("%s: job %s crashed (ref %s)", self.kind, job_id, ref, exc_info=e)
            msg = f"internal error (ref {ref}): {type(e).__name__}; the service log has the details"
            self._finish(job_id, JobPhase.FAILED, msg, error=JobErrorInfo(code=ErrorCode.INTERNAL.value, reason="Internal", message=msg))
        else:
            if live.cancel.is_set() and result.output is None:
                self._finish(job_id, JobPhase.CANCELLED, "cancelled")
            else:
                self._finish(job_id, JobPhase.SUCCEEDED, result.message, output=result.output, stats=result.stats)
        finally:
            JOBS_ACTIVE.labels(self.kind).dec()
            JOB_DURATION.labels(self.kind).observe(time.monotonic() - t0)
            with self._cond:
                live.running = False
                self._cond.notify_all()

    def _interrupt(self, job_id: str) -> None:
        def apply(rec: JobRecord) -> None:
            rec.phase = JobPhase.PENDING
            rec.message = "interrupted by a service shutdown; resumes when the service restarts"

        try:
            self._update(job_id, apply, force=True)
        except SelmaError as e:  # the stored record still says it was unfinished: it resumes all the same
            log.warning("%s: job %s interrupted; its record could not be saved: %s", self.kind, job_id, e)

    def _finish(
        self,
        job_id: str,
        phase: JobPhase,
        message: str,
        *,
        error: JobErrorInfo | None = None,
        output: OutputRef | None = None,
        stats: Mapping[str, Any] | None = None,
    ) -> None:
        with self._cond:
            if job_id in self._queued:
                self._queued.remove(job_id)  # cancelled or failed while waiting: its place goes

        def apply(rec: JobRecord) -> None:
            rec.phase = phase
            rec.message = message
            rec.error = error
            rec.queue_position = 0
            rec.finished_at = _now()
            if output is not None:
                rec.output = output
            if stats:
                rec.stats.update(stats)
            if phase == JobPhase.SUCCEEDED:
                # ``done`` stays what the job reported: a job that published 2 of 4 says 2/4.
                rec.progress.eta_seconds = 0.0

        try:
            self._update(job_id, apply, force=True)
        except SelmaError as e:
            # The store is failing too: end the job in memory all the same, so nobody waits on it for
            # ever; the stored record keeps its last saved phase, so a restarted service resumes it.
            log.error("%s: job %s ended %s but its record could not be saved: %s", self.kind, job_id, phase.value, e)

            with self._cond:
                rec = self._records[job_id].model_copy(deep=True)
                apply(rec)
                rec.message = f"{message} (the job record could not be saved: {e})"
                rec.updated_at = _now()
                self._records[job_id] = rec
                self._cond.notify_all()
        JOBS_FINISHED.labels(self.kind, phase.value).inc()
