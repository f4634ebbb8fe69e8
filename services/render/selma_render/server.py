"""gRPC glue for ``selma.v1.RenderService``: protobuf in, :class:`~selma_render.core.RenderCore` call, protobuf out.

``build_server(settings)`` assembles a (not yet started) server around a fresh core and re-queues
unfinished jobs; ``main()`` is what ``selma serve render`` runs.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from selma.api import dict_to_message, generated_image, job_status
from selma.job_rpcs import JOB_KINDS, JobRpcs
from selma.jobs import JobRecord
from selma.logs import configure_logging
from selma.server import SelmaServer, ServiceRegistration, serve
from selma.sources import check_request
from selma.v1 import common_pb2, render_service_pb2, render_service_pb2_grpc
from selma_render.core import RenderCore
from selma_render.settings import RenderSettings
from selma_render.spec import scheduler_enum

log = logging.getLogger(__name__)

SERVICE_NAME = "selma.v1.RenderService"


def stats_to_proto(stats: dict[str, Any]) -> render_service_pb2.DatasetRenderStats:
    """The job record's stats dict → ``DatasetRenderStats``."""
    out = render_service_pb2.DatasetRenderStats(
        prompts_total=int(stats.get("prompts_total", 0)),
        images_total=int(stats.get("images_total", 0)),
        images_done=int(stats.get("images_done", 0)),
        images_skipped_existing=int(stats.get("images_skipped_existing", 0)),
        images_per_second=float(stats.get("images_per_second", 0.0)),
        current_batch_size=int(stats.get("current_batch_size", 0)),
        oom_retries=int(stats.get("oom_retries", 0)),
    )
    out.model_load_time.FromNanoseconds(int(float(stats.get("model_load_seconds", 0.0)) * 1e9))
    if stats.get("model_resolved"):
        out.model_resolved.CopyFrom(common_pb2.ModelRef(**stats["model_resolved"]))
    name = stats.get("scheduler_resolved")
    if name in common_pb2.Scheduler.keys():
        out.scheduler_resolved = common_pb2.Scheduler.Value(name)
    for shard in stats.get("shards") or []:
        out.shards.add(index=int(shard["index"]), images_total=int(shard["images_total"]), images_done=int(shard["images_done"]),
                       attempts=int(shard["attempts"]), complete=bool(shard["complete"]))
    return out


def job_to_proto(rec: JobRecord) -> render_service_pb2.DatasetRenderJob:
    return render_service_pb2.DatasetRenderJob(
        status=job_status(rec),
        spec=dict_to_message(rec.spec, render_service_pb2.DatasetRenderSpec),
        stats=stats_to_proto(rec.stats),
    )


class RenderServicer(render_service_pb2_grpc.RenderServiceServicer):
    """Converts between protobuf and the core; no logic of its own (the five job RPCs: :class:`selma.job_rpcs.JobRpcs`)."""

    def __init__(self, core: RenderCore) -> None:
        self.core = core
        JobRpcs(JOB_KINDS["render"], job_to_proto, core.jobs, start=self._start, watch_interval=core.settings.render_watch_interval_seconds).bind(self)

    def _start(self, request: render_service_pb2.StartDatasetRenderRequest) -> tuple[JobRecord | render_service_pb2.DatasetRenderJob, bool]:
        check_request(request, self.core.settings)  # before any model or prompt set is resolved
        rec, spec, created = self.core.start(request.idempotency_key, request.spec, validate_only=request.validate_only)
        if rec is None:
            return render_service_pb2.DatasetRenderJob(spec=spec), False
        return rec, created

    def Preview(self, request: render_service_pb2.PreviewRequest, context: grpc.ServicerContext) -> render_service_pb2.PreviewResponse:  # noqa: N802
        check_request(request, self.core.settings)
        result = self.core.preview(list(request.prompts), request.settings)
        m = result.model.resolved
        out = render_service_pb2.PreviewResponse(
            images=[
                generated_image(img)
                for img in result.images
            ],
            model_resolved=common_pb2.ModelRef(source=m.source, revision=m.revision, variant=m.variant, vae_source=m.vae_source),
            scheduler_resolved=scheduler_enum(result.render.scheduler),
        )
        out.render_time.FromNanoseconds(int(result.render_seconds * 1e9))
        return out


def registration(core: RenderCore) -> ServiceRegistration:
    return ServiceRegistration(
        name=SERVICE_NAME, servicer=RenderServicer(core), add_fn=render_service_pb2_grpc.add_RenderServiceServicer_to_server
    )


class RenderServer(SelmaServer):
    """A SelmaServer that also stops the render jobs (resumably) when it stops."""

    def __init__(self, settings: RenderSettings, core: RenderCore) -> None:
        super().__init__(settings, [registration(core)], name="render")
        self.core = core

    def stop(self, grace: float | None = None) -> None:
        super().stop(grace)
        self.core.shutdown()


def build_server(settings: RenderSettings) -> RenderServer:
    """A render server (not started): core objects built, unfinished jobs re-queued."""
    core = RenderCore(settings)
    server = RenderServer(settings, core)
    core.recover()
    return server


def main() -> int:
    settings = RenderSettings()
    configure_logging(settings.log_level, settings.log_format)
    log.info("render settings: %s", settings.safe_dump())
    core = RenderCore(settings)

    def on_start(_server: SelmaServer) -> None:
        core.warm_up()  # the default model is loaded before the service reports SERVING
        core.recover()

    try:
        serve(settings, [registration(core)], name="render", on_start=on_start)
    finally:
        core.shutdown()
    return 0
