"""The ShapesWorld loop's pieces without services: the grammar prompt backend, held-out prompts, the gate, the mix, the table text."""

from __future__ import annotations

import io
import json

import pytest

from selma.artifacts import ArtifactKind, ArtifactStore
from selma.errors import InvalidArgument
from selma.llm.local import ModelRegistry
from selma_prompts.generator import PromptGenerator
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import SkillLibrary, make_skill
from selma_prompts.spec import resolve_spec
from selma_prompts.templates import build_request
from selma_shapesworld import world
from selma_shapesworld.grammar import GrammarBackend, grammar_captions, request_examples
from selma_shapesworld.loop import (
    README_END,
    README_START,
    SeedResult,
    TableConfig,
    gate_dataset,
    heldout_captions,
    mix_datasets,
    publish_heldout,
    render_table,
    replace_readme_section,
    table_rows,
)

EXAMPLES = {
    "count": ["two red circles", "three blue squares", "four small green triangles"],
    "relation": ["a red circle to the left of a blue square", "a green triangle above a yellow circle", "a small purple square below a large red triangle"],
    "binding": ["a red circle and a blue square", "a yellow triangle and a green circle", "a large purple square and a small yellow triangle"],
    "multi": ["a red circle, a green triangle and a blue square", "a blue circle and a blue triangle", "a yellow square, a purple circle and a red triangle"],
}


def _request(examples, seed=7, n=12):
    skill = make_skill({"name": "s", "rules": ["Write ShapesWorld captions."], "seed_examples": examples}, field="skill")
    return build_request(1, seed, skill, [f"seed-{i}" for i in range(len(examples))], list(examples), n)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_backend_answers_with_parsable_captions_of_the_examples_kind(kind):
    req = _request(EXAMPLES[kind])
    assert request_examples(req) == EXAMPLES[kind]
    (resp,) = GrammarBackend().generate([req])
    lines = resp.text.splitlines()
    assert len(lines) == 12
    assert lines[0].startswith(f"{req.first_number}. ")
    for line in lines:
        text = line.split(". ", 1)[1]
        assert world.parse_caption(text).kind == kind


def test_backend_is_deterministic_from_the_request_seed():
    b = GrammarBackend()
    a1 = b.generate([_request(EXAMPLES["relation"], seed=3)])[0].text
    a2 = b.generate([_request(EXAMPLES["relation"], seed=3)])[0].text
    other = b.generate([_request(EXAMPLES["relation"], seed=4)])[0].text
    assert a1 == a2
    assert a1 != other
    assert grammar_captions(EXAMPLES["count"], 5, 1) == grammar_captions(EXAMPLES["count"], 5, 1)


def test_backend_needs_shapesworld_examples():
    with pytest.raises(InvalidArgument, match="ShapesWorld caption"):
        GrammarBackend().generate([_request(["a photo of a cat", "a dog on a sofa", "two apples"])])


def test_prompt_loop_with_the_grammar_backend_fills_the_count_deterministically():
    settings = PromptSettings()
    d = {"skill": {"name": "spatial", "rules": ["Two objects in a stated relation."], "seed_examples": EXAMPLES["relation"]},
         "count": 25, "backend": {"shapesworld_grammar": {}}, "rouge_l_threshold": 0.9, "seed": 5}
    runs = []
    for _ in range(2):
        spec = resolve_spec(d, settings, SkillLibrary([]))
        state = PromptGenerator(spec, ModelRegistry(settings).backend(spec.backend)).run()
        runs.append([r["text"] for r in state.records])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 25 and len(set(runs[0])) == 25
    assert all(world.parse_caption(t).kind == "relation" for t in runs[0])
    assert spec.backend.model_name == "shapesworld-grammar"
    with pytest.raises(InvalidArgument):
        resolve_spec({**d, "backend": {"shapesworld_grammar": {"temperature": 1}}}, settings, SkillLibrary([]))


def test_heldout_captions_avoid_the_training_prompts():
    train = grammar_captions(EXAMPLES["count"], 40, 0)
    held = heldout_captions(EXAMPLES["count"], 20, 0, train)
    assert len(set(held)) == 20
    assert not {world._normalise(t, "caption") for t in held} & {world._normalise(t, "caption") for t in train + EXAMPLES["count"]}


# ------------------------------------------------------------------------------------ artifacts


def _png(scene) -> bytes:
    buf = io.BytesIO()
    world.render(scene).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def store(storage):
    return ArtifactStore(storage)


def _dataset(store, key, pairs, shown):
    """An image_dataset in the render service's format: images[i] = render of shown[i] for caption pairs[i]."""
    with store.writer(ArtifactKind.IMAGE_DATASET, key=key) as w:
        rows = []
        for i, ((_, cap), scene) in enumerate(zip(pairs, shown, strict=True)):
            name = f"images/{i:06d}-0.png"
            w.put_bytes(name, _png(scene))
            rows.append({"file_name": name, "text": cap, "prompt_id": f"p{i:06d}", "prompt_index": i, "image_index": 0, "skill": "counting"})
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return w.manifest


def test_gate_keeps_exactly_the_images_the_judge_accepts(store):
    from selma_training.data import load_dataset

    pairs = world.dataset(3, 8, {"count": 1.0, "relation": 1.0, "binding": 1.0})
    # even images: the ground-truth render of their caption; odd: the render of another caption
    shown = [s if i % 2 == 0 else pairs[(i + 3) % len(pairs)][0] for i, (s, _) in enumerate(pairs)]
    src = _dataset(store, "r/counting/render", pairs, shown)
    gated = gate_dataset(store, src.id, run="r", skill="counting")
    _, examples = load_dataset(store, gated.id)  # what the training service reads
    assert [e.text for e in examples] == [pairs[i][1] for i in range(0, 8, 2)]
    assert gated.parameters["kept"] == 4 and gated.parameters["total"] == 8
    assert gated.parameters["per_skill"] == {"counting": {"kept": 4, "total": 8}}
    assert list(gated.parents) == [src.id]
    assert gated.labels["selma.dev/skill"] == "counting"
    assert store.read_bytes(gated, "images/000000-0.png") == store.read_bytes(src, "images/000000-0.png")
    # a re-run returns the published artifact
    assert gate_dataset(store, src.id, run="r", skill="counting").id == gated.id


def test_mix_concatenates_datasets_with_lineage(store):
    from selma_training.data import load_dataset

    a = world.dataset(1, 3, {"count": 1.0})
    b = world.dataset(2, 2, {"relation": 1.0})
    da = _dataset(store, "r/counting/render", a, [s for s, _ in a])
    db = _dataset(store, "r/spatial/render", b, [s for s, _ in b])
    mixed = mix_datasets(store, {"counting": da.id, "spatial": db.id}, run="r")
    _, examples = load_dataset(store, mixed.id)
    assert [e.text for e in examples] == [c for _, c in a] + [c for _, c in b]
    assert sorted(mixed.parents) == sorted([da.id, db.id])
    assert mixed.parameters["per_skill"] == {"counting": 3, "spatial": 2}
    assert examples[3].file_name == "images/spatial/000000-0.png"


def test_heldout_prompt_set_carries_judge_questions_and_is_disjoint(store):
    from selma_evaluation.questions import questions_from_records
    from selma_evaluation.runner import read_prompt_records

    with store.writer(ArtifactKind.PROMPT_SET, key="r/counting/prompts") as w:
        train = grammar_captions(EXAMPLES["count"], 30, 0)
        w.put_bytes("prompts.jsonl", "".join(json.dumps({"id": f"p{i:06d}", "index": i, "text": t, "skill": "counting"}) + "\n"
                                             for i, t in enumerate(train)).encode())
    ps = w.manifest.id
    held = publish_heldout(store, run="r", skill="counting", examples=EXAMPLES["count"], n=10, seed=0, training_prompt_sets=[ps])
    records = read_prompt_records(store, [{"id": held.id}], "spec.prompt_set")
    assert len(records) == 10 and not {r["text"] for r in records} & set(train)
    items = questions_from_records(records)
    assert all(it.questions and it.skill == "counting" for it in items)
    assert held.parameters["count"] == 10 and list(held.parents) == [ps]
    again = publish_heldout(store, run="r", skill="counting", examples=EXAMPLES["count"], n=10, seed=0, training_prompt_sets=[ps])
    assert again.id == held.id


# ------------------------------------------------------------------------------------ table text


def _result(seed, bump):
    skills = ["counting", "spatial"]
    labels = ["base", "expert-counting", "expert-spatial", "mixed", "merged", "merged-gated"]
    scores = {lab: {s: 10.0 * i + bump for i, s in enumerate(["", *skills])} for lab in labels}
    facts = {"skills": skills, "prompts": dict.fromkeys(skills, 6), "images": dict.fromkeys(skills, 6),
             "gate": {s: {"kept": 1, "total": 6} for s in skills}, "heldout": dict.fromkeys(skills, 3),
             "stage_seconds": {"training": 10.0}, "span_seconds": 90.0 + 30 * seed, "model": "tiny://sd", "steps": 4, "rank": 4, "render": "ddim 4 steps"}
    return SeedResult(seed=seed, run=f"r-s{seed}", scores=scores, facts=facts)


def test_table_has_every_row_and_column_with_mean_and_spread(tmp_path):
    results = [_result(0, 0.0), _result(1, 2.0)]
    columns, rows = table_rows(results)
    assert columns == ["counting", "spatial", "overall"]
    assert [r[0] for r in rows][0] == "base model" and len(rows) == 6
    text = render_table(results, TableConfig(seeds=(0, 1), command="selma shapesworld table --seeds 0,1"), 60.0)
    assert "| base model | 11.0 ± 1.4 | 21.0 ± 1.4 | 1.0 ± 1.4 |" in text
    assert "--seeds 0,1" in text
    assert "seed 0 1.5 min, seed 1 2.0 min" in text  # each seed's job span, also when a re-run only attaches
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\nrest\n")
    replace_readme_section(readme, text)
    replace_readme_section(readme, text)  # idempotent
    doc = readme.read_text()
    assert doc.startswith("intro\n") and doc.endswith(f"{README_END}\nrest\n") and "old" not in doc and doc.count("| base model |") == 1
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(InvalidArgument, match="markers"):
        replace_readme_section(tmp_path / "bare.md", text)
