"""gRPC glue of the EvaluationService: protobuf ⇄ domain, calls into :class:`EvaluationCore`.

By default the training process hosts this service beside TrainingService (``selma serve
training``), sharing its batch launchers; ``selma serve evaluation`` runs it alone.
"""

from __future__ import annotations

import logging

from selma.api import dict_to_message, job_status, message_to_dict
from selma.batch.launchers import Launcher
from selma.job_rpcs import JOB_KINDS, JobRpcs
from selma.jobs import JobRecord
from selma.server import Hosted, SelmaServer, ServiceRegistration
from selma.sources import check_request
from selma.v1 import evaluation_service_pb2 as pb
from selma.v1 import evaluation_service_pb2_grpc as pb_grpc
from selma_evaluation import metrics as _metrics  # noqa: F401 - the gate's metrics exist (at 0) from start-up
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


def to_gate_job(rec: JobRecord) -> pb.GateJob:
    """A GateJob message for a job record."""
    job = pb.GateJob(status=job_status(rec))
    job.spec.CopyFrom(dict_to_message(rec.spec, pb.GateSpec))
    job.stats.CopyFrom(dict_to_message(rec.stats, pb.GateStats))
    return job


class EvaluationServicer(pb_grpc.EvaluationServiceServicer):
    """The evaluation and gate RPCs over an :class:`EvaluationCore` (the five job RPCs of each: :class:`selma.job_rpcs.JobRpcs`)."""

    def __init__(self, core: EvaluationCore) -> None:
        self.core = core
        JobRpcs(JOB_KINDS["evaluation"], to_job, core, start=self._start).bind(self)
        JobRpcs(JOB_KINDS["gate"], to_gate_job, core.gate, start=self._start_gate).bind(self)

    def _start_gate(self, request: pb.StartGateRequest) -> tuple[JobRecord | pb.GateJob, bool]:
        check_request(request, self.core.settings)
        rec, created = self.core.gate.start(request.idempotency_key, message_to_dict(request.spec), validate_only=request.validate_only)
        if rec is None:
            return pb.GateJob(spec=request.spec), False
        return rec, created

    def _start(self, request: pb.StartEvaluationRequest) -> tuple[JobRecord | pb.EvaluationJob, bool]:
        check_request(request, self.core.settings)  # before any model is resolved or prompt set read
        rec, created, _doc = self.core.start(request.idempotency_key, message_to_dict(request.spec), validate_only=request.validate_only)
        if rec is None:
            return pb.EvaluationJob(spec=request.spec), False
        return rec, created


def registration(core: EvaluationCore) -> ServiceRegistration:
    return ServiceRegistration(name=SERVICE_NAME, servicer=EvaluationServicer(core), add_fn=pb_grpc.add_EvaluationServiceServicer_to_server)


def hosted(settings: EvaluationSettings | None = None, *, launchers: dict[str, Launcher] | None = None) -> Hosted:
    """The service as a process hosts it; ``launchers``: share another service's (training's) worker pool."""
    core = EvaluationCore(settings or EvaluationSettings(), launchers=launchers)
    return Hosted(registration=registration(core), on_start=core.recover, on_stop=core.shutdown, core=core)


def build_server(settings: EvaluationSettings, *, launchers: dict[str, Launcher] | None = None) -> SelmaServer:
    """A started server with only the EvaluationService (jobs recovered, ready); ``server.core`` is its core."""
    return hosted(settings, launchers=launchers).start_server(settings, name="evaluation")
