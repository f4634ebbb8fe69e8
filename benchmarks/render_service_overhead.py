"""Images per second through RenderService vs the diffusers pipeline called directly, same batch size.

The service side is a real gRPC server on 127.0.0.1 (``build_server``) rendering a prompt set into
an image-dataset artifact: StartDatasetRender, then Watch until SUCCEEDED — so it includes PNG
encoding, storage uploads, journal checkpoints, progress records, metadata and publishing.  The
baseline calls the same loaded pipeline class in-process with the same prompts, batch size,
steps and one generator per image, and keeps the PIL images in memory.  Both sides exclude
model loading (the model is loaded and warmed up first).  The shared harness runs both sides
(warm-up excluded, rotated order, paired ratios per block).  Target: throughput ratio
(service / direct) >= 0.9.

    .venv/bin/python benchmarks/render_service_overhead.py [--model sd|sdxl] [--images 48] [--batch-size 8] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
from harness import compare

from selma.models.tiny import build_tiny
from selma.pipelines import ModelSpec, load_pipeline
from selma.v1 import common_pb2, render_service_pb2, render_service_pb2_grpc
from selma_render.server import build_server
from selma_render.settings import RenderSettings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("sd", "sdxl"), default="sd")
    ap.add_argument("--images", type=int, default=32, help="images per round (prompts, one image each)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared CI box)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="", help="working directory (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="selma-render-bench-") as tmp:
        work = Path(args.dir or tmp)
        tiny = build_tiny(work / "tiny-models")
        model = getattr(tiny, args.model)
        # the request names the model by path: the service may read it only from an allowed directory (selma.sources)
        settings = RenderSettings(data_dir=work / "data", render_default_model=str(model), device=args.device,
                                  model_allowed_dirs=str(Path(model).parent))
        prompts = [f"{i % 5 + 1} red cubes and a blue sphere, photo {i}" for i in range(args.images)]

        server = build_server(settings).start()
        server.core.warm_up()
        # time spent inside pipeline calls within the service: a load-independent view of its overhead
        inside = [0.0]
        inner_generate = server.core.renderer.generate

        def timed_generate(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            t = time.perf_counter()
            try:
                return inner_generate(*a, **kw)
            finally:
                inside[0] += time.perf_counter() - t

        server.core.renderer.generate = timed_generate
        store = server.core.store
        with store.writer("prompt_set", key="bench-prompts", labels={"selma.dev/skill": "bench"}) as w:
            w.put_bytes("prompts.jsonl", "".join(json.dumps({"id": f"p{i:06d}", "index": i, "text": t}) + "\n" for i, t in enumerate(prompts)).encode())
        prompt_set = w.manifest.id
        channel = grpc.insecure_channel(server.address)
        stub = render_service_pb2_grpc.RenderServiceStub(channel)
        spec = render_service_pb2.DatasetRenderSpec(
            prompt_set=common_pb2.ArtifactRef(id=prompt_set),
            settings=render_service_pb2.RenderSettings(
                model=common_pb2.ModelRef(source=str(model)),
                diffusion=common_pb2.DiffusionSettings(steps=args.steps),
                batch_size=args.batch_size,
                device=common_pb2.DeviceOptions(device=args.device),
            ),
        )

        def service_round(key: str) -> float:
            inside[0] = 0.0
            t0 = time.perf_counter()
            job_id = stub.StartDatasetRender(render_service_pb2.StartDatasetRenderRequest(idempotency_key=key, spec=spec)).job.status.job_id
            for update in stub.WatchDatasetRender(render_service_pb2.WatchDatasetRenderRequest(job_id=job_id)):
                last = update.job
            elapsed = time.perf_counter() - t0
            if last.status.phase != common_pb2.JOB_PHASE_SUCCEEDED:
                raise SystemExit(f"service job failed: {last.status.message}")
            fractions.append(inside[0] / elapsed)
            pipeline_seconds.append(inside[0])
            return elapsed

        pipe = load_pipeline(ModelSpec(str(model)), settings, device=args.device)
        pipe.set_progress_bar_config(disable=True)

        def direct_round() -> float:
            t0 = time.perf_counter()
            for i in range(0, len(prompts), args.batch_size):
                batch = prompts[i : i + args.batch_size]
                gens = [torch.Generator().manual_seed(i + j) for j in range(len(batch))]
                with torch.inference_mode():
                    images = pipe(batch, num_inference_steps=args.steps, generator=gens).images
                assert len(images) == len(batch)
            return time.perf_counter() - t0

        fractions: list[float] = []
        pipeline_seconds: list[float] = []
        keys = (f"round-{i}" for i in range(10**6))
        print(f"model tiny-{args.model}, {args.images} images/round, batch {args.batch_size}, {args.steps} steps, device {args.device}")
        cmp = compare({"direct diffusers": direct_round, "RenderService": lambda: service_round(next(keys))}, baseline="direct diffusers",
                      repeats=args.rounds, title="seconds per round of images (throughput ratio = speed-up column; target >= 0.9)")
        fractions, pipeline_seconds = fractions[-args.rounds :], pipeline_seconds[-args.rounds :]  # the warm-up's are not counted
        cmp.notes.append(f"share of the service's wall time inside pipeline calls: {statistics.median(fractions):.3f} (median over blocks)")
        cmp.notes.append(f"pipeline calls inside the service: {args.images / statistics.median(pipeline_seconds):.2f} images/s "
                         f"(direct {args.images / statistics.median(cmp.times['direct diffusers']):.2f}; the rest is machine noise)")
        cmp.print(unit="s", per="round", speedup=True)
        channel.close()
        server.stop(grace=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
