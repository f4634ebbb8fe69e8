"""A command that starts its own stack (selma demo, selma shapesworld table) stops it when it gets SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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


def test_sigterm_runs_the_finally_that_stops_the_stack():
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out.splitlines() == ["interrupted", "stack stopped"]
    assert proc.returncode == 0


def test_without_it_sigterm_skips_the_finally():
    """The default this helper changes: the process dies at once and the services would be left behind."""
    program = PROGRAM.replace("sigterm_interrupts()\n", "")
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out == "" and proc.returncode == -15
