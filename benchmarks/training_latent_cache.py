"""Training steps/s with the latent/text-embedding cache vs. encoding every step (diffusers' example loop).

Same tiny SD model, data, batch, seed and step count; each variant runs in its own fresh
process (so peak RSS is its own), the cached variant starting from a published cache, as every
re-run and resume does.  Prints steps/s, the ratio (target >= 1.25x) and peak memory.

    .venv/bin/python benchmarks/training_latent_cache.py [--steps 40] [--batch 4] [--images 16]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
import uuid
from pathlib import Path


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
                              "batch_size": batch, "resolution": resolution, "use_latent_cache": cached})
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
        ctx = mp.get_context("spawn")
        common = (root, storage_uri, str(tiny.sd), dataset.id)
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            warm = pool.apply(_run, (common + (True, 1, a.batch, a.resolution),))  # builds and publishes the cache
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            live = pool.apply(_run, (common + (False, a.steps, a.batch, a.resolution),))
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            cached = pool.apply(_run, (common + (True, a.steps, a.batch, a.resolution),))
    print(f"tiny SD, {a.images} images at {a.resolution}px, batch {a.batch}, {a.steps} steps, 1 torch thread, CPU")
    print(f"cache build (first run, {a.images} images x 2 orientations): {warm['total_s']:.2f} s total incl. 1 step")
    print(f"{'variant':<28}{'steps/s':>10}{'run s':>10}{'peak RSS MiB':>15}")
    for name, r in (("encode every step", live), ("latent/text cache (hit)", cached)):
        print(f"{name:<28}{r['steps_per_second']:>10.2f}{r['total_s']:>10.2f}{r['peak_rss_bytes'] / 2**20:>15.0f}")
    ratio = cached["steps_per_second"] / live["steps_per_second"] if live["steps_per_second"] else float("nan")
    print(f"speed-up with the cache: {ratio:.2f}x (target >= 1.25x); cache hit: {cached['hit']}")


if __name__ == "__main__":
    main()
