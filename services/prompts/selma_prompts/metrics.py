"""Prometheus metrics of the prompt service (module-level, default registry).

Labels are bounded: ``skill`` is a skill name, ``reason`` a rejection reason, ``filter`` a filter name.
The LLM calls' metrics are the LLM layer's (:mod:`selma.llm.metrics`).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PROMPTS_ACCEPTED = Counter(
    "selma_prompts_accepted_total",
    "Generated prompts accepted into a prompt set, by skill.",
    ["skill"],
)
PROMPTS_REJECTED = Counter(
    "selma_prompts_rejected_total",
    "Generated candidates rejected, by skill and reason (rouge_l, embedding, empty, too_long).",
    ["skill", "reason"],
)
FILTER_SECONDS = Histogram(
    "selma_prompts_filter_seconds",
    "Time spent in a diversity filter for one LLM response's candidates, by filter (rouge_l, embedding).",
    ["filter"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
