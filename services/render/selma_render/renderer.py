"""Text-to-image rendering on loaded diffusers pipelines: one pipeline call per batch, one seed per image.

Models come from :class:`selma.pipelines.PipelineCache` (hub id, local path or mirrored ``s3://``
prefix; safetensors only) and stay loaded across requests.  A cached pipeline is never mutated:
each call builds a *view* — the same pipeline class over the same modules (weights shared, no
copy) with a fresh scheduler of the requested kind — because diffusers schedulers carry
per-call state and the cached pipeline may be used by a preview and a job at once.  SD 2
v-prediction and other model specifics travel in the scheduler config the view is built from.

Reproducibility: every image gets its own CPU ``torch.Generator`` seeded with its own seed
(diffusers accepts one generator per batch element), so its initial noise — and any noise an
ancestral sampler adds — does not depend on the other images in the batch or on the device.
Batched kernels may still round differently for different batch sizes, so bit-identical
re-renders need the same batch composition; the dataset job plans batches deterministically
(see :mod:`selma_render.dataset`).  At most ``render_device_concurrency`` calls run on one device
at once (default 1: a preview waits for the current batch instead of competing for accelerator
memory).  On CPU, where a call runs on ``OMP_NUM_THREADS`` threads (1 under ``selma up``), more
lets datasets rendering concurrently (``render_max_concurrent_jobs``) use more cores; concurrent
calls get private tokenizer copies (:class:`selma.pipelines.TokenizerPool`).
"""

from __future__ import annotations

import gc
import inspect
import io
import logging
import re
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from selma.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, SelmaError
from selma.pipelines import SCHEDULERS, ModelSpec, PipelineCache, TokenizerPool, import_libraries, make_scheduler
from selma_render.metrics import MODEL_LOAD_SECONDS
from selma_render.settings import RenderSettings
from selma_render.spec import RenderConfig

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from PIL.Image import Image

log = logging.getLogger(__name__)

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SNAPSHOT_RE = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")


@dataclass
class LoadedModel:
    """A pipeline from the cache plus what was resolved while loading it."""

    pipe: DiffusionPipeline
    spec: ModelSpec
    resolved: ModelSpec  # revision pinned to a commit where the hub cache reveals it
    device: torch.device
    dtype: torch.dtype
    load_seconds: float  # 0 when it came from the cache
    lock: threading.BoundedSemaphore  # bounds the pipeline calls running on this device at once


@dataclass(frozen=True)
class ResolvedRender:
    """The concrete sampling parameters of a render on one model (model defaults filled in)."""

    scheduler: str  # a SCHEDULERS key, or the scheduler class name if the model ships another kind
    scheduler_key: str  # what make_scheduler gets: "" = the model's own scheduler
    steps: int
    guidance_scale: float | None  # None: the pipeline takes no guidance scale
    width: int
    height: int
    negative_prompt: str


class OutOfMemory(ResourceExhausted):
    """The device ran out of memory even at batch size 1 (RESOURCE_EXHAUSTED; job error reason ``OutOfMemory``)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and for any RuntimeError reporting "out of memory" (MPS, XPU, cuDNN)."""
    import torch

    cuda_oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if cuda_oom is not None and isinstance(exc, cuda_oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_device_memory(device: torch.device) -> None:
    """Return cached blocks to the device after an out-of-memory error, before retrying smaller."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def encode_png(image: Image) -> bytes:
    """PNG bytes (RGB, 8 bits per channel); deterministic for equal pixels (no timestamps or text chunks)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scheduler_key_of(scheduler: Any) -> str:
    """The :data:`SCHEDULERS` key of a scheduler instance, or its class name if it has none."""
    name = type(scheduler).__name__
    for key, (cls_name, _) in SCHEDULERS.items():
        if cls_name == name:
            return key
    return name


def native_size(pipe: DiffusionPipeline) -> int:
    """The model's native image side in pixels (sample size × VAE scale factor)."""
    vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    sample = getattr(pipe, "default_sample_size", None)
    if not sample:
        for name in ("unet", "transformer"):
            module = getattr(pipe, name, None)
            sample = getattr(getattr(module, "config", None), "sample_size", None)
            if sample:
                break
    if isinstance(sample, list | tuple):
        sample = sample[0]
    return int(sample) * vae_scale if sample else 512


def _pinned(spec: ModelSpec, pipe: DiffusionPipeline) -> ModelSpec:
    """``spec`` with the revision replaced by the commit the hub cache loaded, when visible."""
    if spec.revision and _COMMIT_RE.fullmatch(spec.revision):
        return spec
    for name in ("unet", "transformer", "vae"):
        path = str(getattr(getattr(getattr(pipe, name, None), "config", None), "_name_or_path", "") or "")
        m = _SNAPSHOT_RE.search(path)
        if m:
            return ModelSpec(source=spec.source, revision=m.group(1), variant=spec.variant, vae_source=spec.vae_source)
    return spec


class Renderer:
    """Loads models (cached) and renders batches of (prompt, seed) pairs."""

    def __init__(self, settings: RenderSettings, cache: PipelineCache | None = None) -> None:
        self.settings = settings
        self.cache = cache or PipelineCache(settings, max_models=settings.render_max_models)
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()
        self._locks: dict[str, threading.BoundedSemaphore] = {}
        self._tokenizers: weakref.WeakKeyDictionary[Any, TokenizerPool] = weakref.WeakKeyDictionary()
        self._guard = threading.Lock()

    def _device_lock(self, device: torch.device) -> threading.BoundedSemaphore:
        with self._guard:
            if str(device) not in self._locks:
                self._locks[str(device)] = threading.BoundedSemaphore(self.settings.render_device_concurrency)
            return self._locks[str(device)]

    def _tokenizer_pool(self, pipe: Any) -> TokenizerPool:
        with self._guard:
            if pipe not in self._tokenizers:
                self._tokenizers[pipe] = TokenizerPool(pipe.components)
            return self._tokenizers[pipe]

    def load(self, cfg: RenderConfig, *, field: str = "settings.model.source") -> LoadedModel:
        """The pipeline for ``cfg.model`` on ``cfg.device``/``cfg.precision``, loading it on a cache miss.

        Any failure to load is FAILED_PRECONDITION with the reason (NotFound for a missing path,
        InvalidArgument for a bad device or precision pass through unchanged).
        """
        import_libraries()  # start-up, not model loading (selma_startup_phase_seconds)
        t0 = time.perf_counter()
        try:
            pipe = self.cache.get(cfg.model, device=cfg.device, precision=cfg.precision)
        except SelmaError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a broken checkpoint raises, the caller must learn why
            log.warning("loading %s failed", cfg.model.source, exc_info=True)
            raise FailedPrecondition(f"cannot load model {cfg.model.source!r}: {type(e).__name__}: {e}", field=field) from e
        seconds = time.perf_counter() - t0
        if pipe in self._seen:
            seconds = 0.0
        else:
            self._seen.add(pipe)
            MODEL_LOAD_SECONDS.observe(seconds)
        if "prompt" not in inspect.signature(pipe.__call__).parameters:
            raise FailedPrecondition(f"model {cfg.model.source!r} ({type(pipe).__name__}) is not a text-to-image pipeline", field=field)
        return LoadedModel(
            pipe=pipe,
            spec=cfg.model,
            resolved=_pinned(cfg.model, pipe),
            device=pipe.device,
            dtype=pipe.dtype,
            load_seconds=seconds,
            lock=self._device_lock(pipe.device),
        )

    def resolve(self, model: LoadedModel, cfg: RenderConfig, *, prefix: str = "settings") -> ResolvedRender:
        """Fill in the model's defaults: scheduler, guidance scale and native resolution."""
        pipe = model.pipe
        scheduler = make_scheduler(pipe, cfg.scheduler)  # validates the name; cheap
        params = inspect.signature(pipe.__call__).parameters
        guidance: float | None = cfg.guidance_scale
        if "guidance_scale" not in params:
            guidance = None
        elif guidance is None:
            default = params["guidance_scale"].default
            guidance = float(default) if isinstance(default, int | float) else None
        side = native_size(pipe)
        width, height = cfg.width or side, cfg.height or side
        model_max = int(self.settings.render_max_size_factor * side) // 8 * 8
        for name, value in (("width", width), ("height", height)):
            if value > self.settings.render_max_resolution:
                raise InvalidArgument(
                    f"the model's native {name} {value} is above this service's maximum "
                    f"SELMA_RENDER_MAX_RESOLUTION={self.settings.render_max_resolution}; ask for a smaller {name}",
                    field=f"{prefix}.diffusion.{name}",
                )
            if value > model_max:
                raise InvalidArgument(
                    f"{name} {value} is over this model's maximum {model_max} "
                    f"(SELMA_RENDER_MAX_SIZE_FACTOR={self.settings.render_max_size_factor:g} x its native {side})",
                    field=f"{prefix}.diffusion.{name}",
                )
        return ResolvedRender(
            scheduler=scheduler_key_of(scheduler),
            scheduler_key=cfg.scheduler,
            steps=cfg.steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            negative_prompt=cfg.negative_prompt,
        )

    @staticmethod
    def pipeline_view(pipe: DiffusionPipeline, scheduler_key: str, tokenizers: dict[str, Any] | None = None) -> DiffusionPipeline:
        """The same pipeline class over the cached modules with a fresh scheduler (weights shared) and,
        for concurrent calls, ``tokenizers`` no other call holds."""
        params = inspect.signature(type(pipe).__init__).parameters
        kwargs: dict[str, Any] = {k: v for k, v in {**pipe.components, **(tokenizers or {})}.items() if k in params}
        for name in params:  # non-module constructor options recorded in the config (e.g. force_zeros_for_empty_prompt)
            if name not in kwargs and name != "self" and name in pipe.config and not isinstance(pipe.config[name], list | tuple):
                kwargs[name] = pipe.config[name]
        if "requires_safety_checker" in params and kwargs.get("safety_checker") is None:
            kwargs["requires_safety_checker"] = False
        kwargs["scheduler"] = make_scheduler(pipe, scheduler_key)
        view = type(pipe)(**kwargs)
        view.set_progress_bar_config(disable=True)
        return view

    def generate(self, model: LoadedModel, r: ResolvedRender, prompts: list[str], seeds: list[int]) -> list[Image]:
        """One pipeline call: image ``i`` is rendered from ``prompts[i]`` with a generator seeded ``seeds[i]``.

        Out-of-memory errors propagate (see :func:`is_out_of_memory`); the caller retries smaller.
        """
        import torch

        if len(prompts) != len(seeds) or not prompts:
            raise ValueError("generate needs one seed per prompt and at least one prompt")
        # CPU generators: the same seed gives the same initial noise on every device.
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        kwargs: dict[str, Any] = {
            "prompt": list(prompts),
            "num_inference_steps": r.steps,
            "width": r.width,
            "height": r.height,
            "generator": generators,
            "num_images_per_prompt": 1,
            "output_type": "pil",
        }
        if r.guidance_scale is not None:
            kwargs["guidance_scale"] = r.guidance_scale
        if r.negative_prompt:
            kwargs["negative_prompt"] = [r.negative_prompt] * len(prompts)
        with model.lock, self._tokenizer_pool(model.pipe).borrow() as tokenizers, torch.inference_mode():
            out = self.pipeline_view(model.pipe, r.scheduler_key, tokenizers)(**kwargs)
        images = list(out.images)
        if len(images) != len(prompts):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(prompts)} prompts")
        return images
