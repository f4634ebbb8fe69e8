"""`selma run` prints what a stage did: a prompt stage that published 2 of 4 prompts says 2/4 and why."""

from __future__ import annotations

import io

from rich.console import Console

from selma import api
from selma.app.runner import Reporter
from selma.jobs import JobContext, JobManager, JobPhase, JobResult
from selma.storage import FileStorage


def test_a_stage_that_published_fewer_than_asked_prints_the_published_count_and_why(tmp_path):
    def short(ctx: JobContext) -> JobResult:  # what the prompt service does when its LLM budget runs out
        ctx.progress(2, 4, unit="prompts")
        return JobResult(message="stopped: the budget of 8 LLM requests is spent with 2/4 prompts accepted")

    mgr = JobManager(FileStorage(tmp_path / "store"), "prompt_generation", short)
    rec, _ = mgr.start("run/skill/prompts", {})
    final = [r for r in mgr.watch(rec.job_id)][-1]
    mgr.shutdown()
    assert final.phase == JobPhase.SUCCEEDED

    out = io.StringIO()
    with Reporter(Console(file=out, width=200), live=False) as reporter:
        reporter.update("counting · prompts", api.job_status(final))
    line = out.getvalue().strip()
    assert "succeeded 2/4 prompts" in line and "4/4" not in line
    assert "budget of 8 LLM requests" in line
