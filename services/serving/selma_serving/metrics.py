"""Prometheus metrics of the serving service (module-level objects on the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from selma.metrics import RPC_BUCKETS

# model label values: "base", "registered", "mix" (per-request experts): bounded by construction.
REQUEST_SECONDS = Histogram(
    "selma_serving_request_seconds",
    "Generate requests from arrival to the last image, by kind of model.",
    ["model"],
    buckets=RPC_BUCKETS,
)
IMAGE_SECONDS = Histogram(
    "selma_serving_image_generation_seconds",
    "Denoising and decoding time of one image (no queueing), by kind of model.",
    ["model"],
    buckets=RPC_BUCKETS,
)
QUEUE_DEPTH = Gauge("selma_serving_queue_depth", "Generate requests waiting for a generation slot.")
IN_FLIGHT = Gauge("selma_serving_in_flight_requests", "Generate requests holding a generation slot.")
IMAGES_GENERATED = Counter("selma_serving_images_generated_total", "Images generated, by kind of model.", ["model"])
REJECTED = Counter("selma_serving_rejected_requests_total", "Generate requests refused because the queue was full.")
MERGE_CACHE_HITS = Counter("selma_serving_merge_cache_hits_total", "Per-request expert mixes served from the fused-model cache.")
MERGE_CACHE_MISSES = Counter("selma_serving_merge_cache_misses_total", "Per-request expert mixes merged and fused anew.")
MERGE_CACHE_BYTES = Gauge("selma_serving_merge_cache_bytes", "Bytes held by fused per-request mixes.")
MERGE_SECONDS = Histogram(
    "selma_serving_merge_seconds",
    "Time to merge experts (and fuse the result), by where the merge ran.",
    ["source"],  # "request" or "job"
    buckets=RPC_BUCKETS,
)
MODEL_LOAD_SECONDS = Histogram(
    "selma_serving_model_load_seconds",
    "Time to load a model: the base pipeline or a registered model fused into a UNet copy.",
    ["kind"],  # "base" or "registered"
    buckets=RPC_BUCKETS,
)
BATCH_SIZE = Histogram(
    "selma_serving_batch_size",
    "Images in one batched pipeline call, by kind of model.",
    ["model"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
QUEUE_WAIT = Histogram(
    "selma_serving_queue_wait_seconds",
    "Time a Generate request waited in line for a slot or a batch (0 when one was free).",
    buckets=RPC_BUCKETS,
)
FIRST_STEP_SECONDS = Histogram(
    "selma_serving_time_to_first_step_seconds",
    "From a Generate request's arrival to the end of its first denoising step, by kind of model.",
    ["model"],
    buckets=RPC_BUCKETS,
)
