"""Validating a ``selma.v1.LlmBackend`` (proto-JSON dict) into a :class:`~selma.llm.backend.BackendSpec`, defaults from :class:`LlmSettings`."""

from __future__ import annotations

from typing import Any

from selma import plugins
from selma.errors import InvalidArgument
from selma.llm.backend import BackendSpec, Sampling
from selma.llm.openai_http import checked_credential, parse_base_url, parse_transport
from selma.llm.settings import LlmSettings
from selma.specs import check_known_fields, device_options, parse_float, parse_int, parse_mapping, parse_str

_OPENAI_API = {"OPEN_AI_API_UNSPECIFIED": "", "OPEN_AI_API_COMPLETIONS": "completions", "OPEN_AI_API_CHAT_COMPLETIONS": "chat"}
BUILTIN_KINDS = ("openai_compatible", "local_causal_lm", "embedded", "tiny_test")


def _sampling(d: Any, fld: str, settings: LlmSettings) -> Sampling:
    d = parse_mapping(d, fld)
    check_known_fields(d, {"temperature", "top_p", "max_tokens", "stop"}, fld)
    temperature = parse_float(d.get("temperature"), f"{fld}.temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise InvalidArgument(f"temperature must be in [0, 2]; got {temperature}", field=f"{fld}.temperature")
    top_p = parse_float(d.get("top_p"), f"{fld}.top_p", 1.0)
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"top_p must be in (0, 1]; got {top_p}", field=f"{fld}.top_p")
    max_tokens = parse_int(d.get("max_tokens"), f"{fld}.max_tokens")
    if max_tokens < 0 or max_tokens > 131072:
        raise InvalidArgument(f"max_tokens must be in 0..131072 (0 = default); got {max_tokens}", field=f"{fld}.max_tokens")
    stop = d.get("stop") or []
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
        raise InvalidArgument("stop must be a list of at most 8 non-empty strings", field=f"{fld}.stop")
    return Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens or settings.llm_max_tokens, stop=tuple(stop))


def resolve_backend(d: Any, settings: LlmSettings, fld: str = "spec.backend") -> BackendSpec:
    """Validate an ``LlmBackend`` dict (empty = the service default); kinds added by plugins included."""
    kinds = backend_kinds()
    d = parse_mapping(d, fld)
    check_known_fields(d, set(kinds), fld)
    if len(d) > 1:
        raise InvalidArgument(f"set exactly one backend; got {sorted(d)}", field=fld)
    kind, body = next(iter(d.items())) if d else (settings.llm_default_backend, {})
    fld = f"{fld}.{kind}"
    body = parse_mapping(body, fld)
    if kind == "openai_compatible":
        check_known_fields(
            body,
            {"base_url", "model", "api_key", "api", "sampling", "request_timeout", "max_concurrency", "max_retries", "extra_body"},
            fld,
        )
        base_url = parse_base_url(body, fld, settings.llm_openai_base_url, "llm_openai_base_url")
        model = parse_str(body.get("model"), f"{fld}.model") or settings.llm_openai_model
        if not model:
            raise InvalidArgument("model is required: the service has no default (llm_openai_model)", field=f"{fld}.model")
        key = parse_mapping(body.get("api_key"), f"{fld}.api_key")
        check_known_fields(key, {"name", "key"}, f"{fld}.api_key")
        api_name = body.get("api") or "OPEN_AI_API_UNSPECIFIED"
        if api_name not in _OPENAI_API:
            raise InvalidArgument(f"unknown api {api_name!r}", field=f"{fld}.api")
        timeout, concurrency, retries, extra = parse_transport(body, fld, default_retries=settings.llm_max_retries)
        spec = BackendSpec(
            kind=kind,
            sampling=_sampling(body.get("sampling"), f"{fld}.sampling", settings),
            base_url=base_url,
            model=model,
            api=_OPENAI_API[api_name] or settings.llm_openai_api,
            api_key_name=parse_str(key.get("name"), f"{fld}.api_key.name"),
            api_key_key=parse_str(key.get("key"), f"{fld}.api_key.key"),
            request_timeout=timeout or settings.llm_request_timeout_seconds,
            max_concurrency=concurrency or settings.llm_max_concurrency,
            max_retries=retries,
            extra_body=dict(extra),
        )
        checked_credential(base_url, [settings.llm_openai_base_url, *settings.llm_allowed_base_urls],
                           lambda: settings.api_key(spec.api_key_name, spec.api_key_key, field=f"{fld}.api_key"),
                           allow_any=settings.llm_allow_any_base_url, prefix="LLM", what="LLM", field=f"{fld}.base_url")
        return spec
    if kind == "local_causal_lm":
        check_known_fields(body, {"model", "device", "sampling", "use_chat_template"}, fld)
        model_ref = parse_mapping(body.get("model"), f"{fld}.model")
        check_known_fields(model_ref, {"source", "revision", "variant", "vae_source"}, f"{fld}.model")
        source = parse_str(model_ref.get("source"), f"{fld}.model.source") or settings.llm_local_model
        if not source:
            raise InvalidArgument("model.source is required (a model directory or hub id): the service has no default", field=f"{fld}.model.source")
        device, precision = device_options(body.get("device"), f"{fld}.device")
        chat = body.get("use_chat_template")
        if chat is not None and not isinstance(chat, bool):
            raise InvalidArgument("use_chat_template must be a boolean", field=f"{fld}.use_chat_template")
        return BackendSpec(
            kind=kind,
            sampling=_sampling(body.get("sampling"), f"{fld}.sampling", settings),
            model=source,
            device=device,
            precision=precision,
            use_chat_template=chat,
        )
    if kind == "embedded":
        check_known_fields(body, {"device", "sampling"}, fld)
        device, precision = device_options(body.get("device"), f"{fld}.device")
        return BackendSpec(kind=kind, sampling=_sampling(body.get("sampling"), f"{fld}.sampling", settings), device=device, precision=precision)
    if kind == "tiny_test":
        check_known_fields(body, {"seed"}, fld)
        seed = parse_int(body.get("seed"), f"{fld}.seed")
        if not 0 <= seed < 2**31:
            raise InvalidArgument(f"seed must be in 0..2^31-1; got {seed}", field=f"{fld}.seed")
        # Its context is 128 tokens: keep generations short.
        return BackendSpec(kind=kind, sampling=Sampling(max_tokens=48), tiny_seed=seed)
    plugin = plugins.registry().llm_backends.get(kind)
    if plugin is not None:
        plugin.check(body, fld)
        return BackendSpec(kind=kind, sampling=Sampling(temperature=0.0, max_tokens=0), plugin_model_name=plugin.model_name)
    raise InvalidArgument(f"unknown backend {kind!r}; use one of {', '.join(kinds)}", field=fld)


def backend_kinds() -> tuple[str, ...]:
    """The built-in LLM backend kinds and those plugins added."""
    return (*BUILTIN_KINDS, *sorted(plugins.registry().llm_backends))
