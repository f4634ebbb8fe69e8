"""An image of a rendered dataset is reproduced byte for byte by ServingService.Generate.

Render (a dataset render through the render core, batch size 1) and serving (a real gRPC server)
run the same tiny SD base model with the same prompts, seed policy, base seed and diffusion
settings; both derive every image's seed with :func:`selma.seeds.derive_seed`, so each image of
the dataset and the corresponding Generate image have the same seed and the same PNG bytes, for
every seed policy.  Two prompts with two images each make the prompt and image indices matter.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import grpc
import pytest

from selma.seeds import SeedPolicy, derive_seed
from selma.v1 import common_pb2, render_service_pb2
from selma.v1 import serving_service_pb2 as spb
from selma.v1 import serving_service_pb2_grpc as spb_grpc
from selma_render.core import RenderCore
from selma_render.settings import RenderSettings
from selma_serving.server import build_server
from selma_serving.settings import ServingSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE_SEED = 42
IMAGES_PER_PROMPT = 2
PROMPTS = ["1 red cube on a table", "2 blue spheres on the grass"]
# Everything explicit, so neither service fills in a default of its own.
DIFFUSION = common_pb2.DiffusionSettings(steps=2, scheduler=common_pb2.SCHEDULER_DDIM, guidance_scale=6.0, width=64, height=64)
POLICIES = {
    SeedPolicy.DERIVED: common_pb2.SEED_POLICY_DERIVED,
    SeedPolicy.SEQUENTIAL: common_pb2.SEED_POLICY_SEQUENTIAL,
    SeedPolicy.FIXED: common_pb2.SEED_POLICY_FIXED,
}


@pytest.fixture(scope="module")
def services(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("seed-reproduction")
    render = RenderCore(RenderSettings(data_dir=root / "render", storage_uri=(root / "render-storage").as_uri(), render_max_resolution=256))
    serving_settings = ServingSettings(data_dir=root / "serving", storage_uri=(root / "serving-storage").as_uri(),
                                       serving_base_model=str(tiny_models.sd), serving_max_steps=20, serving_max_resolution=128)
    server = build_server(serving_settings).start()
    server.core.engine.load_base()
    server.set_ready(True)
    channel = grpc.insecure_channel(server.address)

    lines = [{"id": f"p{i:06d}", "index": i, "text": text, "skill": "count"} for i, text in enumerate(PROMPTS)]
    with render.store.writer("prompt_set", key="prompts", labels={"selma.dev/skill": "count"}, parameters={"skill": "count"}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    yield SimpleNamespace(render=render, stub=spb_grpc.ServingServiceStub(channel), model=str(tiny_models.sd), prompt_set=w.manifest.id)
    channel.close()
    server.stop(0)
    server.core.shutdown()
    render.shutdown()


def render_dataset(s: SimpleNamespace, policy: int) -> tuple[list[dict], dict[str, bytes]]:
    """Render the prompt set at batch size 1; returns the metadata rows and file name → PNG bytes."""
    spec = render_service_pb2.DatasetRenderSpec(
        run="r1",
        prompt_set=common_pb2.ArtifactRef(id=s.prompt_set, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET),
        settings=render_service_pb2.RenderSettings(
            model=common_pb2.ModelRef(source=s.model),
            diffusion=DIFFUSION,
            images_per_prompt=IMAGES_PER_PROMPT,
            base_seed=BASE_SEED,
            seed_policy=policy,
            batch_size=1,
        ),
    )
    rec, _, _ = s.render.start(f"seeds-{policy}", spec)
    *_, rec = s.render.jobs.watch(rec.job_id)  # the last update is terminal
    assert rec.output is not None, rec.message
    manifest = s.render.store.get(rec.output.id)
    rows = [json.loads(line) for line in s.render.store.read_bytes(manifest, "metadata.jsonl").decode().splitlines()]
    return rows, {r["file_name"]: s.render.store.read_bytes(manifest, r["file_name"]) for r in rows}


@pytest.mark.parametrize("policy", list(POLICIES), ids=[p.value for p in POLICIES])
def test_generate_reproduces_every_image_of_a_rendered_dataset(services, policy):
    rows, pngs = render_dataset(services, POLICIES[policy])
    assert [(r["prompt_index"], r["image_index"]) for r in rows] == [(p, i) for p in range(len(PROMPTS)) for i in range(IMAGES_PER_PROMPT)]
    assert [r["seed"] for r in rows] == [derive_seed(policy, BASE_SEED, r["prompt_index"], r["image_index"], IMAGES_PER_PROMPT) for r in rows]

    generated = list(services.stub.Generate(spb.GenerateRequest(prompts=PROMPTS, diffusion=DIFFUSION, images_per_prompt=IMAGES_PER_PROMPT,
                                                                seed=BASE_SEED, seed_policy=POLICIES[policy])))
    assert len(generated) == len(rows)
    for row, resp in zip(rows, generated, strict=True):
        img = resp.image
        where = f"{policy.value} prompt {row['prompt_index']} image {row['image_index']}"
        assert (img.prompt_index, img.image_index, img.prompt) == (row["prompt_index"], row["image_index"], row["text"]), where
        assert img.seed == row["seed"], where
        # PNG bytes, not just pixels: both services write RGB PNGs with PIL's defaults and no metadata chunks
        assert img.png == pngs[row["file_name"]], where

    if policy is not SeedPolicy.FIXED:  # the indices matter: four different seeds and four different images
        assert len({r["seed"] for r in rows}) == len({g.image.png for g in generated}) == len(rows)
