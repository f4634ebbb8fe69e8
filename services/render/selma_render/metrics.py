"""Prometheus metrics of the render service (module-level objects on the default registry).

Labels are bounded: ``source`` is ``dataset`` or ``preview``; no ids, prompts or model names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

IMAGES_RENDERED = Counter(
    "selma_render_images_total",
    "Images rendered (and, for datasets, stored), by source.",
    ["source"],
)
IMAGE_SECONDS = Histogram(
    "selma_render_image_seconds",
    "Pipeline wall time per image (a batch's time divided by its size), by source.",
    ["source"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
QUEUE_LENGTH = Gauge(
    "selma_render_queue_length",
    "Dataset renders accepted but waiting for a worker (phase PENDING).",
)
MODEL_LOAD_SECONDS = Histogram(
    "selma_render_model_load_seconds",
    "Time to load a text-to-image pipeline into memory (cache misses only).",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
OOM_RETRIES = Counter(
    "selma_render_oom_retries_total",
    "Batches retried at a smaller size after the device ran out of memory.",
)
