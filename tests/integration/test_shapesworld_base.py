"""The published ShapesWorld base model: loads through the normal model path and draws single shapes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("selma_shapesworld.world")

from diffusers import StableDiffusionPipeline  # noqa: E402

from selma.pipelines import ModelSpec, load_pipeline, make_scheduler  # noqa: E402
from selma_shapesworld import judge, world  # noqa: E402
from selma_shapesworld.plugin import model_path as shapesworld_model_path  # noqa: E402

pytestmark = pytest.mark.slow

# Judge `ok` accuracy on the 24 prompts below, DDIM 25 steps, CFG 2, 1 thread: measured 17/24 (71 %) on
# the published weights (CFG 4: 16/24; on 48 fresh single-object captions at CFG 4: 62.5 %; the weights
# before the skill-richer retraining: 8/24).  The floor leaves room for float differences across CPUs and
# library versions; random weights score 0.
GUIDANCE = 2.0
ACCURACY_FLOOR = 0.2


def test_published_weights_are_small_safetensors_with_their_training_record():
    path = shapesworld_model_path("shapesworld://base")
    files = [p for p in path.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert sum(p.stat().st_size for p in files) < 16 * 2**20
    record = json.loads((path / "shapesworld-base.json").read_text())
    assert record["seed"] == 0 and record["config"]["unet_steps"] > 0


def test_base_model_loads_and_renders_recognisable_single_shapes(make_settings):
    torch.set_num_threads(1)
    pipe = load_pipeline(ModelSpec("shapesworld://base"), make_settings(), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.scheduler = make_scheduler(pipe, "ddim")
    captions = [c for _, c in world.dataset(2024, 24, mix={"single": 1.0})]
    generators = [torch.Generator().manual_seed(i) for i in range(len(captions))]
    images = pipe(captions, num_inference_steps=25, guidance_scale=GUIDANCE, generator=generators).images
    assert all(im.size == (64, 64) for im in images)
    passed = [judge.verify(im, cap) for im, cap in zip(images, captions, strict=True)]
    accuracy = sum(passed) / len(passed)
    assert accuracy >= ACCURACY_FLOOR, f"judge accepted {sum(passed)}/{len(passed)} single-object images"
