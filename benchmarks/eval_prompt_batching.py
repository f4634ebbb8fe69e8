"""Evaluation with several prompts per ServingService.Generate call vs one prompt per call.

A real ServingService on 127.0.0.1 (tiny SD, CPU, its defaults: no batching across requests,
serving_request_batch_size 8 for a multi-prompt request with batch_prompts) and the evaluation worker's own runner
(EvaluationRunner: Generate RPCs, PNG storage, tiny VQA answers, scoring, the report) in this
process.  Sides: ``eval_prompts_per_call`` 1 (how evaluation rendered before) and --per-call
(default 8); each run is a fresh job (nothing resumed), base model plus one expert mix.  The
shared harness rotates the order per block and prints paired ratios.

    .venv/bin/python benchmarks/eval_prompt_batching.py [--prompts 32] [--steps 10] [--per-call 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from itertools import count
from pathlib import Path

import torch
from harness import compare

from selma.api import message_to_dict
from selma.artifacts import ArtifactStore
from selma.models.tiny import build_tiny
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import evaluation_service_pb2 as pb
from selma_evaluation.runner import EvaluationJobDoc, EvaluationRunner
from selma_evaluation.settings import EvaluationSettings
from selma_serving.server import build_server as build_serving
from selma_serving.settings import ServingSettings
from selma_serving.testing import make_expert


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--per-call", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory(prefix="selma-eval-batch-bench-") as tmp:
        root = Path(tmp)
        tiny = build_tiny(root / "tiny")
        storage_uri = (root / "storage").as_uri()
        serving = build_serving(ServingSettings(data_dir=root / "serving", storage_uri=storage_uri, serving_base_model=str(tiny.sd),
                                                device="cpu", log_level="WARNING", serving_max_prompts=max(16, args.per_call))).start()
        serving.core.engine.load_base()
        serving.set_ready(True)
        store = ArtifactStore(open_storage(serving.core.settings))
        experts = [make_expert(store, str(tiny.sd), seed=s, rank=4, skill=f"s{s}", run="bench") for s in (1, 2)]
        settings = EvaluationSettings(data_dir=root / "eval", storage_uri=storage_uri, device="cpu", batch_progress_interval_seconds=1,
                                      eval_serving_endpoint=serving.address, log_level="WARNING")
        mix = common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e.id, weight=0.5) for e in experts])
        spec = message_to_dict(pb.EvaluationSpec(
            benchmark=pb.EVALUATION_BENCHMARK_DSG_1K, categories=["countbench"], max_prompts=args.prompts,
            diffusion=common_pb2.DiffusionSettings(steps=args.steps, width=64, height=64),
            targets=[pb.EvaluationTarget(label="base"), pb.EvaluationTarget(label="mix", experts=mix)]))
        jobs = count()

        def evaluate(per_call: int) -> None:
            name = f"bench-{next(jobs)}"
            doc = EvaluationJobDoc(job_id=name, idempotency_key=name, spec=spec, report_id=f"eval-report-{name}",
                                   work_prefix=f"evaluation/{name}", serving_endpoint=serving.address, vqa={"tiny_test": {}}, metrics=["dsg"])
            runner = EvaluationRunner(doc, settings.model_copy(update={"eval_prompts_per_call": per_call}))
            try:
                runner.run()
            finally:
                runner.close()

        print(f"{2 * args.prompts} images (base + one mix), {args.steps} steps, 64x64, tiny SD on CPU, torch threads {args.threads}")
        compare({"1 prompt per Generate call": lambda: evaluate(1),
                 f"{args.per_call} prompts per Generate call": lambda: evaluate(args.per_call)},
                baseline="1 prompt per Generate call", repeats=args.rounds,
                title=f"seconds per evaluation of {args.prompts} prompts").print(unit="s", per="evaluation", speedup=True)
        serving.stop(0)
        serving.core.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
