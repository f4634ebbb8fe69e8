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
from selma.llm.openai_http import OpenAICompatibleBackend
from selma.llm.settings import LlmSettings

log = logging.getLogger(__name__)


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
                f"out of memory generating a batch of {len(texts)} with {self.model_name}; lower llm_local_batch_size or max_tokens"
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
        return LoadedLm(model=model, tokenizer=tok, device=device, lock=threading.Lock())

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
