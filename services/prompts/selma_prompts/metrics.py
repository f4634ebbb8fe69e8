"""Prometheus metrics of the prompt service (module-level, default registry).

Labels are bounded: ``skill`` is a skill name, ``reason`` a rejection reason, ``backend`` a
backend kind (never a model name, URL or prompt), ``error`` one of a fixed set of error classes.
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
LLM_REQUESTS = Counter(
    "selma_prompts_llm_requests_total",
    "LLM requests finished (after retries), by backend kind and outcome (ok, error).",
    ["backend", "outcome"],
)
LLM_REQUEST_SECONDS = Histogram(
    "selma_prompts_llm_request_seconds",
    "Latency of one LLM call attempt (HTTP request or local generate batch), by backend kind.",
    ["backend"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
LLM_ERRORS = Counter(
    "selma_prompts_llm_errors_total",
    "Failed LLM call attempts, by backend kind and error class (timeout, connect, http_429, http_5xx, http_4xx, invalid_response, local).",
    ["backend", "error"],
)
LLM_RETRIES = Counter(
    "selma_prompts_llm_retries_total",
    "LLM call attempts retried after a transient error, by backend kind.",
    ["backend"],
)
LLM_TOKENS = Counter(
    "selma_prompts_llm_tokens_total",
    "Tokens reported by LLM backends, by backend kind and type (prompt, completion).",
    ["backend", "type"],
)
FILTER_SECONDS = Histogram(
    "selma_prompts_filter_seconds",
    "Time spent in a diversity filter for one LLM response's candidates, by filter (rouge_l, embedding).",
    ["filter"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
