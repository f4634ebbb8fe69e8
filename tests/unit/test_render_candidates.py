"""Best-of-K candidate rounds of a dataset render: candidate k of prompt i is image k of a K-image render.

Its seed, file name and bytes do not depend on which rounds ran before, on the prompts a gate
already kept, or on the run: a resumed or repeated round renders the same candidates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.errors import FailedPrecondition, InvalidArgument, NotFound
from selma.jobs import JobPhase, JobRecord
from selma.v1 import common_pb2, render_service_pb2
from selma_render.core import RenderCore
from selma_render.dataset import Prompt, plan_dataset_items, plan_items, reproduce_image
from selma_render.settings import RenderSettings
from selma_render.spec import parse_dataset_spec

pytestmark = pytest.mark.slow

K = 3


@pytest.fixture
def settings(make_settings) -> RenderSettings:
    return RenderSettings(**make_settings().model_dump(), render_max_resolution=256)


@pytest.fixture
def core(settings) -> Iterator[RenderCore]:
    c = RenderCore(settings)
    yield c
    c.shutdown()


def _prompt_set(store: ArtifactStore, n: int) -> str:
    lines = [{"id": f"p{i:06d}", "index": i, "text": f"{i + 1} red cubes on a table", "skill": "count"} for i in range(n)]
    with store.writer("prompt_set", key="prompts", parameters={"skill": "count", "count": n}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    return w.manifest.id


def _kept(store: ArtifactStore, prompt_ids: list[str]) -> str:
    """A stand-in for a gate's kept dataset: one row per prompt id (no images needed to skip prompts)."""
    aid = new_artifact_id(ArtifactKind.IMAGE_DATASET, "kept/" + ",".join(prompt_ids))
    with store.writer(ArtifactKind.IMAGE_DATASET, id=aid, parameters={"format": "imagefolder", "images": len(prompt_ids)}) as w:
        w.put_bytes("metadata.jsonl", "".join(json.dumps({"file_name": f"images/{p}.png", "prompt_id": p}) + "\n" for p in prompt_ids).encode())
    return aid


def _spec(model, ps: str, *, ipp: int = 1, candidates: render_service_pb2.CandidateRound | None = None) -> render_service_pb2.DatasetRenderSpec:
    s = render_service_pb2.DatasetRenderSpec(
        run="r1", skill="count", prompt_set=common_pb2.ArtifactRef(id=ps, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET),
        settings=render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source=str(model)), images_per_prompt=ipp, batch_size=2, base_seed=11,
                                                   diffusion=common_pb2.DiffusionSettings(steps=2, scheduler=common_pb2.SCHEDULER_DDIM)))
    if candidates is not None:
        s.candidates.CopyFrom(candidates)
    return s


def _run(core: RenderCore, key: str, s: render_service_pb2.DatasetRenderSpec) -> JobRecord:
    rec, _, _ = core.start(key, s)
    *_, rec = core.jobs.watch(rec.job_id)
    assert rec.phase == JobPhase.SUCCEEDED, rec.error
    return rec


def _rows(store: ArtifactStore, aid: str) -> dict[str, dict]:
    return {r["file_name"]: r for r in (json.loads(x) for x in store.read_bytes(aid, "metadata.jsonl").decode().splitlines() if x.strip())}


def test_candidate_rounds_render_the_images_of_a_k_image_render_for_the_prompts_not_yet_kept(core, tiny_models):
    store = core.store
    ps = _prompt_set(store, 4)
    full = _run(core, "full", _spec(tiny_models.sd, ps, ipp=K)).output.id
    full_rows = _rows(store, full)
    # round 0: candidate 0 of every prompt
    r0 = _run(core, "round-0", _spec(tiny_models.sd, ps, candidates=render_service_pb2.CandidateRound(index=0, per_prompt=K))).output.id
    assert sorted(_rows(store, r0)) == [f"images/{i:06d}-0.png" for i in range(4)]
    # round 2 (round 1 need not have run): prompts 0 and 2 already have a kept image; at most 1 image
    skip = common_pb2.ArtifactRef(id=_kept(store, ["p000000", "p000002"]), kind=common_pb2.ARTIFACT_KIND_IMAGE_DATASET)
    r2 = _run(core, "round-2", _spec(tiny_models.sd, ps, candidates=render_service_pb2.CandidateRound(index=2, per_prompt=K, skip_kept_in=skip))).output.id
    assert sorted(_rows(store, r2)) == ["images/000001-2.png", "images/000003-2.png"]
    capped = _run(core, "round-2-capped", _spec(tiny_models.sd, ps, candidates=render_service_pb2.CandidateRound(
        index=2, per_prompt=K, skip_kept_in=skip, max_images=1))).output.id
    assert sorted(_rows(store, capped)) == ["images/000001-2.png"]
    for aid in (r0, r2, capped):
        for name, row in _rows(store, aid).items():
            assert row["seed"] == full_rows[name]["seed"], name  # the seed of image k of the K-image render
            assert store.read_bytes(aid, name) == store.read_bytes(full, name), name  # and its bytes
    # the same round again (another run, another key) renders the same candidates
    again = _run(core, "round-2-again", _spec(tiny_models.sd, ps, candidates=render_service_pb2.CandidateRound(index=2, per_prompt=K, skip_kept_in=skip))).output.id
    assert [(f.path, f.sha256) for f in store.get(again).files if f.path.startswith("images/")] == \
           [(f.path, f.sha256) for f in store.get(r2).files if f.path.startswith("images/")]
    assert store.get(r2).parameters["candidate_round"] == {"index": 2, "per_prompt": K, "skip_kept_in": skip.id, "max_images": 0}
    # a candidate is re-rendered exactly from its round's dataset, like any dataset image
    assert reproduce_image(store, core.renderer, r2, "images/000003-2.png").identical


def test_candidate_seeds_match_a_k_image_plan_with_several_images_per_prompt(settings):
    prompts = [Prompt(id=f"p{i:06d}", index=i, text="x") for i in range(3)]
    msg = _spec("tiny://sd", "prompt-set-x", ipp=2)
    full = {it.path: it.seed for it in plan_items(prompts, parse_dataset_spec(_spec("tiny://sd", "prompt-set-x", ipp=2 * K), settings).config)}
    for k in range(K):
        msg.candidates.CopyFrom(render_service_pb2.CandidateRound(index=k, per_prompt=K))
        items = plan_dataset_items(None, prompts, parse_dataset_spec(msg, settings))  # type: ignore[arg-type]  # no skip: no store read
        assert {it.path: it.seed for it in items} == {p: s for p, s in full.items() if int(p.split("-")[1][:-4]) // 2 == k}


@pytest.mark.parametrize(("round_", "field"), [
    (render_service_pb2.CandidateRound(index=3, per_prompt=3), "spec.candidates.index"),
    (render_service_pb2.CandidateRound(index=0, per_prompt=17), "spec.candidates.per_prompt"),
    (render_service_pb2.CandidateRound(index=0, per_prompt=2, max_images=-1), "spec.candidates.max_images"),
    (render_service_pb2.CandidateRound(index=0, per_prompt=2, skip_kept_in=common_pb2.ArtifactRef(kind=common_pb2.ARTIFACT_KIND_IMAGE_DATASET)),
     "spec.candidates.skip_kept_in.id"),
])
def test_a_bad_candidate_round_is_refused_naming_the_field(settings, round_, field):
    with pytest.raises(InvalidArgument) as e:
        parse_dataset_spec(_spec("tiny://sd", "prompt-set-x", candidates=round_), settings)
    assert e.value.field == field


def test_a_round_with_nothing_to_render_or_an_unknown_gated_dataset_is_refused_at_start(core, tiny_models):
    ps = _prompt_set(core.store, 2)
    skip = common_pb2.ArtifactRef(id=_kept(core.store, ["p000000", "p000001"]))
    with pytest.raises(FailedPrecondition, match="nothing to render") as e:
        core.start("all-kept", _spec(tiny_models.sd, ps, candidates=render_service_pb2.CandidateRound(index=1, per_prompt=2, skip_kept_in=skip)))
    assert e.value.field == "spec.candidates"
    with pytest.raises(NotFound) as e:
        core.start("unknown", _spec(tiny_models.sd, ps, candidates=render_service_pb2.CandidateRound(
            index=1, per_prompt=2, skip_kept_in=common_pb2.ArtifactRef(id="image-dataset-0000"))))
    assert e.value.field == "spec.candidates.skip_kept_in.id"
    assert core.jobs.list(page_size=10, page_token="")[0] == []  # nothing was started
