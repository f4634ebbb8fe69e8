"""Wall time of one sharded dataset render with N local shard workers vs one worker (same spec, same images).

Each side renders the same prompt set with the tiny model through ``RenderCore`` and the local
launcher: the service writes the work document, starts the shard workers (``selma render shard``
child processes, each importing torch and loading the model), follows their journals and
publishes the dataset.  So a side's time includes process start-up and model load per worker,
which is what a sharded render costs on one machine; on a box with fewer free cores than workers
do not expect a speed-up (the workers share the cores).  Every side renders byte-identical images
(tests/integration/test_render_shards.py).  Shared harness: warm-up excluded, rotated order,
paired ratios per block.

    .venv/bin/python benchmarks/render_shards.py [--images 24] [--batch-size 2] [--steps 4] [--shards 1,2,3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from harness import compare

from selma.models.tiny import build_tiny
from selma.v1 import common_pb2, render_service_pb2
from selma_render.core import RenderCore
from selma_render.settings import RenderSettings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="images per render (prompts, one image each)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="width and height in pixels")
    ap.add_argument("--shards", default="1,3", help="comma-separated worker counts; the first is the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (OMP_NUM_THREADS)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers inherit it, as under `selma up`
    counts = [int(x) for x in args.shards.split(",")]

    with tempfile.TemporaryDirectory(prefix="selma-shard-bench-") as tmp:
        work = Path(tmp)
        tiny = build_tiny(work / "tiny-models")
        settings = RenderSettings(data_dir=work / "data", storage_uri=(work / "storage").as_uri(), render_default_model=str(tiny.sd),
                                  device="cpu", batch_poll_seconds=0.2, log_level="WARNING")
        core = RenderCore(settings)
        with core.store.writer("prompt_set", key="bench-prompts", labels={"selma.dev/skill": "bench"}) as w:
            w.put_bytes("prompts.jsonl", "".join(json.dumps({"id": f"p{i:06d}", "index": i, "text": f"{i % 5 + 1} red cubes, photo {i}"}) + "\n"
                                                 for i in range(args.images)).encode())
        prompt_set = w.manifest.id
        keys = (f"round-{i}" for i in range(10**6))

        def render(shards: int) -> None:
            spec = render_service_pb2.DatasetRenderSpec(
                prompt_set=common_pb2.ArtifactRef(id=prompt_set), shards=shards,
                settings=render_service_pb2.RenderSettings(
                    diffusion=common_pb2.DiffusionSettings(steps=args.steps, width=args.size, height=args.size), batch_size=args.batch_size),
            )
            rec, _, _ = core.start(next(keys), spec)
            for _ in core.jobs.watch(rec.job_id, heartbeat=1.0):
                pass
            done = core.jobs.get(rec.job_id)
            if done.phase.name != "SUCCEEDED":
                raise SystemExit(f"render with {shards} shard(s) failed: {done.message}")

        print(f"tiny-sd, {args.images} images of {args.size}px, batch {args.batch_size}, {args.steps} steps, {args.threads} thread(s) per worker")
        sides = {f"{n} worker(s)": (lambda n=n: render(n)) for n in counts}
        cmp = compare(sides, baseline=f"{counts[0]} worker(s)", repeats=args.rounds,
                      title="seconds per dataset render (process start-up and model load per worker included)")
        cmp.print(unit="s", per="render", speedup=True)
        core.shutdown(wait=True, timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
