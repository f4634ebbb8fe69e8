"""Training steps/s with the latent/text-embedding cache vs. encoding every step (diffusers' example loop).

Same tiny SD model, data, batch, seed and step count; both variants run in this one process
through the shared harness (rotated order, paired ratios per block), the cached variant starting
from a published cache, as every re-run and resume does.  The cache's one-off build is measured
and charged to the cached side for a whole run of --steps and of 4x --steps (target: steady-state
speed-up >= 1.25x).

    .venv/bin/python benchmarks/training_latent_cache.py [--steps 40] [--batch 4] [--images 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from harness import compare, spread


def _run(args: tuple[str, str, str, str, bool, int, int, int]) -> dict:
    root, storage_uri, model, dataset_id, cached, steps, batch, resolution = args
    import resource

    import torch

    torch.set_num_threads(1)
    from selma.batch.progress import read_progress
    from selma.storage import open_storage
    from selma_training.config import TrainingJob, from_proto_dict
    from selma_training.settings import TrainingSettings
    from selma_training.trainer import train

    settings = TrainingSettings(data_dir=Path(root) / "data", storage_uri=storage_uri, device="cpu", batch_progress_interval_seconds=1e9)
    cfg, _ = from_proto_dict({"base_model": {"source": model}, "max_steps": steps, "checkpoint_every": 10 * steps,
                              "batch_size": batch, "resolution": resolution, "use_latent_cache": cached,
                              "random_flip": True})  # both orientations, as the README's measurement
    jid = uuid.uuid4().hex[:12]
    job = TrainingJob(job_id=jid, idempotency_key=jid, run="bench", skill="shapes", dataset_id=dataset_id, config=cfg,
                      expert_id=f"expert-{jid}", work_prefix=f"training/{jid}")
    t0 = time.perf_counter()
    result = train(job, settings)
    total = time.perf_counter() - t0
    doc = read_progress(open_storage(settings), job.progress_key) or {}
    return {"cached": cached, "hit": result.cache_hit, "steps_per_second": doc.get("steps_per_second", 0.0), "total_s": total,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "final_loss": result.final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    from selma.artifacts import ArtifactStore
    from selma.models.tiny import build_tiny
    from selma.storage import open_storage
    from selma_training.config import TrainingJob  # noqa: F401 - fail early if the package is missing
    from selma_training.samples import publish_shapes_dataset
    from selma_training.settings import TrainingSettings

    with tempfile.TemporaryDirectory(prefix="selma-bench-") as root:
        tiny = build_tiny(Path(root) / "tiny")
        storage_uri = (Path(root) / "storage").as_uri()
        store = ArtifactStore(open_storage(TrainingSettings(data_dir=Path(root) / "data", storage_uri=storage_uri)))
        dataset = publish_shapes_dataset(store, a.images, size=a.resolution)
        common = (root, storage_uri, str(tiny.sd), dataset.id)
        warm = _run(common + (True, 1, a.batch, a.resolution))  # builds and publishes the cache (and 1 step)
        one_step = _run(common + (True, 1, a.batch, a.resolution))  # the same single step on a cache hit
        build = max(warm["total_s"] - one_step["total_s"], 0.0)

        totals: dict[bool, list[float]] = {True: [], False: []}

        def per_step(cached: bool) -> float:
            r = _run(common + (cached, a.steps, a.batch, a.resolution))
            assert r["hit"] == cached, r
            totals[cached].append(r["total_s"])  # the whole training call (model load included)
            return 1.0 / r["steps_per_second"]  # steady-state seconds per step, from the trainer's progress

        cmp = compare({"encode every step": lambda: per_step(False), "latent/text cache (hit)": lambda: per_step(True)},
                      baseline="encode every step", repeats=a.repeats, warmup=0,
                      title=f"training seconds per step: tiny SD, {a.images} images at {a.resolution}px, batch {a.batch}, {a.steps} steps",
                      builds={f"latent cache ({a.images} images x 2 orientations)": build})
        live, cached = (spread(cmp.times[k])[1] for k in ("encode every step", "latent/text cache (hit)"))
        live_total, cached_total = spread(totals[False])[1], spread(totals[True])[1]
        cmp.notes.append(f"whole training calls of {a.steps} steps (load included): {live_total:.2f} s vs {cached_total:.2f} s cached "
                         f"({live_total / cached_total:.2f}x); {live_total / (cached_total + build):.2f}x with the cache build charged")
        for steps in (a.steps, 4 * a.steps):
            cmp.notes.append(f"steady state over {steps} steps with the cache build charged: {live * steps / (build + cached * steps):.2f}x")
        cmp.print(per="step", speedup=True)

if __name__ == "__main__":
    main()
