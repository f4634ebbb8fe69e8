"""Retention across the four real services (`selma up` processes, tiny models): a finished run is
deleted through the ServingService, every service forgets its jobs, nothing labelled with the run
is left, and running the same SkillSet again starts every stage afresh."""

from __future__ import annotations

from pathlib import Path

import _processes
import pytest
from rich.console import Console
from test_run_e2e import skillset_text

from selma.app.local_stack import LocalStack
from selma.app.runner import Reporter, RunDriver, RunState
from selma.app.skillset import parse_skillset
from selma.artifacts import ArtifactStore
from selma.client import Endpoints, SelmaClient
from selma.retention import load_jobs
from selma.storage import FileStorage
from selma.v1 import serving_service_pb2

pytestmark = pytest.mark.slow

RUN = "e2e-retention"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("retention-stack")
    stack = LocalStack(root, extra_env={"SELMA_SERVING_GC_GRACE_SECONDS": "0"})
    try:
        endpoints = stack.start(timeout=300)
        for sp in stack.processes.values():
            _processes.track(sp.proc.pid, f"local stack service {sp.name}")
        yield stack, endpoints
    finally:
        stack.stop()


def drive(endpoints: Endpoints, text: str, state_dir: Path) -> tuple[dict, RunState]:
    ss = parse_skillset(text, source="e2e.yaml")
    with SelmaClient(endpoints) as client, Reporter(Console(), live=False) as reporter:
        state = RunState.open(state_dir / "runs", ss)
        return RunDriver(client, ss, state, reporter).run(), state


@pytest.mark.timeout(900)
def test_a_deleted_run_leaves_nothing_and_runs_again_from_scratch(stack, llm, tmp_path):
    local, endpoints = stack
    store = ArtifactStore(FileStorage(local.data_dir / "storage"))
    text = skillset_text(RUN, llm.base_url, steps=2)
    result, first = drive(endpoints, text, tmp_path)
    jobs_before = {st["job_id"] for st in first.data["stages"].values()}
    assert len(jobs_before) == 7  # 2 skills x (prompts, render, training) + merge

    with SelmaClient(endpoints) as client:
        dry = client.delete_run(RUN, dry_run=True)
        kept = {k.artifact_id for k in dry.kept}
        assert {result["merged_model"], *result["experts"].values()} <= kept, "the registered model keeps its lineage"
        assert all(k.dependant == f"registered model {RUN}" for k in dry.kept)

        client.delete_model(RUN)
        done = client.delete_run(RUN)
        assert not done.kept and set(done.job_ids) == jobs_before
        assert {result["merged_model"], *result["experts"].values()} <= {r.key for r in done.removed}
        for kind in ("prompts", "render", "training", "merge"):
            assert client.jobs(kind).list(run=RUN) == [], f"the {kind} service forgot the deleted jobs"
        serving = client.stub("serving")
        assert not serving.ListExperts(serving_service_pb2.ListExpertsRequest(run=RUN), timeout=30).experts
        assert client.collect_garbage().removed_count == 0, "deleting the run left no garbage behind"
    assert store.list(labels={"selma.dev/run": RUN}) == []
    assert not any(j.run == RUN for j in load_jobs(store.storage))
    assert not any(store.storage.list(f"training/{job}/") for job in jobs_before)

    # the same SkillSet again: every stage runs afresh (no attach to a deleted job) and publishes anew
    again, second = drive(endpoints, text, tmp_path)
    assert set(again["experts"]) == set(result["experts"])
    assert {st["job_id"] for st in second.data["stages"].values()} == jobs_before  # same keys, new records
    for aid in (again["merged_model"], *again["experts"].values()):
        m = store.get(aid)
        for f in m.files:
            store.read_bytes(m, f.path)  # sha256-verified
