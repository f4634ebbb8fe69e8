"""The ShapesWorld loop's pieces without services: the grammar prompt backend, held-out prompts, the oracle's data, the mix,
the table's SkillSet and its text."""

from __future__ import annotations

import io
import json

import pytest

from selma.artifacts import ArtifactKind, ArtifactStore
from selma.errors import FailedPrecondition, InvalidArgument
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
    configured_skillset,
    heldout_captions,
    mix_datasets,
    publish_heldout,
    publish_oracle,
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


def test_heldout_captions_say_which_knob_to_turn_when_the_grammar_runs_out():
    # counting captions are few (count x colour x shape): once training has taken every one of them,
    # no held-out set can be drawn, and the error names both flags that fix it
    train = sorted({c for seed in range(300) for c in grammar_captions(EXAMPLES["count"], 64, seed)})
    with pytest.raises(FailedPrecondition) as e:
        heldout_captions(EXAMPLES["count"], 64, 0, train)
    msg = str(e.value)
    taken = len({world._normalise(t, "caption") for t in train + EXAMPLES["count"]})
    assert f"has 0 caption(s) of this kind left outside the {taken} training prompts" in msg and "64 held-out" in msg
    assert "--eval-per-skill" in msg and "--prompts-per-skill" in msg and "--n" in msg


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


def test_oracle_renders_every_caption_as_a_scene_the_judge_verifies(store):
    from PIL import Image

    from selma_shapesworld.judge import Judge
    from selma_training.data import load_dataset

    captions = [c for kind in ("count", "relation", "binding", "multi") for c in grammar_captions(EXAMPLES[kind], 6, 1)]
    with store.writer(ArtifactKind.PROMPT_SET, key="r/all/prompts") as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps({"id": f"p{i:06d}", "index": i, "text": t}) + "\n"
                                             for i, t in enumerate(captions)).encode())
    ps = w.manifest.id
    oracle = publish_oracle(store, ps, run="r", skill="counting", seed=0, size=64)
    _, examples = load_dataset(store, oracle.id)  # what the training service reads
    assert [e.text for e in examples] == captions
    judge = Judge()
    for e in examples:
        image = Image.open(io.BytesIO(store.read_bytes(oracle, e.file_name))).convert("RGB")
        assert image.size == (64, 64)
        assert judge.verify(image, e.text, strict=True), e.text  # exactly the caption's objects, nothing else
    assert list(oracle.parents) == [ps] and oracle.parameters["images"] == len(captions)
    # a re-run returns the published artifact; another seed draws other scenes of the same captions
    assert publish_oracle(store, ps, run="r", skill="counting", seed=0, size=64).id == oracle.id
    other = publish_oracle(store, ps, run="r2", skill="counting", seed=1, size=64)
    assert [store.read_bytes(other, e.file_name) for e in examples] != [store.read_bytes(oracle, e.file_name) for e in examples]


def test_scene_for_caption_is_seeded_and_refuses_text_outside_the_grammar():
    import numpy as np

    cap = "a small purple square below a large red triangle"
    a = world.scene_for_caption(cap, np.random.default_rng(5))
    assert a == world.scene_for_caption(cap, np.random.default_rng(5))
    assert world.caption(a, sizes=True) == cap
    assert len({world.scene_for_caption(cap, np.random.default_rng(i)) for i in range(8)}) > 1
    counted = world.scene_for_caption("four green circles", np.random.default_rng(0))
    assert len(counted.objects) == 4 and len({o.extent for o in counted.objects}) == 1
    with pytest.raises(InvalidArgument, match="caption"):
        world.scene_for_caption("a red circle and a blue circle", np.random.default_rng(0))  # two circles: outside the grammar


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


LABELS = ["base", "merged-ungated", "merged", "mixed", "expert-counting", "expert-spatial", "merged-oracle"]


def _result(seed, bump, merged_gain):
    skills = ["counting", "spatial"]
    scores = {lab: {s: 10.0 * i + bump for i, s in enumerate(["", *skills])} for lab in LABELS}
    scores["merged"] = {k: v + merged_gain for k, v in scores["merged"].items()}
    gate = {s: {"candidates": 40, "kept": 5, "pass_rate_percent": 12.5, "prompts_kept": 5, "prompts_total": 8, "round": 4} for s in skills}
    facts = {"skills": skills, "prompts": dict.fromkeys(skills, 8), "gate": gate, "heldout": dict.fromkeys(skills, 3),
             "stage_seconds": {"training": 10.0}, "span_seconds": 90.0 + 30 * seed, "local_seconds": {"mix": 1.0},
             "steps": {"training": [13, 13], "training-ungated": [20, 20], "training-oracle": [20, 20], "training-mixed": [25]},
             "model": "tiny://sd", "rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "epochs": 40.0, "max_steps": 300, "batch_size": 16,
             "render": "ddim 4 steps", "merge": "mean_delta", "gate_settings": {"threshold": 1.0, "k": 8, "target_kept": 48, "max_candidates": 512}}
    return SeedResult(seed=seed, run=f"r-s{seed}", scores=scores, facts=facts)


def test_table_has_every_row_and_column_with_mean_spread_and_paired_difference(tmp_path):
    # merged − base per seed: 4, 6, 11 → mean 7.0, SE = stdev / sqrt(3) = 3.606 / 1.732 = 2.08 (7.0 > 2 SE)
    results = [_result(0, 0.0, 4.0), _result(1, 2.0, 6.0), _result(2, 1.0, 11.0)]
    columns, rows = table_rows(results)
    assert columns == ["counting", "spatial", "overall"]
    assert [r[0] for r in rows] == [
        "base model", "SELMA as in the paper: merged experts, one ungated image per prompt",
        "SELMA with the gate: merged experts, best-of-K gated data", "one LoRA on all skills' gated data (mixed)",
        "single expert (gated data): counting", "single expert (gated data): spatial", "oracle: merged experts on ground-truth renders"]
    assert rows[2][2] == [4.0, 6.0, 11.0] and rows[0][2] == []
    text = render_table(results, TableConfig(seeds=(0, 1, 2), command="selma shapesworld table --seeds 0,1,2"))
    assert "| configuration | counting | spatial | overall | Δ overall vs base (paired) |" in text
    assert "| base model | 11.0 ± 1.0 | 21.0 ± 1.0 | 1.0 ± 1.0 | – |" in text
    assert "| SELMA with the gate: merged experts, best-of-K gated data | 18.0 ± 4.0 | 28.0 ± 4.0 | 8.0 ± 4.0 | +7.0 ± 2.1 (> 2 SE) |" in text
    assert "| oracle: merged experts on ground-truth renders | 11.0 ± 1.0 | 21.0 ± 1.0 | 1.0 ± 1.0 | +0.0 ± 0.0 |" in text
    assert "--seeds 0,1,2" in text
    assert "seed 0 1.5 min, seed 1 2.0 min, seed 2 2.5 min" in text  # each seed's job span, also when a re-run only attaches
    assert "counting 15 of 120 candidates kept (12.5%; 15/24 prompts)" in text
    assert "steps per expert: gated 13, ungated 20, oracle 20, mixed 25" in text and "40 epochs" in text
    assert render_table(results, TableConfig(seeds=(0, 1, 2), command="selma shapesworld table --seeds 0,1,2")) == text
    one = render_table(results[:1], TableConfig(seeds=(0,), command="x"))
    assert "one seed, no spread" in one and "| +4.0 |" in one
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold\n{README_END}\nrest\n")
    replace_readme_section(readme, text)
    replace_readme_section(readme, text)  # idempotent
    doc = readme.read_text()
    assert doc.startswith("intro\n") and doc.endswith(f"{README_END}\nrest\n") and "old" not in doc and doc.count("| base model |") == 1
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(InvalidArgument, match="markers"):
        replace_readme_section(tmp_path / "bare.md", text)


def test_table_skillset_applies_overrides_and_names_runs_by_them(tmp_path):
    cfg = TableConfig(seeds=(0,), prompts_per_skill=6, epochs=10, steps=50, gate_threshold=0.5, candidates=4, target_kept=12,
                      max_candidates=24, skills=("counting",))
    ss = configured_skillset(cfg, 3)
    assert [s.name for s in ss.skills] == ["counting"] and ss.skills[0].count == 6
    assert ss.gate.threshold == 0.5 and ss.gate.candidates_per_prompt == 4 and ss.gate.target_kept == 12 and ss.gate.max_candidates == 24
    assert ss.training_config.epochs == 10 and ss.training_config.max_steps == 50 and ss.training_config.seed == 3
    assert ss.name.endswith("-s3") and ss.model_name == ss.name
    same_but_seed = configured_skillset(cfg, 4)
    assert same_but_seed.name[:-1] == ss.name[:-1]  # the digest covers settings, not the seed
    other = configured_skillset(TableConfig(seeds=(0,), prompts_per_skill=6, epochs=10, steps=50, gate_threshold=0.75, candidates=4,
                                            target_kept=12, max_candidates=24, skills=("counting",)), 3)
    assert other.name != ss.name  # another threshold is another run (its jobs' keys differ)
    with pytest.raises(InvalidArgument, match="targetKept|target_kept|maxCandidates|max_candidates"):
        configured_skillset(TableConfig(seeds=(0,), target_kept=100, max_candidates=50), 0)


def test_table_template_needs_a_gate_section_and_one_first_candidate_per_prompt(tmp_path):
    from selma_shapesworld.loop import DEFAULT_SKILLSET

    plain = DEFAULT_SKILLSET.with_name("skillset.yaml")  # the paper's loop: no gate
    with pytest.raises(InvalidArgument, match="gate: section") as e:
        configured_skillset(TableConfig(skillset=plain), 0)
    assert e.value.field == "skillset"
    # SELMA as in the paper trains on round 0: one image of every prompt
    several = tmp_path / "several.yaml"
    several.write_text(DEFAULT_SKILLSET.read_text().replace("imagesPerPrompt: 1", "imagesPerPrompt: 2"))
    with pytest.raises(InvalidArgument, match="imagesPerPrompt") as e:
        configured_skillset(TableConfig(skillset=several), 0)
    with pytest.raises(InvalidArgument, match="below the prompts per skill") as e:
        configured_skillset(TableConfig(prompts_per_skill=40, target_kept=10, max_candidates=30), 0)
    assert e.value.field == "max_candidates"


def test_the_table_names_the_command_without_its_output_and_connection_flags():
    from selma_shapesworld.loop import _command_line

    argv = ["selma", "shapesworld", "table", "--seeds", "0,1,2", "--out", "t.md", "--readme=README.md", "--plain", "--dir", "/tmp/d",
            "--endpoints", "e.json", "--storage", "file:///s", "--epochs", "40"]
    assert _command_line(argv) == "selma shapesworld table --seeds 0,1,2 --epochs 40"
    assert _command_line(["python", "-m", "selma_shapesworld.loop", "table"]) == "selma shapesworld table"


def test_the_run_name_follows_the_base_models_weights(tmp_path):
    import shutil

    from selma_shapesworld.loop import model_identity, service_model_source

    base = service_model_source("shapesworld://base")
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    cfg = TableConfig(seeds=(0,), model=str(copy))
    first = configured_skillset(cfg, 0).name
    assert model_identity(str(copy)) == model_identity(base) and configured_skillset(cfg, 0).name == first
    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-1] + b"\0")  # other weights at the same path
    assert configured_skillset(cfg, 0).name != first  # a new run: no job attaches to experts of the old weights
    assert model_identity("tiny://sd") == "tiny://sd"
