"""Per-job overhead of a local training worker: a fresh interpreter per job vs. a child forked by the warm worker.

A quickstart-sized training job (examples/quickstart.yaml: tiny preset, 30 steps, a checkpoint
every 10, LoRA rank 8, six 64-px images, a cold latent cache: every job has a dataset of its own)
runs through ``LocalLauncher`` two ways, timed from launch to exit:

* ``plain`` — ``batch_warm_worker`` off: ``python -m selma.app.cli train --config …`` per job;
* ``warm`` — the job forked from the launcher's zygote (started, and its imports paid, before the
  blocks: printed as a build cost).

The **overhead** of a job in each mode is measured directly: the same ``selma train`` command run
again on its finished job (a no-op: the trainer reads the job document, sees the published expert
and exits) is process start, imports, settings, storage and teardown without the work.  Per block
the **overhead share** is ``no-op wall / job wall`` of the same mode; the goal (#24) is ≤ 25 % with
the warm worker.  (The plain no-op skips the diffusers import that a real job pays in
``load_pipeline``, so its share understates the plain overhead; the script also prints the share
implied by the work being the same in both modes: ``1 - (warm job - warm no-op) / plain job``.)  All four sides run in one
process through the shared harness: warm-up excluded, order rotated per block, paired ratios.

    .venv/bin/python benchmarks/local_job_overhead.py [--steps 30] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
from harness import compare, spread

from selma.artifacts import ArtifactStore
from selma.batch.launchers import LaunchRequest, LocalLauncher, Monitor
from selma.models.tiny import build_tiny
from selma.storage import open_storage
from selma_training.config import TrainingJob, from_proto_dict
from selma_training.samples import publish_shapes_dataset
from selma_training.settings import TrainingSettings


class Quiet(Monitor):
    def __init__(self) -> None:
        self.details: dict[str, str] = {}

    def poll(self, details, message=None, attempt=None) -> None:
        self.details = dict(details)

    def state(self) -> str | None:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="selma-job-overhead-") as tmp:
        root = Path(tmp)
        tiny = build_tiny(root / "tiny")
        common = dict(storage_uri=(root / "storage").as_uri(), device="cpu", batch_progress_interval_seconds=2, batch_poll_seconds=0.5,
                      log_level="WARNING", hf_offline=True, cache_dir=root / "cache")
        settings = TrainingSettings(data_dir=root / "data", **common)
        store = ArtifactStore(open_storage(settings))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        launchers = {
            "plain": LocalLauncher(TrainingSettings(data_dir=root / "plain", batch_warm_worker=False, **common), env=env),
            "warm": LocalLauncher(TrainingSettings(data_dir=root / "warm", batch_warm_worker=True, **common), env=env),
        }
        t0 = time.perf_counter()
        warm = launchers["warm"]
        while warm.warm_worker() is None:  # asking starts it; its imports are a one-off cost per service
            time.sleep(0.05)
        zygote_start = time.perf_counter() - t0
        cfg, _ = from_proto_dict({"base_model": {"source": str(tiny.sd)}, "preset": "TRAINING_PRESET_TINY", "max_steps": args.steps,
                                  "checkpoint_every": 10, "lora": {"rank": 8, "alpha": 8}})
        seeds = iter(range(1, 10_000))

        def new_job() -> tuple[TrainingJob, Path]:
            dataset = publish_shapes_dataset(store, args.images, seed=next(seeds))  # cold latent cache, as each quickstart skill
            jid = uuid.uuid4().hex[:12]
            job = TrainingJob(job_id=f"job-{jid}", idempotency_key=jid, run="bench", skill="shapes", dataset_id=dataset.id, config=cfg,
                              expert_id=f"expert-{jid}", work_prefix=f"training/job-{jid}")
            doc = root / f"{jid}.json"
            doc.write_text(job.model_dump_json())
            return job, doc

        done: dict[str, tuple[TrainingJob, Path]] = {}

        def launch(mode: str, job: TrainingJob, doc: Path) -> float:
            req = LaunchRequest(job_id=job.job_id, idempotency_key=job.idempotency_key, run="bench", skill="shapes", config_uri=str(doc),
                                expert_id=job.expert_id)
            monitor = Quiet()
            t = time.perf_counter()
            outcome = launchers[mode].run(req, monitor)
            wall = time.perf_counter() - t
            if outcome.state != "succeeded":
                raise RuntimeError(f"{mode}: {outcome}")
            if monitor.details.get("local.warm") != str(mode == "warm").lower():
                raise RuntimeError(f"{mode} ran with local.warm={monitor.details.get('local.warm')}")
            return wall

        def train(mode: str):
            def side() -> float:
                job, doc = new_job()
                wall = launch(mode, job, doc)
                done[mode] = (job, doc)
                return wall
            return side

        def noop(mode: str):
            def side() -> float:
                if mode not in done:  # the very first call of the warm-up
                    train(mode)()
                return launch(mode, *done[mode])
            return side

        sides = {"plain: job": train("plain"), "plain: no-op job": noop("plain"), "warm: job": train("warm"), "warm: no-op job": noop("warm")}
        cmp = compare(sides, baseline="plain: job", repeats=args.rounds, warmup=1,
                      title=f"local training job, quickstart-sized ({args.steps} steps, {args.images} images, {args.threads} thread(s))",
                      builds={"warm worker start (its imports)": zygote_start})
        for mode in ("plain", "warm"):
            shares = [n / w for n, w in zip(cmp.times[f"{mode}: no-op job"], cmp.times[f"{mode}: job"], strict=True)]
            lo, med, hi = spread(shares)
            cmp.notes.append(f"overhead share (no-op wall / job wall), {mode}: min {lo:.1%}, median {med:.1%}, max {hi:.1%}")
        # the plain no-op skips imports a real job pays later (diffusers, transformers, peft in load_pipeline): the work of a
        # job is the same in both modes, so (plain job - (warm job - warm no-op)) / plain job bounds the plain overhead better
        implied = [1 - (w - n) / p for p, w, n in zip(cmp.times["plain: job"], cmp.times["warm: job"], cmp.times["warm: no-op job"], strict=True)]
        lo, med, hi = spread(implied)
        cmp.notes.append(f"plain overhead share implied by the same work in both modes, 1 - (warm job - warm no-op) / plain job: "
                         f"min {lo:.1%}, median {med:.1%}, max {hi:.1%}")
        pair = cmp.ratios("warm: job")
        cmp.notes.append(f"job wall time warm / plain, per block: min {min(pair):.3f}, median {statistics.median(pair):.3f}, max {max(pair):.3f}")
        cmp.print(unit="s", per="job")
        for launcher in launchers.values():
            launcher.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
