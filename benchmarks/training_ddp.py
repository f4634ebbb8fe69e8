"""Data-parallel expert training on CPU: time per optimizer step with N gloo processes vs one process.

Both sides train the same expert (tiny SD, same config, seed and global batch
``batch_size × gradient_accumulation_steps``) through the local launcher as the service runs it:
``selma train`` as a child process, which for N > 1 is the torchrun agent of N trainer processes
(each training ``accumulation / N`` micro-batches of every step, gradients all-reduced by
DistributedDataParallel).  A side's time is the trainer's own steady state — seconds per optimizer
step from its progress (``1 / steps_per_second``, training loop only: process start-up, model
load and the latent cache are not in it).

Printed: seconds per step of each side, the paired ratio N-process / 1-process per block (ideal
1/N), and the per-worker efficiency ``t_1 / (N · t_N)`` (steps/s per worker relative to one
process; < 1 = communication and contention cost; on a box with fewer free cores than processes
it cannot approach 1).  Shared harness: warm-up excluded, rotated order, paired ratios per block.

    .venv/bin/python benchmarks/training_ddp.py [--workers 2] [--steps 20] [--batch-size 2] [--accumulation 4] [--resolution 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import uuid
from pathlib import Path

from harness import compare

from selma.artifacts import ArtifactStore
from selma.batch.launchers import LaunchRequest, LocalLauncher, Monitor
from selma.batch.progress import read_progress
from selma.models.tiny import build_tiny
from selma.storage import open_storage
from selma_training.config import TrainingJob, from_proto_dict
from selma_training.samples import publish_shapes_dataset
from selma_training.settings import TrainingSettings


class _Quiet(Monitor):
    def poll(self, details: dict[str, str], message: str | None = None, attempt: int | None = None) -> None:
        pass

    def state(self) -> str | None:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="trainer processes of the distributed side")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--accumulation", type=int, default=4, help="micro-batches per step (a multiple of --workers)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the trainers inherit it

    with tempfile.TemporaryDirectory(prefix="selma-ddp-bench-") as tmp:
        work = Path(tmp)
        tiny = build_tiny(work / "tiny-models")
        settings = TrainingSettings(data_dir=work / "data", storage_uri=(work / "storage").as_uri(), device="cpu",
                                    batch_progress_interval_seconds=0, batch_poll_seconds=0.5, log_level="WARNING")
        store = ArtifactStore(open_storage(settings))
        dataset = publish_shapes_dataset(store, args.images)
        launcher = LocalLauncher(settings)

        def seconds_per_step(world: int) -> float:
            cfg, _ = from_proto_dict({"base_model": {"source": str(tiny.sd)}, "resolution": args.resolution, "batch_size": args.batch_size,
                                      "gradient_accumulation_steps": args.accumulation, "max_steps": args.steps,
                                      "checkpoint_every": args.steps, "lora": {"rank": 4}})
            jid = uuid.uuid4().hex[:12]
            job = TrainingJob(job_id=f"bench-{jid}", idempotency_key=jid, run="bench", skill="ddp", dataset_id=dataset.id, config=cfg,
                              expert_id=f"expert-{jid}", work_prefix=f"training/bench-{jid}", nodes=1, processes_per_node=world)
            doc = work / f"{job.job_id}.json"
            doc.write_text(job.model_dump_json())
            req = LaunchRequest(job_id=job.job_id, idempotency_key=jid, run="bench", skill="ddp", config_uri=str(doc), expert_id=job.expert_id,
                                placement={"max_retries": 0}, nodes=1 if world > 1 else 0, processes_per_node=world)
            outcome = launcher.run(req, _Quiet())
            if outcome.state != "succeeded":
                raise SystemExit(f"{world}-process training failed: {outcome.message}")
            return 1.0 / float(read_progress(store.storage, job.progress_key)["steps_per_second"])

        global_batch = args.batch_size * args.accumulation
        print(f"tiny-sd LoRA rank 4 at {args.resolution}px, global batch {global_batch} ({args.accumulation} micro-batches of "
              f"{args.batch_size}), {args.steps} steps, {args.threads} thread(s) per process, {os.cpu_count()} CPUs")
        one, many = "1 process", f"{args.workers} processes (gloo DDP)"
        cmp = compare({one: lambda: seconds_per_step(1), many: lambda: seconds_per_step(args.workers)}, baseline=one,
                      repeats=args.rounds, title="seconds per optimizer step (training loop only)")
        efficiency = [b / (args.workers * t) for t, b in zip(cmp.times[many], cmp.times[one], strict=True)]
        cmp.notes.append(f"per-worker efficiency t_1 / ({args.workers} * t_{args.workers}) per block: min {min(efficiency):.3f}, "
                         f"median {statistics.median(efficiency):.3f}, max {max(efficiency):.3f} (1 = perfect scaling)")
        cmp.print(unit="s", per="step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
