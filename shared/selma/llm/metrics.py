"""Prometheus metrics of the LLM layer (labels bounded: backend kind, outcome, error class, token type).

The names keep the ``selma_prompts_llm_`` prefix the dashboards and alerts use: the prompt service
is their main caller.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

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
LLM_BATCH_ROWS = Histogram(
    "selma_llm_batch_rows",
    "Sequences in one forward of a local model's batching queue (prefills and decode steps of all jobs together).",
    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256),
)
