"""Loading text-to-image pipelines the same way everywhere: render, training and serving.

A model reference is a Hugging Face hub id (``stabilityai/stable-diffusion-2-base``), a local
directory (a tiny pipeline built by ``selma models build-tiny``), or an ``s3://``/``file://``
prefix that is mirrored once into the model cache.  Loading always goes through diffusers'
``AutoPipelineForText2Image.from_pretrained`` with ``use_safetensors=True``: the code path is
identical for a tiny CPU model and SDXL on a GPU; only the reference differs.

Devices and dtypes resolve from the request, then settings (``auto`` = CUDA if present, fp16
on CUDA and fp32 on CPU).  Schedulers are chosen per call and built fresh from the loaded
scheduler's config, because diffusers schedulers are stateful and must not be shared by
concurrent requests.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma import plugins
from selma.config import SelmaSettings
from selma.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

# Scheduler names accepted by the API (the proto enum without its prefix, lower-cased) and
# the diffusers class plus config overrides each stands for.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm_solver_multistep": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


@dataclass(frozen=True)
class ModelSpec:
    """What to load: mirrors ``selma.v1.ModelRef``."""

    source: str
    revision: str = ""
    variant: str = ""
    vae_source: str = ""

    def __post_init__(self) -> None:
        if not self.source or not self.source.strip():
            raise InvalidArgument("model source is empty; give a hub id, a local path or an s3:// prefix", field="model.source")


def resolve_device(requested: str, settings: SelmaSettings) -> torch.device:
    """``requested`` ("" = settings) → a torch device; FailedPrecondition if CUDA is asked for but absent."""
    import torch

    name = (requested or settings.device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"device {name!r} requested but CUDA is not available on this node; use cpu or schedule on a GPU node", field="device")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise InvalidArgument(f"device must be auto, cpu, cuda or cuda:N; got {name!r}", field="device")


def resolve_dtype(requested: str, device: torch.device, settings: SelmaSettings) -> torch.dtype:
    """``requested`` in {"", auto, fp32, fp16, bf16} → a torch dtype (fp16 is refused on CPU)."""
    import torch

    name = (requested or settings.precision or "auto").lower()
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise InvalidArgument(f"precision must be auto, fp32, fp16 or bf16; got {name!r}", field="precision")
    if name == "fp16" and device.type == "cpu":
        raise InvalidArgument("fp16 is not supported on CPU; use fp32 or bf16", field="precision")
    return table[name]


TINY_SCHEME = "tiny://"
TINY_COMPONENTS = ("sd", "sdxl", "lm")


def tiny_model_path(source: str, settings: SelmaSettings) -> Path:
    """``tiny://sd`` / ``tiny://sdxl`` / ``tiny://lm`` (optionally ``?seed=N``): the offline tiny models.

    They are built on first use, deterministically, under ``<model_cache_dir>/tiny/seed-N`` —
    the embedded default that lets a laptop or CI run every stage with no download.
    """
    from selma.models.tiny import build_tiny

    rest = source[len(TINY_SCHEME) :]
    name, _, query = rest.partition("?")
    seed = 0
    if query:
        key, _, value = query.partition("=")
        if key != "seed" or not value.isdigit():
            raise InvalidArgument(f"tiny model reference {source!r}: only ?seed=N is understood", field="model.source")
        seed = int(value)
    if name not in TINY_COMPONENTS:
        raise InvalidArgument(f"unknown tiny model {name!r}; use tiny://sd, tiny://sdxl or tiny://lm", field="model.source")
    from selma.models._hf import no_progress_bars

    with no_progress_bars():  # builds models: under the process's model-loading lock
        models = build_tiny(settings.resolved_model_cache_dir / "tiny" / f"seed-{seed}", seed=seed)
    return getattr(models, name)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def mirror_model(source: str, settings: SelmaSettings, *, marker: str, kind: str, field: str) -> Path:
    """A model stored under an ``s3://`` / ``file://`` prefix, copied once into ``<model_cache_dir>/mirror/<sha>/``.

    The copy is published by an atomic rename, so a crashed copy is never used; pickled weight
    files are never fetched, let alone loaded.  ``marker`` is the file that makes the directory a
    model of ``kind`` (``model_index.json`` for a diffusers pipeline, ``config.json`` for a
    transformers model): NotFound when the prefix is empty, FailedPrecondition when it has no marker.
    """
    from selma.storage import open_storage

    cache = settings.resolved_model_cache_dir / "mirror" / hashlib.sha256(source.encode()).hexdigest()[:24]
    if (cache / marker).is_file():
        return cache
    storage = open_storage(settings, source)
    objects = [o for o in storage.list("") if not o.key.endswith(PICKLE_SUFFIXES)]
    if not objects:
        raise NotFound(f"no model files under {source}", field=field)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    for obj in objects:
        storage.download_file(obj.key, tmp / obj.key)
    if not (tmp / marker).is_file():
        raise FailedPrecondition(f"{source} is not a {kind} (no {marker})", field=field)
    try:
        tmp.rename(cache)
    except OSError:
        if not (cache / marker).is_file():
            raise
    return cache


def materialize(source: str, settings: SelmaSettings) -> str:
    """A reference from_pretrained can take: local dirs as-is, storage prefixes mirrored into the cache.

    ``tiny://sd`` and friends resolve to the offline tiny models (see :func:`tiny_model_path`), and a
    scheme a plugin registered (:mod:`selma.plugins`, e.g. ``shapesworld://base``) to its directory.

    ``s3://bucket/prefix`` and ``file:///dir`` are copied once into
    ``<model_cache_dir>/mirror/<sha>/`` (published by an atomic rename, so a crashed copy is
    never used); anything else is returned unchanged and treated as a hub id.
    """
    if source.startswith(TINY_SCHEME):
        return str(tiny_model_path(source, settings))
    resolver = plugins.registry().model_scheme(source)
    if resolver is not None:
        return str(resolver(source))
    if source.startswith(("s3://", "file://")):
        return str(mirror_model(source, settings, marker="model_index.json", kind="diffusers pipeline", field="model.source"))
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith("."):
        if not path.exists():
            raise NotFound(f"model directory {source} does not exist", field="model.source")
        return str(path)
    return source


_imported = threading.Event()


def import_libraries() -> None:
    """Import diffusers (and with it transformers) once, timed as the ``imports`` start-up phase.

    Services call this before they start timing a model load, so their model-load metrics
    measure loading only (the first load used to include ~a minute of imports on a busy box).
    """
    if _imported.is_set():
        return
    from selma.metrics import STARTUP_PHASE_SECONDS

    t0 = time.perf_counter()
    import diffusers  # noqa: F401
    import diffusers.pipelines.auto_pipeline  # noqa: F401 - the lazy module AutoPipelineForText2Image lives in

    if not _imported.is_set():
        _imported.set()
        STARTUP_PHASE_SECONDS.labels("imports").set(time.perf_counter() - t0)


def load_pipeline(spec: ModelSpec, settings: SelmaSettings, *, device: str = "", precision: str = "") -> DiffusionPipeline:
    """Load a text-to-image pipeline (safetensors only) onto the resolved device and dtype."""
    import_libraries()
    from diffusers import AutoencoderKL, AutoPipelineForText2Image
    from diffusers.utils import logging as diffusers_logging

    from selma.metrics import STARTUP_PHASE_SECONDS
    from selma.models._hf import no_progress_bars

    dev = resolve_device(device, settings)
    dtype = resolve_dtype(precision, dev, settings)
    t_mat = time.perf_counter()
    ref = materialize(spec.source, settings)
    STARTUP_PHASE_SECONDS.labels("model_materialize").inc(time.perf_counter() - t_mat)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "cache_dir": str(settings.resolved_model_cache_dir),
        "local_files_only": settings.hf_offline,
    }
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.variant:
        kwargs["variant"] = spec.variant
    t0 = time.perf_counter()
    diffusers_logging.disable_progress_bar()  # services log instead; bars would flood pod logs
    try:
        if spec.vae_source:
            kwargs["vae"] = AutoencoderKL.from_pretrained(materialize(spec.vae_source, settings), **{k: v for k, v in kwargs.items() if k != "variant"})
        with no_progress_bars():
            pipe = AutoPipelineForText2Image.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as e:
        raise FailedPrecondition(f"cannot load model {spec.source!r}: {e}", field="model.source") from e
    if hasattr(pipe, "safety_checker") and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # research setting; callers filter outputs if they need to
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s (%s) on %s/%s in %.2f s", spec.source, type(pipe).__name__, dev, str(dtype).removeprefix("torch."), time.perf_counter() - t0)
    return pipe


def make_scheduler(pipe: DiffusionPipeline, name: str = "") -> Any:
    """A fresh scheduler for one call: ``name`` from :data:`SCHEDULERS`, "" = the model's own."""
    import diffusers

    if not name:
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    key = name.lower().removeprefix("scheduler_")
    if key not in SCHEDULERS:
        raise InvalidArgument(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}", field="scheduler")
    cls_name, overrides = SCHEDULERS[key]
    overrides = dict(overrides)
    if key in ("ddim", "ddpm") and "clip_sample" not in pipe.scheduler.config:
        # Latent-diffusion checkpoints whose own scheduler has no clip_sample (PNDM, Euler) must
        # not inherit DDIM/DDPM's pixel-space default of clipping x0 to [-1, 1].
        overrides["clip_sample"] = False
    return getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)


class TokenizerPool:
    """Private tokenizer copies for concurrent calls of one pipeline's components.

    A Hugging Face *fast* tokenizer is not safe to share between threads: every call first sets
    the Rust tokenizer's padding/truncation state and then encodes.  A diffusers pipeline calls
    its tokenizer twice per prompt with different settings (padded to ``model_max_length``, then
    ``padding="longest"`` to detect truncation), so two concurrent requests can encode with each
    other's settings: no error, just different prompt embeddings and a different image.  Each
    borrower gets copies no other thread holds; copies return to the pool for reuse, so a copy is
    made only when more calls run at once than ever before.
    """

    def __init__(self, components: dict[str, Any]) -> None:
        self._originals = {k: v for k, v in components.items() if k.startswith("tokenizer") and v is not None}
        self._free: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[dict[str, Any]]:
        """Tokenizer components (``tokenizer``, ``tokenizer_2``...) for one call's exclusive use."""
        import copy

        with self._lock:
            held = self._free.pop() if self._free else None
            if held is None:
                # deepcopy under the lock: copying reads the originals' state, which nobody else mutates
                held = {k: copy.deepcopy(v) for k, v in self._originals.items()}
        try:
            yield held
        finally:
            with self._lock:
                self._free.append(held)


class PipelineCache:
    """Loaded pipelines reused across requests, LRU-bounded by count; one load per key at a time."""

    def __init__(self, settings: SelmaSettings, max_models: int = 2) -> None:
        self.settings = settings
        self.max_models = max_models
        self._models: OrderedDict[tuple, DiffusionPipeline] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}

    def get(self, spec: ModelSpec, *, device: str = "", precision: str = "") -> DiffusionPipeline:
        dev = resolve_device(device, self.settings)
        key = (spec, str(dev), str(resolve_dtype(precision, dev, self.settings)))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            pipe = load_pipeline(spec, self.settings, device=device, precision=precision)
            with self._lock:
                self._models[key] = pipe
                while len(self._models) > self.max_models:
                    old, _ = self._models.popitem(last=False)
                    log.info("evicted %s from the pipeline cache", old[0].source)
                self._loading.pop(key, None)
            return pipe

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
