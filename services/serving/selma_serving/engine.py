"""Generation: one base pipeline, fused UNet copies per model or expert mix, a bounded request queue.

Concurrency model.  The base pipeline is loaded once and never mutated: no adapter is ever
injected into it.  A merged model or a per-request mix is *fused* into a UNet copy that shares
every untouched parameter with the base UNet and owns new tensors only for the adapted
modules (zero LoRA overhead at inference, and memory proportional to the adapted weights).
Each image runs through a fresh pipeline view (the base components, the request's UNet, a
new scheduler and tokenizers no other request holds: fast tokenizers keep padding state between
calls), so concurrent requests share no mutable state and each produces exactly the image it
would produce alone.  Fused mixes live in an LRU cache bounded by bytes and keyed by
the resolved merge (experts, weights, method, density, seed).

Admission: at most ``serving_max_concurrent`` requests hold a generation slot and at most
``serving_max_queue`` wait for one; beyond that a request is refused (ResourceExhausted).
Waiting honours the request's deadline and cancellation, and so does denoising (checked
after every step).
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from selma.errors import Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument, ResourceExhausted
from selma.limits import check_chars, check_items
from selma.pipelines import ModelSpec, TokenizerPool, import_libraries, load_pipeline, make_scheduler
from selma.seeds import SeedPolicy, derive_seed
from selma_serving import metrics
from selma_serving.lora import BaseModelId, ExpertCache, check_against_unet, check_tensor_values
from selma_serving.merge import MergeParams, ResolvedMerge, merge, resolve
from selma_serving.settings import ServingSettings

if TYPE_CHECKING:
    from selma_serving.registry import ModelRegistry

log = logging.getLogger(__name__)

SEED_POLICIES = tuple(p.value for p in SeedPolicy)  # GenerationRequest.seed_policy values


def fused_copy(
    base_unet: torch.nn.Module,
    deltas: dict[str, torch.Tensor] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    *,
    max_abs: float = math.inf,
    what: str = "the adapter",
) -> tuple[torch.nn.Module, int]:
    """A UNet equal to ``base_unet`` with ``deltas`` added (fp32, then cast) or ``weights`` replacing
    the named modules' weights.  Untouched parameters and buffers are shared, never copied; the
    base is not modified.  Returns (unet, bytes of the new tensors).

    The probe before anything is built: every delta finite and at most ``max_abs`` in magnitude,
    every replacement weight finite (FAILED_PRECONDITION naming ``what`` and the tensor); a model
    that would only ever produce NaN/black images is refused rather than served."""
    deltas = deltas or {}
    weights = weights or {}
    check_against_unet({n: tuple(d.shape) for n, d in itertools.chain(deltas.items(), weights.items())}, base_unet, what=what)
    check_tensor_values(deltas, what=f"{what} (merged weight deltas)", max_abs=max_abs)
    check_tensor_values(weights, what=f"{what} (fused weights)")
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(base_unet.parameters(), base_unet.buffers())}
    unet = copy.deepcopy(base_unet, memo)
    nbytes = 0
    with torch.no_grad():
        for name, value in itertools.chain(deltas.items(), weights.items()):
            mod = unet.get_submodule(name)
            w = mod.weight
            if name in deltas:
                new = (w.detach().float() + value.to(device=w.device, dtype=torch.float32)).to(w.dtype)
            else:
                new = value.to(device=w.device, dtype=w.dtype).clone()
            mod.weight = torch.nn.Parameter(new, requires_grad=False)  # replaces the shared one on the copy only
            nbytes += new.numel() * new.element_size()
    return unet, nbytes


class FusedCache:
    """LRU of fused UNets bounded by bytes; one build per key at a time (others wait for it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[torch.nn.Module, int]] = OrderedDict()
        self._building: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()
        self.bytes = 0

    def get(self, key: Hashable, build: Callable[[], tuple[torch.nn.Module, int]]) -> tuple[torch.nn.Module, bool]:
        """(value, hit): the cached UNet for ``key``, or ``build()``'s, cached if it fits."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    metrics.MERGE_CACHE_HITS.inc()
                    return self._items[key][0], True
                pending = self._building.get(key)
                if pending is None:
                    self._building[key] = threading.Event()
                    break
            pending.wait()  # another request is building this mix; reuse its result
        metrics.MERGE_CACHE_MISSES.inc()
        try:
            value, nbytes = build()
            with self._lock:
                if nbytes <= self.max_bytes:
                    self._items[key] = (value, nbytes)
                    self.bytes += nbytes
                    while self.bytes > self.max_bytes and self._items:
                        _, (_, freed) = self._items.popitem(last=False)  # in-flight users keep their reference
                        self.bytes -= freed
                metrics.MERGE_CACHE_BYTES.set(self.bytes)
            return value, False
        finally:
            with self._lock:
                self._building.pop(key).set()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0
            metrics.MERGE_CACHE_BYTES.set(0)

    def __len__(self) -> int:
        return len(self._items)


class Admission:
    """Generation slots plus a bounded waiting line."""

    def __init__(self, max_concurrent: int, max_queue: int) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.running = 0
        self.waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def slot(self, *, deadline: float | None = None, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold a slot for the block; ResourceExhausted if the line is full, Cancelled/DeadlineExceeded while waiting."""
        with self._cond:
            if self.running >= self.max_concurrent or self.waiting:
                if self.waiting >= self.max_queue:
                    metrics.REJECTED.inc()
                    raise ResourceExhausted(
                        f"the server is busy ({self.running} generating, {self.waiting} waiting, queue limit {self.max_queue}); retry later"
                    )
                self.waiting += 1
                metrics.QUEUE_DEPTH.set(self.waiting)
                self._cond.notify_all()  # lets observers (tests, drains) see the new waiter
                try:
                    while self.running >= self.max_concurrent:
                        if cancel is not None and cancel.is_set():
                            raise Cancelled("the request was cancelled while queued")
                        remaining = None if deadline is None else deadline - time.monotonic()
                        if remaining is not None and remaining <= 0:
                            raise DeadlineExceeded("the deadline passed while the request was queued")
                        # Bounded waits: a cancel callback notifies, the bound covers a missed wake-up.
                        self._cond.wait(timeout=1.0 if remaining is None else min(remaining, 1.0))
                finally:
                    self.waiting -= 1
                    metrics.QUEUE_DEPTH.set(self.waiting)
            self.running += 1
            metrics.IN_FLIGHT.set(self.running)
        try:
            yield
        finally:
            with self._cond:
                self.running -= 1
                metrics.IN_FLIGHT.set(self.running)
                self._cond.notify_all()

    def wake(self) -> None:
        """Let waiters re-check their cancel flags now."""
        with self._cond:
            self._cond.notify_all()


@dataclass
class GenerationRequest:
    """A Generate call in domain terms (mirrors ``selma.v1.GenerateRequest``)."""

    prompts: list[str]
    negative_prompt: str = ""
    steps: int = 0
    guidance_scale: float | None = None
    width: int = 0
    height: int = 0
    scheduler: str = ""
    images_per_prompt: int = 0
    seed: int | None = None
    seed_policy: str = "derived"
    model_name: str = ""
    merge: MergeParams | None = None


@dataclass(frozen=True)
class ServedInfo:
    """The model that actually produced an image."""

    model_name: str
    base_model: BaseModelId
    merge: ResolvedMerge | None
    merge_dict: dict[str, Any] | None
    fused: bool
    cache_hit: bool
    kind: str  # metrics label: base, registered or mix


@dataclass
class GeneratedImage:
    """One image with everything needed to reproduce it."""

    png: bytes
    seed: int
    prompt: str
    prompt_index: int
    image_index: int
    width: int
    height: int
    index: int
    total: int
    seconds: float
    served: ServedInfo = field(repr=False)


class Engine:
    """The base pipeline and everything that generates with it."""

    def __init__(self, settings: ServingSettings, experts: ExpertCache) -> None:
        self.settings = settings
        self.experts = experts
        self.base_id = BaseModelId(settings.serving_base_model.rstrip("/"), settings.serving_base_revision, settings.serving_base_variant)
        self.pipe: Any = None
        self.cache = FusedCache(settings.serving_merge_cache_bytes)
        self.admission = Admission(settings.serving_max_concurrent, settings.serving_max_queue)
        self.registry: ModelRegistry | None = None
        self._load_lock = threading.Lock()
        self._view_kwargs: dict[str, Any] = {}
        self._tokenizers: TokenizerPool | None = None

    # --- base model

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def load_base(self) -> None:
        """Load the base pipeline once (safetensors only); the service is SERVING only afterwards."""
        with self._load_lock:
            if self.pipe is not None:
                return
            if not self.base_id.source:
                raise FailedPrecondition("no base model configured; set SELMA_SERVING_BASE_MODEL", field="serving_base_model")
            import_libraries()  # start-up, not model loading (selma_startup_phase_seconds)
            t0 = time.perf_counter()
            pipe = load_pipeline(
                ModelSpec(self.base_id.source, self.base_id.revision, self.base_id.variant, self.settings.serving_base_vae),
                self.settings,
            )
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    module.requires_grad_(False)
                    module.eval()
            # Views must be built like the base: pass its registered init options (e.g. SDXL's
            # force_zeros_for_empty_prompt), and never ask for the safety checker it was loaded without.
            params = inspect.signature(type(pipe).__init__).parameters
            self._view_kwargs = {k: pipe.config[k] for k in params if k not in pipe.components and k != "self" and k in pipe.config}
            if "requires_safety_checker" in params:
                self._view_kwargs["requires_safety_checker"] = False
            self._tokenizers = TokenizerPool(pipe.components)
            self.pipe = pipe
            metrics.MODEL_LOAD_SECONDS.labels("base").observe(time.perf_counter() - t0)
            log.info("base model %s ready", self.base_id)

    def _require_pipe(self) -> Any:
        if self.pipe is None:
            raise FailedPrecondition("the base model is not loaded yet; wait for SERVING")
        return self.pipe

    @property
    def base_unet(self) -> torch.nn.Module:
        return self._require_pipe().unet

    def check_base(self, base: BaseModelId, what: str) -> None:
        """Adapters must belong to the served base model."""
        if base != self.base_id:
            raise FailedPrecondition(f"{what} was trained on {base}, but this service serves {self.base_id}", field="experts")

    # --- per-request mixes

    def mix_unet(self, params: MergeParams) -> tuple[torch.nn.Module, ResolvedMerge, bool]:
        """The fused UNet for a per-request expert mix: (unet, resolved merge, cache hit)."""
        adapters = [self.experts.get(e.ref, field_name=f"experts[{i}].expert_id") for i, e in enumerate(params.experts)]
        rm = resolve(params, adapters, default_density=self.settings.serving_default_density,
                     max_weight=self.settings.serving_max_merge_weight)
        for a in adapters:
            self.check_base(a.base_model, f"expert {a.id}")
        if rm.method == "mean_delta" and rm.output_rank == 0:
            rm = replace(rm, fuse=True)  # the exact LoRA and the fused delta are the same model
        base_unet = self.base_unet
        check_against_unet({n: m.weight_shape for n, m in adapters[0].modules.items()}, base_unet, what=f"expert {adapters[0].id}")

        def build() -> tuple[torch.nn.Module, int]:
            t0 = time.perf_counter()
            result = merge(adapters, rm)
            unet, nbytes = fused_copy(base_unet, deltas=result.effective_deltas(), max_abs=self.settings.serving_max_adapter_value,
                                      what=f"the mix of {', '.join(rm.expert_ids)}")
            metrics.MERGE_SECONDS.labels("request").observe(time.perf_counter() - t0)
            return unet, nbytes

        unet, hit = self.cache.get(rm, build)
        return unet, rm, hit

    # --- generation

    def native_size(self) -> int:
        pipe = self._require_pipe()
        return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))

    def default_guidance(self) -> float:
        return 5.0 if "XL" in type(self._require_pipe()).__name__ else 7.5

    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """Check limits and fill defaults (INVALID_ARGUMENT naming the field)."""
        s = self.settings
        if not req.prompts:
            raise InvalidArgument("give at least one prompt", field="prompts")
        check_items(len(req.prompts), "prompts", s.serving_max_prompts, "serving_max_prompts", "prompts")
        # characters first (cheap), then tokens: nothing unbounded ever reaches the tokenizer
        for i, p in enumerate(req.prompts):
            check_chars(p, f"prompts[{i}]", s.max_prompt_chars, "max_prompt_chars")
            if not p or not p.strip():
                raise InvalidArgument(f"prompts[{i}] is empty", field=f"prompts[{i}]")
        check_chars(req.negative_prompt, "diffusion.negative_prompt", s.max_prompt_chars, "max_prompt_chars")
        for i, p in enumerate(req.prompts):
            self.check_prompt_tokens(p, f"prompts[{i}]")
        if req.negative_prompt:
            self.check_prompt_tokens(req.negative_prompt, "diffusion.negative_prompt")
        ipp = req.images_per_prompt or 1
        if not 1 <= ipp <= s.serving_max_images_per_prompt:
            raise InvalidArgument(
                f"images_per_prompt must be 1..SELMA_SERVING_MAX_IMAGES_PER_PROMPT={s.serving_max_images_per_prompt}; got {req.images_per_prompt}",
                field="images_per_prompt",
            )
        steps = req.steps or min(50, s.serving_max_steps)  # 0 = 50, within a lower configured limit
        if not 1 <= steps <= s.serving_max_steps:
            raise InvalidArgument(f"diffusion.steps must be 1..SELMA_SERVING_MAX_STEPS={s.serving_max_steps}; got {req.steps}", field="diffusion.steps")
        guidance = self.default_guidance() if req.guidance_scale is None else req.guidance_scale
        if not math.isfinite(guidance) or not 0 <= guidance <= 30:
            raise InvalidArgument(f"diffusion.guidance_scale must be in [0, 30]; got {req.guidance_scale}", field="diffusion.guidance_scale")
        native = self.native_size()
        # the model's own maximum: a denoising step costs ~size² (attention more), and cancellation is checked per step
        model_max = int(s.serving_max_size_factor * native) // 8 * 8
        size = {}
        for name in ("width", "height"):
            v = getattr(req, name) or native
            if v < 8 or v % 8 or v > s.serving_max_resolution:
                raise InvalidArgument(
                    f"diffusion.{name} must be a multiple of 8 up to SELMA_SERVING_MAX_RESOLUTION={s.serving_max_resolution}; got {getattr(req, name)}",
                    field=f"diffusion.{name}",
                )
            if v > model_max:
                raise InvalidArgument(
                    f"diffusion.{name} {v} is over this model's maximum {model_max} "
                    f"(SELMA_SERVING_MAX_SIZE_FACTOR={s.serving_max_size_factor:g} x its native {native})",
                    field=f"diffusion.{name}",
                )
            size[name] = v
        if req.seed_policy not in SEED_POLICIES:
            raise InvalidArgument(f"unknown seed policy {req.seed_policy!r}", field="seed_policy")
        if req.seed is not None and not 0 <= req.seed < 2**63:
            raise InvalidArgument(f"seed must be in [0, 2^63); got {req.seed}", field="seed")
        if req.model_name and req.merge is not None:
            raise InvalidArgument("give model_name or experts, not both", field="model")
        make_scheduler(self._require_pipe(), req.scheduler)  # InvalidArgument for an unknown scheduler
        return replace(
            req,
            images_per_prompt=ipp,
            steps=steps,
            guidance_scale=guidance,
            width=size["width"],
            height=size["height"],
            seed=secrets.randbits(63) if req.seed is None else req.seed,
        )

    def check_prompt_tokens(self, prompt: str, fld: str) -> None:
        """At most ``serving_max_prompt_tokens`` tokens of the base pipeline's (first) tokenizer."""
        tokenizer = getattr(self._require_pipe(), "tokenizer", None)
        if tokenizer is None:
            return
        n = len(tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"])
        check_items(n, fld, self.settings.serving_max_prompt_tokens, "serving_max_prompt_tokens", "tokens")

    def resolve_model(self, req: GenerationRequest) -> tuple[torch.nn.Module, ServedInfo]:
        if req.model_name and req.model_name != "base":
            if self.registry is None:
                raise FailedPrecondition("no model registry configured")
            unet, entry, held = self.registry.unet_and_hit(req.model_name)  # held: the "cache hit" of a registered model
            return unet, ServedInfo(req.model_name, self.base_id, None, entry.merge, True, held, "registered")
        if req.merge is not None:
            unet, rm, hit = self.mix_unet(req.merge)
            return unet, ServedInfo("", self.base_id, rm, rm.to_dict(), True, hit, "mix")
        return self.base_unet, ServedInfo("", self.base_id, None, None, False, False, "base")

    def pipeline_view(self, unet: torch.nn.Module, scheduler: str, tokenizers: dict[str, Any] | None = None) -> Any:
        """A per-image pipeline: shared frozen components, this request's UNet, a fresh scheduler
        and, for concurrent use, tokenizers borrowed from :meth:`tokenizers` (fast tokenizers are stateful)."""
        pipe = self._require_pipe()
        components = {**pipe.components, **(tokenizers or {}), "unet": unet, "scheduler": make_scheduler(pipe, scheduler)}
        view = type(pipe)(**components, **self._view_kwargs)
        view.set_progress_bar_config(disable=True)
        return view

    @contextmanager
    def tokenizers(self) -> Iterator[dict[str, Any]]:
        """Tokenizer copies no concurrent request holds (see :class:`selma.pipelines.TokenizerPool`)."""
        self._require_pipe()
        assert self._tokenizers is not None
        with self._tokenizers.borrow() as held:
            yield held

    def generate(
        self,
        req: GenerationRequest,
        *,
        cancel: threading.Event | None = None,
        is_active: Callable[[], bool] = lambda: True,
        deadline: float | None = None,
    ) -> Iterator[GeneratedImage]:
        """Validate, queue, then yield one image at a time in (prompt, image) order."""
        t_start = time.perf_counter()
        req = self.validate(req)
        cancel = cancel or threading.Event()

        def check() -> None:
            if cancel.is_set() or not is_active():
                raise Cancelled("the request was cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("the request's deadline passed during generation")

        total = len(req.prompts) * req.images_per_prompt
        kind = "base"
        with self.admission.slot(deadline=deadline, cancel=cancel):
            check()
            unet, served = self.resolve_model(req)
            kind = served.kind

            def on_step(_pipe: Any, _step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                check()  # raising here stops denoising at once
                return kwargs

            index = 0
            for p_i, prompt in enumerate(req.prompts):
                for i_i in range(req.images_per_prompt):
                    check()
                    seed = derive_seed(req.seed_policy, req.seed or 0, p_i, i_i, req.images_per_prompt)  # the same seeds as render
                    t0 = time.perf_counter()
                    # a CPU generator, as render uses: the same seed gives the same noise on every device,
                    # so a dataset image (rendered anywhere) is reproduced by Generate (diffusers moves it)
                    gen = torch.Generator(device="cpu").manual_seed(seed)
                    with self.tokenizers() as tokenizers:
                        out = self.pipeline_view(unet, req.scheduler, tokenizers)(
                            prompt=prompt,
                            negative_prompt=req.negative_prompt or None,
                            num_inference_steps=req.steps,
                            guidance_scale=req.guidance_scale,
                            width=req.width,
                            height=req.height,
                            num_images_per_prompt=1,
                            generator=gen,
                            output_type="pil",
                            callback_on_step_end=on_step,
                        )
                    buf = io.BytesIO()
                    out.images[0].convert("RGB").save(buf, format="PNG")
                    seconds = time.perf_counter() - t0
                    metrics.IMAGE_SECONDS.labels(kind).observe(seconds)
                    metrics.IMAGES_GENERATED.labels(kind).inc()
                    yield GeneratedImage(
                        png=buf.getvalue(),
                        seed=seed,
                        prompt=prompt,
                        prompt_index=p_i,
                        image_index=i_i,
                        width=req.width,
                        height=req.height,
                        index=index,
                        total=total,
                        seconds=seconds,
                        served=served,
                    )
                    index += 1
        metrics.REQUEST_SECONDS.labels(kind).observe(time.perf_counter() - t_start)
