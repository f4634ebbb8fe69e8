"""ServingService gRPC glue: protobuf ↔ the core's dicts and dataclasses (no logic of its own)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from selma.api import (
    artifact_kind_from_proto,
    artifact_kind_to_proto,
    artifact_ref,
    dict_to_message,
    enum_name,
    enum_value,
    generated_image,
    job_status,
    manifest_to_proto,
    message_to_dict,
    timestamp,
)
from selma.artifacts import ArtifactKind, Manifest
from selma.auth import ADMIN, Principal, current_principal
from selma.errors import FailedPrecondition, InvalidArgument
from selma.job_rpcs import JOB_KINDS, JobRpcs
from selma.jobs import JobRecord
from selma.logs import configure_logging
from selma.lora_format import trained_alpha
from selma.paging import paginate
from selma.retention import Removal
from selma.server import Hosted, SelmaServer, ServiceRegistration, serve_hosted
from selma.sources import check_request
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc
from selma_serving.core import ServingCore, spec_json_from_dict
from selma_serving.engine import GeneratedImage, GenerationRequest, QueueProgress
from selma_serving.lora import BaseModelId
from selma_serving.merge import params_from_dict
from selma_serving.registry import ModelEntry
from selma_serving.settings import ServingSettings

log = logging.getLogger(__name__)

SERVICE_NAME = "selma.v1.ServingService"
KiB, MiB = 1024, 1024 * 1024


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _model_ref(base: BaseModelId) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(source=base.source, revision=base.revision, variant=base.variant)


_REMOVED_TYPES = {"artifact": pb.REMOVED_ITEM_TYPE_ARTIFACT, "staging": pb.REMOVED_ITEM_TYPE_STAGING, "scratch": pb.REMOVED_ITEM_TYPE_SCRATCH,
                  "cache": pb.REMOVED_ITEM_TYPE_CACHE}
MAX_LISTED_REMOVALS = 1000


def _removed_item(r: Removal) -> pb.RemovedItem:
    kind = artifact_kind_to_proto(r.kind) if r.kind else common_pb2.ARTIFACT_KIND_UNSPECIFIED
    return pb.RemovedItem(type=_REMOVED_TYPES[r.what], key=r.key, kind=kind, size_bytes=r.size, reason=r.reason)


def _merge_spec(d: dict[str, Any] | None) -> common_pb2.MergeSpec | None:
    return dict_to_message(spec_json_from_dict(d), common_pb2.MergeSpec) if d else None


def client_identity(principal: Principal | None, peer: str) -> str:
    """Whom fair admission rotates over: the token's name with auth on, else the peer's host
    (its connections share one turn: a client gains nothing by opening more channels)."""
    if principal is not None:
        return f"token:{principal.name}"
    host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 or peer.startswith("ipv4:") else peer
    return f"peer:{host}"


def cap_priority(requested: str, principal: Principal | None) -> str:
    """The priority a request is served at: "high" only for admin callers (or with auth off)."""
    if requested == "high" and principal is not None and ADMIN not in principal.scopes:
        log.info("priority high asked by %s without the admin scope: served at normal", principal.name)
        return "normal"
    return requested or "normal"


class ServingServicer(pb_grpc.ServingServiceServicer):
    """Converts requests for :class:`ServingCore` and its results back to protobuf."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core
        JobRpcs(JOB_KINDS["merge"], self._job, core.jobs, start=self._start_merge).bind(self)

    # --- merge jobs (the five job RPCs: :class:`selma.job_rpcs.JobRpcs`)

    def _job(self, rec: JobRecord) -> pb.MergeJob:
        return pb.MergeJob(
            status=job_status(rec),
            spec=dict_to_message(rec.spec, pb.MergeJobSpec),
            stats=dict_to_message(rec.stats, pb.MergeStats),
        )

    def _start_merge(self, request: pb.StartMergeRequest) -> tuple[JobRecord | pb.MergeJob, bool]:
        spec = message_to_dict(request.spec)
        if request.validate_only:
            rm = self.core.validate_merge_spec(spec)
            stats = pb.MergeStats(expert_count=len(rm.expert_ids), resolved_merge=_merge_spec(rm.to_dict()))
            return pb.MergeJob(spec=request.spec, stats=stats), False
        return self.core.start_merge(request.idempotency_key, spec)

    # --- generation

    def _generation_request(self, request: pb.GenerateRequest) -> GenerationRequest:
        d = request.diffusion
        which = request.WhichOneof("model")
        return GenerationRequest(
            prompts=list(request.prompts),
            negative_prompt=d.negative_prompt,
            steps=d.steps,
            guidance_scale=d.guidance_scale if d.HasField("guidance_scale") else None,
            width=d.width,
            height=d.height,
            scheduler=enum_name(common_pb2.Scheduler, d.scheduler, field="diffusion.scheduler"),
            images_per_prompt=request.images_per_prompt,
            seed=request.seed if request.HasField("seed") else None,
            seed_policy=enum_name(common_pb2.SeedPolicy, request.seed_policy, field="seed_policy") or "derived",
            model_name=request.model_name if which == "model_name" else "",
            merge=params_from_dict(message_to_dict(request.experts)) if which == "experts" else None,
            prompt_seeds=list(request.prompt_seeds),
            batch_prompts=request.batch_prompts,
        )

    def _served(self, img: GeneratedImage) -> pb.ServedModel:
        s = img.served
        out = pb.ServedModel(model_name=s.model_name, base_model=_model_ref(s.base_model), fused=s.fused, merge_cache_hit=s.cache_hit)
        spec = _merge_spec(s.merge_dict)
        if spec is not None:
            out.merge.CopyFrom(spec)
        return out

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        req = self._generation_request(request)
        cancel = threading.Event()
        admission = self.core.engine.admission

        def on_done() -> None:
            cancel.set()
            admission.wake()

        context.add_callback(on_done)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        principal = current_principal()
        priority = cap_priority(enum_name(pb.GenerationPriority, request.priority, field="priority"), principal)
        items = self.core.engine.generate(req, cancel=cancel, is_active=context.is_active, deadline=deadline,
                                          client=client_identity(principal, context.peer()), priority=priority,
                                          progress=request.stream_progress)
        for img in items:
            if isinstance(img, QueueProgress):
                yield pb.GenerateResponse(progress=pb.GenerateProgress(
                    queue_position=img.position, queue_length=img.queue_length, batch_size=img.batch_size))
                continue
            yield pb.GenerateResponse(
                image=generated_image(img),
                model=self._served(img),
                index=img.index,
                total=img.total,
                generation_time=_duration(img.seconds),
            )

    # --- models

    def _model_info(self, e: ModelEntry) -> pb.ModelInfo:
        info = pb.ModelInfo(
            model_name=e.name,
            kind=pb.MODEL_KIND_MERGED if e.kind == "merged" else pb.MODEL_KIND_EXPERT,
            state=enum_value(pb.ModelState, e.state),
            artifact=artifact_ref(e.manifest),
            base_model=_model_ref(e.base_model),
            fused=True,
            registered_at=timestamp(e.registered_at),
            memory_bytes=e.memory_bytes,
            error_message=e.error,
        )
        spec = _merge_spec(e.merge)
        if spec is not None:
            info.merge.CopyFrom(spec)
        if e.loaded_at is not None:
            info.loaded_at.CopyFrom(timestamp(e.loaded_at))
        return info

    def _base_info(self) -> pb.ModelInfo:
        engine = self.core.engine
        return pb.ModelInfo(
            model_name="base",
            kind=pb.MODEL_KIND_BASE,
            state=pb.MODEL_STATE_LOADED if engine.loaded else pb.MODEL_STATE_LOADING,
            base_model=_model_ref(engine.base_id),
            fused=False,
        )

    def RegisterModel(self, request: pb.RegisterModelRequest, context: grpc.ServicerContext) -> pb.RegisterModelResponse:
        check_request(request, self.core.settings)
        ref = request.artifact
        if not (ref.id or ref.uri):
            raise InvalidArgument("artifact is required (an id or a uri)", field="artifact")
        manifest = self.core.resolve_artifact(id=ref.id, uri=ref.uri, kind=artifact_kind_from_proto(ref.kind), sha256=ref.sha256)
        entry, created = self.core.registry.register(request.model_name, manifest, replace=request.replace, load=request.load)
        return pb.RegisterModelResponse(model=self._model_info(entry), created=created)

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.LoadModelResponse:
        if request.model_name == "base":
            return pb.LoadModelResponse(model=self._base_info(), load_time=_duration(0))
        entry, seconds = self.core.registry.load(request.model_name)
        return pb.LoadModelResponse(model=self._model_info(entry), load_time=_duration(seconds))

    def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.ServicerContext) -> pb.UnloadModelResponse:
        if request.model_name == "base":
            raise FailedPrecondition("the base model cannot be unloaded", field="model_name")
        return pb.UnloadModelResponse(model=self._model_info(self.core.registry.unload(request.model_name)))

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        models = [self._base_info()] + [self._model_info(e) for e in sorted(self.core.registry.list(), key=lambda e: e.name)]
        if request.states:
            models = [m for m in models if m.state in set(request.states)]
        chunk, token = paginate(models, request.page_size, request.page_token)
        return pb.ListModelsResponse(models=chunk, next_page_token=token)

    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext) -> pb.DeleteModelResponse:
        if request.model_name == "base":
            raise FailedPrecondition("the base model cannot be deleted", field="model_name")
        if len(request.model_name) > 63:  # never echo an oversized name back
            raise InvalidArgument(f"model_name must be at most 63 characters; got {len(request.model_name)}", field="model_name")
        entry, was_loaded = self.core.registry.delete(request.model_name)
        return pb.DeleteModelResponse(model_name=entry.name, artifact=artifact_ref(entry.manifest), was_loaded=was_loaded)

    # --- retention

    def DeleteRun(self, request: pb.DeleteRunRequest, context: grpc.ServicerContext) -> pb.DeleteRunResponse:
        d = self.core.delete_run(request.run, dry_run=request.dry_run)
        removed = [_removed_item(r) for r in d.artifacts]
        removed += [pb.RemovedItem(type=pb.REMOVED_ITEM_TYPE_SCRATCH, key=p, reason=f"scratch of a job of run {d.run}") for p in d.scratch]
        return pb.DeleteRunResponse(
            run=d.run,
            dry_run=d.dry_run,
            job_ids=d.jobs,
            removed=removed,
            kept=[pb.KeptArtifact(artifact_id=a, dependant=why) for a, why in d.kept.items()],
            bytes_freed=d.bytes_freed,
        )

    def CollectGarbage(self, request: pb.CollectGarbageRequest, context: grpc.ServicerContext) -> pb.CollectGarbageResponse:
        report = self.core.collect_garbage(dry_run=request.dry_run)
        return pb.CollectGarbageResponse(
            dry_run=report.dry_run,
            removed=[_removed_item(r) for r in report.removals[:MAX_LISTED_REMOVALS]],
            removed_count=len(report.removals),
            bytes_freed=report.bytes_freed,
            retained_artifacts=report.retained,
            skipped=report.skipped,
            grace_period=_duration(self.core.gc_grace.total_seconds()),
        )

    def _expert_info(self, m: Manifest) -> pb.ExpertInfo:
        info = self.core.expert_details(m)
        out = pb.ExpertInfo(
            expert_id=m.id,
            artifact=artifact_ref(m),
            run=m.labels.get("selma.dev/run", str(info.get("run", "") or "")),
            skill=m.labels.get("selma.dev/skill", str(info.get("skill", "") or "")),
            base_model=_model_ref(BaseModelId.from_dict(info.get("base_model"))),
            rank=int(info.get("rank", 0) or 0),
            alpha=trained_alpha(info),
            target_modules=[str(t) for t in info.get("target_modules", []) or []],
            steps=int(info.get("steps", 0) or 0),
            final_loss=float(info.get("final_loss", 0) or 0),
            created_at=timestamp(m.created_at),
        )
        dataset = next((p for p in m.parents if p.startswith(ArtifactKind.IMAGE_DATASET.id_prefix + "-")), "")
        if dataset:
            out.dataset.CopyFrom(common_pb2.ArtifactRef(id=dataset, kind=common_pb2.ARTIFACT_KIND_IMAGE_DATASET))
        return out

    def ListExperts(self, request: pb.ListExpertsRequest, context: grpc.ServicerContext) -> pb.ListExpertsResponse:
        manifests = self.core.list_experts(run=request.run, skill=request.skill, base_model_source=request.base_model_source)
        chunk, token = paginate(manifests, request.page_size, request.page_token)
        return pb.ListExpertsResponse(experts=[self._expert_info(m) for m in chunk], next_page_token=token)

    def ExportAdapter(self, request: pb.ExportAdapterRequest, context: grpc.ServicerContext) -> Iterator[pb.ExportAdapterResponse]:
        fmt = enum_name(pb.AdapterFormat, request.format, field="format") or "diffusers"
        chunk = request.chunk_size_bytes or MiB
        if not KiB <= chunk <= 4 * MiB:
            raise InvalidArgument(f"chunk_size_bytes must be 1 KiB..4 MiB; got {request.chunk_size_bytes}", field="chunk_size_bytes")
        which = request.WhichOneof("source")
        f = self.core.export(
            model_name=request.model_name if which == "model_name" else "",
            expert_id=request.expert_id if which == "expert_id" else "",
            fmt=fmt,
        )
        info = pb.ExportedFileInfo(file_name=f.file_name, size_bytes=len(f.data), sha256=f.sha256, format=enum_value(pb.AdapterFormat, fmt), rank=f.rank)
        for offset in range(0, max(len(f.data), 1), chunk):
            msg = pb.ExportAdapterResponse(offset=offset, data=f.data[offset : offset + chunk])
            if offset == 0:
                msg.info.CopyFrom(info)
            yield msg

    def GetLineage(self, request: pb.GetLineageRequest, context: grpc.ServicerContext) -> pb.GetLineageResponse:
        check_request(request, self.core.settings)
        ref = request.artifact
        manifest = self.core.resolve_artifact(id=ref.id, uri=ref.uri, kind=artifact_kind_from_proto(ref.kind), sha256=ref.sha256)
        return pb.GetLineageResponse(artifacts=[manifest_to_proto(m) for m in self.core.lineage(manifest.id, request.max_depth)])


def registration(core: ServingCore) -> ServiceRegistration:
    return ServiceRegistration(name=SERVICE_NAME, servicer=ServingServicer(core), add_fn=pb_grpc.add_ServingServiceServicer_to_server)


def hosted(settings: ServingSettings, *, core: ServingCore | None = None) -> Hosted:
    """The service as a process hosts it: merge jobs resumed now, the base model loaded once the ports
    are open (SERVING only after that), the core shut down on the way out.  ``hosted(s).start_server(s,
    name="serving")`` is a started, ready server (tests, benchmarks)."""
    core = core or ServingCore(settings)
    core.jobs.recover()
    return Hosted(registration=registration(core), on_start=core.engine.load_base, on_stop=core.shutdown, core=core)


def build_server(settings: ServingSettings, *, core: ServingCore | None = None) -> SelmaServer:
    """A server with the ServingService (not started, not ready): resumes merge jobs; load the base model, then set_ready."""
    core = core or ServingCore(settings)
    core.jobs.recover()
    server = SelmaServer(settings, [registration(core)], name="serving")
    server.core = core  # type: ignore[attr-defined]  # tests and on_start reach the core through the server
    return server


def main() -> None:
    settings = ServingSettings()
    configure_logging(settings.log_level, settings.log_format)
    serve_hosted(settings, [hosted(settings)], name="serving")
