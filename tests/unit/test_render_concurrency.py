"""Several dataset renders at once (render_max_concurrent_jobs) overlap their pipeline calls on one
device up to render_device_concurrency, each call with its own tokenizers, and render the same
images as one at a time."""

from __future__ import annotations

import json
import threading

import pytest

from selma.artifacts import ArtifactStore
from selma.jobs import JobPhase
from selma.v1 import common_pb2, render_service_pb2
from selma_render.core import RenderCore
from selma_render.settings import RenderSettings

pytestmark = pytest.mark.slow


def make_prompt_set(store: ArtifactStore, n: int, key: str) -> str:
    lines = [{"id": f"p{i:06d}", "index": i, "text": f"{i + 1} red cubes on a table", "skill": key} for i in range(n)]
    with store.writer("prompt_set", key=key, labels={"selma.dev/skill": key}, parameters={"skill": key, "count": n}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    return w.manifest.id


def spec(model, prompt_set: str) -> render_service_pb2.DatasetRenderSpec:  # noqa: ANN001
    return render_service_pb2.DatasetRenderSpec(
        run="r1", prompt_set=common_pb2.ArtifactRef(id=prompt_set, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET),
        settings=render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source=str(model)), diffusion=common_pb2.DiffusionSettings(steps=2),
                                                   images_per_prompt=1, batch_size=2),
    )


def render_two(settings: RenderSettings, tiny_models, on_call=None) -> list[dict[str, bytes]]:  # noqa: ANN001
    core = RenderCore(settings)
    try:
        if on_call is not None:
            view = core.renderer.pipeline_view

            def pipeline_view(pipe, key, tokenizers=None):  # noqa: ANN001, ANN202
                inner = view(pipe, key, tokenizers)

                def call(**kw):  # noqa: ANN003, ANN202
                    on_call(tokenizers)
                    return inner(**kw)

                return call

            core.renderer.pipeline_view = pipeline_view  # type: ignore[method-assign]
        recs = []
        for name in ("a", "b"):
            ps = make_prompt_set(core.store, 4, f"prompts-{name}")
            recs.append(core.start(f"render-{name}", spec(tiny_models.sd, ps))[0])
        out = []
        for rec in recs:
            *_, last = core.jobs.watch(rec.job_id)
            assert last.phase == JobPhase.SUCCEEDED, last.message
            m = core.store.get(last.output.id)
            rows = [json.loads(x) for x in core.store.read_bytes(m, "metadata.jsonl").decode().splitlines()]
            out.append({r["file_name"]: core.store.read_bytes(m, r["file_name"]) for r in rows})
        return out
    finally:
        core.shutdown()


def test_two_datasets_render_at_once_with_private_tokenizers_and_the_same_images(make_settings, tiny_models, tmp_path):
    def settings(name: str, **kw) -> RenderSettings:  # noqa: ANN003
        return RenderSettings(**make_settings(storage_uri=(tmp_path / name).as_uri(), data_dir=tmp_path / f"{name}-data").model_dump(), **kw)

    serial = render_two(settings("serial", render_max_concurrent_jobs=1), tiny_models)

    both_inside = threading.Barrier(2, timeout=120)  # passes only when two calls are inside the pipeline at once
    tokenizer_ids: list[int] = []
    first_calls = iter(range(2))

    def on_call(tokenizers):  # noqa: ANN001, ANN202
        tokenizer_ids.append(id(tokenizers["tokenizer"]))
        if next(first_calls, None) is not None:
            both_inside.wait()

    concurrent = render_two(settings("concurrent", render_max_concurrent_jobs=2, render_device_concurrency=2), tiny_models, on_call)
    assert not both_inside.broken
    assert len(set(tokenizer_ids[:2])) == 2  # the two overlapping calls held different tokenizer copies
    assert concurrent == serial  # byte-identical PNGs: concurrency changes the schedule, not the images
