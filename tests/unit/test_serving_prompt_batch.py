"""One request's prompts as batched pipeline calls (even with batching across requests off, as on
CPU), each prompt seeded by its own ``prompt_seeds`` entry; single-prompt requests stay unbatched."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from selma.errors import InvalidArgument
from selma_serving.core import ServingCore
from selma_serving.engine import GenerationRequest
from selma_serving.settings import ServingSettings

pytestmark = pytest.mark.slow

# the serving batch tolerance (tests/unit/test_serving_batching.py, measured by benchmarks/serving_batch_tolerance.py)
PIXEL_TOLERANCE = 2
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a star"]
SEEDS = [11, 2**40 + 5, 7]


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-prompt-batch")
    settings = ServingSettings(data_dir=root / "data", storage_uri=(root / "storage").as_uri(), serving_base_model=str(tiny_models.sd),
                               serving_max_steps=50, serving_max_resolution=128, serving_max_batch_size=1, serving_request_batch_size=4)
    core = ServingCore(settings)
    core.start()
    yield SimpleNamespace(core=core, engine=core.engine)
    core.shutdown()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.fixture
def calls(env, monkeypatch):
    """Images per pipeline call, in order."""
    sizes: list[int] = []
    view = env.engine.pipeline_view

    def pipeline_view(unet, scheduler, *rest):
        pipe = view(unet, scheduler, *rest)

        def run(**kw):
            gens = kw["generator"]
            sizes.append(len(gens) if isinstance(gens, list) else 1)
            return pipe(**kw)

        return run

    monkeypatch.setattr(env.engine, "pipeline_view", pipeline_view)
    return sizes


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompts": PROMPTS, "steps": 4, "width": 32, "height": 32, "seed_policy": "sequential", **kw})


def test_a_multi_prompt_request_runs_batched_and_each_prompt_matches_its_solo_render(env, calls):
    batched = list(env.engine.generate(request(prompt_seeds=SEEDS, images_per_prompt=2, batch_prompts=True)))
    assert calls == [4, 2]  # 6 images in calls of serving_request_batch_size 4, though cross-request batching is off
    assert [(im.prompt_index, im.image_index, im.seed) for im in batched] == [(p, i, SEEDS[p] + i) for p in range(3) for i in range(2)]
    calls.clear()
    for p, prompt in enumerate(PROMPTS):
        alone = list(env.engine.generate(request(prompts=[prompt], seed=SEEDS[p], images_per_prompt=2)))
        for i, im in enumerate(alone):
            assert im.seed == SEEDS[p] + i
            worst = np.abs(pixels(im.png) - pixels(batched[2 * p + i].png)).max()
            assert worst <= PIXEL_TOLERANCE, (prompt, i, worst)
    assert calls == [1] * 6  # single-prompt requests: one image per call (serving_max_batch_size 1)


def test_without_batch_prompts_or_with_one_prompt_nothing_is_batched_so_seeds_reproduce_exactly(env, calls):
    unbatched = list(env.engine.generate(request(prompt_seeds=SEEDS)))
    assert calls == [1, 1, 1]  # batch_prompts not asked for: one image per call, as a dataset render at batch size 1
    calls.clear()
    for p, prompt in enumerate(PROMPTS):
        assert next(env.engine.generate(request(prompts=[prompt], seed=SEEDS[p]))).png == unbatched[p].png  # byte-identical
    calls.clear()
    images = list(env.engine.generate(request(prompts=[PROMPTS[0]], seed=99, images_per_prompt=3, batch_prompts=True)))
    assert calls == [1, 1, 1]  # one prompt: batch_prompts has no effect
    again = list(env.engine.generate(request(prompts=[PROMPTS[0]], seed=images[2].seed, seed_policy="fixed")))
    assert again[0].png == images[2].png  # byte-identical


def test_prompt_seeds_are_checked_naming_the_field(env):
    for kw, fld in (({"prompt_seeds": [1, 2]}, "prompt_seeds"), ({"prompt_seeds": SEEDS, "seed": 3}, "prompt_seeds"),
                    ({"prompt_seeds": [1, -2, 3]}, "prompt_seeds[1]"), ({"prompt_seeds": [1, 2, 2**63]}, "prompt_seeds[2]")):
        with pytest.raises(InvalidArgument) as e:
            list(env.engine.generate(request(**kw)))
        assert e.value.field == fld, kw
