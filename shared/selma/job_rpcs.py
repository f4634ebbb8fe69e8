"""The five job RPCs of every job kind, written once.

Each kind of long-running work has ``Start<Noun>``, ``Get<Noun>``, ``Watch<Noun>``,
``Cancel<Noun>`` and ``List<Noun>s`` (tests/unit/test_api.py holds the API to that).
:data:`selma.job_kinds.JOB_KINDS` names them for every kind (the client SDK uses the same
table), and :class:`JobRpcs` implements them for any servicer over the core's job operations
(:class:`JobOps`; a :class:`~selma.jobs.JobManager` is one).  Only Start has a service-specific
part, a small hook::

    class TrainingServicer(pb_grpc.TrainingServiceServicer):
        def __init__(self, core):
            self.core = core
            JobRpcs(JOB_KINDS["training"], to_job, core, start=self._start).bind(self)

        def _start(self, request):  # -> (record, created), or (preview job, False) for validate_only
            ...

The rules every kind shares: Watch streams at most one update per ``min_interval`` (unset = the
service's default; negative is INVALID_ARGUMENT), Cancel's reason defaults to "cancelled by
client", List pages by :mod:`selma.paging`, and a validate_only Start answers ``created=False``
with a job whose status carries the idempotency key and says nothing was started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from google.protobuf.message import Message

from selma.api import filter_kwargs
from selma.errors import InvalidArgument
from selma.job_kinds import JOB_KINDS, VERBS, JobKind
from selma.jobs import JobRecord
from selma.paging import page_window

__all__ = ["CANCEL_REASON", "DEFAULT_WATCH_INTERVAL", "JOB_KINDS", "VALIDATED_MESSAGE", "JobKind", "JobOps", "JobRpcs", "StartHook"]

DEFAULT_WATCH_INTERVAL = 1.0
CANCEL_REASON = "cancelled by client"
VALIDATED_MESSAGE = "valid; nothing started (validate_only)"


class JobOps(Protocol):
    """The core's job operations the RPCs call (:class:`~selma.jobs.JobManager`'s signatures)."""

    def get(self, job_id: str) -> JobRecord: ...

    def watch(self, job_id: str, *, min_interval: float, is_active: Callable[[], bool]) -> Iterator[JobRecord]: ...

    def cancel(self, job_id: str, reason: str = "") -> JobRecord: ...

    def list(self, *, page_size: int, page_token: str, **filters: Any) -> tuple[list[JobRecord], str]: ...


# Start's service-specific part: the request → (record, created), or for validate_only
# (a preview job message: spec and stats as the service resolved them, False).
StartHook = Callable[[Any], "tuple[JobRecord | Message, bool]"]


class JobRpcs:
    """``Start/Get/Watch/Cancel/List`` of one job kind over ``ops``; :meth:`bind` puts them on a servicer."""

    def __init__(
        self,
        kind: JobKind,
        to_job: Callable[[JobRecord], Message],
        ops: JobOps,
        *,
        start: StartHook,
        watch_interval: float = DEFAULT_WATCH_INTERVAL,
    ) -> None:
        self.kind = kind
        self.to_job = to_job
        self.ops = ops
        self._start = start
        self.watch_interval = watch_interval

    def bind(self, servicer: Any) -> Any:
        """Serve the five RPCs from ``servicer`` (its generated base class must declare them)."""
        for verb in VERBS:
            name = self.kind.method(verb)
            if not callable(getattr(type(servicer), name, None)):
                raise TypeError(f"{type(servicer).__name__} is not a servicer with a {name} RPC")
            setattr(servicer, name, getattr(self, verb))
        return servicer

    def start(self, request: Any, context: Any) -> Message:
        job, created = self._start(request)
        if isinstance(job, JobRecord):
            return self.kind.response("start", job=self.to_job(job), created=created)
        job.status.idempotency_key = request.idempotency_key
        job.status.message = job.status.message or VALIDATED_MESSAGE
        return self.kind.response("start", job=job, created=False)

    def get(self, request: Any, context: Any) -> Message:
        return self.kind.response("get", job=self.to_job(self.ops.get(request.job_id)))

    def watch(self, request: Any, context: Any) -> Iterator[Message]:
        if request.HasField("min_interval"):
            interval = request.min_interval.ToNanoseconds() / 1e9
            if interval < 0:
                raise InvalidArgument("min_interval must not be negative", field="min_interval")
        else:
            interval = self.watch_interval
        for rec in self.ops.watch(request.job_id, min_interval=interval, is_active=context.is_active):
            yield self.kind.response("watch", job=self.to_job(rec))

    def cancel(self, request: Any, context: Any) -> Message:
        rec = self.ops.cancel(request.job_id, request.reason or CANCEL_REASON)
        return self.kind.response("cancel", job=self.to_job(rec))

    def list(self, request: Any, context: Any) -> Message:
        _offset, size = page_window(request.page_size, request.page_token)
        recs, token = self.ops.list(**filter_kwargs(request.filter), page_size=size, page_token=request.page_token)
        return self.kind.response("list", jobs=[self.to_job(r) for r in recs], next_page_token=token)
