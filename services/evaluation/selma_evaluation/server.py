"""gRPC glue of the EvaluationService: protobuf ⇄ domain, calls into :class:`EvaluationCore`.

By default the training process hosts this service beside TrainingService (``selma serve
training``), sharing its batch launchers; ``selma serve evaluation`` runs it alone.
"""

from __future__ import annotations

import logging
from typing import Any

from selma.api import dict_to_message, filter_kwargs, job_status, message_to_dict
from selma.batch.launchers import Launcher
from selma.jobs import JobRecord
from selma.server import Hosted, SelmaServer, ServiceRegistration
from selma.v1 import evaluation_service_pb2 as pb
from selma.v1 import evaluation_service_pb2_grpc as pb_grpc

from selma_evaluation.core import EvaluationCore
from selma_evaluation.settings import EvaluationSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "selma.v1.EvaluationService"


def to_job(rec: JobRecord) -> pb.EvaluationJob:
    """An EvaluationJob message for a job record."""
    job = pb.EvaluationJob(status=job_status(rec))
    job.spec.CopyFrom(dict_to_message(rec.spec, pb.EvaluationSpec))
    job.stats.CopyFrom(dict_to_message(rec.stats, pb.EvaluationStats))
    return job


class EvaluationServicer(pb_grpc.EvaluationServiceServicer):
    """The evaluation RPCs over an :class:`EvaluationCore`."""

    def __init__(self, core: EvaluationCore) -> None:
        self.core = core

    def StartEvaluation(self, request: pb.StartEvaluationRequest, context: Any) -> pb.StartEvaluationResponse:
        spec = message_to_dict(request.spec)
        rec, created, _doc = self.core.start(request.idempotency_key, spec, validate_only=request.validate_only)
        if rec is None:
            return pb.StartEvaluationResponse(job=pb.EvaluationJob(spec=request.spec), created=False)
        return pb.StartEvaluationResponse(job=to_job(rec), created=created)

    def GetEvaluation(self, request: pb.GetEvaluationRequest, context: Any) -> pb.GetEvaluationResponse:
        return pb.GetEvaluationResponse(job=to_job(self.core.get(request.job_id)))

    def WatchEvaluation(self, request: pb.WatchEvaluationRequest, context: Any) -> Any:
        interval = request.min_interval.ToTimedelta().total_seconds() if request.HasField("min_interval") else 1.0
        for rec in self.core.watch(request.job_id, min_interval=interval, is_active=context.is_active):
            yield pb.WatchEvaluationResponse(job=to_job(rec))

    def CancelEvaluation(self, request: pb.CancelEvaluationRequest, context: Any) -> pb.CancelEvaluationResponse:
        return pb.CancelEvaluationResponse(job=to_job(self.core.cancel(request.job_id, request.reason)))

    def ListEvaluations(self, request: pb.ListEvaluationsRequest, context: Any) -> pb.ListEvaluationsResponse:
        recs, token = self.core.list(**filter_kwargs(request.filter), page_size=request.page_size or 50, page_token=request.page_token)
        return pb.ListEvaluationsResponse(jobs=[to_job(r) for r in recs], next_page_token=token)


def registration(core: EvaluationCore) -> ServiceRegistration:
    return ServiceRegistration(name=SERVICE_NAME, servicer=EvaluationServicer(core), add_fn=pb_grpc.add_EvaluationServiceServicer_to_server)


def hosted(settings: EvaluationSettings | None = None, *, launchers: dict[str, Launcher] | None = None) -> Hosted:
    """The service as a process hosts it; ``launchers``: share another service's (training's) worker pool."""
    core = EvaluationCore(settings or EvaluationSettings(), launchers=launchers)
    return Hosted(registration=registration(core), on_start=core.recover, on_stop=core.shutdown, core=core)


def build_server(settings: EvaluationSettings, *, launchers: dict[str, Launcher] | None = None) -> SelmaServer:
    """A started server with only the EvaluationService (jobs recovered, ready); ``server.core`` is its core."""
    return hosted(settings, launchers=launchers).start_server(settings, name="evaluation")
