"""The local launcher's warm worker (selma.batch.zygote): jobs forked from a preloaded process behave as fresh ones.

Each test drives :class:`LocalLauncher` itself (``_run_once``'s wait, cancel, kill and retry paths);
the worker is a small ``python -c`` program instead of ``selma train`` (``command`` is the seam), so
crashes, signals and environments are the test's to choose.  The trainer's own run through the warm
worker is in tests/integration/test_training_warm_worker.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from selma.batch.launchers import LaunchRequest, LocalLauncher, Monitor, Outcome
from selma.batch.settings import BatchSettings

# The worker: writes what a fresh interpreter would show about itself to the file named by argv[1],
# then does what argv[2] says (exit N, sleep, segfault).
PROGRAM = r"""
import json, os, signal, sys, time
out, action = sys.argv[1], sys.argv[2]
facts = {"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "own_group": os.getpgid(0) == os.getpid(),
         "own_session": os.getsid(0) == os.getpid(), "env": {k: v for k, v in os.environ.items() if k.startswith(("WARM_", "SELMA_BATCH_PARENT"))},
         "main": __name__, "torch_loaded": "torch" in sys.modules}
if action.startswith("threads"):
    import torch
    torch.ones(512, 512) @ torch.ones(512, 512)  # a parallel op: the pool exists now
    facts["torch_threads"] = torch.get_num_threads()
def on_term(*_):
    with open(out + ".term", "w") as f:
        f.write("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
with open(out + ".tmp", "w") as f:
    json.dump(facts, f)
os.replace(out + ".tmp", out)
print("worker says hello", flush=True)
if action.startswith("exit"):
    sys.exit(int(action[4:]))
if action == "sleep":
    time.sleep(600)
if action == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
if action == "raise":
    raise RuntimeError("worker error: boom")
"""


class ScriptLauncher(LocalLauncher):
    """A LocalLauncher whose worker is PROGRAM: ``config_uri`` is the facts file, ``skill`` the action."""

    def command(self, req: LaunchRequest) -> list[str]:
        return [self.settings.batch_python or sys.executable, "-c", PROGRAM, req.config_uri, req.skill]


class StubMonitor(Monitor):
    def __init__(self) -> None:
        self.details: dict[str, str] = {}
        self.cancelled = threading.Event()

    def poll(self, details, message=None, attempt=None) -> None:
        self.details = dict(details)

    def state(self) -> str | None:
        return "cancelled" if self.cancelled.is_set() else None


def settings(tmp_path: Path, **overrides) -> BatchSettings:
    values = dict(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), batch_poll_seconds=0.1,
                  batch_warm_preload=["json"], batch_backoff_limit=0, log_level="WARNING")
    values.update(overrides)
    return BatchSettings(**values)


def request(tmp_path: Path, name: str, action: str, **kw) -> LaunchRequest:
    return LaunchRequest(job_id=name, idempotency_key=name, run="r", skill=action, config_uri=str(tmp_path / f"{name}.json"),
                         expert_id="e", **kw)


def wait_for(predicate, timeout: float = 300.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.05)


def warm(launcher: LocalLauncher):
    """The launcher's warm worker once it is ready (asking starts it)."""
    return wait_for(launcher.warm_worker, what="the warm worker becoming ready")


def facts(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())


@pytest.fixture
def launchers():
    made: list[LocalLauncher] = []
    yield made
    for launcher in made:
        launcher.close()


def make(launchers, s: BatchSettings, **kw) -> ScriptLauncher:
    launcher = ScriptLauncher(s, **kw)
    launchers.append(launcher)
    return launcher


def run(launcher: LocalLauncher, req: LaunchRequest, monitor: Monitor | None = None) -> tuple[Outcome, dict[str, str]]:
    monitor = monitor or StubMonitor()
    outcome = launcher.run(req, monitor)
    return outcome, monitor.details


def test_a_forked_job_sees_what_a_fresh_interpreter_sees(tmp_path, launchers):
    env = {**os.environ, "WARM_PER_SERVICE": "same"}
    warm_launcher = make(launchers, settings(tmp_path / "w"), env=env)
    plain = make(launchers, settings(tmp_path / "p", batch_warm_worker=False), env=env)
    zygote = warm(warm_launcher)
    outcome, details = run(warm_launcher, request(tmp_path, "warm", "exit0"))
    assert outcome.state == "succeeded" and details["local.warm"] == "true", (outcome, details)
    outcome, pdetails = run(plain, request(tmp_path, "plain", "exit0"))
    assert outcome.state == "succeeded" and pdetails["local.warm"] == "false"
    w, p = facts(tmp_path, "warm"), facts(tmp_path, "plain")
    assert w["pid"] != zygote.proc.pid and w["pid"] == int(details["local.pid"])
    # the same command line, working directory, session and process group of its own, and __main__
    for key in ("cwd", "own_group", "own_session", "main"):
        assert w[key] == p[key], key
    assert w["argv"][0] == p["argv"][0] == "-c" and w["argv"][1:] == [str(tmp_path / "warm.json"), "exit0"]
    assert w["own_group"] and w["own_session"] and w["main"] == "__main__"
    assert w["env"]["WARM_PER_SERVICE"] == "same"
    # the worker's parent-death guard points at its real parent: the zygote (which dies with the service)
    assert w["env"]["SELMA_BATCH_PARENT_PID"] == str(zygote.proc.pid)
    assert p["env"]["SELMA_BATCH_PARENT_PID"] == str(os.getpid())
    # stdout and stderr go to the job's log file
    assert "worker says hello" in Path(details["local.log"]).read_text()


def test_exit_codes_and_errors_are_reported_as_for_a_subprocess(tmp_path, launchers):
    launcher = make(launchers, settings(tmp_path))
    warm(launcher)
    outcome, details = run(launcher, request(tmp_path, "bad", "exit2"))
    assert (outcome.state, outcome.reason, outcome.retryable, details["local.warm"]) == ("failed", "BAD_INPUT", False, "true")
    outcome, _ = run(launcher, request(tmp_path, "err", "raise"))
    assert outcome.state == "failed" and outcome.reason == "TRAINER_FAILED" and "exited with 1" in outcome.message
    assert "RuntimeError: worker error: boom" in outcome.message  # the traceback went to the job's log


@pytest.mark.parametrize("crash", ["kill", "segfault"])
def test_a_crashed_job_is_reported_failed_and_the_next_job_runs_on_the_same_warm_worker(tmp_path, launchers, crash):
    launcher = make(launchers, settings(tmp_path))
    zygote = warm(launcher)
    if crash == "kill":
        monitor = StubMonitor()
        result: list[Outcome] = []
        t = threading.Thread(target=lambda: result.append(launcher.run(request(tmp_path, "victim", "sleep"), monitor)))
        t.start()
        wait_for(lambda: (tmp_path / "victim.json").exists(), what="the job starting")
        assert launcher.kill("victim") == facts(tmp_path, "victim")["pid"]
        t.join(timeout=120)
        outcome, code = result[0], -signal.SIGKILL
    else:
        outcome, _ = run(launcher, request(tmp_path, "victim", "segfault"))
        code = -signal.SIGSEGV
    assert outcome.state == "failed" and outcome.reason == "TRAINER_FAILED" and f"exited with {code}" in outcome.message, outcome
    assert zygote.alive() and launcher.warm_worker() is zygote
    outcome, details = run(launcher, request(tmp_path, "next", "exit0"))
    assert outcome.state == "succeeded" and details["local.warm"] == "true"


def test_a_killed_zygote_is_replaced_and_jobs_run_meanwhile(tmp_path, launchers):
    launcher = make(launchers, settings(tmp_path))
    first = warm(launcher)
    first.proc.kill()
    first.proc.wait()
    # the next job runs at once, as a plain subprocess, while a new warm worker starts
    outcome, details = run(launcher, request(tmp_path, "meanwhile", "exit0"))
    assert outcome.state == "succeeded" and details["local.warm"] == "false"
    second = warm(launcher)
    assert second is not first and second.proc.pid != first.proc.pid
    outcome, details = run(launcher, request(tmp_path, "after", "exit0"))
    assert outcome.state == "succeeded" and details["local.warm"] == "true"


def test_a_zygote_dying_under_a_running_job_stops_it_and_the_retry_runs(tmp_path, launchers):
    launcher = make(launchers, settings(tmp_path))
    zygote = warm(launcher)
    monitor = StubMonitor()
    result: list[Outcome] = []
    req = request(tmp_path, "orphan", "sleep", placement={"max_retries": 1})
    t = threading.Thread(target=lambda: result.append(launcher.run(req, monitor)))
    t.start()
    wait_for(lambda: (tmp_path / "orphan.json").exists(), what="the job starting")
    first_pid = facts(tmp_path, "orphan")["pid"]
    (tmp_path / "orphan.json").unlink()
    zygote.proc.kill()
    # the orphaned job got SIGTERM (its checkpoint signal), exited, and the retry started: a plain subprocess
    wait_for(lambda: (tmp_path / "orphan.json").exists(), what="the retry starting")
    assert (tmp_path / "orphan.json.term").read_text() == "SIGTERM"
    second = facts(tmp_path, "orphan")
    wait_for(lambda: monitor.details.get("local.attempt") == "2", what="the retry's first progress poll")
    assert second["pid"] != first_pid and monitor.details["local.warm"] == "false"
    assert not Path(f"/proc/{first_pid}").exists() or Path(f"/proc/{first_pid}/stat").read_text().split()[2] in "ZX"
    monitor.cancelled.set()
    t.join(timeout=120)
    assert result[0].state == "cancelled"


def test_cancel_sends_sigterm_to_the_forked_job(tmp_path, launchers):
    launcher = make(launchers, settings(tmp_path))
    zygote = warm(launcher)
    monitor = StubMonitor()
    result: list[Outcome] = []
    req = request(tmp_path, "long", "sleep")
    t = threading.Thread(target=lambda: result.append(launcher.run(req, monitor)))
    t.start()
    wait_for(lambda: (tmp_path / "long.json").exists(), what="the job starting")
    launcher.cancel(req)  # what CancelExpertTraining does: SIGTERM to the worker's pid
    monitor.cancelled.set()
    t.join(timeout=120)
    assert result[0].state == "cancelled" and monitor.details["local.warm"] == "true"
    assert (tmp_path / "long.json.term").read_text() == "SIGTERM"
    assert zygote.alive()


def test_closing_the_launcher_stops_the_zygote_and_later_jobs_run_plain(tmp_path, launchers):
    launcher = make(launchers, settings(tmp_path))
    zygote = warm(launcher)
    launcher.close()
    assert zygote.proc.poll() is not None
    outcome, details = run(launcher, request(tmp_path, "late", "exit0"))
    assert outcome.state == "succeeded" and details["local.warm"] == "false"


def test_a_different_environment_runs_as_a_plain_subprocess(tmp_path, launchers):
    """A variable a library may read at import (not SELMA_*, not a thread count) differs from the zygote's: no fork."""
    env = {**os.environ, "WARM_PER_SERVICE": "a"}
    launcher = make(launchers, settings(tmp_path), env=env)
    zygote = warm(launcher)
    assert zygote.accepts(launcher.command(request(tmp_path, "x", "exit0")), {**env, "SELMA_ANYTHING": "1", "OMP_NUM_THREADS": "3"})
    assert not zygote.accepts(launcher.command(request(tmp_path, "x", "exit0")), {**env, "WARM_PER_SERVICE": "b"})
    assert not zygote.accepts(["/other/python", "-m", "selma.app.cli"], env)
    launcher._env = {**env, "WARM_PER_SERVICE": "b"}
    outcome, details = run(launcher, request(tmp_path, "other", "exit0"))
    assert outcome.state == "succeeded" and details["local.warm"] == "false"
    assert facts(tmp_path, "other")["env"]["WARM_PER_SERVICE"] == "b"


def test_a_warm_worker_that_cannot_start_is_given_up_and_jobs_run_plain(tmp_path, launchers):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "warm_broken.py").write_text("raise ImportError('broken on purpose')\n")
    env = {**os.environ, "PYTHONPATH": str(mods)}
    launcher = make(launchers, settings(tmp_path, batch_warm_preload=["json", "warm_broken"]), env=env)

    def failed() -> float:
        return REGISTRY.get_sample_value("selma_batch_warm_worker_starts_total", {"result": "failed"}) or 0.0

    before = failed()
    for i in range(LocalLauncher.WARM_START_ATTEMPTS):
        assert launcher.warm_worker() is None  # asking starts one in the background
        wait_for(lambda i=i: failed() >= before + i + 1, what=f"start {i + 1} failing")
    assert launcher.warm_worker() is None
    outcome, details = run(launcher, request(tmp_path, "plain", "exit0"))
    assert outcome.state == "succeeded" and details["local.warm"] == "false"
    assert failed() == before + LocalLauncher.WARM_START_ATTEMPTS  # given up: no further start
    assert (launcher.log_dir / "warm-worker.log").read_text().count("ImportError: broken on purpose") == LocalLauncher.WARM_START_ATTEMPTS


@pytest.mark.slow
def test_per_job_thread_count_applies_in_the_forked_child(tmp_path, launchers):
    """OMP_NUM_THREADS of each job, not of the zygote, sizes torch's pool (set before the child's first op)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    launcher = make(launchers, settings(tmp_path / "w", batch_warm_preload=["torch"]), env=base)
    zygote = warm(launcher)
    assert zygote.info["imported"] == ["torch"]
    got = {}
    for n in ("2", "1"):
        env = {**base, "OMP_NUM_THREADS": n}
        launcher._env = env  # the service's environment for this job: one zygote serves both
        outcome, details = run(launcher, request(tmp_path, f"warm{n}", "threads"))
        assert outcome.state == "succeeded" and details["local.warm"] == "true", outcome
        plain = make(launchers, settings(tmp_path / f"p{n}", batch_warm_worker=False), env=env)
        assert run(plain, request(tmp_path, f"plain{n}", "threads"))[0].state == "succeeded"
        w, p = facts(tmp_path, f"warm{n}"), facts(tmp_path, f"plain{n}")
        assert w["torch_loaded"] and not p["torch_loaded"]  # forked after the zygote's imports; the fresh one imports itself
        got[n] = (w["torch_threads"], p["torch_threads"])
    assert got == {"1": (1, 1), "2": (2, 2)}
    assert launcher.warm_worker() is zygote


def test_a_poll_racing_the_launchers_wait_never_turns_a_finished_job_into_a_lost_one(tmp_path):
    """Cancel/kill RPCs poll() a job while the launcher's thread wait()s on it: one of them reads the
    exit status; the other must see that status, not the pipe's EOF (which means "the zygote died")."""
    from selma.batch.zygote import WarmWorker

    worker = WarmWorker(python=sys.executable, env=dict(os.environ), preload=[], log_path=tmp_path / "zygote.log")
    worker.start()
    try:
        for round_ in range(10):
            with (tmp_path / f"job-{round_}.log").open("wb") as out:
                child = worker.spawn([sys.executable, "-c", "import time; time.sleep(0.2)"], env=dict(os.environ), stdout=out.fileno())
            polled: list[int | None] = []

            def hammer(c=child, seen=polled) -> None:  # noqa: ANN001 - polls until the status is known
                while c.returncode is None:
                    seen.append(c.poll())

            poller = threading.Thread(target=hammer)
            poller.start()
            assert child.wait(timeout=60) == 0
            poller.join(timeout=60)
            assert not child.lost and child.returncode == 0 and child.poll() == 0
            assert set(polled) <= {None, 0}
    finally:
        worker.close()
