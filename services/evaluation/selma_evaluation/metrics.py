"""Prometheus metrics of the evaluation service's gate jobs (module-level objects on the default registry).

Labels are bounded: ``verdict`` is ``kept`` or ``rejected``; no ids, skills, prompts or model names.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

GATE_IMAGES_JOURNALED = Counter(
    "selma_gate_images_journaled_total",
    "Candidate images whose scores a gate job read from its journal instead of asking the VQA model again (resumes, later rounds).",
)
GATE_QUESTIONS_ANSWERED = Counter(
    "selma_gate_questions_answered_total",
    "Questions the VQA model answered for the gate.",
)
GATE_VERDICTS = Counter(
    "selma_gate_images_total",
    "Candidate images the VQA model scored for the gate, by verdict at the job's threshold (kept: score at or above it); "
    "each candidate counts once, when scored, not when a later round or threshold reads its journaled score.",
    ["verdict"],
)
GATE_IMAGE_SECONDS = Histogram(
    "selma_gate_image_seconds",
    "VQA scoring wall time per candidate image (a chunk's time divided by its size).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
