"""A prompt-generation request, validated and with every default resolved.

Jobs store their spec as the JSON form of ``selma.v1.PromptGenerationSpec`` (proto field
names, as ``selma.api.message_to_dict`` writes it: enums as names, 64-bit integers and
durations as strings).  :func:`resolve_spec` turns that dict into a :class:`GenerationSpec`,
raising InvalidArgument that names the offending field (``spec.count``, …).  The CLI builds
the same dict, so both paths validate identically.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from selma.errors import InvalidArgument, PermissionDenied

from selma_prompts.rouge import DEFAULT_THRESHOLD
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import Skill, SkillLibrary, make_skill

DEFAULT_EXAMPLES_PER_REQUEST = 3
DEFAULT_PROMPTS_PER_REQUEST = 20
DEFAULT_MAX_COSINE = 0.9
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Keys of extra_body that would smuggle credentials or replace what the loop controls.
FORBIDDEN_EXTRA_FIELDS = re.compile(r"(api[-_]?key|authori[sz]ation|secret|password|bearer|^token$|access[-_]?token|^headers?$)", re.I)
RESERVED_EXTRA_FIELDS = {"model", "prompt", "messages", "n", "stream"}
_OPENAI_API = {"OPEN_AI_API_UNSPECIFIED": "", "OPEN_AI_API_COMPLETIONS": "completions", "OPEN_AI_API_CHAT_COMPLETIONS": "chat"}
_PRECISION = {"PRECISION_UNSPECIFIED": "", "PRECISION_FP32": "fp32", "PRECISION_FP16": "fp16", "PRECISION_BF16": "bf16"}
# shapesworld_grammar: the ShapesWorld caption grammar (selma_shapesworld.grammar), for the ShapesWorld loop.
BACKEND_KINDS = ("openai_compatible", "local_causal_lm", "embedded", "tiny_test", "shapesworld_grammar")


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters with defaults applied."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendSpec:
    """The LLM to call.  Fields not used by ``kind`` keep their defaults.

    ``api_key_name``/``api_key_key`` name a credential (resolved by the settings when the
    backend is built); the secret itself is never part of a spec.
    """

    kind: str
    sampling: Sampling = field(default_factory=Sampling)
    # openai_compatible
    base_url: str = ""
    model: str = ""
    api: str = "chat"
    api_key_name: str = ""
    api_key_key: str = ""
    request_timeout: float = 60.0
    max_concurrency: int = 4
    max_retries: int = 3
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    # local_causal_lm / embedded
    device: str = ""
    precision: str = ""
    use_chat_template: bool | None = None
    # tiny_test
    tiny_seed: int = 0

    @property
    def model_name(self) -> str:
        """The model as reported in lineage (no URL, no credential)."""
        if self.kind == "embedded":
            return "SmolLM2-135M-Instruct"
        if self.kind == "tiny_test":
            return f"tiny-lm-seed{self.tiny_seed}"
        if self.kind == "shapesworld_grammar":
            return "shapesworld-grammar"
        return self.model

    @property
    def backend_model(self) -> str:
        return f"{self.kind}:{self.model_name}"


@dataclass(frozen=True)
class EmbeddingSpec:
    """The optional embedding filter."""

    model_source: str = ""
    max_cosine_similarity: float = DEFAULT_MAX_COSINE
    device: str = "cpu"


@dataclass(frozen=True)
class GenerationSpec:
    """Everything the generation loop needs, validated, defaults resolved."""

    skill: Skill
    count: int
    threshold: float = DEFAULT_THRESHOLD
    backend: BackendSpec = field(default_factory=lambda: BackendSpec(kind="tiny_test"))
    seed: int = 0
    examples_per_request: int = DEFAULT_EXAMPLES_PER_REQUEST
    prompts_per_request: int = DEFAULT_PROMPTS_PER_REQUEST
    max_llm_requests: int = 0
    embedding: EmbeddingSpec | None = None
    run: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        """LLM requests allowed: the spec's, or 10 × count / prompts_per_request + 10."""
        return self.max_llm_requests or default_budget(self.count, self.prompts_per_request)

    def parameters(self) -> dict[str, Any]:
        """Manifest parameters (deterministic: no secrets, URLs, timings)."""
        return {
            "skill": self.skill.name,
            "requested": self.count,
            "threshold": self.threshold,
            "backend": self.backend.kind,
            "model": self.backend.model_name,
            "seed": self.seed,
            "examples_per_request": self.examples_per_request,
            "prompts_per_request": self.prompts_per_request,
            "max_llm_requests": self.budget,
            "temperature": self.backend.sampling.temperature,
            "top_p": self.backend.sampling.top_p,
            "max_tokens": self.backend.sampling.max_tokens,
            "embedding_filter": None
            if self.embedding is None
            else {"model": self.embedding.model_source or "all-MiniLM-L6-v2", "max_cosine_similarity": self.embedding.max_cosine_similarity},
            "skill_definition": self.skill.to_dict(),
        }


def default_budget(count: int, prompts_per_request: int) -> int:
    return math.ceil(10 * count / prompts_per_request) + 10


def parse_int(value: Any, fld: str, default: int = 0) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidArgument(f"must be an integer; got {value!r}", field=fld)
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"must be an integer; got {value!r}", field=fld) from None


def parse_float(value: Any, fld: str, default: float | None = None) -> float | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidArgument(f"must be a number; got {value!r}", field=fld)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"must be a number; got {value!r}", field=fld) from None
    if not math.isfinite(out):
        raise InvalidArgument(f"must be a finite number; got {value!r}", field=fld)
    return out


def parse_duration(value: Any, fld: str) -> float | None:
    """A protobuf JSON duration ("1.5s") or a number of seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if not value.endswith("s"):
            raise InvalidArgument(f"must be a duration such as '30s'; got {value!r}", field=fld)
        value = value[:-1]
    return parse_float(value, fld)


def parse_str(value: Any, fld: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"must be a string; got {type(value).__name__}", field=fld)
    return value.strip()


def parse_mapping(value: Any, fld: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"must be an object; got {type(value).__name__}", field=fld)
    return value


def check_known_fields(d: Mapping[str, Any], allowed: set[str], fld: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise InvalidArgument(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}", field=fld)


def _sampling(d: Any, fld: str, settings: PromptSettings) -> Sampling:
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
    return Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens or settings.prompts_max_tokens, stop=tuple(stop))


def _device(d: Any, fld: str) -> tuple[str, str]:
    d = parse_mapping(d, fld)
    check_known_fields(d, {"device", "precision"}, fld)
    device = parse_str(d.get("device"), f"{fld}.device").lower()
    if device and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise InvalidArgument(f"device must be auto, cpu, cuda or cuda:N; got {device!r}", field=f"{fld}.device")
    precision = d.get("precision") or "PRECISION_UNSPECIFIED"
    if precision not in _PRECISION:
        raise InvalidArgument(f"unknown precision {precision!r}", field=f"{fld}.precision")
    return device, _PRECISION[precision]


def _credential_endpoint_allowed(base_url: str, settings: PromptSettings) -> bool:
    allowed = [settings.prompts_openai_base_url, *settings.prompts_allowed_base_urls]
    return base_url.rstrip("/") in {u.rstrip("/") for u in allowed if u}


def resolve_backend(d: Any, settings: PromptSettings, fld: str = "spec.backend") -> BackendSpec:
    """Validate an ``LlmBackend`` dict (empty = the service default)."""
    d = parse_mapping(d, fld)
    check_known_fields(d, set(BACKEND_KINDS), fld)
    if len(d) > 1:
        raise InvalidArgument(f"set exactly one backend; got {sorted(d)}", field=fld)
    kind, body = next(iter(d.items())) if d else (settings.prompts_default_backend, {})
    fld = f"{fld}.{kind}"
    body = parse_mapping(body, fld)
    if kind == "openai_compatible":
        check_known_fields(
            body,
            {"base_url", "model", "api_key", "api", "sampling", "request_timeout", "max_concurrency", "max_retries", "extra_body"},
            fld,
        )
        base_url = parse_base_url(body, fld, settings.prompts_openai_base_url, "prompts_openai_base_url")
        model = parse_str(body.get("model"), f"{fld}.model") or settings.prompts_openai_model
        if not model:
            raise InvalidArgument("model is required: the service has no default (prompts_openai_model)", field=f"{fld}.model")
        key = parse_mapping(body.get("api_key"), f"{fld}.api_key")
        check_known_fields(key, {"name", "key"}, f"{fld}.api_key")
        api_name = body.get("api") or "OPEN_AI_API_UNSPECIFIED"
        if api_name not in _OPENAI_API:
            raise InvalidArgument(f"unknown api {api_name!r}", field=f"{fld}.api")
        timeout, concurrency, retries, extra = parse_transport(body, fld, default_retries=settings.prompts_max_retries)
        spec = BackendSpec(
            kind=kind,
            sampling=_sampling(body.get("sampling"), f"{fld}.sampling", settings),
            base_url=base_url,
            model=model,
            api=_OPENAI_API[api_name] or settings.prompts_openai_api,
            api_key_name=parse_str(key.get("name"), f"{fld}.api_key.name"),
            api_key_key=parse_str(key.get("key"), f"{fld}.api_key.key"),
            request_timeout=timeout or settings.prompts_request_timeout_seconds,
            max_concurrency=concurrency or settings.prompts_max_concurrency,
            max_retries=retries,
            extra_body=dict(extra),
        )
        # Resolve the credential now so a misnamed secret fails the request, not the job later.
        credential = settings.api_key(spec.api_key_name, spec.api_key_key, field=f"{fld}.api_key")
        if credential is not None and not _credential_endpoint_allowed(base_url, settings):
            # A caller must not be able to send the service's keys to an endpoint of its choosing.
            raise PermissionDenied(
                f"the service only sends API keys to configured endpoints; {base_url!r} is not one "
                "(add it to SELMA_PROMPTS_ALLOWED_BASE_URLS, or call it without an api_key)",
                field=f"{fld}.base_url",
            )
        return spec
    if kind == "local_causal_lm":
        check_known_fields(body, {"model", "device", "sampling", "use_chat_template"}, fld)
        model_ref = parse_mapping(body.get("model"), f"{fld}.model")
        check_known_fields(model_ref, {"source", "revision", "variant", "vae_source"}, f"{fld}.model")
        source = parse_str(model_ref.get("source"), f"{fld}.model.source") or settings.prompts_local_model
        if not source:
            raise InvalidArgument("model.source is required (a model directory or hub id): the service has no default", field=f"{fld}.model.source")
        device, precision = _device(body.get("device"), f"{fld}.device")
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
        device, precision = _device(body.get("device"), f"{fld}.device")
        return BackendSpec(kind=kind, sampling=_sampling(body.get("sampling"), f"{fld}.sampling", settings), device=device, precision=precision)
    if kind == "tiny_test":
        check_known_fields(body, {"seed"}, fld)
        seed = parse_int(body.get("seed"), f"{fld}.seed")
        if not 0 <= seed < 2**31:
            raise InvalidArgument(f"seed must be in 0..2^31-1; got {seed}", field=f"{fld}.seed")
        # Its context is 128 tokens: keep generations short.
        return BackendSpec(kind=kind, sampling=Sampling(max_tokens=48), tiny_seed=seed)
    if kind == "shapesworld_grammar":
        # The ShapesWorld grammar (selma_shapesworld.grammar) has no options and loads no model.
        check_known_fields(body, set(), fld)
        return BackendSpec(kind=kind, sampling=Sampling(temperature=0.0, max_tokens=0))
    raise InvalidArgument(f"unknown backend {kind!r}; use one of {', '.join(BACKEND_KINDS)}", field=fld)


def resolve_spec(
    d: Mapping[str, Any],
    settings: PromptSettings,
    library: SkillLibrary,
    *,
    max_count: int | None = None,
    preview: bool = False,
) -> GenerationSpec:
    """Validate a ``PromptGenerationSpec`` dict and resolve its defaults.

    ``max_count`` caps ``count`` silently (previews); otherwise a count above the service
    maximum is an error.
    """
    d = parse_mapping(d, "spec")
    check_known_fields(
        d,
        {
            "run", "skill_name", "skill", "count", "rouge_l_threshold", "embedding_filter", "backend", "seed",
            "examples_per_request", "prompts_per_request", "max_llm_requests", "labels",
        },
        "spec",
    )
    run = "" if preview else parse_str(d.get("run"), "spec.run")
    if run and not _DNS_LABEL.match(run):
        raise InvalidArgument(f"run must be a DNS label (lowercase letters, digits, '-', at most 63); got {run!r}", field="spec.run")
    if "skill" in d and "skill_name" in d:
        raise InvalidArgument("give skill_name or an inline skill, not both", field="spec.skill")
    if "skill" in d:
        skill = make_skill(parse_mapping(d["skill"], "spec.skill"), field="spec.skill")
    elif parse_str(d.get("skill_name"), "spec.skill_name"):
        skill = library.get(d["skill_name"], field="spec.skill_name")
    else:
        raise InvalidArgument(
            f"a skill is required: set skill_name (one of {', '.join(library.names())}) or an inline skill", field="spec.skill_name"
        )
    count = parse_int(d.get("count"), "spec.count")
    if count <= 0:
        raise InvalidArgument(f"count must be at least 1; got {count}", field="spec.count")
    if max_count is not None:
        count = min(count, max_count)
    elif count > settings.prompts_max_count:
        raise InvalidArgument(f"count must be at most {settings.prompts_max_count} (the service maximum); got {count}", field="spec.count")
    threshold = parse_float(d.get("rouge_l_threshold"), "spec.rouge_l_threshold", 0.0)
    if threshold == 0:
        threshold = DEFAULT_THRESHOLD
    elif not 0 < threshold <= 1:
        raise InvalidArgument(f"rouge_l_threshold must be in (0, 1] (0 = default {DEFAULT_THRESHOLD}); got {threshold}", field="spec.rouge_l_threshold")
    embedding = None
    if "embedding_filter" in d:
        ef = parse_mapping(d["embedding_filter"], "spec.embedding_filter")
        check_known_fields(ef, {"model", "max_cosine_similarity", "device"}, "spec.embedding_filter")
        model_ref = parse_mapping(ef.get("model"), "spec.embedding_filter.model")
        max_cos = parse_float(ef.get("max_cosine_similarity"), "spec.embedding_filter.max_cosine_similarity", 0.0)
        if max_cos == 0:
            max_cos = DEFAULT_MAX_COSINE
        elif not 0 < max_cos <= 1:
            raise InvalidArgument(f"max_cosine_similarity must be in (0, 1]; got {max_cos}", field="spec.embedding_filter.max_cosine_similarity")
        device, _ = _device(ef.get("device"), "spec.embedding_filter.device")
        embedding = EmbeddingSpec(
            model_source=parse_str(model_ref.get("source"), "spec.embedding_filter.model.source"),
            max_cosine_similarity=max_cos,
            device=device or settings.prompts_embedding_device,
        )
    seed = parse_int(d.get("seed"), "spec.seed")
    if not 0 <= seed < 2**63:
        raise InvalidArgument(f"seed must be in 0..2^63-1; got {seed}", field="spec.seed")
    k = parse_int(d.get("examples_per_request"), "spec.examples_per_request") or DEFAULT_EXAMPLES_PER_REQUEST
    if not 1 <= k <= 20:
        raise InvalidArgument(f"examples_per_request must be in 1..20 (0 = default 3); got {k}", field="spec.examples_per_request")
    n = parse_int(d.get("prompts_per_request"), "spec.prompts_per_request") or DEFAULT_PROMPTS_PER_REQUEST
    if not 1 <= n <= 100:
        raise InvalidArgument(f"prompts_per_request must be in 1..100 (0 = default 20); got {n}", field="spec.prompts_per_request")
    budget = parse_int(d.get("max_llm_requests"), "spec.max_llm_requests")
    if budget < 0 or budget > 10_000_000:
        raise InvalidArgument(f"max_llm_requests must be in 0..10000000 (0 = default); got {budget}", field="spec.max_llm_requests")
    labels = {} if preview else dict(parse_mapping(d.get("labels"), "spec.labels"))
    for key, value in labels.items():
        if not isinstance(value, str) or not 0 < len(key) <= 63 or len(value) > 63:
            raise InvalidArgument("label keys must be 1-63 characters and values strings of at most 63", field=f"spec.labels[{key!r}]")
    return GenerationSpec(
        skill=skill,
        count=count,
        threshold=threshold,
        backend=resolve_backend(d.get("backend"), settings),
        seed=seed,
        examples_per_request=k,
        prompts_per_request=n,
        max_llm_requests=budget,
        embedding=embedding,
        run=run,
        labels=labels,
    )


def parse_base_url(body: Mapping[str, Any], fld: str, default: str, setting: str) -> str:
    """An OpenAI-compatible ``base_url`` (or the service default named ``setting``): http(s), no credentials."""
    base_url = (parse_str(body.get("base_url"), f"{fld}.base_url") or default).rstrip("/")
    if not base_url:
        raise InvalidArgument(
            f"base_url is required (e.g. http://vllm.llm.svc:8000/v1): the service has no default ({setting})",
            field=f"{fld}.base_url",
        )
    if not re.match(r"^https?://[^\s/]+", base_url):
        raise InvalidArgument(f"base_url must be an http(s) URL up to and including /v1; got {base_url!r}", field=f"{fld}.base_url")
    if "@" in base_url.split("/")[2]:
        raise InvalidArgument("base_url must not carry credentials; name an api_key secret instead", field=f"{fld}.base_url")
    return base_url


def parse_transport(body: Mapping[str, Any], fld: str, *, default_retries: int) -> tuple[float | None, int, int, dict[str, Any]]:
    """(request_timeout or None, max_concurrency (0 = default), max_retries, extra_body) of an OpenAI-compatible backend."""
    timeout = parse_duration(body.get("request_timeout"), f"{fld}.request_timeout")
    if timeout is not None and not 0 < timeout <= 3600:
        raise InvalidArgument(f"request_timeout must be in (0, 3600] seconds; got {timeout}", field=f"{fld}.request_timeout")
    concurrency = parse_int(body.get("max_concurrency"), f"{fld}.max_concurrency")
    if not 0 <= concurrency <= 64:
        raise InvalidArgument(f"max_concurrency must be in 1..64 (0 = default); got {concurrency}", field=f"{fld}.max_concurrency")
    retries = parse_int(body.get("max_retries"), f"{fld}.max_retries", default_retries)
    if not 0 <= retries <= 10:
        raise InvalidArgument(f"max_retries must be in 0..10; got {retries}", field=f"{fld}.max_retries")
    extra = parse_mapping(body.get("extra_body"), f"{fld}.extra_body")
    for k in extra:
        if FORBIDDEN_EXTRA_FIELDS.search(k):
            raise InvalidArgument(f"extra_body must not carry credentials ({k!r}); name an api_key secret instead", field=f"{fld}.extra_body")
        if k in RESERVED_EXTRA_FIELDS:
            raise InvalidArgument(f"extra_body cannot set {k!r}: the service controls it", field=f"{fld}.extra_body")
    return timeout, concurrency, retries, dict(extra)
