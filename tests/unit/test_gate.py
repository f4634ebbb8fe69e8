"""The gate stage's core: the ShapesWorld judge keeps exactly the right images, scores are journaled and reused.

Candidates are ShapesWorld ground-truth renders of their captions and deliberately wrong images
(a blank canvas; the same scene recoloured), so which ones pass is known without any model.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from selma import plugins
from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.errors import InvalidArgument, SelmaError, Unavailable
from selma.jobs import JobPhase
from selma.storage import open_storage
from selma_evaluation import gate as G
from selma_evaluation.settings import EvaluationSettings
from selma_shapesworld import world as W
from selma_shapesworld.judge import ShapesWorldJudgeVqa

JUDGE = {"shapesworld_judge": {}}


@pytest.fixture
def env(tmp_path):
    settings = EvaluationSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), hf_offline=True, log_level="WARNING")
    storage = open_storage(settings)
    store = ArtifactStore(storage)
    cores: list[G.GateCore] = []

    def core() -> G.GateCore:
        c = G.GateCore(settings, storage, store)
        cores.append(c)
        return c

    yield {"settings": settings, "storage": storage, "store": store, "core": core}
    for c in cores:
        c.shutdown()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _recoloured(scene: W.Scene) -> Image.Image:
    """The scene with every object in another colour: the caption's colour questions fail."""
    objs = []
    for o in scene.objects:
        other = next(c for c in W.COLOURS if c != o.colour)
        objs.append(replace(o, colour=other))
    return W.render(replace(scene, objects=tuple(objs)))


def _world(store: ArtifactStore, n: int = 4, seed: int = 0) -> tuple[str, str, dict[str, str]]:
    """A prompt set of ``n`` single-object captions and a dataset with 3 candidates each: right, blank, recoloured.

    Returns (prompt set id, dataset id, {file_name: "right"|"blank"|"recoloured"}).
    """
    rng = np.random.default_rng(seed)
    scenes = [W.sample_scene(rng, "single") for _ in range(n)]
    records = [{"id": f"p{i:06d}", "index": i, "text": W.caption(s), "skill": "objects"} for i, s in enumerate(scenes)]
    ps = new_artifact_id(ArtifactKind.PROMPT_SET, f"test/{seed}/prompts")
    with store.writer(ArtifactKind.PROMPT_SET, id=ps, parameters={"skill": "objects"}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    truth: dict[str, str] = {}
    rows = []
    ds = new_artifact_id(ArtifactKind.IMAGE_DATASET, f"test/{seed}/render")
    with store.writer(ArtifactKind.IMAGE_DATASET, id=ds, parents=[ps], parameters={"format": "imagefolder", "images": 3 * n}) as w:
        for i, (scene, rec) in enumerate(zip(scenes, records, strict=True)):
            blank = Image.new("RGB", (W.DEFAULT_SIZE, W.DEFAULT_SIZE), W.BACKGROUND)
            for k, (kind, image) in enumerate((("right", W.render(scene)), ("blank", blank), ("recoloured", _recoloured(scene)))):
                name = f"images/{i:06d}-{k}.png"
                w.put_bytes(name, _png(image))
                truth[name] = kind
                rows.append({"file_name": name, "text": rec["text"], "prompt_id": rec["id"], "prompt_index": i, "image_index": k, "seed": 1000 * i + k})
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return ps, ds, truth


def _spec(ps: str, datasets: list[str], **gate: Any) -> dict[str, Any]:
    return {"run": "t", "skill": "objects", "prompt_set": {"id": ps}, "datasets": [{"id": d} for d in datasets],
            "gate": {"vqa": JUDGE, "question_source": "GATE_QUESTION_SOURCE_VQA_BACKEND", **gate}}


def _finish(core: G.GateCore, job_id: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    *_, rec = core.manager.watch(job_id, is_active=lambda: time.monotonic() < deadline)  # the last update is terminal
    assert rec is not None and rec.phase.terminal, f"gate job {job_id} did not finish within {timeout} s"
    return rec


def _lines(store: ArtifactStore, aid: str, path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in store.read_bytes(aid, path).decode().splitlines() if line.strip()]


def test_judge_gate_keeps_exactly_the_right_images_and_records_every_candidates_score(env):
    store = env["store"]
    ps, ds, truth = _world(store)
    core = env["core"]()
    rec, created = core.start("t/objects/gate", _spec(ps, [ds], threshold=1.0))
    rec = _finish(core, rec.job_id)
    assert rec.phase == JobPhase.SUCCEEDED, rec.error
    kept_id = rec.output.id
    kept = store.get(kept_id)
    rows = _lines(store, kept_id, "metadata.jsonl")
    assert {r["file_name"] for r in rows} == {f for f, kind in truth.items() if kind == "right"}
    assert all(r["gate"] == {"score": 1.0, "threshold": 1.0} for r in rows)
    for r in rows:  # the kept images are the candidates' own bytes
        assert store.read_bytes(kept_id, r["file_name"]) == store.read_bytes(ds, r["file_name"])
    candidates = {c["file_name"]: c for c in _lines(store, kept_id, "gate.jsonl")}
    assert set(candidates) == set(truth)
    for name, kind in truth.items():
        c = candidates[name]
        assert c["passed"] == (kind == "right")
        assert c["questions"] and all({"id", "text", "answer", "score"} <= set(q) for q in c["questions"])
        assert c["score"] == pytest.approx(sum(q["score"] for q in c["questions"]) / len(c["questions"]))
    assert all(candidates[f]["score"] == 0.0 for f, kind in truth.items() if kind == "blank")
    assert all(0.0 < candidates[f]["score"] < 1.0 for f, kind in truth.items() if kind == "recoloured")
    # lineage: the kept dataset is its own artifact, the candidates its parent
    assert kept.parents == (ds,)
    assert [m.id for m in store.lineage(kept_id)][:3] == [kept_id, ds, ps]
    p = kept.parameters
    assert (p["candidates"], p["kept"], p["prompts_kept"], p["prompts_total"]) == (12, 4, 4, 4)
    assert p["pass_rate_percent"] == pytest.approx(100 * 4 / 12)
    assert (rec.stats["candidates_scored"], rec.stats["kept"], rec.stats["prompts_kept"], rec.stats["candidates_from_journal"]) == (12, 4, 4, 0)


def test_a_lower_threshold_reuses_the_journaled_scores_and_keeps_what_reaches_it(env):
    store = env["store"]
    ps, ds, truth = _world(store, seed=1)
    core = env["core"]()
    first = _finish(core, core.start("t/objects/gate", _spec(ps, [ds], threshold=1.0))[0].job_id)
    scores = {c["file_name"]: c["score"] for c in _lines(store, first.output.id, "gate.jsonl")}

    calls: list[int] = []
    counting = _counting_registry(calls)
    with plugins.use_registry(counting):
        second = _finish(core, core.start("t/objects/gate-half", _spec(ps, [ds], threshold=0.5))[0].job_id)
    assert second.phase == JobPhase.SUCCEEDED, second.error
    assert calls == []  # every score came from the journal
    assert second.stats["candidates_from_journal"] == 12
    kept = {r["file_name"] for r in _lines(store, second.output.id, "metadata.jsonl")}
    assert kept == {f for f, s in scores.items() if s >= 0.5}
    assert {f for f, kind in truth.items() if kind == "right"} <= kept and not any(truth[f] == "blank" for f in kept)


def _metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_gate_metrics_count_each_candidate_once_when_scored_and_journal_reads_apart(env):
    store = env["store"]
    ps, ds, truth = _world(store, seed=2)
    core = env["core"]()
    names = ("selma_gate_images_journaled_total", "selma_gate_questions_answered_total", "selma_gate_image_seconds_count")
    before = {k: _metric(k) for k in names}
    kept0, rejected0 = _metric("selma_gate_images_total", verdict="kept"), _metric("selma_gate_images_total", verdict="rejected")

    def delta(name: str, **labels: str) -> float:
        return _metric(name, **labels) - (before.get(name, 0.0) if not labels else {"kept": kept0, "rejected": rejected0}[labels["verdict"]])

    first = _finish(core, core.start("t/objects/gate-m", _spec(ps, [ds], threshold=1.0))[0].job_id)
    assert first.phase == JobPhase.SUCCEEDED, first.error
    assert (delta("selma_gate_images_total", verdict="kept"), delta("selma_gate_images_total", verdict="rejected")) == (4, 8)
    assert delta("selma_gate_image_seconds_count") == 12
    assert delta("selma_gate_questions_answered_total") == first.stats["questions_answered"] > 0
    # round 2 over both rounds' candidates: only its one new candidate is scored (and counted); round 1's come from the journal
    rows = _lines(store, ds, "metadata.jsonl")
    right = next(r for r in rows if truth[r["file_name"]] == "right")
    with store.writer(ArtifactKind.IMAGE_DATASET, key="test/2/render-1") as w:
        name = right["file_name"].replace("-0.png", "-5.png")
        w.put_bytes(name, store.read_bytes(ds, right["file_name"]))
        w.put_bytes("metadata.jsonl", (json.dumps(dict(right, file_name=name, image_index=5)) + "\n").encode())
    second = _finish(core, core.start("t/objects/gate-m-1", _spec(ps, [ds, w.manifest.id], threshold=1.0))[0].job_id)
    assert second.phase == JobPhase.SUCCEEDED, second.error
    assert (delta("selma_gate_images_total", verdict="kept"), delta("selma_gate_images_total", verdict="rejected")) == (5, 8)
    assert delta("selma_gate_images_journaled_total") == 12
    # another threshold over the same candidates: every score from the journal, nothing counted as scored again
    third = _finish(core, core.start("t/objects/gate-m-half", _spec(ps, [ds], threshold=0.5))[0].job_id)
    assert third.phase == JobPhase.SUCCEEDED, third.error
    assert (delta("selma_gate_images_total", verdict="kept"), delta("selma_gate_images_total", verdict="rejected")) == (5, 8)
    assert delta("selma_gate_images_journaled_total") == 24 and delta("selma_gate_image_seconds_count") == 13


def test_a_dataset_id_published_again_with_other_images_is_scored_afresh(env):
    """A journal belongs to a dataset's content: the same id re-rendered (its run deleted) never reuses old scores."""
    store = env["store"]
    ps, ds, truth = _world(store, seed=4)
    core = env["core"]()
    first = _finish(core, core.start("t/objects/gate-a", _spec(ps, [ds], threshold=1.0))[0].job_id)
    assert first.phase == JobPhase.SUCCEEDED, first.error
    rows = _lines(store, ds, "metadata.jsonl")
    images = {r["file_name"]: store.read_bytes(ds, r["file_name"]) for r in rows}
    store.delete(ds)
    blank = next(f for f, kind in truth.items() if kind == "blank")
    with store.writer(ArtifactKind.IMAGE_DATASET, id=ds, parents=[ps]) as w:  # same id, every right image now blank
        for r in rows:
            w.put_bytes(r["file_name"], images[blank] if truth[r["file_name"]] == "right" else images[r["file_name"]])
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    calls: list[int] = []
    with plugins.use_registry(_counting_registry(calls)):
        again = _finish(core, core.start("t/objects/gate-b", _spec(ps, [ds], threshold=1.0))[0].job_id)
    assert again.phase == JobPhase.SUCCEEDED, again.error
    assert again.stats["candidates_from_journal"] == 0 and calls  # scored again, not read from the old journal
    assert _lines(store, again.output.id, "metadata.jsonl") == []  # nothing right is left to keep


def _counting_registry(calls: list[int], *, fail_after: int | None = None) -> plugins.Registry:
    """The real registry with the judge wrapped: counts answered queries, optionally fails after ``fail_after`` calls."""
    reg = plugins.registry()
    real = reg.vqa_backends["shapesworld_judge"]

    class Counting(ShapesWorldJudgeVqa):
        def answer(self, queries):  # noqa: ANN001, ANN201
            if fail_after is not None and len(calls) >= fail_after:
                raise Unavailable("the VQA model went away (test)")
            calls.append(len(queries))
            return super().answer(queries)

    wrapped = plugins.VqaBackendPlugin(kind=real.kind, check=real.check, build=lambda bs: Counting(batch_size=bs), cli_name=real.cli_name,
                                       questions=real.questions)
    return plugins.Registry(llm_backends=dict(reg.llm_backends), vqa_backends={**reg.vqa_backends, real.kind: wrapped},
                            model_schemes=dict(reg.model_schemes), commands=list(reg.commands))


def test_a_gate_job_that_dies_midway_resumes_without_rescoring_scored_images(env, monkeypatch):
    monkeypatch.setattr(G, "CHUNK", 2)  # journal every 2 images
    store = env["store"]
    ps, ds, truth = _world(store, seed=2)
    core = env["core"]()
    calls: list[int] = []
    with plugins.use_registry(_counting_registry(calls, fail_after=2)):
        rec = _finish(core, core.start("t/objects/gate", _spec(ps, [ds]))[0].job_id)
    assert rec.phase == JobPhase.FAILED
    assert len(calls) == 2  # two chunks (4 images) scored and journaled before the failure
    calls.clear()
    with plugins.use_registry(_counting_registry(calls)):
        rec, created = core.start("t/objects/gate", _spec(ps, [ds]))  # the same key restarts the job
        rec = _finish(core, rec.job_id)
    assert created and rec.phase == JobPhase.SUCCEEDED, rec.error
    assert rec.stats["candidates_from_journal"] == 4
    assert len(calls) == (12 - 4) // 2  # only the images the first attempt had not scored
    assert {r["file_name"] for r in _lines(store, rec.output.id, "metadata.jsonl")} == {f for f, k in truth.items() if k == "right"}


def test_a_gate_job_whose_service_stops_midway_resumes_in_the_next_process_without_rescoring(env, monkeypatch):
    import threading

    monkeypatch.setattr(G, "CHUNK", 2)
    store = env["store"]
    ps, ds, truth = _world(store, seed=7)
    reached, release = threading.Event(), threading.Event()
    calls: list[int] = []
    reg = _counting_registry(calls)
    real_build = reg.vqa_backends["shapesworld_judge"].build

    def build(bs):  # noqa: ANN001, ANN202 - the third chunk waits until the service is stopping
        vqa = real_build(bs)
        inner = vqa.answer

        def answer(queries):  # noqa: ANN001, ANN202
            if len(calls) == 2:
                reached.set()
                assert release.wait(300), "the test never released the VQA model"
            return inner(queries)

        vqa.answer = answer
        return vqa

    reg.vqa_backends["shapesworld_judge"] = replace(reg.vqa_backends["shapesworld_judge"], build=build)
    first = env["core"]()
    with plugins.use_registry(reg):
        rec, _ = first.start("t/objects/gate", _spec(ps, [ds]))
        assert reached.wait(300), "the gate job never reached its third chunk"
        stopper = threading.Thread(target=first.shutdown)  # the process stops: running jobs are interrupted, not failed
        stopper.start()
        release.set()
        stopper.join(300)
    assert first.manager.get(rec.job_id).phase in (JobPhase.PENDING, JobPhase.RUNNING)  # left for the next process
    assert len(calls) == 3  # the chunk in flight finished and was journaled before the job stopped
    calls.clear()
    second = env["core"]()  # the next process of the service
    with plugins.use_registry(_counting_registry(calls)):
        assert second.recover() == [rec.job_id]
        done = _finish(second, rec.job_id)
    assert done.phase == JobPhase.SUCCEEDED, done.error
    assert done.stats["candidates_from_journal"] == 6 and len(calls) == (12 - 6) // 2
    assert {r["file_name"] for r in _lines(store, done.output.id, "metadata.jsonl")} == {f for f, k in truth.items() if k == "right"}


def test_a_second_round_scores_only_its_new_candidates_and_names_every_round_as_parent(env):
    store = env["store"]
    ps, ds, truth = _world(store, seed=3)
    core = env["core"]()
    _finish(core, core.start("t/objects/gate", _spec(ps, [ds]))[0].job_id)
    # round 2: one more candidate (the right image again, under a new image index)
    rows = _lines(store, ds, "metadata.jsonl")
    ds2 = new_artifact_id(ArtifactKind.IMAGE_DATASET, "test/3/render-1")
    extra = [dict(r, file_name=r["file_name"].replace("-0.png", "-3.png"), image_index=3) for r in rows if truth[r["file_name"]] == "right"][:1]
    with store.writer(ArtifactKind.IMAGE_DATASET, id=ds2, parents=[ps], parameters={"format": "imagefolder", "images": 1}) as w:
        w.put_bytes(extra[0]["file_name"], store.read_bytes(ds, rows[0]["file_name"]))
        w.put_bytes("metadata.jsonl", (json.dumps(extra[0]) + "\n").encode())
    rec = _finish(core, core.start("t/objects/gate-1", _spec(ps, [ds, ds2]))[0].job_id)
    assert rec.phase == JobPhase.SUCCEEDED, rec.error
    assert rec.stats["candidates_from_journal"] == 12 and rec.stats["candidates_total"] == 13
    kept = store.get(rec.output.id)
    assert kept.parents == (ds, ds2)
    assert kept.parameters["kept"] == 5 and kept.parameters["prompts_kept"] == 4


@pytest.mark.parametrize(("gate", "field", "words"), [
    ({"threshold": 1.5}, "spec.gate.threshold", "[0, 1]"),
    ({"candidates_per_prompt": 17}, "spec.gate.candidates_per_prompt", "1..16"),
    ({"target_kept": 10, "max_candidates": 5}, "spec.gate.max_candidates", "target_kept"),
    ({"target_kept": -1}, "spec.gate.target_kept", ">= 0"),
    ({"question_source": "GATE_QUESTION_SOURCE_VQA_BACKEND", "vqa": {"tiny_test": {}}}, "spec.gate.question_source", "writes no questions"),
    ({"vqa": {"tiny_test": {}, "shapesworld_judge": {}}}, "spec.gate.vqa", "exactly one"),
    ({"vqa": {"transformers": {"batch_size": 999}}}, "spec.gate.vqa.transformers.batch_size", "1..256"),
    ({"vqa": {"openai_compatible": {"base_url": "http://169.254.169.254/v1", "model": "m", "api": "OPEN_AI_API_CHAT_COMPLETIONS"}}},
     "spec.gate.vqa.openai_compatible.base_url", ""),
    ({"question_source": "GATE_QUESTION_SOURCE_GENERATED",
      "question_backend": {"openai_compatible": {"base_url": "http://169.254.169.254/v1", "model": "m", "api": "OPEN_AI_API_COMPLETIONS"}}},
     "spec.gate.question_backend.openai_compatible.base_url", ""),
])
def test_a_bad_gate_is_refused_naming_the_field(env, gate, field, words):
    store = env["store"]
    ps, ds, _ = _world(store, n=1, seed=4)
    spec = _spec(ps, [ds])
    spec["gate"] = {**spec["gate"], **gate}
    with pytest.raises(SelmaError) as e:  # InvalidArgument, or PermissionDenied for an endpoint the service may not call
        env["core"]().start("t/objects/gate", spec)
    assert e.value.field == field and words in e.value.message


def test_a_gate_needs_candidates_of_the_right_kind(env):
    store = env["store"]
    ps, ds, _ = _world(store, n=1, seed=5)
    with pytest.raises(InvalidArgument) as e:
        env["core"]().start("t/objects/gate", _spec(ps, [ps]))
    assert e.value.field == "spec.datasets[0].id" and "not a image_dataset" in e.value.message
    with pytest.raises(InvalidArgument) as e:
        env["core"]().start("t/objects/gate", _spec(ps, []))
    assert e.value.field == "spec.datasets"


def test_pass_at_k_counts_prompts_whose_first_passing_candidate_is_within_k():
    cands = [
        {"prompt_id": "a", "candidate": 0, "passed": True},
        {"prompt_id": "b", "candidate": 0, "passed": False}, {"prompt_id": "b", "candidate": 1, "passed": False},
        {"prompt_id": "b", "candidate": 2, "passed": True}, {"prompt_id": "b", "candidate": 3, "passed": True},
        {"prompt_id": "c", "candidate": 0, "passed": False}, {"prompt_id": "c", "candidate": 7, "passed": True},
        {"prompt_id": "d", "candidate": 0, "passed": False},
    ]
    assert G.pass_at_k(cands, [1, 2, 3, 4, 8], prompts_total=4) == {1: 1, 2: 1, 3: 2, 4: 2, 8: 3}
    with pytest.raises(InvalidArgument):
        G.pass_at_k(cands, [1], prompts_total=2)


def test_gate_report_prints_per_skill_pass_rates_at_k(env, capsys):
    from selma.app.cli import main

    store = env["store"]
    ps, ds, _ = _world(store, seed=6)
    core = env["core"]()
    rec = _finish(core, core.start("t/objects/gate", _spec(ps, [ds]))[0].job_id)
    assert main(["eval", "gate-report", rec.output.id, "--k", "1,2,3", "--storage", env["settings"].resolved_storage_uri, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out if isinstance(out, list) else out["records"]
    # the right image is candidate 0 of every prompt (image index 0 of the one candidate dataset)
    assert (row["skill"], row["prompts"], row["candidates"], row["kept"]) == ("objects", 4, 12, 4)
    assert row["prompts_passing_at_k"] == {"1": 4, "2": 4, "3": 4} and row["pass_at_k_percent"]["1"] == 100.0
    assert main(["eval", "gate-report", ds, "--storage", env["settings"].resolved_storage_uri]) != 0
    assert "dataset_id: " + ds + " is not a gated image_dataset" in capsys.readouterr().err
