"""A reduced ShapesWorld table through the real services (`selma up` processes): one seed, two skills,
six prompts per skill, a few LoRA steps, three held-out prompts per skill.

It runs on the published ShapesWorld base model when its weights are there, else on tiny://sd
(the same code path).  The run's gate stage is the product's (a gate job scoring every candidate
with the judge); its threshold is 0 here, so every candidate is kept and the gated experts train
(the images of a few-step render rarely pass the real threshold).  It checks the table's format,
not its numbers: every configuration row and every skill column present, each cell a score in
[0, 100], steps resolved from epochs by the training service, and that a re-run attaches to the
finished jobs and writes the table byte for byte.
"""

from __future__ import annotations

import json
import re

import pytest
from rich.console import Console

from selma.app.local_stack import LocalStack
from selma.app.runner import Reporter
from selma.artifacts import ArtifactStore
from selma.client import SelmaClient
from selma.config import SelmaSettings
from selma.storage import open_storage
from selma_shapesworld.loop import TableConfig, run_table, service_model_source, stack_env

pytestmark = pytest.mark.slow


def _model() -> str:
    try:
        service_model_source("shapesworld://base")
    except Exception:  # noqa: BLE001 - weights not published (yet): the tiny model exercises the same path
        return "tiny://sd"
    return "shapesworld://base"


def test_reduced_loop_runs_end_to_end_and_produces_the_table(tmp_path):
    model = _model()
    cfg = TableConfig(seeds=(0,), prompts_per_skill=6, steps=3, epochs=4, eval_per_skill=3, skills=("counting", "spatial"), model=model,
                      render_steps=4, gate_threshold=0.0, candidates=2, command="test")
    stack = LocalStack(tmp_path / "stack", extra_env=stack_env(service_model_source(model)))
    endpoints = stack.start(timeout=300)
    try:
        store = ArtifactStore(open_storage(SelmaSettings(), (stack.data_dir / "storage").as_uri()))
        with SelmaClient(endpoints) as client, Reporter(Console(), live=False) as reporter:
            text, results, _ = run_table(cfg, client=client, store=store, state_dir=tmp_path / "state", reporter=reporter)
            again, results2, _ = run_table(cfg, client=client, store=store, state_dir=tmp_path / "state", reporter=reporter)
    finally:
        stack.stop()

    (r,) = results
    assert again == text  # the re-run attaches to the finished jobs and writes the same bytes
    assert results2[0].scores == r.scores
    assert results2[0].facts["eval_report"] == r.facts["eval_report"]
    # The table process's own stages are kept in the run state, so a re-run that only attaches reports the first run's times.
    assert {"heldout", "oracle-data", "mix"} <= set(r.facts["local_seconds"])
    state = json.loads((tmp_path / "state" / "runs" / f"{r.run}.json").read_text())
    assert state["table"]["local_seconds"] == r.facts["local_seconds"]
    labels = {"base", "merged-ungated", "merged", "mixed", "expert-counting", "expert-spatial", "merged-oracle"}
    assert set(r.scores) == labels
    for label in labels:
        assert set(r.scores[label]) == {"", "counting", "spatial"}
        assert all(0.0 <= v <= 100.0 for v in r.scores[label].values())
    assert r.facts["prompts"] == {"counting": 6, "spatial": 6}
    # threshold 0: the first round's gate keeps every candidate, and a round with every prompt kept is the last
    for skill in ("counting", "spatial"):
        assert {k: r.facts["gate"][skill][k] for k in ("candidates", "kept", "prompts_kept", "round")} == {
            "candidates": 6, "kept": 6, "prompts_kept": 6, "round": 0}
    # steps from epochs: 4 passes over 6 images at batch 16 = 2 steps; the mixed LoRA's 12 images: 3 (the cap)
    assert r.facts["steps"] == {"training": [2, 2], "training-mixed": [3], "training-oracle": [2, 2], "training-ungated": [2, 2]}
    # four expert sets, each its own training data: the kept images, the first candidates, the ground truth
    assert len({*r.facts["experts"].values(), *r.facts["ungated_experts"].values(), *r.facts["oracle_experts"].values(),
                r.facts["mixed_expert"]}) == 7
    oracle = store.get(r.facts["datasets"]["oracle"]["counting"])
    assert oracle.parameters["images"] == 6 and list(oracle.parents) == [r.facts["datasets"]["prompt_sets"]["counting"]]

    header = next(line for line in text.splitlines() if line.startswith("| configuration"))
    assert header == "| configuration | counting | spatial | overall | Δ overall vs base (paired) |"
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        "base model", "SELMA as in the paper: merged experts, one ungated image per prompt",
        "SELMA with the gate: merged experts, best-of-K gated data", "one LoRA on all skills' gated data (mixed)",
        "single expert (gated data): counting", "single expert (gated data): spatial", "oracle: merged experts on ground-truth renders",
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 4
        assert all(re.fullmatch(r"\d{1,3}\.\d", c) and 0 <= float(c) <= 100 for c in cells[:3]), row
        assert cells[3] == "–" if row.startswith("| base model") else re.fullmatch(r"[+-]\d{1,3}\.\d", cells[3]), row
    assert "How it was obtained" in text and model in text
