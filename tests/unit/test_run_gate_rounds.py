"""``selma run``'s best-of-K rounds (RunDriver.gated_dataset) against a simulated render and gate.

The services are replaced by a deterministic world: prompt i's candidate k passes iff
``(i + k) % period == 0``.  The driver's own logic is under test: which candidate round it asks
the render service for, for which prompts (skip_kept_in), with what is left of the budget, and
when it stops.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from selma.app.runner import Reporter, RunDriver, RunState
from selma.app.skillset import parse_skillset
from selma.errors import RunFailed
from selma.v1 import common_pb2, evaluation_service_pb2, render_service_pb2

N = 10


def _skillset(gate: str) -> str:
    return f"""
apiVersion: selma.dev/v1alpha1
kind: SkillSet
metadata: {{name: rounds}}
spec:
  skills: [{{name: counting, count: {N}}}]
  training: {{config: {{baseModel: {{source: tiny://sd}}}}}}
  gate: {gate}
"""


class World(RunDriver):
    """A RunDriver whose services are a simulation; records every render round it was asked for."""

    def __init__(self, gate: str, tmp_path, period: int) -> None:  # noqa: ANN001
        ss = parse_skillset(_skillset(gate))
        self.out = io.StringIO()
        super().__init__(client=None, skillset=ss, state=RunState.open(tmp_path / "runs", ss),  # type: ignore[arg-type]
                         reporter=Reporter(Console(file=self.out, width=200), live=False))
        self.period = period
        self.rounds: list[tuple[int, int, str, int]] = []  # (candidate index, per_prompt, skip_kept_in, max_images)
        self.candidates: dict[str, list[tuple[int, int]]] = {}  # dataset id -> [(prompt, candidate)]
        self.kept_prompts: dict[str, set[int]] = {}  # kept dataset id -> prompts with a kept image
        self.stages: list[str] = []

    def passes(self, prompt: int, k: int) -> bool:
        return self.period > 0 and (prompt + k) % self.period == 0  # period 0: nothing ever passes

    def drive(self, kind, skill, spec, *, stage=""):  # noqa: ANN001, ANN201
        self.stages.append(stage or kind)
        status = common_pb2.JobStatus(phase=common_pb2.JOB_PHASE_SUCCEEDED)
        if kind == "render":
            c = spec.candidates
            self.rounds.append((c.index, c.per_prompt, c.skip_kept_in.id, c.max_images))
            skip = self.kept_prompts.get(c.skip_kept_in.id, set())
            todo = [(i, c.index) for i in range(N) if i not in skip]
            todo = todo[: c.max_images] if c.max_images else todo
            status.output.id = f"dataset-{stage}"
            self.candidates[status.output.id] = todo
            return SimpleNamespace(status=status, stats=render_service_pb2.DatasetRenderStats(images_total=len(todo)))
        assert kind == "gate" and isinstance(spec, evaluation_service_pb2.GateSpec)
        cands = [c for d in spec.datasets for c in self.candidates[d.id]]
        kept = [c for c in cands if self.passes(*c)]
        status.output.id = f"kept-{stage}"
        self.kept_prompts[status.output.id] = {i for i, _ in kept}
        stats = evaluation_service_pb2.GateStats(candidates_total=len(cands), candidates_scored=len(cands), kept=len(kept),
                                                 pass_rate_percent=100.0 * len(kept) / len(cands), prompts_total=N,
                                                 prompts_kept=len({i for i, _ in kept}))
        return SimpleNamespace(status=status, stats=stats)


def test_rounds_render_the_next_candidate_only_for_prompts_without_a_kept_image_and_stop_at_the_target(tmp_path):
    w = World("{vqa: {tinyTest: {}}, candidatesPerPrompt: 8, targetKept: 5}", tmp_path, period=5)
    kept = w.gated_dataset(w.skillset.skills[0], common_pb2.ArtifactRef(id="prompt-set-x"))
    # each round one candidate more per prompt passes (prompts 0 and 5 at k=0, 4 and 9 at k=1, ...): 2, 4, 6 ≥ 5 after round 3
    assert [r[0] for r in w.rounds] == [0, 1, 2]
    assert all(r[1] == 8 for r in w.rounds)
    assert [r[2] for r in w.rounds] == ["", "kept-gate", "kept-gate-1"]  # each round skips what the last gate kept
    assert [len(w.candidates[f"dataset-{s}"]) for s in ("render", "render-1", "render-2")] == [10, 8, 6]
    assert w.stages == ["render", "gate", "render-1", "gate-1", "render-2", "gate-2"]
    assert kept.id == "kept-gate-2" and len(w.kept_prompts[kept.id]) == 6
    summary = w.gate_summary["counting"]
    assert (summary["candidates"], summary["kept"], summary["prompts_kept"], summary["round"]) == (24, 6, 6, 2)
    assert "gate round 3/8: kept 6 of 24 candidates (25.0%)" in w.out.getvalue()
    assert w.state.data["stages"]["counting/gate"]["summary"]["kept"] == 6


def test_rounds_stop_when_the_candidate_budget_is_spent(tmp_path):
    w = World("{vqa: {tinyTest: {}}, candidatesPerPrompt: 8, targetKept: 9, maxCandidates: 13}", tmp_path, period=5)
    w.gated_dataset(w.skillset.skills[0], common_pb2.ArtifactRef(id="prompt-set-x"))
    assert [(r[0], r[3]) for r in w.rounds] == [(0, 13), (1, 3)]  # the second round gets what is left of the budget
    assert sum(len(v) for v in w.candidates.values()) == 13


def test_rounds_stop_after_k_or_when_every_prompt_has_a_kept_image(tmp_path):
    w = World("{vqa: {tinyTest: {}}, candidatesPerPrompt: 3}", tmp_path, period=5)
    w.gated_dataset(w.skillset.skills[0], common_pb2.ArtifactRef(id="prompt-set-x"))
    assert [r[0] for r in w.rounds] == [0, 1, 2]  # no target: all K rounds
    w = World("{vqa: {tinyTest: {}}, candidatesPerPrompt: 8}", tmp_path / "b", period=1)
    w.gated_dataset(w.skillset.skills[0], common_pb2.ArtifactRef(id="prompt-set-x"))
    assert [r[0] for r in w.rounds] == [0]  # every prompt passed in round 0


def test_a_skill_with_no_kept_image_fails_the_run_naming_the_gate_settings(tmp_path):
    w = World("{vqa: {tinyTest: {}}, candidatesPerPrompt: 2}", tmp_path, period=0)
    with pytest.raises(RunFailed, match=r"counting · gate: no image passed \(20 candidates scored\).*spec.gate.threshold"):
        w.gated_dataset(w.skillset.skills[0], common_pb2.ArtifactRef(id="prompt-set-x"))


def test_lineage_labels_a_kept_dataset_with_its_gate_numbers_and_a_candidate_round_with_its_index():
    from selma.app.runner import _gate_note

    kept = common_pb2.ArtifactManifest()
    kept.parameters.update({"kept": 3, "candidates": 64, "pass_rate_percent": 100 * 3 / 64})
    assert _gate_note(kept) == "  gate: kept 3 of 64 candidates (4.7%)"
    rnd = common_pb2.ArtifactManifest()
    rnd.parameters.update({"candidate_round": {"index": 2, "per_prompt": 8, "skip_kept_in": "", "max_images": 0}})
    assert _gate_note(rnd) == "  best-of-K candidate 2"
    assert _gate_note(common_pb2.ArtifactManifest()) == ""
