"""gRPC glue of the TrainingService: protobuf ⇄ domain, calls into the cores.

Expert training goes to :mod:`selma_training.core`; the Evaluation RPCs go to
:mod:`selma_evaluation.core`, which launches its workers through the same launchers.
"""

from __future__ import annotations

import logging
from typing import Any

from selma.api import dict_to_message, filter_kwargs, job_status, message_to_dict
from selma.jobs import JobRecord
from selma.logs import configure_logging
from selma.server import SelmaServer, ServiceRegistration, serve
from selma.v1 import training_service_pb2 as pb
from selma.v1 import training_service_pb2_grpc as pb_grpc

from selma_evaluation.core import EvaluationCore
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


def to_eval_job(rec: JobRecord) -> pb.EvaluationJob:
    """An EvaluationJob message for a job record."""
    job = pb.EvaluationJob(status=job_status(rec))
    job.spec.CopyFrom(dict_to_message(rec.spec, pb.EvaluationSpec))
    job.stats.CopyFrom(dict_to_message(rec.stats, pb.EvaluationStats))
    return job


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    """Expert-training RPCs over a :class:`TrainingCore`, evaluation RPCs over an :class:`EvaluationCore`."""

    def __init__(self, core: TrainingCore, evaluation: EvaluationCore | None = None) -> None:
        self.core = core
        self.evaluation = evaluation or EvaluationCore(core.settings, core.storage, core.launchers)

    # -- evaluation

    def StartEvaluation(self, request: pb.StartEvaluationRequest, context: Any) -> pb.StartEvaluationResponse:
        spec = message_to_dict(request.spec)
        rec, created, _doc = self.evaluation.start(request.idempotency_key, spec, validate_only=request.validate_only)
        if rec is None:
            return pb.StartEvaluationResponse(job=pb.EvaluationJob(spec=request.spec), created=False)
        return pb.StartEvaluationResponse(job=to_eval_job(rec), created=created)

    def GetEvaluation(self, request: pb.GetEvaluationRequest, context: Any) -> pb.GetEvaluationResponse:
        return pb.GetEvaluationResponse(job=to_eval_job(self.evaluation.get(request.job_id)))

    def WatchEvaluation(self, request: pb.WatchEvaluationRequest, context: Any) -> Any:
        interval = request.min_interval.ToTimedelta().total_seconds() if request.HasField("min_interval") else 1.0
        for rec in self.evaluation.watch(request.job_id, min_interval=interval, is_active=context.is_active):
            yield pb.WatchEvaluationResponse(job=to_eval_job(rec))

    def CancelEvaluation(self, request: pb.CancelEvaluationRequest, context: Any) -> pb.CancelEvaluationResponse:
        return pb.CancelEvaluationResponse(job=to_eval_job(self.evaluation.cancel(request.job_id, request.reason)))

    def ListEvaluations(self, request: pb.ListEvaluationsRequest, context: Any) -> pb.ListEvaluationsResponse:
        recs, token = self.evaluation.list(**filter_kwargs(request.filter), page_size=request.page_size or 50, page_token=request.page_token)
        return pb.ListEvaluationsResponse(jobs=[to_eval_job(r) for r in recs], next_page_token=token)

    # -- expert training

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


def build_server(settings: TrainingSettings, *, core: TrainingCore | None = None) -> SelmaServer:
    """Construct the core, recover jobs, register the servicer; returns the started server (not blocking)."""
    core = core or TrainingCore(settings)
    core.recover()
    servicer = TrainingServicer(core)
    servicer.evaluation.recover()
    server = SelmaServer(settings, [ServiceRegistration(name=SERVICE_NAME, servicer=servicer, add_fn=pb_grpc.add_TrainingServiceServicer_to_server)], name="training")
    server.core = core  # type: ignore[attr-defined]  # tests and main() reach the core through the server
    server.evaluation = servicer.evaluation  # type: ignore[attr-defined]
    return server.start()


def main() -> int:
    settings = TrainingSettings()
    configure_logging(settings.log_level, settings.log_format)
    core = TrainingCore(settings)
    servicer = TrainingServicer(core)

    def on_start(_server: Any) -> None:
        core.recover()
        servicer.evaluation.recover()

    try:
        serve(settings, [ServiceRegistration(name=SERVICE_NAME, servicer=servicer, add_fn=pb_grpc.add_TrainingServiceServicer_to_server)],
              name="training", on_start=on_start)
    finally:
        servicer.evaluation.shutdown()
        core.shutdown()
    return 0
