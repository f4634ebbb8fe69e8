"""Local transformers causal LMs (any checkpoint, the bundled SmolLM2, the tiny test LM) and the registry that holds them."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma import plugins
from selma.errors import InvalidArgument, ResourceExhausted
from selma.llm import metrics
from selma.llm.backend import BackendSpec, LlmBackend, LlmRequest, LlmResponse, Sampling
from selma.llm.batching import BatchingQueue, DecodeRequest
from selma.llm.openai_http import OpenAICompatibleBackend
from selma.llm.settings import LlmSettings

log = logging.getLogger(__name__)

# Hugging Face generate's top-k when a checkpoint sets none (what local sampling used before the batching queue).
HF_DEFAULT_TOP_K = 50


@dataclass
class LoadedLm:
    """A causal LM in memory, the queue every generate call goes through, and the lock its tokenizer needs."""

    model: Any
    tokenizer: Any
    device: Any
    lock: threading.Lock  # a fast tokenizer must not be used from two threads at once
    queue: BatchingQueue


class LocalLmBackend(LlmBackend):
    """A transformers causal LM held by the registry; requests go through the model's batching queue.

    Every job using the same model shares one decode loop (:mod:`selma.llm.batching`), so the rounds of
    concurrent jobs are decoded together; each request samples with its own seed, and its text does
    not depend on which other requests shared its batch.
    """

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
        with self.lm.lock:
            text = self.lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{text}{req.first_number}."

    def generate(self, requests: list[LlmRequest], *, cancel: threading.Event | None = None) -> list[LlmResponse]:
        tok, model = self.lm.tokenizer, self.lm.model
        texts = [self.render(r) for r in requests]
        ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or 4096
        max_new = min(self.sampling.max_tokens, max(8, ctx // 2))
        with self.lm.lock:
            tok.truncation_side = "left"  # keep the end of the prompt, where the list continues
            encoded = tok(texts, truncation=True, max_length=ctx - max_new, add_special_tokens=not self.use_chat_template)["input_ids"]
        eos = frozenset(_eos_ids(model, tok))
        top_k = getattr(model.generation_config, "top_k", None)
        top_k = HF_DEFAULT_TOP_K if top_k is None else int(top_k)
        decode = [
            DecodeRequest(input_ids=tuple(ids), seed=r.seed, max_new_tokens=max_new, temperature=self.sampling.temperature,
                          top_p=self.sampling.top_p, top_k=top_k, eos_ids=eos, stop=tuple(self.sampling.stop))
            for ids, r in zip(encoded, requests, strict=True)
        ]
        t0 = time.perf_counter()
        try:
            results = self.lm.queue.submit(decode, cancel=cancel)
        except ResourceExhausted:
            metrics.LLM_ERRORS.labels(self.kind, "local").inc()
            raise
        metrics.LLM_REQUEST_SECONDS.labels(self.kind).observe(time.perf_counter() - t0)
        responses = []
        for d, res in zip(decode, results, strict=True):
            with self.lm.lock:
                text = tok.decode(res.tokens, skip_special_tokens=True)
            for s in self.sampling.stop:
                text = text.split(s, 1)[0]
            responses.append(
                LlmResponse(
                    text=text,
                    finish_reason=res.finish_reason,
                    starts_mid_item=True,  # both renderings end with the next item's number
                    prompt_tokens=len(d.input_ids),
                    completion_tokens=len(res.tokens),
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

    def __init__(self, settings: LlmSettings) -> None:
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
                while len(self._models) > self.settings.llm_max_loaded_models:
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
        lock = threading.Lock()
        queue = BatchingQueue(model, tok, device, max_batch=self.settings.llm_local_max_batch,
                              max_wait=self.settings.llm_local_max_wait_seconds, tokenizer_lock=lock)
        return LoadedLm(model=model, tokenizer=tok, device=device, lock=lock, queue=queue)

    def embedding_model(self, source: str, device: str) -> tuple[Any, threading.Lock]:
        """A sentence-embedding model and its lock."""
        from selma.llm.embedding import load_embedding_model

        return self._get(("emb", source, device), lambda: (load_embedding_model(source, device=device), threading.Lock()))

    def backend(self, spec: BackendSpec) -> LlmBackend:
        """A ready backend for ``spec`` (loads local models; resolves the API key)."""
        plugin = plugins.registry().llm_backends.get(spec.kind)
        if plugin is not None:  # a kind a plugin added (selma.plugins)
            return plugin.build(spec)
        if spec.kind == "openai_compatible":
            return OpenAICompatibleBackend(
                spec,
                self.settings.api_key(spec.api_key_name, spec.api_key_key),
                backoff=self.settings.llm_retry_backoff_seconds,
                max_backoff=self.settings.llm_retry_max_backoff_seconds,
            )
        lm = self.causal_lm(spec)
        return LocalLmBackend(
            spec.kind,
            spec.model_name,
            lm,
            spec.sampling,
            use_chat_template=spec.use_chat_template,
            batch_size=self.settings.llm_local_batch_size,
        )


def _tiny_lm_dir(cache: Path, seed: int) -> Path:
    """The tiny LM for ``seed``, built once under the model cache."""
    from selma.models.tiny import build_tiny_lm

    path = cache / f"tiny-lm-seed{seed}"
    if not (path / "config.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_lm(path, seed)
    return path
