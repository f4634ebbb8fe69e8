"""gRPC glue of the TrainingService: protobuf ⇄ domain, calls into :class:`TrainingCore`."""

from __future__ import annotations

import logging
from typing import Any

from selma.api import dict_to_message, enum_value, job_status, message_to_dict
from selma.job_rpcs import JOB_KINDS, JobRpcs
from selma.jobs import JobRecord
from selma.server import Hosted, SelmaServer, ServiceRegistration
from selma.sources import check_request
from selma.v1 import training_service_pb2 as pb
from selma.v1 import training_service_pb2_grpc as pb_grpc
from selma_training.core import TrainingCore
from selma_training.settings import TrainingSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "selma.v1.TrainingService"


def to_job(rec: JobRecord) -> pb.ExpertTrainingJob:
    """An ExpertTrainingJob message for a job record."""
    job = pb.ExpertTrainingJob(status=job_status(rec))
    job.spec.CopyFrom(dict_to_message(rec.spec, pb.ExpertTrainingSpec))
    job.stats.CopyFrom(dict_to_message(rec.stats, pb.ExpertTrainingStats))
    return job


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    """Expert-training RPCs over a :class:`TrainingCore` (the five job RPCs: :class:`selma.job_rpcs.JobRpcs`)."""

    def __init__(self, core: TrainingCore) -> None:
        self.core = core
        JobRpcs(JOB_KINDS["training"], to_job, core, start=self._start).bind(self)

    def _start(self, request: pb.StartExpertTrainingRequest) -> tuple[JobRecord | pb.ExpertTrainingJob, bool]:
        check_request(request, self.core.settings)  # before the base model is inspected or the dataset read
        rec, created, prepared = self.core.start(request.idempotency_key, message_to_dict(request.spec), validate_only=request.validate_only)
        if rec is None:
            job = pb.ExpertTrainingJob(spec=request.spec)
            job.stats.resolved_config.CopyFrom(dict_to_message(prepared.resolved_config, pb.ExpertTrainingConfig))
            return job, False
        return rec, created

    def ListTrainingPresets(self, request: pb.ListTrainingPresetsRequest, context: Any) -> pb.ListTrainingPresetsResponse:
        out = pb.ListTrainingPresetsResponse()
        for _name, description, config in self.core.presets():
            out.presets.add(preset=enum_value(pb.TrainingPreset, config["preset"]), description=description, config=dict_to_message(config, pb.ExpertTrainingConfig))
        return out


def registration(core: TrainingCore) -> ServiceRegistration:
    return ServiceRegistration(name=SERVICE_NAME, servicer=TrainingServicer(core), add_fn=pb_grpc.add_TrainingServiceServicer_to_server)


def hosted(settings: TrainingSettings | None = None, *, core: TrainingCore | None = None) -> Hosted:
    """The service as a process hosts it (``selma serve training`` adds the EvaluationService beside it)."""
    core = core or TrainingCore(settings or TrainingSettings())
    return Hosted(registration=registration(core), on_start=core.recover, on_stop=core.shutdown, core=core)


def build_server(settings: TrainingSettings, *, core: TrainingCore | None = None) -> SelmaServer:
    """A started server with only the TrainingService (jobs recovered, ready); ``server.core`` is its core."""
    return hosted(settings, core=core).start_server(settings, name="training")
