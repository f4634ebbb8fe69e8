"""Where a trainer runs: one interface, a local-subprocess and a Kubernetes implementation.

A launcher takes a :class:`LaunchRequest` (the stored job document's URI plus placement),
starts the trainer — ``selma train --config URI`` — if it is not already running, and follows
it until a terminal outcome, waking up on its own events (a process exit or a poll timeout; a
Job watch event or the watch's server-side timeout).  At each wake-up it hands the
:class:`Monitor` launcher facts (pid, Job and pod names) so the service can read the trainer's
progress object and check for cancel / shutdown.

The **local** launcher (the embedded default) runs the trainer as a child process with a
concurrency limit.  The child dies with the service (it arms ``PR_SET_PDEATHSIG`` = SIGTERM
itself, so it checkpoints first) and the restarted service re-queues the job, whose new trainer resumes
from the last checkpoint: no orphan keeps training, and no work is lost beyond one interval.
A child that fails for a reason other than bad input is restarted (resuming) up to the
placement's ``max_retries``, mirroring a Job's ``backoffLimit``.

With ``batch_warm_worker`` (the default) the local launcher keeps a warm worker
(:mod:`selma.batch.zygote`): a process that has imported torch, diffusers and the worker modules
once, and forks each job as a fresh child that runs the same command line, with the same
environment, log file, exit codes and signals, in a process group of its own.  While the warm worker
starts (or restarts, after it died) jobs run as plain subprocesses; the Kubernetes launcher is one
pod per job as before.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selma.batch import metrics
from selma.batch.settings import BatchSettings
from selma.batch.zygote import WarmChild, WarmWorker, WarmWorkerError
from selma.errors import InvalidArgument

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 143


# Job names of a job: a client re-start of a failed job (JobRecord.restarts, raised only by a re-start:
# pod retries and relaunches do not count, so a restarted service still computes the running Job's
# name) must never adopt the failed Job of an earlier start, and a distributed run's own relaunches
# (at most max_retries <= 20 of them) count up from there without reaching the next start's names.
ATTEMPT_STRIDE = 100


def launch_attempt(restarts: int) -> int:
    """``LaunchRequest.attempt`` for a job re-started ``restarts`` times: 0 for the first start (its Job
    keeps the name it always had), then a fresh range of Job names per re-start."""
    return max(int(restarts), 0) * ATTEMPT_STRIDE


@dataclass
class LaunchRequest:
    """One trainer to run: ids, the job document URI and placement (proto-JSON ``Placement``)."""

    job_id: str
    idempotency_key: str
    run: str
    skill: str
    config_uri: str
    expert_id: str
    placement: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    # What the worker does: "train" runs ``selma train --config URI``; "eval" runs
    # ``selma eval execute --config URI`` (evaluations are batch work launched the same way);
    # "render" runs ``selma render shard --config URI`` (one shard of a dataset render).
    task: str = "train"
    # > 0: a Kubernetes Indexed Job of this many completions (completion index = shard), all run at once.
    completions: int = 0
    # The shard a local worker runs (``--shard N``); None = the whole task, or the completion index.
    shard: int | None = None
    # > 0: distributed training over this many nodes (a Kubernetes Indexed Job of one pod per node with a
    # headless Service for rendezvous); the worker itself starts processes_per_node processes per node.
    nodes: int = 0
    processes_per_node: int = 0
    # The service's attempt of the job: a new attempt (a client re-started a failed job) gets a new Job name
    # (see launch_attempt); a distributed run's own restarts count up from it.
    attempt: int = 0
    # The launching service's settings: its own (WORKER_SETTING_PREFIXES) settings travel to the worker.
    # None = the launcher's; set when several services share one launcher (training and evaluation).
    service_settings: BatchSettings | None = None

    @property
    def args(self) -> list[str]:
        """The ``selma`` subcommand and arguments the worker runs."""
        if self.task == "eval":
            return ["eval", "execute", "--config", self.config_uri]
        if self.task == "render":
            return ["render", "shard", "--config", self.config_uri, *(["--shard", str(self.shard)] if self.shard is not None else [])]
        return ["train", "--config", self.config_uri]


@dataclass
class Outcome:
    """How a launch ended: succeeded, failed, cancelled or interrupted (the service is stopping)."""

    state: str
    message: str = ""
    reason: str = ""
    retryable: bool = True


RELAUNCH_CAUSE = "relaunch.cause"  # launcher detail: why the worker of this launch was started again


class Monitor(ABC):
    """The service side of a launch: progress, details and the cancel/stop signals."""

    @abstractmethod
    def poll(self, details: dict[str, str], message: str | None = None, attempt: int | None = None) -> None:
        """Read the trainer's progress and publish it together with launcher ``details``."""

    @abstractmethod
    def state(self) -> str | None:
        """None while the job should go on; "cancelled" or "stopping" otherwise."""


class ContextMonitor(Monitor):
    """A Monitor whose cancel and shutdown signals come from a :class:`selma.jobs.JobContext` (``self.ctx``)."""

    ctx: Any

    def state(self) -> str | None:
        from selma.errors import Cancelled
        from selma.jobs import Interrupted

        try:
            self.ctx.check_cancelled()
        except Interrupted:
            return "stopping"
        except Cancelled:
            return "cancelled"
        return None


class LiveLaunches:
    """The launches in flight, by job id, so that a cancel reaches the launcher at once."""

    def __init__(self) -> None:
        self._live: dict[str, tuple[Launcher, LaunchRequest]] = {}
        self._lock = threading.Lock()

    def run(self, launcher: Launcher, req: LaunchRequest, monitor: Monitor) -> Outcome:
        """``launcher.run(req, monitor)``, registered for :meth:`cancel` while it runs."""
        with self._lock:
            self._live[req.job_id] = (launcher, req)
        try:
            outcome = launcher.run(req, monitor)
            metrics.OUTCOMES.labels(req.task, launcher.name, outcome.state).inc()
            return outcome
        finally:
            with self._lock:
                self._live.pop(req.job_id, None)

    def cancel(self, job_id: str) -> bool:
        """Stop the job's running launch, if any (wakes its follower: process exit, Job DELETED); True if there was one."""
        with self._lock:
            live = self._live.get(job_id)
        if live is None:
            return False
        launcher, req = live
        launcher.cancel(req)
        return True


class Launcher(ABC):
    """Runs trainers somewhere; see the module docstring."""

    name: str

    def validate(self, placement: dict[str, Any]) -> None:  # noqa: B027 - optional hook; the local launcher checks little
        """Reject a placement this launcher cannot honour (InvalidArgument naming the field)."""

    def preflight(self) -> None:  # noqa: B027 - optional hook; only Kubernetes can be unreachable
        """Fail fast (UNAVAILABLE / PERMISSION_DENIED) when the launcher cannot work at all."""

    @abstractmethod
    def run(self, req: LaunchRequest, monitor: Monitor) -> Outcome:
        """Start (or adopt) the trainer and follow it to an outcome."""

    @abstractmethod
    def cancel(self, req: LaunchRequest) -> None:
        """Stop the trainer (idempotent); its checkpoints are kept."""

    def close(self) -> None:  # noqa: B027 - optional hook; only the local launcher holds a process of its own
        """Release what the launcher holds between jobs (the local warm worker); running jobs are the caller's to stop first."""

    def discover(self) -> list[dict[str, str]]:
        """Trainers this launcher can see running without a service record (Kubernetes: from labels)."""
        return []


class LocalLauncher(Launcher):
    """Trainer subprocesses on this machine, at most ``batch_max_local_jobs`` at once."""

    name = "local"

    def __init__(self, settings: BatchSettings, *, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self._slots = threading.BoundedSemaphore(settings.batch_max_local_jobs)
        self._procs: dict[str, subprocess.Popen[bytes] | WarmChild] = {}
        self._lock = threading.Lock()
        self._env = env
        self.log_dir = Path(settings.data_dir).resolve() / "training-logs"
        self._warm: WarmWorker | None = None
        self._warm_starting = False
        self._warm_failures = 0
        self._closed = False

    def validate(self, placement: dict[str, Any]) -> None:  # noqa: B027 - optional hook; the local launcher checks little
        retries = placement.get("max_retries")
        if retries is not None and not 0 <= int(retries) <= 20:
            raise InvalidArgument(f"max_retries must be in 0..20; got {retries}", field="spec.placement.max_retries")

    def child_env(self, req: LaunchRequest | None = None) -> dict[str, str]:
        """The worker's environment: ours, plus the settings it must share with the service that launched it."""
        env = dict(self._env if self._env is not None else os.environ)
        s = self.settings
        values: dict[str, Any] = {
            "data_dir": Path(s.data_dir).resolve(),
            "storage_uri": s.resolved_storage_uri,
            "s3_endpoint": s.s3_endpoint,
            "s3_access_key": s.s3_access_key.get_secret_value(),
            "s3_secret_key": s.s3_secret_key.get_secret_value(),
            "s3_region": s.s3_region,
            "s3_secure": s.s3_secure,
            "s3_create_buckets": s.s3_create_buckets,
            "storage_retries": s.storage_retries,
            "storage_backoff_seconds": s.storage_backoff_seconds,
            "model_cache_dir": s.resolved_model_cache_dir,
            "hf_offline": s.hf_offline,
            "device": s.device,
            "precision": s.precision,
            "log_level": s.log_level,
            "batch_progress_interval_seconds": s.batch_progress_interval_seconds,
            # no /metrics server in local trainers: the service's port (inherited through the
            # environment) would clash, and the service already exports selma_training_* gauges
            "metrics_port": 0,
            # the trainer arms PR_SET_PDEATHSIG itself (no preexec_fn: unsafe in a threaded server)
            "batch_parent_pid": os.getpid(),
        }
        for k, v in values.items():
            env[f"SELMA_{k.upper()}"] = str(v).lower() if isinstance(v, bool) else str(v)
        service = (req.service_settings if req is not None else None) or s
        env.update(service.worker_env(secrets=True))  # local workers share the service's environment anyway
        return env

    def command(self, req: LaunchRequest) -> list[str]:
        python = self.settings.batch_python or sys.executable
        return [python, "-m", "selma.app.cli", *req.args]

    # -- the warm worker

    WARM_START_ATTEMPTS = 3  # failed starts in a row after which the launcher stops trying (plain subprocesses only)

    def warm_worker(self, req: LaunchRequest | None = None) -> WarmWorker | None:
        """The ready warm worker, or None (off, starting, given up, closed); starts one in the background if none runs."""
        if not self.settings.batch_warm_worker:
            return None
        with self._lock:
            current = self._warm
            if current is not None and current.alive():
                return current
            if self._closed or self._warm_starting or self._warm_failures >= self.WARM_START_ATTEMPTS:
                return None
            self._warm_starting, self._warm = True, None
        if current is not None:
            code = current.proc.poll() if current.proc is not None else None
            log.warning("the warm worker exited (%s); restarting it, jobs run as plain subprocesses meanwhile", code)
            current.close(timeout=0)
        extra = type(req.service_settings).WORKER_PRELOAD if req is not None and req.service_settings is not None else ()
        preload = list(dict.fromkeys([*self.settings.batch_warm_preload, *type(self.settings).WORKER_PRELOAD, *extra]))
        worker = WarmWorker(python=self.settings.batch_python or sys.executable, env=self.child_env(), preload=preload,
                            log_path=self.log_dir / "warm-worker.log", start_timeout=self.settings.batch_warm_start_timeout_seconds)
        threading.Thread(target=self._start_warm, args=(worker,), name="warm-worker-start", daemon=True).start()
        return None

    def _start_warm(self, worker: WarmWorker) -> None:
        try:
            worker.start()
        except (WarmWorkerError, OSError) as e:
            with self._lock:
                self._warm_starting = False
                self._warm_failures += 1
                failures = self._warm_failures
            metrics.WARM_STARTS.labels("failed").inc()
            give_up = failures >= self.WARM_START_ATTEMPTS
            log.warning("warm worker failed to start (%s)%s", e, "; local jobs run as plain subprocesses from now on" if give_up else "")
            return
        metrics.WARM_STARTS.labels("ready").inc()
        weakref.finalize(self, worker.close)  # a launcher dropped without close() (or the process exiting) stops its zygote
        with self._lock:
            self._warm_starting, self._warm_failures = False, 0
            closed = self._closed
            if not closed:
                self._warm = worker
        if closed:
            worker.close()

    def close(self) -> None:
        """Stop the warm worker (idempotent); later jobs run as plain subprocesses."""
        with self._lock:
            self._closed = True
            worker, self._warm = self._warm, None
        if worker is not None:
            worker.close()

    def _start(self, req: LaunchRequest, log_file: Any) -> subprocess.Popen[bytes] | WarmChild:
        """The worker process of one attempt: forked by the warm worker when it can, else a fresh interpreter."""
        command, env = self.command(req), self.child_env(req)
        warm = self.warm_worker(req)
        if warm is not None and warm.accepts(command, env):
            try:
                return warm.spawn(command, env=env, stdout=log_file.fileno())
            except WarmWorkerError as e:
                log.warning("warm worker could not start the worker of %s (%s); starting a plain subprocess", req.job_id, e)
        return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def run(self, req: LaunchRequest, monitor: Monitor) -> Outcome:
        poll = self.settings.batch_poll_seconds
        while not self._slots.acquire(timeout=poll):
            monitor.poll({"local.queue": "waiting for a local training slot"}, message="waiting for a local training slot")
            if (st := monitor.state()) is not None:
                return Outcome(st, f"{st} while waiting for a slot")
        try:
            retries = int(req.placement.get("max_retries", self.settings.batch_backoff_limit))
            attempt, cause = 0, ""
            while True:
                attempt += 1
                outcome = self._run_once(req, monitor, attempt, poll, cause)
                if outcome.state != "failed" or not outcome.retryable or attempt > retries:
                    return outcome
                log.warning("trainer for %s failed (%s); restarting from its last checkpoint (retry %d of %d)", req.job_id, outcome.message, attempt, retries)
                cause = outcome.message
        finally:
            self._slots.release()

    def _run_once(self, req: LaunchRequest, monitor: Monitor, attempt: int, poll: float, cause: str = "") -> Outcome:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{req.job_id}.log"
        with log_path.open("ab") as log_file:
            metrics.LAUNCHES.labels(req.task, self.name).inc()
            proc = self._start(req, log_file)
        warm = isinstance(proc, WarmChild)
        with self._lock:
            self._procs[req.job_id] = proc
        details = {"local.pid": str(proc.pid), "local.log": str(log_path), "local.attempt": str(attempt), "local.warm": str(warm).lower()}
        if cause:
            details[RELAUNCH_CAUSE] = cause[:300]
        log.info("started trainer for %s: pid %d%s, log %s", req.job_id, proc.pid, " (forked by the warm worker)" if warm else "", log_path)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll)
                    break
                except subprocess.TimeoutExpired:
                    monitor.poll(details, attempt=attempt)
                    st = monitor.state()
                    if st == "cancelled":
                        self._stop(proc)
                        return Outcome("cancelled", "cancelled")
                    if st == "stopping":
                        self._stop(proc)  # SIGTERM: the trainer checkpoints, the next service resumes it
                        return Outcome("interrupted", "service stopping")
        finally:
            with self._lock:
                self._procs.pop(req.job_id, None)
        monitor.poll(details, attempt=attempt)
        if monitor.state() == "cancelled" and rc != 0:
            return Outcome("cancelled", "cancelled")
        if getattr(proc, "lost", False):  # the warm worker died under it: the child got SIGTERM, checkpointed and is gone
            return Outcome("failed", "the warm worker died while the trainer ran (the trainer was stopped with SIGTERM)", "WORKER_LOST")
        if rc == 0:
            return Outcome("succeeded", "trainer finished")
        tail = _tail(log_path)
        if rc == EXIT_BAD_INPUT:
            return Outcome("failed", f"trainer rejected its input (exit 2): {tail}", "BAD_INPUT", retryable=False)
        if rc == EXIT_INTERRUPTED or rc == -signal.SIGTERM:
            return Outcome("failed", "trainer was stopped by SIGTERM (checkpoint saved)", "INTERRUPTED")
        return Outcome("failed", f"trainer exited with {rc}: {tail}", "TRAINER_FAILED")

    def _stop(self, proc: subprocess.Popen[bytes] | WarmChild, grace: float = 60.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cancel(self, req: LaunchRequest) -> None:
        with self._lock:
            proc = self._procs.get(req.job_id)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def kill(self, job_id: str) -> int | None:
        """SIGKILL a running trainer (tests: a crash with no chance to checkpoint). Returns its pid."""
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is None or proc.poll() is not None:
            return None
        proc.kill()
        return proc.pid


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_bytes()[-4000:].decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    errs = [ln for ln in text if "error" in ln.lower()]
    return (errs[-1] if errs else (text[-1] if text else ""))[-limit:]


LauncherFactory = Callable[[BatchSettings], Launcher]


def default_launchers(settings: BatchSettings) -> dict[str, Launcher]:
    """One launcher of each kind over ``settings`` (a service's own, or shared by services hosted together)."""
    from selma.batch.kube import KubernetesLauncher

    return {"local": LocalLauncher(settings), "kubernetes": KubernetesLauncher(settings)}
