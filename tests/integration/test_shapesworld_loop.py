"""A reduced ShapesWorld table through the real services (`selma up` processes): one seed, two skills,
six prompts per skill, a few LoRA steps, three held-out prompts per skill.

It runs on the published ShapesWorld base model when its weights are there, else on tiny://sd
(the same code path).  It checks the table's format, not its numbers: every configuration row
and every skill column present, each cell a score in [0, 100], and that a re-run attaches to the
finished jobs (same scores, same artifacts).
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


class _EveryOtherCaption:
    """A gate judge that accepts every other caption it is asked about: the images of an untrained model
    rarely pass the real judge, and the gated experts and their merge must run through the services too."""

    def __init__(self) -> None:
        self.calls = 0

    def verify(self, image, caption, strict=False):  # noqa: ANN001 - the Judge.verify signature
        self.calls += 1
        return self.calls % 2 == 1


def _model() -> str:
    try:
        service_model_source("shapesworld://base")
    except Exception:  # noqa: BLE001 - weights not published (yet): the tiny model exercises the same path
        return "tiny://sd"
    return "shapesworld://base"


def test_reduced_loop_runs_end_to_end_and_produces_the_table(tmp_path):
    model = _model()
    cfg = TableConfig(seeds=(0,), prompts_per_skill=6, steps=3, eval_per_skill=3, skills=("counting", "spatial"), model=model,
                      render_steps=4, images_per_prompt=1, command="test")
    stack = LocalStack(tmp_path / "stack", extra_env=stack_env(service_model_source(model)))
    endpoints = stack.start(timeout=300)
    try:
        store = ArtifactStore(open_storage(SelmaSettings(), (stack.data_dir / "storage").as_uri()))
        with SelmaClient(endpoints) as client, Reporter(Console(), live=False) as reporter:
            text, results, _ = run_table(cfg, client=client, store=store, state_dir=tmp_path / "state", reporter=reporter,
                                         judge=_EveryOtherCaption())
            again, results2, _ = run_table(cfg, client=client, store=store, state_dir=tmp_path / "state", reporter=reporter)
    finally:
        stack.stop()

    (r,) = results
    assert results2[0].scores == r.scores
    assert results2[0].facts["eval_report"] == r.facts["eval_report"]
    # The table process's own stages are kept in the run state, so a re-run that only attaches reports the first run's times.
    assert {"heldout", "gate", "mix"} <= set(r.facts["local_seconds"])
    state = json.loads((tmp_path / "state" / "runs" / f"{r.run}.json").read_text())
    assert state["table"]["local_seconds"] == r.facts["local_seconds"]
    assert results2[0].facts["local_seconds"] == r.facts["local_seconds"]
    labels = {"base", "expert-counting", "expert-spatial", "mixed", "merged", "merged-gated"}
    assert set(r.scores) == labels
    for label in labels:
        assert set(r.scores[label]) == {"", "counting", "spatial"}
        assert all(0.0 <= v <= 100.0 for v in r.scores[label].values())
    assert r.facts["prompts"] == {"counting": 6, "spatial": 6}
    assert r.facts["gate"] == {"counting": {"kept": 3, "total": 6}, "spatial": {"kept": 3, "total": 6}}
    assert set(r.facts["gated_experts"]) == {"counting", "spatial"}  # trained on the gated data and merged
    assert results2[0].facts["gated_experts"] == r.facts["gated_experts"]

    header = next(line for line in text.splitlines() if line.startswith("| configuration"))
    assert header == "| configuration | counting | spatial | overall |"
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        "base model", "single-skill expert: counting", "single-skill expert: spatial", "one LoRA on all skills' data (mixed)",
        "merged experts (SELMA)", "merged experts, judge-gated data",
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert len(cells) == 3
        assert all(re.fullmatch(r"\d{1,3}\.\d", c) and 0 <= float(c) <= 100 for c in cells), row
    assert "How it was obtained" in text and model in text
