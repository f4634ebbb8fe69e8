"""The generic job servicer (selma.job_rpcs) over a fake core, and the one List page-size rule (selma.paging)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from google.protobuf.duration_pb2 import Duration

from selma import client
from selma.api import job_status
from selma.errors import InvalidArgument, NotFound
from selma.job_rpcs import CANCEL_REASON, JOB_KINDS, VALIDATED_MESSAGE, JobRpcs
from selma.jobs import JobPhase, JobRecord
from selma.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page_window, paginate
from selma.v1 import (
    common_pb2,
    evaluation_service_pb2_grpc,
    prompt_service_pb2_grpc,
    render_service_pb2_grpc,
    serving_service_pb2_grpc,
    training_service_pb2,
    training_service_pb2_grpc,
)

pb = training_service_pb2
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def record(i: int, **kw) -> JobRecord:
    t = T0 + timedelta(seconds=i)
    fields = {"job_id": f"job-{i:03d}", "kind": "x", "idempotency_key": f"k{i}", "spec": {"run": "r"}, "spec_digest": "d", "created_at": t, "updated_at": t}
    return JobRecord(**{**fields, **kw})


class FakeCore:
    """The job operations the RPCs call, over a dict; records every call."""

    def __init__(self, n: int = 0) -> None:
        self.recs = {r.job_id: r for r in (record(i) for i in range(n))}
        self.calls: list[tuple] = []

    def get(self, job_id: str) -> JobRecord:
        self.calls.append(("get", job_id))
        if job_id not in self.recs:
            raise NotFound(f"no job {job_id!r}", field="job_id")
        return self.recs[job_id]

    def watch(self, job_id: str, *, min_interval: float, is_active) -> list[JobRecord]:
        self.calls.append(("watch", job_id, min_interval))
        rec = self.get(job_id)
        return [rec, rec.model_copy(update={"phase": JobPhase.SUCCEEDED})]

    def cancel(self, job_id: str, reason: str = "") -> JobRecord:
        self.calls.append(("cancel", job_id, reason))
        return self.get(job_id).model_copy(update={"phase": JobPhase.CANCELLED, "message": reason})

    def list(self, *, page_size: int, page_token: str, **filters) -> tuple[list[JobRecord], str]:
        self.calls.append(("list", page_size, page_token, filters))
        newest_first = sorted(self.recs.values(), key=lambda r: r.created_at, reverse=True)
        return paginate(newest_first, page_size, page_token)


def to_job(rec: JobRecord) -> pb.ExpertTrainingJob:
    return pb.ExpertTrainingJob(status=job_status(rec))


class Servicer(training_service_pb2_grpc.TrainingServiceServicer):
    def __init__(self, core: FakeCore) -> None:
        self.core = core
        self.started: list = []
        JobRpcs(JOB_KINDS["training"], to_job, core, start=self._start, watch_interval=2.5).bind(self)

    def _start(self, request: pb.StartExpertTrainingRequest):
        self.started.append(request.idempotency_key)
        if request.validate_only:
            return pb.ExpertTrainingJob(spec=request.spec), True  # a careless hook: created is still False
        rec = record(500, idempotency_key=request.idempotency_key)
        self.core.recs[rec.job_id] = rec
        return rec, True


class Context:
    def is_active(self) -> bool:
        return True


@pytest.fixture
def svc() -> Servicer:
    return Servicer(FakeCore(120))


def test_start_returns_the_record_as_a_job_and_created(svc):
    resp = svc.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="run/train/a", spec=pb.ExpertTrainingSpec(run="run")), Context())
    assert isinstance(resp, pb.StartExpertTrainingResponse)
    assert resp.created and resp.job.status.job_id == "job-500" and resp.job.status.idempotency_key == "run/train/a"


def test_validate_only_start_fills_the_status_and_is_never_created(svc):
    req = pb.StartExpertTrainingRequest(idempotency_key="run/train/a", spec=pb.ExpertTrainingSpec(run="run"), validate_only=True)
    resp = svc.StartExpertTraining(req, Context())
    assert not resp.created and resp.job.spec.run == "run"
    assert resp.job.status.job_id == "" and resp.job.status.idempotency_key == "run/train/a" and resp.job.status.message == VALIDATED_MESSAGE
    assert "job-500" not in svc.core.recs


def test_get_and_not_found(svc):
    assert svc.GetExpertTraining(pb.GetExpertTrainingRequest(job_id="job-007"), Context()).job.status.job_id == "job-007"
    with pytest.raises(NotFound):
        svc.GetExpertTraining(pb.GetExpertTrainingRequest(job_id="nope"), Context())


def test_watch_streams_jobs_at_the_requested_or_default_interval(svc):
    updates = list(svc.WatchExpertTraining(pb.WatchExpertTrainingRequest(job_id="job-001"), Context()))
    assert all(isinstance(u, pb.WatchExpertTrainingResponse) for u in updates)
    assert [u.job.status.phase for u in updates] == [common_pb2.JOB_PHASE_PENDING, common_pb2.JOB_PHASE_SUCCEEDED]
    assert svc.core.calls[0] == ("watch", "job-001", 2.5)
    list(svc.WatchExpertTraining(pb.WatchExpertTrainingRequest(job_id="job-001", min_interval=Duration(nanos=250_000_000)), Context()))
    assert ("watch", "job-001", 0.25) in svc.core.calls
    with pytest.raises(InvalidArgument) as e:
        list(svc.WatchExpertTraining(pb.WatchExpertTrainingRequest(job_id="job-001", min_interval=Duration(seconds=-1)), Context()))
    assert e.value.field == "min_interval"


def test_cancel_passes_the_reason_or_the_default(svc):
    job = svc.CancelExpertTraining(pb.CancelExpertTrainingRequest(job_id="job-002"), Context()).job
    assert job.status.phase == common_pb2.JOB_PHASE_CANCELLED and job.status.message == CANCEL_REASON
    svc.CancelExpertTraining(pb.CancelExpertTrainingRequest(job_id="job-002", reason="wrong skill"), Context())
    assert svc.core.calls[-2] == ("cancel", "job-002", "wrong skill")


def test_list_pages_by_the_one_rule(svc):
    ctx = Context()
    first = svc.ListExpertTrainings(pb.ListExpertTrainingsRequest(), ctx)  # 0 = the default, 50
    assert len(first.jobs) == DEFAULT_PAGE_SIZE and first.jobs[0].status.job_id == "job-119" and first.next_page_token
    second = svc.ListExpertTrainings(pb.ListExpertTrainingsRequest(page_token=first.next_page_token), ctx)
    third = svc.ListExpertTrainings(pb.ListExpertTrainingsRequest(page_token=second.next_page_token), ctx)
    ids = [j.status.job_id for j in [*first.jobs, *second.jobs, *third.jobs]]
    assert len(ids) == len(set(ids)) == 120 and third.next_page_token == ""
    assert [c[1] for c in svc.core.calls if c[0] == "list"] == [50, 50, 50]  # the core is given the resolved size
    everything = svc.ListExpertTrainings(pb.ListExpertTrainingsRequest(page_size=MAX_PAGE_SIZE), ctx)
    assert len(everything.jobs) == 120 and not everything.next_page_token


def test_list_passes_the_filter(svc):
    f = common_pb2.JobFilter(run="r1", skill="s", phases=[common_pb2.JOB_PHASE_RUNNING], labels={"team": "a"})
    svc.ListExpertTrainings(pb.ListExpertTrainingsRequest(filter=f, page_size=3), Context())
    _, size, token, filters = svc.core.calls[-1]
    assert (size, token) == (3, "")
    assert filters == {"run": "r1", "skill": "s", "phases": {JobPhase.RUNNING}, "labels": {"team": "a"}, "idempotency_key": ""}


@pytest.mark.parametrize(
    ("size", "token", "field"),
    [(-1, "", "page_size"), (MAX_PAGE_SIZE + 1, "", "page_size"), (0, "abc", "page_token"), (0, "-5", "page_token"), (0, "1.5", "page_token")],
)
def test_list_refuses_a_bad_page_size_or_token_before_calling_the_core(svc, size, token, field):
    with pytest.raises(InvalidArgument) as e:
        svc.ListExpertTrainings(pb.ListExpertTrainingsRequest(page_size=size, page_token=token), Context())
    assert e.value.field == field and field in str(e.value)
    assert not [c for c in svc.core.calls if c[0] == "list"]


def test_bind_refuses_a_servicer_without_the_kinds_rpcs():
    class Prompts(prompt_service_pb2_grpc.PromptServiceServicer):
        pass

    with pytest.raises(TypeError, match="StartExpertTraining"):
        JobRpcs(JOB_KINDS["training"], to_job, FakeCore(), start=lambda r: (None, False)).bind(Prompts())


def test_job_kinds_name_the_generated_rpcs_and_the_client_uses_the_same_table():
    servicers = {
        "prompts": prompt_service_pb2_grpc.PromptServiceServicer,
        "render": render_service_pb2_grpc.RenderServiceServicer,
        "training": training_service_pb2_grpc.TrainingServiceServicer,
        "serving": serving_service_pb2_grpc.ServingServiceServicer,
        "evaluation": evaluation_service_pb2_grpc.EvaluationServiceServicer,
    }
    for kind in JOB_KINDS.values():
        for verb in ("start", "get", "watch", "cancel", "list"):
            name = kind.method(verb)
            assert callable(getattr(servicers[kind.service], name)), name
            assert kind.request(verb).DESCRIPTOR.name == f"{name}Request"
            assert kind.response(verb).DESCRIPTOR.name == f"{name}Response"
    assert JOB_KINDS["merge"].list == "ListMerges" and JOB_KINDS["render"].start == "StartDatasetRender"
    assert client.JOB_KINDS is JOB_KINDS


def test_page_window_and_paginate():
    assert page_window(0, "") == (0, DEFAULT_PAGE_SIZE)
    assert page_window(1, "7") == (7, 1)
    assert page_window(MAX_PAGE_SIZE, "") == (0, MAX_PAGE_SIZE)
    items = list(range(5))
    assert paginate(items, 2, "") == ([0, 1], "2")
    assert paginate(items, 2, "4") == ([4], "")
    assert paginate(items, 0, "") == (items, "")
    assert paginate(items, 2, "9") == ([], "")  # past the end: an empty last page
    for size, token in ((-1, ""), (MAX_PAGE_SIZE + 1, ""), (0, " 1"), (0, "x"), (0, "١")):
        with pytest.raises(InvalidArgument):
            page_window(size, token)
