"""Visual question answering: the models that answer evaluation questions about rendered images.

Every backend implements :class:`VqaModel`: ``answer(queries)`` takes :class:`VqaQuery` objects
(an image, a question, optional multiple-choice options) and returns one free-form answer per
query, in query order; :func:`is_yes` reads a DSG yes/no answer.  :func:`build_vqa` builds a
model from the proto-JSON form of ``selma.v1.VqaBackend``:

* ``transformers``: a Hugging Face model by hub id, local directory or ``s3://``/``file://``
  prefix (mirrored once into the model cache), loaded with ``use_safetensors=True``.  The
  family is detected from the checkpoint's config: BLIP VQA (``BlipForQuestionAnswering``),
  BLIP-2 / InstructBLIP (TIFA's ``Question: … Options: … Answer:`` prompt), and any
  image-text-to-text model ``AutoModelForImageTextToText`` loads (PaliGemma, LLaVA,
  Qwen2-VL, …; the processor's chat template when it has one).  Batched, greedy decoding.
* ``openai_compatible``: a vision chat-completions endpoint (vLLM serving Qwen2-VL, OpenAI):
  the image travels as a base64 PNG ``image_url`` part.  Concurrent requests, bounded retries
  with exponential backoff on transport errors, 429 and 5xx; the API key comes only from the
  settings (see :mod:`selma_evaluation.settings`) and is never logged.
* ``tiny_test``: deterministic pseudo-answers from a hash of the seed, image and question.
* a kind a plugin added (:mod:`selma.plugins`; e.g. ShapesWorld's ``shapesworld_judge``).
* none: ``transformers`` with ``eval_vqa_model``.

Loaded transformers models live in a process-wide cache keyed by the resolved backend, so an
evaluation worker that builds the same backend twice loads it once; a model is freed when the
last :class:`VqaModel` using it is closed.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import io
import json
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import SecretStr

from selma import plugins
from selma.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from selma.llm.openai_http import OpenAiHttp, checked_credential, parse_base_url, parse_transport
from selma.pipelines import mirror_model
from selma.specs import check_known_fields, device_options, parse_float, parse_int, parse_mapping, parse_str
from selma_evaluation.settings import EvaluationSettings

if TYPE_CHECKING:  # annotations only: a command that reads gate scores (`selma eval gate-report`) loads no PIL
    from PIL import Image

log = logging.getLogger(__name__)

FIELD = "spec.vqa"
BUILTIN_KINDS = ("transformers", "openai_compatible", "tiny_test")
# First words of English yes/no questions ("Is there…", "Does the cat…", "Are the…").
_YES_NO_OPENERS = frozenset(
    "is are am was were do does did can could will would should shall has have had may might must".split()
)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VqaQuery:
    """One question about one image; ``choices`` are multiple-choice options (TIFA) the backend may show."""

    image: Image.Image
    question: str
    choices: tuple[str, ...] = ()


class VqaModel(ABC):
    """A visual-question-answering model."""

    name: str  # "transformers:<source>", "openai:<model>", "tiny-test"
    batch_size: int  # queries answered together (a forward pass, or requests in flight)
    # True for a backend whose answers say nothing about the images (tiny_test): reports say so
    plumbing_only: bool = False

    @abstractmethod
    def answer(self, queries: Sequence[VqaQuery]) -> list[str]:
        """A free-form answer per query, in query order; batches internally."""

    def close(self) -> None:  # noqa: B027 - optional hook; stateless models hold nothing
        """Release what the model holds (idempotent)."""


def is_yes(answer: str) -> bool:
    """Whether ``answer`` says yes: its first word, case and punctuation aside, is "yes".

    "yes", "Yes.", " YES! ", "yes, there is" → True; "no", "yeah", "yesterday", "" → False.
    Only the literal word counts, so scores do not depend on how liberal a synonym list is.
    """
    words = re.findall(r"[a-z0-9]+", answer.lower())
    return bool(words) and words[0] == "yes"


def is_yes_no_question(query: VqaQuery) -> bool:
    """A yes/no question: options exactly yes/no, or no options and an auxiliary verb first ("Is there …?")."""
    if query.choices:
        return {c.strip().lower() for c in query.choices} == {"yes", "no"}
    words = re.findall(r"[a-z']+", query.question.lower())
    return bool(words) and words[0] in _YES_NO_OPENERS


def blip2_prompt(query: VqaQuery) -> str:
    """BLIP-2 / InstructBLIP's VQA prompt as TIFA used it: ``Question: {q} Options: {a, b} Answer:``."""
    q = query.question.strip()
    if query.choices:
        return f"Question: {q} Options: {', '.join(c.strip() for c in query.choices)} Answer:"
    return f"Question: {q} Answer:"


def instruction_prompt(query: VqaQuery) -> str:
    """The question for instruction-following models (chat templates, vision chat endpoints)."""
    q = query.question.strip()
    if query.choices and not is_yes_no_question(query):
        return f"{q}\nOptions: {', '.join(c.strip() for c in query.choices)}.\nAnswer with one of the options only."
    if is_yes_no_question(query):
        return f"{q}\nAnswer with yes or no only."
    return f"{q}\nAnswer in a few words."


# ---------------------------------------------------------------------------------------------
# Backend specs (the proto-JSON VqaBackend, validated, defaults resolved)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformersVqaSpec:
    """A transformers model; ``device``/``precision`` "" = settings."""

    source: str
    revision: str = ""
    device: str = ""
    precision: str = ""
    batch_size: int = 16

    kind = "transformers"


@dataclass(frozen=True)
class OpenAiVqaSpec:
    """An OpenAI-compatible vision chat endpoint; the credential is named, never carried."""

    base_url: str
    model: str
    api_key_name: str = ""
    api_key_key: str = ""
    request_timeout: float = 120.0
    max_concurrency: int = 8
    max_retries: int = 3
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    extra_body: str = "{}"  # JSON text, so the spec stays hashable

    kind = "openai_compatible"


@dataclass(frozen=True)
class TinyTestVqaSpec:
    """The tiny test model."""

    seed: int = 0
    batch_size: int = 16

    kind = "tiny_test"


@dataclass(frozen=True)
class PluginVqaSpec:
    """A VQA backend a plugin added (:mod:`selma.plugins`); its options were checked by the plugin."""

    kind: str
    batch_size: int = 64


VqaSpec = TransformersVqaSpec | OpenAiVqaSpec | TinyTestVqaSpec | PluginVqaSpec


def backend_kinds() -> tuple[str, ...]:
    """The built-in VQA backend kinds and those plugins added."""
    return (*BUILTIN_KINDS, *sorted(plugins.registry().vqa_backends))


def parse_backend(backend: Mapping[str, Any] | None, settings: EvaluationSettings) -> VqaSpec:
    """Validate a ``VqaBackend`` dict (``{}`` = the default) without loading anything.

    Raises InvalidArgument naming the field (``spec.vqa.transformers.batch_size``, …) and
    PermissionDenied when a configured API key would go to an endpoint not configured for it.
    """
    d = parse_mapping(backend, FIELD)
    check_known_fields(d, set(backend_kinds()), FIELD)
    if len(d) > 1:
        raise InvalidArgument(f"set exactly one VQA backend; got {sorted(d)}", field=FIELD)
    if not d:
        return TransformersVqaSpec(source=settings.eval_vqa_model, batch_size=settings.eval_vqa_batch_size)
    kind, body = next(iter(d.items()))
    fld = f"{FIELD}.{kind}"
    body = parse_mapping(body, fld)
    if kind == "transformers":
        return _parse_transformers(body, fld, settings)
    if kind == "openai_compatible":
        return _parse_openai(body, fld, settings)
    plugin = plugins.registry().vqa_backends.get(kind)
    if plugin is not None:
        plugin.check(body, fld)
        return PluginVqaSpec(kind=kind, batch_size=settings.eval_vqa_batch_size)
    check_known_fields(body, {"seed"}, fld)
    return TinyTestVqaSpec(seed=parse_int(body.get("seed"), f"{fld}.seed"), batch_size=settings.eval_vqa_batch_size)


def resolve_backend(backend: Mapping[str, Any] | None, settings: EvaluationSettings) -> dict[str, Any]:
    """The ``VqaBackend`` dict with every default filled in (what a worker should be handed)."""
    spec = parse_backend(backend, settings)
    if isinstance(spec, TransformersVqaSpec):
        device: dict[str, Any] = {}
        if spec.device:
            device["device"] = spec.device
        if spec.precision:
            device["precision"] = f"PRECISION_{spec.precision.upper()}"
        model = {"source": spec.source, **({"revision": spec.revision} if spec.revision else {})}
        return {"transformers": {"model": model, **({"device": device} if device else {}), "batch_size": spec.batch_size}}
    if isinstance(spec, TinyTestVqaSpec):
        return {"tiny_test": {"seed": str(spec.seed)}}
    if isinstance(spec, PluginVqaSpec):
        return {spec.kind: {}}
    out: dict[str, Any] = {
        "base_url": spec.base_url,
        "model": spec.model,
        "api": "OPEN_AI_API_CHAT_COMPLETIONS",
        "sampling": {"temperature": spec.temperature, "top_p": spec.top_p, "max_tokens": spec.max_tokens, **({"stop": list(spec.stop)} if spec.stop else {})},
        "request_timeout": f"{spec.request_timeout:g}s",
        "max_concurrency": spec.max_concurrency,
        "max_retries": spec.max_retries,
    }
    if spec.api_key_name:
        out["api_key"] = {"name": spec.api_key_name, **({"key": spec.api_key_key} if spec.api_key_key else {})}
    extra = json.loads(spec.extra_body)
    if extra:
        out["extra_body"] = extra
    return {"openai_compatible": out}


def _parse_transformers(body: Mapping[str, Any], fld: str, settings: EvaluationSettings) -> TransformersVqaSpec:
    check_known_fields(body, {"model", "device", "batch_size"}, fld)
    model = parse_mapping(body.get("model"), f"{fld}.model")
    check_known_fields(model, {"source", "revision", "variant", "vae_source"}, f"{fld}.model")
    if model.get("variant") or model.get("vae_source"):
        raise InvalidArgument("variant and vae_source do not apply to VQA models; leave them empty", field=f"{fld}.model")
    source = parse_str(model.get("source"), f"{fld}.model.source") or settings.eval_vqa_model
    if source.startswith("tiny://"):
        raise InvalidArgument("there is no tiny transformers VQA model; use the tiny_test backend", field=f"{fld}.model.source")
    device, precision = device_options(body.get("device"), f"{fld}.device")
    batch = parse_int(body.get("batch_size"), f"{fld}.batch_size")
    if not 0 <= batch <= 256:
        raise InvalidArgument(f"batch_size must be in 1..256 (0 = service default); got {batch}", field=f"{fld}.batch_size")
    return TransformersVqaSpec(
        source=source,
        revision=parse_str(model.get("revision"), f"{fld}.model.revision"),
        device=device,
        precision=precision,
        batch_size=batch or settings.eval_vqa_batch_size,
    )


def _parse_openai(body: Mapping[str, Any], fld: str, settings: EvaluationSettings) -> OpenAiVqaSpec:
    check_known_fields(
        body, {"base_url", "model", "api_key", "api", "sampling", "request_timeout", "max_concurrency", "max_retries", "extra_body"}, fld
    )
    base_url = parse_base_url(body, fld, settings.eval_vqa_openai_base_url, "eval_vqa_openai_base_url")
    model = parse_str(body.get("model"), f"{fld}.model") or settings.eval_vqa_openai_model
    if not model:
        raise InvalidArgument("model is required: the service has no default (eval_vqa_openai_model)", field=f"{fld}.model")
    api = body.get("api") or "OPEN_AI_API_UNSPECIFIED"
    if api not in ("OPEN_AI_API_UNSPECIFIED", "OPEN_AI_API_CHAT_COMPLETIONS"):
        raise InvalidArgument(f"VQA needs chat completions (images are message parts); got api {api!r}", field=f"{fld}.api")
    key = parse_mapping(body.get("api_key"), f"{fld}.api_key")
    check_known_fields(key, {"name", "key"}, f"{fld}.api_key")
    sampling = parse_mapping(body.get("sampling"), f"{fld}.sampling")
    check_known_fields(sampling, {"temperature", "top_p", "max_tokens", "stop"}, f"{fld}.sampling")
    # Greedy by default: an evaluation must give the same answers when it is run again.
    temperature = parse_float(sampling.get("temperature"), f"{fld}.sampling.temperature", 0.0)
    if not 0 <= temperature <= 2:
        raise InvalidArgument(f"temperature must be in [0, 2]; got {temperature}", field=f"{fld}.sampling.temperature")
    top_p = parse_float(sampling.get("top_p"), f"{fld}.sampling.top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1]; got {top_p}", field=f"{fld}.sampling.top_p")
    max_tokens = parse_int(sampling.get("max_tokens"), f"{fld}.sampling.max_tokens")
    if not 0 <= max_tokens <= 4096:
        raise InvalidArgument(f"max_tokens must be in 0..4096 (0 = default); got {max_tokens}", field=f"{fld}.sampling.max_tokens")
    stop = sampling.get("stop") or []
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
        raise InvalidArgument("stop must be a list of at most 8 non-empty strings", field=f"{fld}.sampling.stop")
    timeout, concurrency, retries, extra = parse_transport(body, fld, default_retries=settings.eval_vqa_max_retries)
    spec = OpenAiVqaSpec(
        base_url=base_url,
        model=model,
        api_key_name=parse_str(key.get("name"), f"{fld}.api_key.name"),
        api_key_key=parse_str(key.get("key"), f"{fld}.api_key.key"),
        request_timeout=timeout or settings.eval_vqa_request_timeout_seconds,
        max_concurrency=concurrency or settings.eval_vqa_concurrency,
        max_retries=retries,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens or settings.eval_vqa_max_new_tokens,
        stop=tuple(stop),
        extra_body=json.dumps(dict(extra), sort_keys=True),
    )
    checked_credential(base_url, [settings.eval_vqa_openai_base_url, *settings.eval_allowed_base_urls],
                       lambda: settings.api_key(spec.api_key_name, spec.api_key_key, field=f"{fld}.api_key"),
                       allow_any=settings.eval_allow_any_base_url, prefix="EVAL", what="VQA", field=f"{fld}.base_url")
    return spec


def build_vqa(backend: Mapping[str, Any] | None, settings: EvaluationSettings) -> VqaModel:
    """A ready VQA model for a ``VqaBackend`` dict (``{}`` = transformers with ``eval_vqa_model``).

    Transformers models are loaded once per process and shared (see :func:`clear_cache`);
    close the returned model when done with it.
    """
    spec = parse_backend(backend, settings)
    if isinstance(spec, TinyTestVqaSpec):
        return TinyTestVqa(seed=spec.seed, batch_size=spec.batch_size)
    if isinstance(spec, PluginVqaSpec):
        return plugins.registry().vqa_backends[spec.kind].build(spec.batch_size)
    if isinstance(spec, OpenAiVqaSpec):
        api_key = settings.api_key(spec.api_key_name, spec.api_key_key, field=f"{FIELD}.openai_compatible.api_key")
        return OpenAiVqa(spec, api_key, settings)
    return TransformersVqa(spec, settings)


# ---------------------------------------------------------------------------------------------
# tiny_test
# ---------------------------------------------------------------------------------------------


def image_digest(image: Image.Image) -> bytes:
    """sha256 of an image's mode, size and pixels (independent of how it was encoded)."""
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.digest()


class TinyTestVqa(VqaModel):
    """Arbitrary but deterministic answers: a function of (seed, image pixels, question) only.

    Multiple-choice queries get one of their choices; all others get "yes" or "no", so DSG
    scoring sees a mix of both and evaluations on tiny models produce non-trivial reports.
    """

    name = "tiny-test"
    plumbing_only = True

    def __init__(self, seed: int = 0, batch_size: int = 16) -> None:
        self.seed = seed
        self.batch_size = batch_size

    def answer(self, queries: Sequence[VqaQuery]) -> list[str]:
        out = []
        for q in queries:
            h = hashlib.sha256(f"selma-tiny-vqa:{self.seed}:".encode() + image_digest(q.image) + q.question.encode())
            n = int.from_bytes(h.digest()[:8], "big")
            if q.choices and not is_yes_no_question(q):
                out.append(q.choices[n % len(q.choices)])
            else:
                out.append("yes" if n % 2 == 0 else "no")
        return out


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------

# architectures (config.architectures) → family; image-text-to-text models are found by model type.
_ARCHITECTURES = {
    "BlipForQuestionAnswering": "blip_vqa",
    "Blip2ForConditionalGeneration": "blip2",
    "InstructBlipForConditionalGeneration": "blip2",
}
# Image-text-to-text model types that are not question answerers (captioners, OCR/document models).
_NOT_VQA_TYPES = frozenset({"blip", "vision-encoder-decoder", "pix2struct", "udop", "got_ocr2", "kosmos-2.5", "evolla"})
SUPPORTED_ARCHITECTURES = (
    "BlipForQuestionAnswering (BLIP VQA), Blip2ForConditionalGeneration (BLIP-2), "
    "InstructBlipForConditionalGeneration (InstructBLIP), and image-text-to-text chat models that "
    "AutoModelForImageTextToText loads (PaliGemma, LLaVA, Qwen2-VL, Idefics, …)"
)


@dataclass
class LoadedVqa:
    """A model in memory: the model, its processor, its family, and a lock serialising generate calls."""

    family: str  # blip_vqa | blip2 | chat
    model: Any
    processor: Any
    device: Any
    dtype: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _CacheEntry:
    loaded: LoadedVqa | None = None
    refs: int = 0
    gate: threading.Lock = field(default_factory=threading.Lock)


_CACHE: dict[str, _CacheEntry] = {}
_CACHE_LOCK = threading.Lock()


def _acquire(key: str, load: Callable[[], LoadedVqa]) -> LoadedVqa:
    """The cached model for ``key`` (loading it once even when two threads ask at once); counts a user."""
    with _CACHE_LOCK:
        entry = _CACHE.setdefault(key, _CacheEntry())
        entry.refs += 1
    try:
        with entry.gate:
            if entry.loaded is None:
                entry.loaded = load()
            return entry.loaded
    except BaseException:
        _release(key)
        raise


def _release(key: str) -> None:
    """One user fewer; the last one frees the model (and the CUDA memory it held)."""
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs > 0:
            return
        del _CACHE[key]
        freed = entry.loaded
        entry.loaded = None
    if freed is not None:
        _free(freed)


def _free(loaded: LoadedVqa) -> None:
    on_cuda = getattr(loaded.device, "type", "") == "cuda"
    del loaded
    gc.collect()
    if on_cuda:
        import torch

        torch.cuda.empty_cache()


def cached_models() -> dict[str, int]:
    """Loaded models and how many open VqaModels use each (for tests and debugging)."""
    with _CACHE_LOCK:
        return {k: e.refs for k, e in _CACHE.items() if e.loaded is not None}


def clear_cache() -> None:
    """Drop every cached model, whoever still holds it (tests; a worker shutting down)."""
    with _CACHE_LOCK:
        entries = list(_CACHE.values())
        _CACHE.clear()
    for e in entries:
        if e.loaded is not None:
            loaded, e.loaded = e.loaded, None
            _free(loaded)


class TransformersVqa(VqaModel):
    """A transformers VQA model held in the process cache; batched greedy generation."""

    def __init__(self, spec: TransformersVqaSpec, settings: EvaluationSettings) -> None:
        from selma.pipelines import resolve_device, resolve_dtype

        self.spec = spec
        self.settings = settings
        self.name = f"transformers:{spec.source}"
        self.batch_size = spec.batch_size
        self.max_new_tokens = settings.eval_vqa_max_new_tokens
        device = resolve_device(spec.device, settings)
        dtype = resolve_dtype(spec.precision, device, settings)
        self._key = json.dumps({**asdict(spec), "batch_size": 0, "device": str(device), "precision": str(dtype)}, sort_keys=True)
        self._closed = False
        self.lm = _acquire(self._key, lambda: load_vqa_model(spec, settings, device, dtype))

    @property
    def family(self) -> str:
        return self.lm.family

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.lm = None  # type: ignore[assignment]
            _release(self._key)

    def prompts(self, queries: Sequence[VqaQuery]) -> list[str]:
        """The exact text given to the model with each image (public for tests and debugging)."""
        lm = self.lm
        if lm.family == "blip_vqa":
            # BLIP VQA was trained on bare questions; options are not shown (TIFA maps its answer to the nearest one).
            return [q.question.strip() for q in queries]
        if lm.family == "blip2":
            return [blip2_prompt(q) for q in queries]
        return [_chat_text(lm, q) for q in queries]

    def answer(self, queries: Sequence[VqaQuery]) -> list[str]:
        if self._closed:
            raise FailedPrecondition("this VQA model was closed; build a new one", field=FIELD)
        out: list[str] = [""] * len(queries)
        for group in self._groups(queries):
            for start in range(0, len(group), self.batch_size):
                chunk = group[start : start + self.batch_size]
                for i, a in zip(chunk, self._answer_batch([queries[i] for i in chunk]), strict=True):
                    out[i] = a
        return out

    def _groups(self, queries: Sequence[VqaQuery]) -> list[list[int]]:
        """Query indices in the groups batched together.

        BLIP VQA's answer decoder attends to every question position, padding included (its
        cross-attention drops the question mask in transformers 5.x), so a padded question
        would get a different answer than alone.  Batching only questions of the same token
        length keeps every answer independent of its batch neighbours.  Other families mask
        padding properly and are batched in order.
        """
        if self.lm.family != "blip_vqa":
            return [list(range(len(queries)))]
        with self.lm.lock:  # a fast tokenizer must not be used from two threads at once
            lengths = [len(ids) for ids in self.lm.processor.tokenizer(self.prompts(queries))["input_ids"]]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        return list(groups.values())

    def _answer_batch(self, queries: Sequence[VqaQuery]) -> list[str]:
        import torch

        lm = self.lm
        images = [_rgb(q.image) for q in queries]
        texts = self.prompts(queries)
        gen = {"max_new_tokens": self.max_new_tokens, "do_sample": False, "num_beams": 1}
        t0 = time.perf_counter()
        try:
            with lm.lock, torch.inference_mode():
                inputs = lm.processor(images=images, text=texts, return_tensors="pt", padding=True)
                inputs = {k: _to(v, lm.device, lm.dtype) for k, v in inputs.items()}
                out = lm.model.generate(**inputs, **gen)
                prompt = inputs["input_ids"]
                # Decoder-only models return the prompt before the answer; BLIP and encoder-decoders do not.
                if lm.family != "blip_vqa" and out.shape[1] >= prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt):
                    out = out[:, prompt.shape[1] :]
                decoded = lm.processor.batch_decode(out, skip_special_tokens=True)
        except torch.OutOfMemoryError:
            raise ResourceExhausted(
                f"out of memory answering {len(queries)} questions at once with {self.spec.source}; "
                "lower spec.vqa.transformers.batch_size or use a smaller precision"
            ) from None
        answers = [a.strip() for a in decoded]
        log.debug("answered %d VQA queries with %s in %.2f s", len(queries), self.name, time.perf_counter() - t0)
        return answers


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _to(value: Any, device: Any, dtype: Any) -> Any:
    """Move a processor output to the model; only floating tensors (pixels) take the model's dtype."""
    if not hasattr(value, "to"):
        return value
    return value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)


def _chat_text(lm: LoadedVqa, query: VqaQuery) -> str:
    """Text for an image-text-to-text model: its chat template, else a plain prompt with the image token."""
    proc = lm.processor
    if getattr(proc, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction_prompt(query)}]}]
        return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    model_type = getattr(lm.model.config, "model_type", "")
    # PaliGemma checkpoints are trained on task prefixes; "answer en" is their VQA task.
    text = f"answer en {query.question.strip()}" if model_type == "paligemma" else blip2_prompt(query)
    image_token = getattr(proc, "image_token", None)
    if image_token and image_token not in text:
        text = f"{image_token}{text}" if model_type == "paligemma" else f"{image_token}\n{text}"
    return text


def materialize_model(source: str, settings: EvaluationSettings) -> str:
    """A reference ``from_pretrained`` takes: a hub id or local directory as-is, storage prefixes mirrored.

    ``s3://…`` / ``file://…`` prefixes holding a transformers ``save_pretrained`` layout
    (``config.json``) are mirrored by :func:`selma.pipelines.mirror_model`, as diffusers pipelines are.
    """
    if source.startswith(("s3://", "file://")):
        return str(mirror_model(source, settings, marker="config.json", kind="transformers model", field=f"{FIELD}.transformers.model.source"))
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith("."):
        if not path.is_dir():
            raise NotFound(f"VQA model {source!r} not found: no such directory", field=f"{FIELD}.transformers.model.source")
        return str(path)
    return source


def detect_family(config: Any) -> str:
    """``blip_vqa``, ``blip2`` or ``chat`` for a transformers config; InvalidArgument for anything else."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    model_type = getattr(config, "model_type", "")
    if model_type in ("blip-2", "instructblip"):
        return "blip2"
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in _NOT_VQA_TYPES:
        return "chat"
    raise InvalidArgument(
        f"unsupported VQA model architecture {', '.join(archs) or model_type or 'unknown'}; supported: {SUPPORTED_ARCHITECTURES}",
        field=f"{FIELD}.transformers.model.source",
    )


def load_vqa_model(spec: TransformersVqaSpec, settings: EvaluationSettings, device: Any, dtype: Any) -> LoadedVqa:
    """Load a VQA model and its processor (safetensors only, no remote code) onto ``device``."""
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoProcessor,
        Blip2ForConditionalGeneration,
        BlipForQuestionAnswering,
        InstructBlipForConditionalGeneration,
    )

    from selma.models._hf import no_progress_bars

    fld = f"{FIELD}.transformers.model.source"
    ref = materialize_model(spec.source, settings)
    hub: dict[str, Any] = {"cache_dir": str(settings.resolved_model_cache_dir), "local_files_only": settings.hf_offline}
    if spec.revision:
        hub["revision"] = spec.revision
    t0 = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(ref, **hub)
    except OSError as e:
        raise NotFound(f"VQA model {spec.source!r} not found: {e}", field=fld) from None
    except ValueError as e:  # an unknown model type (custom code is never run)
        raise InvalidArgument(f"VQA model {spec.source!r}: {e}; supported: {SUPPORTED_ARCHITECTURES}", field=fld) from None
    family = detect_family(config)
    if family == "blip_vqa":
        cls: Any = BlipForQuestionAnswering
    elif family == "blip2":
        cls = InstructBlipForConditionalGeneration if config.model_type == "instructblip" else Blip2ForConditionalGeneration
    else:
        cls = AutoModelForImageTextToText
    try:
        with no_progress_bars():
            model = cls.from_pretrained(ref, dtype=dtype, use_safetensors=True, **hub)
            processor = AutoProcessor.from_pretrained(ref, **hub)
    except OSError as e:
        raise NotFound(f"cannot load VQA model {spec.source!r}: {e}", field=fld) from None
    except ValueError as e:
        raise InvalidArgument(f"cannot load VQA model {spec.source!r}: {e}", field=fld) from None
    model.to(device).eval()
    tokenizer = getattr(processor, "tokenizer", None)
    if family != "blip_vqa" and tokenizer is not None:
        # Prompts of a batch end where generation starts: pad on the left.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    log.info(
        "loaded VQA model %s (%s, %s) on %s/%s in %.2f s",
        spec.source, type(model).__name__, family, device, str(dtype).removeprefix("torch."), time.perf_counter() - t0,
    )  # fmt: skip
    return LoadedVqa(family=family, model=model, processor=processor, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible vision chat
# ---------------------------------------------------------------------------------------------


def image_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,…`` URL (lossless, so the server sees our pixels)."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAiVqa(VqaModel):
    """``POST {base_url}/chat/completions`` with the image as an ``image_url`` part; requests run concurrently.

    The HTTP side (concurrency, bounded retries with backoff, error mapping) is the LLM layer's one
    OpenAI-compatible client, :class:`selma.llm.openai_http.OpenAiHttp`.
    """

    def __init__(
        self, spec: OpenAiVqaSpec, api_key: SecretStr | None, settings: EvaluationSettings, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.spec = spec
        self.name = f"openai:{spec.model}"
        self.batch_size = spec.max_concurrency
        self._extra = json.loads(spec.extra_body)
        self._http = OpenAiHttp(
            spec.base_url, spec.model, api_key, request_timeout=spec.request_timeout, max_concurrency=spec.max_concurrency,
            max_retries=spec.max_retries, backoff=settings.eval_vqa_retry_backoff_seconds, max_backoff=settings.eval_vqa_retry_max_backoff_seconds,
            endpoint="vision endpoint", request_noun="VQA request", field=f"{FIELD}.openai_compatible",
            hint_4xx="check base_url (up to and including /v1), that the model accepts images, and extra_body",
            resume_hint="Fix the endpoint and start the evaluation again with the same idempotency key to resume",
            unavailable=Unavailable, user_agent="selma-evaluation", transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def body(self, query: VqaQuery) -> dict[str, Any]:
        """The JSON body for one query (public for tests; holds no credential)."""
        # No system message: several VLM chat templates (Gemma, older LLaVA) reject the system role.
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(query.image)}},
            {"type": "text", "text": instruction_prompt(query)},
        ]
        s = self.spec
        body: dict[str, Any] = {
            "model": s.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "n": 1,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        for k, v in self._extra.items():
            body.setdefault(k, v)
        return body

    def answer(self, queries: Sequence[VqaQuery]) -> list[str]:
        if self._http.closed:
            raise FailedPrecondition("this VQA model was closed; build a new one", field=FIELD)
        return [answer for answer, _ in self._http.post_all("chat/completions", [(i, self.body(q)) for i, q in enumerate(queries)], _content)]


def _content(data: Any, _resp: httpx.Response) -> str:
    content = data["choices"][0]["message"]["content"]
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise TypeError("content is not a string")
    return content.strip()
