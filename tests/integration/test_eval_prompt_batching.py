"""Evaluation renders several prompts per ServingService.Generate call: each item keeps its own seed,
so the images equal the one-prompt-per-call images within the serving batch tolerance and the
scores are the same."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from selma.api import message_to_dict
from selma.v1 import common_pb2
from selma.v1 import evaluation_service_pb2 as pb
from selma_evaluation.runner import EvaluationJobDoc, EvaluationRunner, ServingRenderer
from selma_evaluation.vqa import VqaModel

pytestmark = pytest.mark.slow

PIXEL_TOLERANCE = 2  # the serving batch tolerance (tests/unit/test_serving_batching.py)


@pytest.fixture(scope="module")
def stack(eval_stack):
    return eval_stack


class BrightnessVqa(VqaModel):
    """Answers from the image's mean brightness: a judge that a pixel level of rounding cannot sway
    (unlike the tiny test VQA, which hashes the pixels), so equal images within tolerance score equal."""

    name = "brightness"
    batch_size = 8

    def answer(self, queries):
        out = []
        for q in queries:
            mean = float(np.asarray(q.image.convert("L"), dtype=np.float64).mean())
            level = int(mean // 32) % 2  # bands 32 levels wide: yes/no alternate with brightness
            out.append(q.choices[level % len(q.choices)] if q.choices else ("yes" if level else "no"))
        return out

    def close(self) -> None:
        pass


def test_multi_prompt_calls_give_the_one_prompt_images_within_tolerance_and_the_same_scores(stack):
    settings, store, experts = stack["settings"], stack["store"], stack["experts"]
    mix = common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e.id, weight=0.5) for e in experts])
    spec = message_to_dict(pb.EvaluationSpec(
        benchmark=pb.EVALUATION_BENCHMARK_DSG_1K, categories=["countbench"], max_prompts=5, base_seed=3, images_per_prompt=2,
        diffusion=common_pb2.DiffusionSettings(steps=2, width=64, height=64),
        targets=[pb.EvaluationTarget(label="base"), pb.EvaluationTarget(label="mix", experts=mix)]))
    calls: dict[str, list[int]] = {}

    def run(name: str, per_call: int) -> dict:
        calls[name] = []

        class Counting(ServingRenderer):
            def render_many(self, target, prompts, seeds, images, diffusion, should_stop):
                calls[name].append(len(prompts))
                return super().render_many(target, prompts, seeds, images, diffusion, should_stop)

        doc = EvaluationJobDoc(job_id=name, idempotency_key=name, spec=spec, report_id=f"eval-report-{name}", work_prefix=f"evaluation/{name}",
                               serving_endpoint=stack["training"].evaluation.serving_endpoint(), vqa={"tiny_test": {}}, metrics=["dsg"])
        runner = EvaluationRunner(doc, settings.model_copy(update={"eval_prompts_per_call": per_call}), renderer=Counting(doc.serving_endpoint))
        runner._vqa = BrightnessVqa()
        try:
            return runner.run()
        finally:
            runner.close()

    single, batched = run("one-per-call", 1), run("batched", 3)
    assert calls == {"one-per-call": [1] * 10, "batched": [3, 2, 3, 2]}  # 5 items × 2 targets
    a, b = store.get(single["id"]), store.get(batched["id"])
    images = sorted(f.path for f in a.files if f.path.startswith("images/") and f.path.endswith(".png"))
    assert len(images) == 20 and images == sorted(f.path for f in b.files if f.path.startswith("images/") and f.path.endswith(".png"))
    for path in images:
        pa, pb_ = (np.asarray(Image.open(io.BytesIO(store.read_bytes(m, path))).convert("RGB")).astype(int) for m in (a, b))
        assert np.abs(pa - pb_).max() <= PIXEL_TOLERANCE, path

    def scores(m) -> list:
        return [(t["label"], t["scores"]) for t in json.loads(store.read_bytes(m, "report.json"))["targets"]]

    assert scores(a) == scores(b) and all(s for _, s in scores(a))
    assert store.read_bytes(a, "verdicts.jsonl") == store.read_bytes(b, "verdicts.jsonl")  # every answer the same
