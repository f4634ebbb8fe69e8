"""gRPC glue of the TrainingService: protobuf ⇄ domain, calls into :class:`TrainingCore`."""

from __future__ import annotations

import logging
from typing import Any

from selma.api import dict_to_message, filter_kwargs, job_status, message_to_dict
from selma.jobs import JobRecord
from selma.server import Hosted, SelmaServer, ServiceRegistration
from selma.v1 import training_service_pb2 as pb
from selma.v1 import training_service_pb2_grpc as pb_grpc

from selma_training.core import TrainingCore
from selma_training.settings import TrainingSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "selma.v1.TrainingService"
_PRESET_ENUM = {"sd1": pb.TRAINING_PRESET_SELMA_SD1, "sd2": pb.TRAINING_PRESET_SELMA_SD2, "sdxl": pb.TRAINING_PRESET_SELMA_SDXL, "tiny": pb.TRAINING_PRESET_TINY}


def to_job(rec: JobRecord) -> pb.ExpertTrainingJob:
    """An ExpertTrainingJob message for a job record."""
    job = pb.ExpertTrainingJob(status=job_status(rec))
    job.spec.CopyFrom(dict_to_message(rec.spec, pb.ExpertTrainingSpec))
    job.stats.CopyFrom(dict_to_message(rec.stats, pb.ExpertTrainingStats))
    return job


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    """Expert-training RPCs over a :class:`TrainingCore`."""

    def __init__(self, core: TrainingCore) -> None:
        self.core = core

    def StartExpertTraining(self, request: pb.StartExpertTrainingRequest, context: Any) -> pb.StartExpertTrainingResponse:
        spec = message_to_dict(request.spec)
        rec, created, prepared = self.core.start(request.idempotency_key, spec, validate_only=request.validate_only)
        if rec is None:
            job = pb.ExpertTrainingJob()
            job.spec.CopyFrom(request.spec)
            job.stats.resolved_config.CopyFrom(dict_to_message(prepared.resolved_config, pb.ExpertTrainingConfig))
            return pb.StartExpertTrainingResponse(job=job, created=False)
        return pb.StartExpertTrainingResponse(job=to_job(rec), created=created)

    def GetExpertTraining(self, request: pb.GetExpertTrainingRequest, context: Any) -> pb.GetExpertTrainingResponse:
        return pb.GetExpertTrainingResponse(job=to_job(self.core.get(request.job_id)))

    def WatchExpertTraining(self, request: pb.WatchExpertTrainingRequest, context: Any) -> Any:
        interval = request.min_interval.ToTimedelta().total_seconds() if request.HasField("min_interval") else 1.0
        for rec in self.core.watch(request.job_id, min_interval=interval, is_active=context.is_active):
            yield pb.WatchExpertTrainingResponse(job=to_job(rec))

    def CancelExpertTraining(self, request: pb.CancelExpertTrainingRequest, context: Any) -> pb.CancelExpertTrainingResponse:
        return pb.CancelExpertTrainingResponse(job=to_job(self.core.cancel(request.job_id, request.reason)))

    def ListExpertTrainings(self, request: pb.ListExpertTrainingsRequest, context: Any) -> pb.ListExpertTrainingsResponse:
        recs, token = self.core.list(**filter_kwargs(request.filter), page_size=request.page_size or 50, page_token=request.page_token)
        return pb.ListExpertTrainingsResponse(jobs=[to_job(r) for r in recs], next_page_token=token)

    def ListTrainingPresets(self, request: pb.ListTrainingPresetsRequest, context: Any) -> pb.ListTrainingPresetsResponse:
        out = pb.ListTrainingPresetsResponse()
        for name, description, config in self.core.presets():
            out.presets.add(preset=_PRESET_ENUM[name], description=description, config=dict_to_message(config, pb.ExpertTrainingConfig))
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
