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

from selma.errors import InvalidArgument
from selma.llm.backend import BackendSpec
from selma.llm.specs import resolve_backend
from selma.specs import (
    check_known_fields,
    device_options,
    parse_float,
    parse_int,
    parse_mapping,
    parse_str,
    rouge_l_threshold,
)
from selma_prompts.rouge import DEFAULT_THRESHOLD
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import Skill, SkillLibrary, make_skill

DEFAULT_EXAMPLES_PER_REQUEST = 3
DEFAULT_PROMPTS_PER_REQUEST = 20
DEFAULT_MAX_COSINE = 0.9
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


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
        raise InvalidArgument(f"count must be at most SELMA_PROMPTS_MAX_COUNT={settings.prompts_max_count}; got {count}", field="spec.count")
    threshold = rouge_l_threshold(d.get("rouge_l_threshold"))
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
        device, _ = device_options(ef.get("device"), "spec.embedding_filter.device")
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
