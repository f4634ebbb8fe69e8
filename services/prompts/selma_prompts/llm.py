"""LLM backends for the prompt loop: OpenAI-compatible HTTP, local transformers models, SmolLM2, the tiny LM.

Every backend answers a *round* of :class:`~selma_prompts.templates.LlmRequest` at once and
returns one :class:`LlmResponse` per request, in request order.  A round is as many requests
as the backend runs together (HTTP concurrency, or a local generate batch); the loop samples
all of a round's in-context examples before sending it, so results do not depend on which
HTTP response arrives first.

Failures: transport errors, timeouts, HTTP 429/5xx and unparseable bodies are retried with
exponential backoff (honouring ``Retry-After``, capped) up to ``max_retries`` times, then the
round fails with :class:`LlmUnavailable` (gRPC UNAVAILABLE).  401/403 is PERMISSION_DENIED and
other 4xx INVALID_ARGUMENT at once, since retrying cannot fix them.  The API key is sent only
in the ``Authorization`` header and never logged or put in an error message.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

import selma
from selma.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable

from selma_prompts import metrics
from selma_prompts.settings import PromptSettings
from selma_prompts.spec import BackendSpec, Sampling
from selma_prompts.templates import LlmRequest

log = logging.getLogger(__name__)

_BODY_EXCERPT = 300


class LlmUnavailable(Unavailable):
    """The LLM failed after all retries; accepted prompts are kept and the job can resume."""


@dataclass
class LlmResponse:
    """One completion: its text, why it ended, and usage where the backend reports it."""

    text: str
    finish_reason: str = "stop"  # "length" = cut by max_tokens
    starts_mid_item: bool = False  # the prompt ended with the next item's number
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


class LlmBackend(ABC):
    """A language model the loop can call."""

    kind: str
    model_name: str
    round_size: int = 1

    @property
    def backend_model(self) -> str:
        return f"{self.kind}:{self.model_name}"

    @abstractmethod
    def generate(self, requests: list[LlmRequest], *, cancel: threading.Event | None = None) -> list[LlmResponse]:
        """Complete every request (in order); raise LlmUnavailable when retries are exhausted."""

    def close(self) -> None:  # noqa: B027 - optional hook; local models have nothing to release
        """Release connections (models stay cached in the registry)."""


def request_seed(seed: int, index: int) -> int:
    """A per-request seed from the job seed and the request number (stable across processes)."""
    digest = hashlib.sha256(f"selma-prompts:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP
# ---------------------------------------------------------------------------------------------


class RetryableError(Exception):
    def __init__(self, error_class: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.retry_after = retry_after


class OpenAICompatibleBackend(LlmBackend):
    """``POST {base_url}/completions`` or ``{base_url}/chat/completions`` (vLLM, TGI, Ollama, OpenAI)."""

    kind = "openai_compatible"

    def __init__(
        self,
        spec: BackendSpec,
        api_key: SecretStr | None,
        *,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.spec = spec
        self.model_name = spec.model
        self.round_size = spec.max_concurrency
        self._url = f"{spec.base_url}/{'completions' if spec.api == 'completions' else 'chat/completions'}"
        self._backoff = backoff
        self._max_backoff = max_backoff
        headers = {"User-Agent": f"selma-prompts/{selma.__version__}", "Content-Type": "application/json"}
        if api_key is not None and api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(spec.request_timeout, connect=min(10.0, spec.request_timeout)),
            limits=httpx.Limits(max_connections=spec.max_concurrency, max_keepalive_connections=spec.max_concurrency),
            transport=transport,
            follow_redirects=False,
        )
        self._pool = ThreadPoolExecutor(max_workers=spec.max_concurrency, thread_name_prefix="llm-http")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def body(self, req: LlmRequest) -> dict[str, Any]:
        """The JSON body for one request (public for tests and debugging; holds no credential)."""
        s: Sampling = self.spec.sampling
        body: dict[str, Any] = {"model": self.spec.model}
        if self.spec.api == "completions":
            body["prompt"] = req.completion_prompt
        else:
            body["messages"] = [{"role": "system", "content": req.system}, {"role": "user", "content": req.user}]
        body.update({"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "n": 1, "seed": req.seed})
        if s.stop:
            body["stop"] = list(s.stop)
        for k, v in self.spec.extra_body.items():
            body.setdefault(k, v)
        return body

    def generate(self, requests: list[LlmRequest], *, cancel: threading.Event | None = None) -> list[LlmResponse]:
        abort = threading.Event()
        futures = [self._pool.submit(self._call, r, cancel, abort) for r in requests]
        results: list[LlmResponse] = []
        first_error: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as e:  # noqa: BLE001 - collected and re-raised below
                abort.set()
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return results

    def _call(self, req: LlmRequest, cancel: threading.Event | None, abort: threading.Event) -> LlmResponse:
        body = self.body(req)
        attempts = self.spec.max_retries + 1
        last = ""
        for attempt in range(attempts):
            t0 = time.perf_counter()
            try:
                resp = self._client.post(self._url, json=body)
                out = self._parse(resp)
            except RetryableError as e:
                metrics.LLM_REQUEST_SECONDS.labels(self.kind).observe(time.perf_counter() - t0)
                metrics.LLM_ERRORS.labels(self.kind, e.error_class).inc()
                last, retry_after = str(e), e.retry_after
            except httpx.TimeoutException:
                metrics.LLM_ERRORS.labels(self.kind, "timeout").inc()
                last, retry_after = f"timed out after {self.spec.request_timeout:g} s", None
            except httpx.TransportError as e:
                metrics.LLM_ERRORS.labels(self.kind, "connect").inc()
                last, retry_after = f"cannot reach the endpoint ({type(e).__name__}: {e})", None
            else:
                metrics.LLM_REQUEST_SECONDS.labels(self.kind).observe(time.perf_counter() - t0)
                out.retries = attempt
                return out
            if attempt + 1 >= attempts or abort.is_set():
                break
            delay = min(self._max_backoff, self._backoff * 2**attempt)
            if retry_after is not None:
                delay = min(self._max_backoff, max(delay, retry_after))
            log.warning("LLM request %d attempt %d/%d failed: %s; retrying in %.2f s", req.index, attempt + 1, attempts, last, delay)
            metrics.LLM_RETRIES.labels(self.kind).inc()
            # Waiting on the cancel event (or a private one) sleeps the backoff but wakes on cancel.
            if (cancel or threading.Event()).wait(delay) or abort.is_set():
                break
        err = LlmUnavailable(
            f"the LLM endpoint {self.spec.base_url} (model {self.spec.model!r}) failed request {req.index} "
            f"{attempts} time(s); last error: {last}. Prompts accepted so far are kept: fix the endpoint and "
            "start the job again with the same idempotency key to resume"
        )
        err.retries = attempts - 1  # type: ignore[attr-defined]
        raise err

    def _parse(self, resp: httpx.Response) -> LlmResponse:
        status = resp.status_code
        if status == 429 or status >= 500:
            raise RetryableError(f"http_{'429' if status == 429 else '5xx'}", f"HTTP {status}: {response_excerpt(resp)}", retry_after_seconds(resp))
        if status in (401, 403):
            metrics.LLM_ERRORS.labels(self.kind, "http_4xx").inc()
            raise PermissionDenied(
                f"the LLM endpoint {self.spec.base_url} refused the credential (HTTP {status}); check the api_key secret",
                field="spec.backend.openai_compatible.api_key",
            )
        if status >= 400:
            metrics.LLM_ERRORS.labels(self.kind, "http_4xx").inc()
            raise InvalidArgument(
                f"the LLM endpoint rejected the request (HTTP {status} from {self._url}): {response_excerpt(resp)}; "
                "check base_url (up to and including /v1), model and extra_body",
                field="spec.backend.openai_compatible",
            )
        if status != 200:
            raise RetryableError("invalid_response", f"unexpected HTTP {status}")
        try:
            data = resp.json()
            choice = data["choices"][0]
            if self.spec.api == "completions":
                text = choice["text"]
            else:
                text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RetryableError("invalid_response", f"unusable response body ({type(e).__name__}): {response_excerpt(resp)}") from None
        usage = data.get("usage") or {}
        out = LlmResponse(
            text=text,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            starts_mid_item=self.spec.api == "completions",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
        metrics.LLM_TOKENS.labels(self.kind, "prompt").inc(out.prompt_tokens)
        metrics.LLM_TOKENS.labels(self.kind, "completion").inc(out.completion_tokens)
        return out


def response_excerpt(resp: httpx.Response) -> str:
    try:
        text = resp.text
    except UnicodeDecodeError:
        return f"<{len(resp.content)} bytes>"
    text = " ".join(text.split())
    return text[:_BODY_EXCERPT] + ("…" if len(text) > _BODY_EXCERPT else "") or "<empty body>"


def retry_after_seconds(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


# ---------------------------------------------------------------------------------------------
# Local transformers models (any checkpoint, SmolLM2, the tiny LM)
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedLm:
    """A causal LM in memory, with the lock that serialises its generate calls."""

    model: Any
    tokenizer: Any
    device: Any
    lock: threading.Lock


class LocalLmBackend(LlmBackend):
    """Batched ``generate`` on a transformers causal LM held by the registry."""

    def __init__(self, kind: str, model_name: str, lm: LoadedLm, sampling: Sampling, *, use_chat_template: bool | None, batch_size: int) -> None:
        self.kind = kind
        self.model_name = model_name
        self.lm = lm
        self.sampling = sampling
        self.round_size = batch_size
        has_template = bool(getattr(lm.tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else (use_chat_template and has_template)

    def render(self, req: LlmRequest) -> str:
        """The exact text fed to the model: chat template with the answer pre-filled, or the completion prompt."""
        if not self.use_chat_template:
            return req.completion_prompt
        messages = [{"role": "system", "content": req.system}, {"role": "user", "content": req.user}]
        text = self.lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{text}{req.first_number}."

    def generate(self, requests: list[LlmRequest], *, cancel: threading.Event | None = None) -> list[LlmResponse]:
        import torch

        tok, model = self.lm.tokenizer, self.lm.model
        texts = [self.render(r) for r in requests]
        ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or 4096
        max_new = min(self.sampling.max_tokens, max(8, ctx // 2))
        t0 = time.perf_counter()
        try:
            with self.lm.lock:
                # One seed per round: generate draws from torch's global RNG, hence the lock.
                torch.manual_seed(requests[0].seed)
                tok.truncation_side = "left"  # keep the end of the prompt, where the list continues
                enc = tok(
                    texts,
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=ctx - max_new,
                    add_special_tokens=not self.use_chat_template,
                ).to(self.lm.device)
                kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": tok.pad_token_id}
                if self.sampling.temperature > 0:
                    kwargs.update(do_sample=True, temperature=self.sampling.temperature, top_p=self.sampling.top_p)
                else:
                    kwargs.update(do_sample=False)
                if self.sampling.stop:
                    kwargs.update(stop_strings=list(self.sampling.stop), tokenizer=tok)
                with torch.inference_mode():
                    out = model.generate(**enc, **kwargs)
        except torch.OutOfMemoryError:
            metrics.LLM_ERRORS.labels(self.kind, "local").inc()
            raise ResourceExhausted(
                f"out of memory generating a batch of {len(texts)} with {self.model_name}; lower prompts_local_batch_size or max_tokens"
            ) from None
        metrics.LLM_REQUEST_SECONDS.labels(self.kind).observe(time.perf_counter() - t0)
        prompt_len = enc["input_ids"].shape[1]
        eos = _eos_ids(model, tok)
        responses = []
        for row, mask in zip(out, enc["attention_mask"], strict=True):
            gen = row[prompt_len:].tolist()
            while gen and gen[-1] == tok.pad_token_id and tok.pad_token_id not in eos:
                gen.pop()
            ended = any(t in eos for t in gen) or len(gen) < max_new
            text = tok.decode(gen, skip_special_tokens=True)
            for s in self.sampling.stop:
                text = text.split(s, 1)[0]
            n_gen = len(gen) if not any(t in eos for t in gen) else next(i for i, t in enumerate(gen) if t in eos) + 1
            responses.append(
                LlmResponse(
                    text=text,
                    finish_reason="stop" if ended else "length",
                    starts_mid_item=True,  # both renderings end with the next item's number
                    prompt_tokens=int(mask.sum()),
                    completion_tokens=n_gen,
                )
            )
        metrics.LLM_TOKENS.labels(self.kind, "prompt").inc(sum(r.prompt_tokens for r in responses))
        metrics.LLM_TOKENS.labels(self.kind, "completion").inc(sum(r.completion_tokens for r in responses))
        return responses


def _eos_ids(model: Any, tok: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    out = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return out


class ModelRegistry:
    """Loaded local models (LLMs and sentence-embedding models), least recently used evicted.

    Jobs share a model; each carries a lock so one generate/encode runs on it at a time.
    """

    def __init__(self, settings: PromptSettings) -> None:
        self.settings = settings
        self._models: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[Any, ...], threading.Lock] = {}

    def _get(self, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per key even when two jobs ask at once
            with self._lock:
                if key in self._models:
                    return self._models[key]
            value = load()
            with self._lock:
                self._models[key] = value
                while len(self._models) > self.settings.prompts_max_loaded_models:
                    evicted, _ = self._models.popitem(last=False)
                    log.info("unloading model %s", evicted)
            return value

    def causal_lm(self, spec: BackendSpec) -> LoadedLm:
        """The LLM a local backend spec names, loading it on first use."""
        from selma.pipelines import resolve_device, resolve_dtype

        device = resolve_device(spec.device, self.settings)
        dtype = resolve_dtype(spec.precision, device, self.settings)
        source = spec.model if spec.kind == "local_causal_lm" else spec.kind
        key = ("llm", spec.kind, source, spec.tiny_seed, str(device), str(dtype))
        return self._get(key, lambda: self._load_lm(spec, device, dtype))

    def _load_lm(self, spec: BackendSpec, device: Any, dtype: Any) -> LoadedLm:
        from selma.models.llm import load_causal_lm, load_smollm2

        cache = self.settings.resolved_model_cache_dir
        t0 = time.perf_counter()
        if spec.kind == "embedded":
            lm = load_smollm2(cache, dtype=dtype)
        elif spec.kind == "tiny_test":
            lm = load_causal_lm(_tiny_lm_dir(cache, spec.tiny_seed), dtype=dtype)
        else:
            try:
                lm = load_causal_lm(spec.model, cache_dir=self.settings.model_cache_dir, dtype=dtype)
            except (OSError, ValueError) as e:
                raise InvalidArgument(
                    f"cannot load causal LM {spec.model!r}: {e}", field="spec.backend.local_causal_lm.model.source"
                ) from None
        model = lm.model.to(device)
        tok = lm.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        log.info("loaded %s (%s) on %s in %.1f s", spec.backend_model, dtype, device, time.perf_counter() - t0)
        return LoadedLm(model=model, tokenizer=tok, device=device, lock=threading.Lock())

    def embedding_model(self, source: str, device: str) -> tuple[Any, threading.Lock]:
        """A sentence-embedding model and its lock."""
        from selma_prompts.embedding import load_embedding_model

        return self._get(("emb", source, device), lambda: (load_embedding_model(source, device=device), threading.Lock()))

    def backend(self, spec: BackendSpec) -> LlmBackend:
        """A ready backend for ``spec`` (loads local models; resolves the API key)."""
        if spec.kind == "shapesworld_grammar":
            # The ShapesWorld caption grammar: no model to load (imported here: optional package).
            from selma_shapesworld.grammar import GrammarBackend

            return GrammarBackend()
        if spec.kind == "openai_compatible":
            return OpenAICompatibleBackend(
                spec,
                self.settings.api_key(spec.api_key_name, spec.api_key_key),
                backoff=self.settings.prompts_retry_backoff_seconds,
                max_backoff=self.settings.prompts_retry_max_backoff_seconds,
            )
        lm = self.causal_lm(spec)
        return LocalLmBackend(
            spec.kind,
            spec.model_name,
            lm,
            spec.sampling,
            use_chat_template=spec.use_chat_template,
            batch_size=self.settings.prompts_local_batch_size,
        )


def _tiny_lm_dir(cache: Path, seed: int) -> Path:
    """The tiny LM for ``seed``, built once under the model cache."""
    from selma.models.tiny import build_tiny_lm

    path = cache / f"tiny-lm-seed{seed}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_lm(path, seed)
    return path
