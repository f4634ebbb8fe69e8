"""The render service's core, behind the gRPC glue: start/get/watch/cancel/list dataset renders, and previews.

:class:`RenderCore` owns the artifact store, the model cache (:class:`~selma_render.renderer.Renderer`)
and the :class:`~selma.jobs.JobManager` that runs :class:`~selma_render.dataset.DatasetRenderJob`.
Starting a job validates everything that can be checked cheaply before queuing it — settings
against the service limits, the prompt set's existence, the model reference's shape and
presence — and stores a *normalised* spec (service defaults written in), so a job means the same
thing when it resumes after a restart.  Loading the model itself happens in the job (it can take
minutes for a large checkpoint); a load failure fails the job with FAILED_PRECONDITION.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import json_format

from selma import plugins
from selma.artifacts import ArtifactStore
from selma.batch.kube import validate_placement
from selma.batch.launchers import Launcher, default_launchers
from selma.errors import FailedPrecondition, InvalidArgument, NotFound
from selma.jobs import JobManager, JobPhase, JobRecord
from selma.limits import check_chars
from selma.pipelines import TINY_SCHEME, ModelSpec
from selma.seeds import derive_seed
from selma.storage import open_storage
from selma.v1 import common_pb2, render_service_pb2
from selma_render.dataset import JOB_KIND, DatasetRenderJob, load_prompts, plan_dataset_items, resolve_prompt_set
from selma_render.metrics import IMAGE_SECONDS, IMAGES_RENDERED, QUEUE_LENGTH
from selma_render.renderer import (
    LoadedModel,
    OutOfMemory,
    Renderer,
    ResolvedRender,
    encode_png,
    free_device_memory,
    is_out_of_memory,
)
from selma_render.settings import RenderSettings
from selma_render.shards import ShardedRender
from selma_render.spec import normalized_settings, parse_dataset_spec, parse_render_settings

log = logging.getLogger(__name__)

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass
class PreviewImage:
    """One preview image: PNG bytes and where it came from."""

    png: bytes
    seed: int
    prompt: str
    prompt_index: int
    image_index: int
    width: int
    height: int


@dataclass
class PreviewResult:
    """What Preview returns."""

    images: list[PreviewImage]
    model: LoadedModel
    render: ResolvedRender
    render_seconds: float


def check_idempotency_key(key: str) -> str:
    """1..256 printable ASCII characters, else INVALID_ARGUMENT."""
    if not key:
        raise InvalidArgument("idempotency_key is required, e.g. '<run>/render/<skill>'", field="idempotency_key")
    if len(key) > 256 or not all(" " <= c <= "~" for c in key):
        raise InvalidArgument("idempotency_key must be 1..256 printable ASCII characters", field="idempotency_key")
    return key


def check_model_reference(model: ModelSpec, settings: RenderSettings, *, field: str) -> None:
    """Cheap checks that ``model`` can be loaded at all, so a job is not queued for a model that cannot exist."""
    source = model.source
    if source.startswith(TINY_SCHEME):  # the offline tiny models, built on first load
        name, _, query = source[len(TINY_SCHEME) :].partition("?")
        if name not in ("sd", "sdxl") or (query and not re.fullmatch(r"seed=\d+", query)):
            raise InvalidArgument(f"tiny text-to-image models are tiny://sd and tiny://sdxl (optionally ?seed=N); got {source!r}", field=field)
        return
    resolver = plugins.registry().model_scheme(source)
    if resolver is not None:  # a scheme a plugin registered (selma.pipelines resolves it the same way)
        resolver(source)
        return
    if source.startswith(("s3://", "file://")):
        storage = open_storage(settings, source)
        if not storage.exists("model_index.json"):
            raise NotFound(f"no diffusers pipeline under {source} (model_index.json is missing)", field=field)
        return
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith("."):
        if not path.exists():
            raise NotFound(f"model directory {source} does not exist", field=field)
        if not (path / "model_index.json").is_file():
            raise FailedPrecondition(f"{source} is not a diffusers pipeline directory (no model_index.json)", field=field)
        return
    if not _HUB_ID_RE.match(source) or ".." in source:
        raise InvalidArgument(
            f"model source {source!r} is neither a hub id (org/name), an absolute path, an s3:// prefix nor tiny://sd", field=field
        )
    if settings.hf_offline:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(
            source, "model_index.json", cache_dir=str(settings.resolved_model_cache_dir), revision=model.revision or None
        )
        if not isinstance(cached, str):
            raise FailedPrecondition(
                f"model {source!r} is not in the model cache {settings.resolved_model_cache_dir} and the service is offline "
                "(hf_offline); pre-load it into the cache or point model.source at a local path or s3:// prefix",
                field=field,
            )


class RenderCore:
    """Dataset renders as jobs, and synchronous previews."""

    def __init__(
        self,
        settings: RenderSettings,
        *,
        store: ArtifactStore | None = None,
        renderer: Renderer | None = None,
        launchers: dict[str, Launcher] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or ArtifactStore(open_storage(settings))
        self.renderer = renderer or Renderer(settings)
        # local shard workers of one render run side by side: as many local slots as a render may have shards
        self.launchers = launchers or default_launchers(
            settings.model_copy(update={"batch_max_local_jobs": max(settings.batch_max_local_jobs, settings.render_max_shards)})
        )
        self.sharded = ShardedRender(settings, self.store, self.launchers)
        self.jobs = JobManager(
            self.store.storage,
            JOB_KIND,
            DatasetRenderJob(settings, self.store, self.renderer, sharded=self.sharded),
            max_concurrent=settings.render_max_concurrent_jobs,
            watchdog_seconds=settings.job_watchdog_seconds,
        )
        QUEUE_LENGTH.set_function(self.queue_length)

    # -- lifecycle ------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Load the default model (if configured) so the first request does not wait for it."""
        if self.settings.render_default_model and self.settings.render_preload_default_model:
            cfg = parse_render_settings(render_service_pb2.RenderSettings(), self.settings)
            model = self.renderer.load(cfg, field="render_default_model")
            log.info("default model %s ready on %s (%.1f s)", cfg.model.source, model.device, model.load_seconds)

    def recover(self) -> list[str]:
        """Re-queue the jobs a previous process left unfinished (they resume from stored images)."""
        try:
            return self.jobs.recover()
        except NotFound:  # a fresh bucket that nothing was written to yet: no jobs to recover
            return []

    def shutdown(self, wait: bool = True, timeout: float = 30.0) -> None:
        """Interrupt running jobs at the next batch boundary; they stay resumable."""
        self.jobs.shutdown(wait=wait, timeout=timeout)
        for launcher in self.launchers.values():
            launcher.close()  # the local warm worker (shard workers were stopped above)

    def queue_length(self) -> int:
        """Jobs waiting for a worker."""
        page, _ = self.jobs.list(phases={JobPhase.PENDING}, page_size=1000)
        return len(page)

    # -- dataset renders --------------------------------------------------------------------

    def normalize(self, spec_msg: render_service_pb2.DatasetRenderSpec) -> tuple[render_service_pb2.DatasetRenderSpec, str]:
        """Validate a spec and return it with defaults written in, plus the resolved skill."""
        spec = parse_dataset_spec(spec_msg, self.settings)
        manifest = resolve_prompt_set(self.store, spec.prompt_set)
        check_model_reference(spec.config.model, self.settings, field="spec.settings.model.source")
        skill = spec.skill or manifest.labels.get("selma.dev/skill", "") or str(manifest.parameters.get("skill", "") or "")
        if spec.candidates is not None:  # a gated dataset that does not exist, or a round with nothing left, is refused now
            plan_dataset_items(self.store, load_prompts(self.store, manifest, spec.max_prompts), spec)
        out = render_service_pb2.DatasetRenderSpec()
        out.CopyFrom(spec_msg)
        out.run = spec.run
        out.skill = skill
        out.prompt_set.CopyFrom(common_pb2.ArtifactRef(id=manifest.id, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET, sha256=spec.prompt_set.sha256))
        out.settings.CopyFrom(normalized_settings(spec.config))
        out.shards = spec.shards
        if spec.shards:
            placement = json_format.MessageToDict(spec_msg.placement, preserving_proto_field_name=True)
            launcher = self.sharded.launcher_name(placement)
            validate_placement(placement)  # the proto's ranges hold for every launcher
            self.launchers[launcher].validate(placement)  # Kubernetes: the operator's placement policy
        else:
            out.ClearField("placement")
        return out, skill

    def start(
        self, idempotency_key: str, spec_msg: render_service_pb2.DatasetRenderSpec, *, validate_only: bool = False
    ) -> tuple[JobRecord | None, render_service_pb2.DatasetRenderSpec, bool]:
        """Start (or return, or resume) the render for ``idempotency_key``: (record or None if validate_only, spec, created)."""
        check_idempotency_key(idempotency_key)
        spec, skill = self.normalize(spec_msg)
        if validate_only:
            return None, spec, False
        rec, created = self.jobs.start(
            idempotency_key,
            json_format.MessageToDict(spec, preserving_proto_field_name=True),
            run=spec.run,
            skill=skill,
            labels=dict(spec.labels),
        )
        return rec, spec, created

    # -- previews -----------------------------------------------------------------------------

    def preview(self, prompts: list[str], settings_msg: render_service_pb2.RenderSettings) -> PreviewResult:
        """Render a few prompts synchronously (one pipeline call per image, batch size 1); store nothing."""
        limit = self.settings.render_preview_max_prompts
        if not prompts:
            raise InvalidArgument("prompts must hold at least one prompt", field="prompts")
        if len(prompts) > limit:
            raise InvalidArgument(f"at most SELMA_RENDER_PREVIEW_MAX_PROMPTS={limit} prompts per preview; got {len(prompts)}", field="prompts")
        for i, p in enumerate(prompts):
            check_chars(p, f"prompts[{i}]", self.settings.max_prompt_chars, "max_prompt_chars")
            if not p.strip():
                raise InvalidArgument(f"prompt {i} is empty", field=f"prompts[{i}]")
        cfg = parse_render_settings(settings_msg, self.settings, prefix="settings", batch_size_used=False)
        n_images = len(prompts) * cfg.images_per_prompt
        if n_images > self.settings.render_preview_max_images:
            raise InvalidArgument(
                f"a preview may return at most SELMA_RENDER_PREVIEW_MAX_IMAGES={self.settings.render_preview_max_images} images; "
                f"{len(prompts)} prompts x {cfg.images_per_prompt} images per prompt = {n_images}",
                field="settings.images_per_prompt",
            )
        model = self.renderer.load(cfg, field="settings.model.source")
        r = self.renderer.resolve(model, cfg, prefix="settings")
        images: list[PreviewImage] = []
        t0 = time.perf_counter()
        for p_idx, text in enumerate(prompts):
            for i in range(cfg.images_per_prompt):
                seed = derive_seed(cfg.seed_policy, cfg.base_seed, p_idx, i, cfg.images_per_prompt)
                t = time.perf_counter()
                image = self._generate_one(model, r, text, seed)
                IMAGE_SECONDS.labels("preview").observe(time.perf_counter() - t)
                IMAGES_RENDERED.labels("preview").inc()
                images.append(PreviewImage(encode_png(image), seed, text, p_idx, i, image.width, image.height))
        return PreviewResult(images=images, model=model, render=r, render_seconds=time.perf_counter() - t0)

    def _generate_one(self, model: LoadedModel, r: ResolvedRender, text: str, seed: int):  # noqa: ANN202 - PIL image
        oom = False
        try:
            (image,) = self.renderer.generate(model, r, [text], [seed])
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            oom = True
        if oom:
            free_device_memory(model.device)
            raise OutOfMemory(
                f"the device ran out of memory rendering one {r.width}x{r.height} preview image; lower the resolution or retry later",
                field="settings.diffusion",
            )
        return image
