"""A command that starts its own stack (selma demo, selma shapesworld table) stops it when it gets SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PROGRAM = textwrap.dedent(
    """
    import os, signal, sys, time
    from selma.app.local_stack import sigterm_interrupts

    sigterm_interrupts()
    try:
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        time.sleep(120)
        sys.stdout.write("slept\\n")
    except KeyboardInterrupt:
        sys.stdout.write("interrupted\\n")
    finally:
        sys.stdout.write("stack stopped\\n"); sys.stdout.flush()
    """
)


def _terminated(program: str) -> tuple[str, int]:
    """Run ``program``, SIGTERM it once it is ready, return (its output, its exit status)."""
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return out, proc.returncode


def test_sigterm_runs_the_finally_that_stops_the_stack():
    out, status = _terminated(PROGRAM)
    assert out.splitlines() == ["interrupted", "stack stopped"]
    assert status == 0


def test_without_it_sigterm_skips_the_finally():
    """The default this helper changes: the process dies at once and the services would be left behind."""
    out, status = _terminated(PROGRAM.replace("sigterm_interrupts()\n", ""))
    assert out == "" and status == -15


def test_an_interrupted_run_stops_its_skill_threads_and_is_left_resumable(tmp_path):
    import json

    import pytest

    from selma.app.runner import RunDriver, RunState
    from selma.app.skillset import load_skillset

    ss = load_skillset(Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml")

    class Interrupted(RunDriver):
        def run(self):  # noqa: ANN201 - Ctrl-C (or SIGTERM through sigterm_interrupts) while the skills' stages run
            self.state.set(phase="running")
            raise KeyboardInterrupt

    driver = Interrupted(client=None, skillset=ss, state=RunState.open(tmp_path / "runs", ss), reporter=None)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        driver.run_interruptible()
    assert driver._stop.is_set()  # the skill threads see the stop and write nothing more
    assert json.loads((tmp_path / "runs" / f"{ss.name}.json").read_text())["phase"] == "interrupted"
    driver._set_phase(phase="running", message="")  # a skill thread back from a paused wait, after the stop
    assert json.loads((tmp_path / "runs" / f"{ss.name}.json").read_text())["phase"] == "interrupted"
