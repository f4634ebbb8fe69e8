"""gRPC glue for ``selma.v1.PromptService``: protobuf in, core calls, protobuf out.

The work lives beside this module: ``spec`` (validation), ``generator`` (the SELMA loop),
``job`` (resumable jobs and publishing), ``llm`` (backends), ``skills``.  ``build_server``
wires them to a :class:`selma.server.SelmaServer`; ``main`` runs the service until SIGTERM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc

from selma.api import dict_to_message, enum_value, job_status, message_to_dict
from selma.errors import Cancelled, InvalidArgument, SelmaError
from selma.job_rpcs import JOB_KINDS, JobRpcs
from selma.jobs import JobManager, JobRecord
from selma.llm.embedding import EmbeddingPool
from selma.llm.local import ModelRegistry
from selma.llm.specs import resolve_backend
from selma.logs import configure_logging
from selma.server import SelmaServer, ServiceRegistration, serve
from selma.sources import check_request
from selma.storage import open_storage
from selma.v1 import prompt_service_pb2 as pb
from selma.v1 import prompt_service_pb2_grpc as pb_grpc
from selma_prompts.generator import GenerationState, PromptGenerator
from selma_prompts.job import JOB_KIND, PromptJobRunner, job_stats
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import Skill, SkillLibrary
from selma_prompts.spec import resolve_spec

log = logging.getLogger(__name__)

SERVICE_NAME = "selma.v1.PromptService"


def skill_to_proto(skill: Skill | dict[str, Any]) -> pb.Skill:
    d = skill.to_dict() if isinstance(skill, Skill) else skill
    return pb.Skill(name=d["name"], description=d.get("description", ""), rules=d["rules"], seed_examples=d["seed_examples"])


def stats_to_proto(stats: dict[str, Any]) -> pb.PromptGenerationStats:
    """The stats dict a job keeps (see ``job.job_stats``) as protobuf."""
    out = pb.PromptGenerationStats(
        requested=int(stats.get("requested", 0)),
        accepted=int(stats.get("accepted", 0)),
        rejected=int(stats.get("rejected", 0)),
        llm_requests=int(stats.get("llm_requests", 0)),
        llm_request_budget=int(stats.get("llm_request_budget", 0)),
        llm_errors=int(stats.get("llm_errors", 0)),
        llm_retries=int(stats.get("llm_retries", 0)),
        prompt_tokens=int(stats.get("prompt_tokens", 0)),
        completion_tokens=int(stats.get("completion_tokens", 0)),
        backend_model=str(stats.get("backend_model", "")),
        stop_reason=enum_value(pb.PromptGenerationStopReason, stats.get("stop_reason", "")),
    )
    for reason, count in sorted((stats.get("rejections") or {}).items()):
        if count:
            out.rejections.add(reason=enum_value(pb.PromptRejectionReason, reason), count=int(count))
    out.filter_time.FromNanoseconds(int(float(stats.get("filter_seconds", 0.0)) * 1e9))
    if stats.get("skill"):
        out.skill.CopyFrom(skill_to_proto(stats["skill"]))
    return out


def job_to_proto(rec: JobRecord) -> pb.PromptGenerationJob:
    return pb.PromptGenerationJob(
        status=job_status(rec), spec=dict_to_message(rec.spec, pb.PromptGenerationSpec), stats=stats_to_proto(rec.stats)
    )


def _check_key(key: str) -> None:
    if not key or len(key) > 256 or not all(32 < ord(c) < 127 or c == " " for c in key) or key != key.strip():
        raise InvalidArgument(
            "idempotency_key is required: 1-256 printable ASCII characters, e.g. '<run>/prompts/<skill>'", field="idempotency_key"
        )


class PromptServicer(pb_grpc.PromptServiceServicer):
    """Converts requests to core calls; holds no logic of its own (the five job RPCs: :class:`selma.job_rpcs.JobRpcs`)."""

    def __init__(self, settings: PromptSettings, jobs: JobManager, library: SkillLibrary, registry: ModelRegistry) -> None:
        self.settings = settings
        self.jobs = jobs
        self.library = library
        self.registry = registry
        JobRpcs(JOB_KINDS["prompts"], job_to_proto, jobs, start=self._start).bind(self)

    def _start(self, request: pb.StartPromptGenerationRequest) -> tuple[JobRecord | pb.PromptGenerationJob, bool]:
        _check_key(request.idempotency_key)
        check_request(request, self.settings)  # before any model is resolved or loaded
        spec_dict = message_to_dict(request.spec)
        spec = resolve_spec(spec_dict, self.settings, self.library)
        if request.validate_only:
            stats = job_stats(spec, GenerationState(), spec.backend.backend_model)
            return pb.PromptGenerationJob(spec=request.spec, stats=stats_to_proto(stats)), False
        rec, created = self.jobs.start(request.idempotency_key, spec_dict, run=spec.run, skill=spec.skill.name, labels=dict(spec.labels))
        if created and not rec.stats:
            # Visible at once in Get/List, before the job function runs.
            rec.stats = job_stats(spec, GenerationState(), spec.backend.backend_model)
        return rec, created

    def ListSkills(self, request: pb.ListSkillsRequest, context: grpc.ServicerContext) -> pb.ListSkillsResponse:
        return pb.ListSkillsResponse(skills=[skill_to_proto(s) for s in self.library.all()])

    def PreviewPrompts(self, request: pb.PreviewPromptsRequest, context: grpc.ServicerContext) -> pb.PreviewPromptsResponse:
        check_request(request, self.settings)
        spec = resolve_spec(
            message_to_dict(request.spec), self.settings, self.library, max_count=self.settings.prompts_preview_limit, preview=True
        )
        backend = self.registry.backend(spec.backend)
        embedder = None
        if spec.embedding is not None:
            model, lock = self.registry.embedding_model(spec.embedding.model_source, spec.embedding.device)
            embedder = EmbeddingPool(model, lock=lock)
        rejected: list[dict[str, Any]] = []

        def check_cancelled() -> None:
            if not context.is_active():
                raise Cancelled("the client went away")

        gen = PromptGenerator(
            spec,
            backend,
            embedder=embedder,
            max_prompt_chars=self.settings.prompts_max_prompt_chars,
            check_cancelled=check_cancelled,
            rejected_sink=rejected,
            max_rejected=self.settings.prompts_preview_max_rejected,
        )
        try:
            state = gen.run()
        finally:
            backend.close()
        return pb.PreviewPromptsResponse(
            accepted=[dict_to_message(r, pb.PromptRecord) for r in state.records],
            rejected=[
                pb.RejectedCandidate(
                    text=r["text"],
                    reason=enum_value(pb.PromptRejectionReason, r["reason"]),
                    nearest_prompt_id=r["nearest_prompt_id"],
                    score=r["score"],
                    llm_request_index=r["llm_request_index"],
                )
                for r in rejected
            ],
            stats=stats_to_proto(job_stats(spec, state, backend.backend_model)),
        )


@dataclass
class PromptCore:
    """The service's core objects, built once per process."""

    settings: PromptSettings
    jobs: JobManager
    library: SkillLibrary
    registry: ModelRegistry
    servicer: PromptServicer

    def registration(self) -> ServiceRegistration:
        return ServiceRegistration(name=SERVICE_NAME, servicer=self.servicer, add_fn=pb_grpc.add_PromptServiceServicer_to_server)

    def preload(self) -> None:
        """Load the default backend if it is a local model, so the first job does not wait for it."""
        if not self.settings.prompts_preload_default_backend or self.settings.llm_default_backend == "openai_compatible":
            return
        try:
            self.registry.causal_lm(resolve_backend({}, self.settings))
        except SelmaError as e:
            # The service stays useful for other backends; jobs on this one will fail with this message.
            log.error("could not load the default backend %s: %s", self.settings.llm_default_backend, e)


def build_core(settings: PromptSettings) -> PromptCore:
    storage = open_storage(settings)
    library = SkillLibrary(settings.prompts_skill_paths)
    registry = ModelRegistry(settings)
    runner = PromptJobRunner(settings, storage, registry, library)
    jobs = JobManager(storage, JOB_KIND, runner, max_concurrent=settings.prompts_max_concurrent_jobs,
                      watchdog_seconds=settings.job_watchdog_seconds)
    return PromptCore(settings, jobs, library, registry, PromptServicer(settings, jobs, library, registry))


class PromptServer(SelmaServer):
    """A SelmaServer that also stops the job manager (jobs stay resumable) when it stops."""

    def __init__(self, core: PromptCore) -> None:
        super().__init__(core.settings, [core.registration()], name="prompts")
        self.core = core

    def stop(self, grace: float | None = None) -> None:
        super().stop(grace)
        self.core.jobs.shutdown()


def build_server(settings: PromptSettings | None = None) -> PromptServer:
    """The prompt service, unstarted: core objects built, unfinished jobs recovered, servicer registered."""
    settings = settings if isinstance(settings, PromptSettings) else PromptSettings(**(settings.model_dump() if settings else {}))
    core = build_core(settings)
    server = PromptServer(core)
    core.jobs.recover()
    return server


def main() -> int:
    """``selma serve prompts``: run until SIGTERM, then drain and leave unfinished jobs resumable."""
    settings = PromptSettings()
    configure_logging(settings.log_level, settings.log_format)
    log.info("prompt service settings: %s", settings.safe_dump())
    core = build_core(settings)

    def on_start(_server: SelmaServer) -> None:
        core.preload()
        core.jobs.recover()

    try:
        serve(settings, [core.registration()], name="prompts", on_start=on_start)
    finally:
        core.jobs.shutdown()
    return 0
