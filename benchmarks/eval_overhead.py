"""Wall time of an evaluation job vs. the same work done directly in one process.

Service side: a real EvaluationService and ServingService on 127.0.0.1; StartEvaluation, then Watch
until SUCCEEDED.  That includes the worker subprocess (Python start-up, job document, progress),
one Generate RPC per prompt and target, PNG storage, VQA batches, scoring, the report (tables,
charts, HTML, image copies) and publishing.  Baseline: the serving Engine called in-process for the
same prompts, seeds and targets (base and a per-request expert mix), the same tiny VQA model
answering the same questions, and DSG scoring — no RPCs, storage, report or subprocess.  Both use
the tiny SD model with its weights loaded and warmed up first.  The shared harness runs both sides
(warm-up excluded, rotated order, paired ratios per block; each service call is a new job).

    .venv/bin/python benchmarks/eval_overhead.py [--prompts 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import grpc
import torch
from harness import compare
from PIL import Image

from selma.artifacts import ArtifactStore
from selma.models.tiny import build_tiny
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import evaluation_service_pb2 as pb
from selma.v1 import evaluation_service_pb2_grpc as pb_grpc
from selma_evaluation.dsg import load_dsg1k, score_dsg
from selma_evaluation.runner import item_seed
from selma_evaluation.server import build_server as build_evaluation
from selma_evaluation.settings import EvaluationSettings
from selma_evaluation.vqa import VqaQuery, build_vqa, is_yes
from selma_serving.engine import GenerationRequest
from selma_serving.merge import params_from_dict
from selma_serving.server import build_server as build_serving
from selma_serving.settings import ServingSettings
from selma_serving.testing import make_expert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="selma-eval-bench-") as tmp:
        root = Path(tmp)
        tiny = build_tiny(root / "tiny")
        storage_uri = (root / "storage").as_uri()
        serving = build_serving(ServingSettings(data_dir=root / "serving", storage_uri=storage_uri, serving_base_model=str(tiny.sd),
                                                device="cpu", log_level="WARNING")).start()
        serving.core.engine.load_base()
        serving.set_ready(True)
        store = ArtifactStore(open_storage(serving.core.settings))
        experts = [make_expert(store, str(tiny.sd), seed=s, rank=4, skill=f"s{s}", run="bench") for s in (1, 2)]
        settings = EvaluationSettings(data_dir=root / "training", storage_uri=storage_uri, device="cpu", batch_poll_seconds=0.2,
                                      batch_progress_interval_seconds=1, eval_serving_endpoint=serving.address, log_level="WARNING")
        evaluation = build_evaluation(settings)
        items = load_dsg1k(["countbench"], args.prompts)
        mix = {"experts": [{"expert_id": e.id, "weight": 0.5} for e in experts]}
        diffusion = common_pb2.DiffusionSettings(steps=args.steps, width=64, height=64)

        # warm-up: the base pipeline and the fused mix
        engine = serving.core.engine
        for merge in (None, params_from_dict(mix)):
            list(engine.generate(GenerationRequest(prompts=["warm up"], steps=2, width=64, height=64, merge=merge)))

        vqa = build_vqa({"tiny_test": {}}, settings)
        stub = pb_grpc.EvaluationServiceStub(grpc.insecure_channel(evaluation.address))
        spec = pb.EvaluationSpec(benchmark=pb.EVALUATION_BENCHMARK_DSG_1K, categories=["countbench"], max_prompts=args.prompts,
                                 diffusion=diffusion, vqa=pb.VqaBackend(tiny_test=pb.TinyTestVqaBackend()),
                                 targets=[pb.EvaluationTarget(label="base"),
                                          pb.EvaluationTarget(label="mix", experts=common_pb2.MergeSpec(
                                              experts=[common_pb2.ExpertWeight(expert_id=e.id, weight=0.5) for e in experts]))])

        def run_direct() -> float:
            t0 = time.perf_counter()
            for merge in (None, params_from_dict(mix)):
                samples = []
                for it in items:
                    img = next(engine.generate(GenerationRequest(prompts=[it.prompt], steps=args.steps, width=64, height=64, merge=merge,
                                                                 seed=item_seed(0, it.id), seed_policy="sequential")))
                    image = Image.open(io.BytesIO(img.png)).convert("RGB")
                    answers = vqa.answer([VqaQuery(image=image, question=q.text) for q in it.questions])
                    samples.append((it, 0, {q.id: is_yes(a) for q, a in zip(it.questions, answers, strict=False)}))
                score_dsg(samples)
            return time.perf_counter() - t0

        def run_service(r: int) -> float:
            t0 = time.perf_counter()
            job = stub.StartEvaluation(pb.StartEvaluationRequest(idempotency_key=f"bench-{r}", spec=spec)).job
            for update in stub.WatchEvaluation(pb.WatchEvaluationRequest(job_id=job.status.job_id)):
                job = update.job
            if job.status.phase != common_pb2.JOB_PHASE_SUCCEEDED:
                raise SystemExit(f"evaluation failed: {job.status.message}")
            return time.perf_counter() - t0

        rounds = iter(range(10**6))
        images = 2 * len(items)
        print(f"{images} images, {sum(len(i.questions) for i in items) * 2} answers, {args.steps} steps, 64x64, tiny SD")
        compare({"direct (engine + VQA + scoring)": run_direct, "evaluation job (worker, RPCs, report)": lambda: run_service(next(rounds))},
                baseline="direct (engine + VQA + scoring)", repeats=args.rounds, title="seconds per evaluation of base + one mix").print(unit="s", per="evaluation")
        evaluation.stop(0)
        evaluation.core.shutdown()
        serving.stop(0)
        serving.core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
