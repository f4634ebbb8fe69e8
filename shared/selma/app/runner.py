"""``selma run``: drive a whole SELMA run from a SkillSet, through the gRPC services only.

Per skill, in parallel: prompt set → image dataset → LoRA expert; then one merge of all
experts, registered on the serving service under the SkillSet's model name.  Every job is
started with a deterministic idempotency key (``<run>/<skill>/<stage>``), so re-running the
same run attaches to jobs that are running and skips those that finished: nothing is done
twice, nothing finished is lost, and Ctrl-C leaves a resumable run (the services keep
working).  A service that goes away pauses the run with a clear status until it is back.

The run's state (stages, job ids, outputs) is kept in ``<dir>/runs/<run>.json``, replaced
atomically; a lock file stops two ``selma run`` of the same run at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.tree import Tree

from selma.api import enum_name, message_to_dict
from selma.app.skillset import SkillSet, load_skillset, merge_job_spec
from selma.cli_options import EXPERT_WEIGHTS_SYNTAX, add_output_options, parse_expert_weights, print_rows
from selma.client import PRIORITY_NAMES, SelmaClient, add_client_arguments, last_target
from selma.errors import Aborted, InvalidArgument, RunFailed
from selma.jobs import run_stage_key
from selma.seeds import SEED_MODULUS, SeedPolicy, seed_policy
from selma.v1 import common_pb2, evaluation_service_pb2, render_service_pb2, training_service_pb2

log = logging.getLogger(__name__)

SKILL_STAGES = ("prompts", "render", "gate", "training")  # gate (and its rounds render-N, gate-N) only with a gate: section
TERMINAL = {common_pb2.JOB_PHASE_SUCCEEDED, common_pb2.JOB_PHASE_FAILED, common_pb2.JOB_PHASE_CANCELLED}
PHASE_NAMES = {v.number: enum_name(common_pb2.JobPhase, v.number) for v in common_pb2.JobPhase.DESCRIPTOR.values}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def stage_key(run: str, skill: str | None, stage: str) -> str:
    """A stage's idempotency key; ``<run>/<skill>`` references resolve through the training stage's (selma.jobs)."""
    return run_stage_key(run, skill, stage)


# ------------------------------------------------------------------------------------ state


class RunState:
    """The run's durable record: one JSON file per run, replaced atomically after each change."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self._lock = threading.Lock()

    @classmethod
    def open(cls, runs_dir: Path, skillset: SkillSet) -> RunState:
        path = runs_dir / f"{skillset.name}.json"
        digest = hashlib.sha256(json.dumps(skillset.raw, sort_keys=True, default=str).encode()).hexdigest()
        if path.exists():
            data = json.loads(path.read_text())
            if data.get("skillset_digest") != digest:
                log.warning("run %s: the SkillSet changed since the last attempt; finished stages are reused only where their settings match", skillset.name)
                data["skillset_digest"] = digest
        else:
            data = {"name": skillset.name, "skillset": skillset.source, "skillset_digest": digest, "created_at": _now(), "stages": {}, "phase": "pending"}
        state = cls(path, data)
        state.save()
        return state

    @classmethod
    def load(cls, runs_dir: Path, name: str) -> RunState:
        path = runs_dir / f"{name}.json"
        if not path.exists():
            raise InvalidArgument(f"no run named {name!r} in {runs_dir}; `selma runs` lists them", field="run")
        return cls(path, json.loads(path.read_text()))

    def stage(self, skill: str | None, stage: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(f"{skill or '*'}/{stage}", {"skill": skill, "stage": stage, "phase": "pending"})

    def update_stage(self, skill: str | None, stage: str, **fields: Any) -> None:
        with self._lock:
            self.stage(skill, stage).update(fields)
            self.save_locked()

    def set(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            self.save_locked()

    def save(self) -> None:
        with self._lock:
            self.save_locked()

    def save_locked(self) -> None:
        self.data["updated_at"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


class RunLock:
    """An exclusive lock per run name (a file holding the owner's pid; stale locks are taken over)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid_alive(pid):
                    raise Aborted(f"run {self.path.stem!r} is already being driven by `selma run` (pid {pid}); wait for it or stop it first", field="run") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise Aborted(f"could not take the lock {self.path}", field="run")

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (also one of another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------- reporting


class Reporter:
    """Live progress per stage and skill: rich bars on a terminal, plain log lines otherwise."""

    def __init__(self, console: Console, *, live: bool | None = None) -> None:
        self.console = console
        self.live = console.is_terminal if live is None else live
        self._progress: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._last: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Reporter:
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description:<32}"),
                BarColumn(),
                TextColumn("{task.fields[count]:>9}"),  # never "0/?" or "0/0": "-" until the total is known
                TextColumn("{task.fields[unit]:<7} {task.fields[phase]:<10}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, label: str, status: common_pb2.JobStatus, note: str = "") -> None:
        phase, count = job_progress(status)
        phase = note or phase
        done, total = status.progress.done, status.progress.total
        with self._lock:
            if self._progress is not None:
                fields = {"unit": status.progress.unit if total else "", "phase": phase, "count": count}
                if label not in self._tasks:
                    self._tasks[label] = self._progress.add_task(label, total=total or None, **fields)
                self._progress.update(self._tasks[label], completed=done, total=total or None, **fields)
                return
            # Plain lines: on phase changes and every 10 % of progress.
            decile = int(10 * done / total) if total else 0
            key = (phase, decile)
            if self._last.get(label) != key:
                self._last[label] = key
                eta = f", eta {status.progress.eta.seconds}s" if status.progress.HasField("eta") and status.phase == common_pb2.JOB_PHASE_RUNNING else ""
                # A stage that did less than was asked (2 of 4 prompts published) says why, on success too.
                short = phase == "succeeded" and total and done < total
                msg = f" - {status.message}" if status.message and (phase in ("failed", "cancelled") or short) else ""
                counted = f" {count} {status.progress.unit}" if total else ""
                self.console.print(f"{label}: {phase}{counted}{eta}{msg}", highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)  # "[paused]" is text, not a rich style


def job_progress(status: common_pb2.JobStatus) -> tuple[str, str]:
    """(phase, count) as a person should read them: a job waiting for a slot is "queued (position n)"
    (not "pending 0/0"), a running job whose total is not known yet says what it is doing
    (e.g. loading its model) instead of "0/?", and counts appear only once the total is known."""
    done, total = status.progress.done, status.progress.total
    count = f"{done}/{total}" if total else "-"
    if status.phase == common_pb2.JOB_PHASE_PENDING:
        if status.queue_position:
            return f"queued (position {status.queue_position})", count
        where = status.message.partition(":")[2].partition(",")[0].strip() if status.message.startswith("queued:") else ""
        return ("queued" + (f" ({where})" if where else "")), count
    phase = PHASE_NAMES.get(status.phase, "?")
    if status.phase == common_pb2.JOB_PHASE_RUNNING and not total and status.message and status.message != "running":
        return f"{phase}: {status.message}"[:60], count
    return phase, count


# ------------------------------------------------------------------------------------ driver


class RunDriver:
    """Runs one SkillSet against the services; resumable by construction (idempotency keys)."""

    def __init__(
        self, client: SelmaClient, skillset: SkillSet, state: RunState, reporter: Reporter, *, retry_seconds: float = 2.0, max_outage: float = 600.0
    ) -> None:
        self.client = client
        self.skillset = skillset
        self.state = state
        self.reporter = reporter
        self.retry_seconds = retry_seconds
        self.max_outage = max_outage  # seconds one stage waits for an unreachable service before the run fails
        self._down_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._phase_lock = threading.Lock()
        self.gate_summary: dict[str, dict[str, Any]] = {}  # per skill, the last gate round's numbers (with a gate: section)

    def stop(self) -> None:
        with self._phase_lock:  # after this no skill thread writes the run's phase (see _set_phase)
            self._stop.set()

    def _set_phase(self, **fields: Any) -> None:
        """The run's phase from a skill thread (paused / running again), unless the run was stopped: then the stopper's word stands."""
        with self._phase_lock:
            if not self._stop.is_set():
                self.state.set(**fields)

    # One stage: start (or attach to) the job for its key, then watch it to the end.
    def drive(self, kind: str, skill: str | None, spec: Any, *, stage: str = "") -> Any:
        """``stage``: the stage's name in keys and run state when one kind runs more than once per skill (gate rounds); "" = ``kind``."""
        run = self.skillset.name
        key = stage_key(run, skill, stage or kind)
        label = f"{skill or run} · {stage or kind}"
        kind_stage = kind
        kind = stage or kind
        jobs = self.client.jobs(kind_stage)
        service = jobs._k.service
        job = self._retrying(label, lambda: jobs.start(key, spec), service=service)[0]
        self.state.update_stage(skill, kind, job_id=job.status.job_id, phase=PHASE_NAMES[job.status.phase], key=key)
        job_id = job.status.job_id
        while not self._stop.is_set():
            try:
                for job in jobs.watch(job_id):
                    self._down_since.pop(label, None)
                    self.reporter.update(label, job.status)
                    self.state.update_stage(skill, kind, phase=PHASE_NAMES[job.status.phase], done=job.status.progress.done, total=job.status.progress.total,
                                            message=job.status.message, queue_position=job.status.queue_position)
                    if self._stop.is_set():
                        return job
                if job.status.phase in TERMINAL:
                    break
                job = self._retrying(label, lambda: jobs.get(job_id), service=service)
                if job.status.phase in TERMINAL:
                    break
            except grpc.RpcError as e:
                # A watch stream the server cut off as it stopped reads CANCELLED or UNAVAILABLE, whichever
                # gRPC saw first; the job's own fate is in its phase, so look again (unless we were stopped).
                cut_off = e.code() == grpc.StatusCode.CANCELLED and not self._stop.is_set()
                if e.code() not in RETRYABLE and not cut_off:
                    raise RunFailed(f"{label}: the {jobs._k.service} service answered {e.code().name}: {e.details()}") from None
                self._pause(label, e, service)
        status = job.status
        if status.phase == common_pb2.JOB_PHASE_SUCCEEDED:
            self.state.update_stage(skill, kind, phase="succeeded", output=message_to_dict(status.output))
            return job
        if status.phase in TERMINAL:
            why = status.error.message or status.message
            raise RunFailed(f"{label} {PHASE_NAMES[status.phase]}: {why}. Fix the cause and run `selma run` again: finished stages are kept")
        return job

    def _retrying(self, label: str, call: Callable[[], Any], *, service: str = "") -> Any:
        while True:
            try:
                result = call()
                self._down_since.pop(label, None)
                return result
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                    raise RunFailed(
                        f"{label}: {e.details()}. This run name was used before with different settings: "
                        "restore the SkillSet or choose a new metadata.name"
                    ) from None
                if e.code() not in RETRYABLE:
                    raise RunFailed(f"{label}: {e.code().name}: {e.details()}") from None
                self._pause(label, e, service)
                if self._stop.is_set():
                    raise RunFailed(f"{label}: stopped while waiting for the service") from None

    def _pause(self, label: str, e: grpc.RpcError, service: str = "") -> None:
        address = self.client.endpoints.address(service) if service else ""
        where = f"the {service} service at {address}" if address else "the service"
        now = time.monotonic()
        since = self._down_since.setdefault(label, now)
        if now - since >= self.max_outage:
            self._down_since.pop(label, None)
            raise RunFailed(
                f"{label}: {where} has been unreachable for {now - since:.0f} s ({e.code().name}); check that it is running "
                "(`selma up`) and the endpoints (--endpoints, --dir or SELMA_ENDPOINTS), then run `selma run` again: finished stages are kept"
            )
        left = self.max_outage - (now - since)
        self._set_phase(phase="paused", message=f"{label}: service unavailable at {address or '?'} ({e.details()}); retrying")
        self.reporter.note(f"[paused] {label}: {where} is unavailable ({e.code().name}); retrying every {self.retry_seconds:.0f} s "
                           f"for up to {left:.0f} s more (Ctrl-C leaves a resumable run)")
        self._stop.wait(min(self.retry_seconds, max(left, 0.0)))
        self._set_phase(phase="running", message="")

    def skill_chain(self, skill) -> str:  # noqa: ANN001 - SkillEntry
        """prompts → render → training for one skill; returns the expert artifact id."""
        ss = self.skillset
        job = self.drive("prompts", skill.name, ss.prompt_spec(skill))
        prompt_set = job.status.output
        render_spec = render_service_pb2.DatasetRenderSpec(run=ss.name, skill=skill.name, prompt_set=prompt_set, settings=ss.render,
                                                           shards=ss.render_shards, placement=ss.render_placement)
        if ss.gate is not None:
            dataset = self.gated_dataset(skill, prompt_set)
        else:
            job = self.drive("render", skill.name, render_spec)
            dataset = job.status.output
        train_spec = training_service_pb2.ExpertTrainingSpec(run=ss.name, skill=skill.name, dataset=dataset, config=ss.training_config_for(skill.name),
                                                             placement=ss.placement, distributed=ss.training_distributed)
        job = self.drive("training", skill.name, train_spec)
        return job.status.output.id

    def gated_dataset(self, skill, prompt_set: common_pb2.ArtifactRef) -> common_pb2.ArtifactRef:  # noqa: ANN001 - SkillEntry
        """Best-of-K rounds for one skill: render candidate r of the prompts without a kept image, gate every candidate so far.

        Round r renders candidate r (its seed derived per candidate, selma.seeds) only for prompts that
        have no kept image yet: an image that passed makes more candidates of its prompt pointless, and
        the budget goes to the prompts the model still gets wrong.  The rounds stop at the target number of
        kept images, when the candidate budget is spent, when every prompt has a kept image, or after K
        rounds.  Returns the last gate job's kept dataset (its parents: every round's candidates).
        """
        ss = self.skillset
        g = ss.gate
        assert g is not None
        k = g.candidates_per_prompt or 1
        budget = g.max_candidates
        datasets: list[common_pb2.ArtifactRef] = []
        kept: common_pb2.ArtifactRef | None = None
        rendered = 0
        stats = None
        for r in range(k):
            rnd = render_service_pb2.CandidateRound(index=r, per_prompt=k, max_images=max(budget - rendered, 0) if budget else 0)
            if kept is not None:
                rnd.skip_kept_in.CopyFrom(common_pb2.ArtifactRef(id=kept.id, kind=common_pb2.ARTIFACT_KIND_IMAGE_DATASET))
            render_spec = render_service_pb2.DatasetRenderSpec(run=ss.name, skill=skill.name, prompt_set=prompt_set, settings=ss.render,
                                                               shards=ss.render_shards, placement=ss.render_placement, candidates=rnd)
            job = self.drive("render", skill.name, render_spec, stage="render" if r == 0 else f"render-{r}")
            datasets.append(common_pb2.ArtifactRef(id=job.status.output.id, kind=common_pb2.ARTIFACT_KIND_IMAGE_DATASET))
            rendered += job.stats.images_total
            gate_spec = evaluation_service_pb2.GateSpec(run=ss.name, skill=skill.name, prompt_set=prompt_set, datasets=datasets, gate=g)
            job = self.drive("gate", skill.name, gate_spec, stage="gate" if r == 0 else f"gate-{r}")
            kept, stats = job.status.output, job.stats
            summary = {"round": r, "candidates": stats.candidates_total, "kept": stats.kept, "pass_rate_percent": round(stats.pass_rate_percent, 1),
                       "prompts_kept": stats.prompts_kept, "prompts_total": stats.prompts_total, "dataset": kept.id}
            self.state.update_stage(skill.name, "gate", summary=summary)
            self.gate_summary[skill.name] = summary
            self.reporter.note(f"{skill.name} · gate round {r + 1}/{k}: kept {stats.kept} of {stats.candidates_total} candidates "
                               f"({stats.pass_rate_percent:.1f}%), {stats.prompts_kept}/{stats.prompts_total} prompts with a kept image")
            if g.target_kept and stats.kept >= g.target_kept:
                break
            if budget and rendered >= budget:
                break
            if stats.prompts_kept >= stats.prompts_total:
                break
        assert kept is not None and stats is not None
        if stats.kept == 0:
            raise RunFailed(f"{skill.name} · gate: no image passed ({stats.candidates_total} candidates scored): lower spec.gate.threshold, "
                            "raise spec.gate.candidatesPerPrompt or spec.gate.maxCandidates, or check the VQA backend and questions")
        return kept

    def run_interruptible(self) -> dict[str, Any]:
        """:meth:`run`; on Ctrl-C (or a SIGTERM turned into one) stop the skill threads and mark the run interrupted, then re-raise.

        The threads stop writing the run state before the caller releases the run's lock, and
        ``selma runs`` shows the run as resumable rather than running.
        """
        try:
            return self.run()
        except KeyboardInterrupt:
            self.stop()
            self.state.set(phase="interrupted", message="stopped by the user; run again to resume")
            raise

    def run(self) -> dict[str, Any]:
        ss = self.skillset
        self.state.set(phase="running", message="", started_at=_now())
        experts: dict[str, str] = {}
        errors: list[BaseException] = []

        def chain(skill) -> None:  # noqa: ANN001
            try:
                experts[skill.name] = self.skill_chain(skill)
            except BaseException as e:  # noqa: BLE001 - reported below, the other skills go on
                errors.append(e)

        threads = [threading.Thread(target=chain, args=(s,), name=f"run-{s.name}", daemon=True) for s in ss.skills]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        if self._stop.is_set():
            self.state.set(phase="interrupted", message="stopped by the user; run again to resume")
            raise KeyboardInterrupt
        if errors:
            self.state.set(phase="failed", message="; ".join(str(e) for e in errors))
            raise errors[0]
        try:
            result = self._merge_and_evaluate(experts)
        except Exception as e:
            # a refused or failed merge/evaluation ends the run: `selma runs` must not keep showing it as running
            self.state.set(phase="failed", message=str(e))
            raise
        if self._stop.is_set():
            self.state.set(phase="interrupted", message="stopped by the user; run again to resume")
            raise KeyboardInterrupt
        if self.gate_summary:
            result["gate"] = dict(sorted(self.gate_summary.items()))
        self.state.set(phase="succeeded", message="", model_name=ss.model_name, merged_model=result["merged_model"], experts=experts,
                       finished_at=_now(), **{k: result[k] for k in ("eval_report", "scores", "gate") if k in result})
        return result

    def _merge_and_evaluate(self, experts: dict[str, str]) -> dict[str, Any]:
        ss = self.skillset
        job = self.drive("merge", None, merge_job_spec(ss, experts))
        merged = job.status.output.id
        result: dict[str, Any] = {"model_name": ss.model_name, "merged_model": merged, "experts": experts}
        if ss.evaluation is not None:
            job = self.drive("evaluation", None, evaluation_spec(ss))
            result["eval_report"] = job.status.output.id
            result["scores"] = {f"{s.target_label}/{enum_name(evaluation_service_pb2.EvaluationMetric, s.metric)}": round(s.score_percent, 2)
                                for s in job.stats.scores if not s.category and not s.skill}
        return result


def evaluation_spec(ss: SkillSet) -> evaluation_service_pb2.EvaluationSpec:
    """The SkillSet's evaluation section for this run: base vs the merged model unless it names targets."""
    spec = evaluation_service_pb2.EvaluationSpec()
    spec.CopyFrom(ss.evaluation)
    spec.run = ss.name
    if not spec.targets:
        spec.targets.add(label="base")
        spec.targets.add(label=ss.model_name, model_name=ss.model_name)
    return spec


# --------------------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=".selma", help="state directory: runs/, endpoints.json (default .selma)")
    common.add_argument("--endpoints", default="", help="endpoints file (default <dir>/endpoints.json or SELMA_ENDPOINTS)")
    add_client_arguments(common)

    p = sub.add_parser("run", parents=[common], help="run a SkillSet end to end through the services (resumable)")
    p.add_argument("skillset", help="SkillSet YAML file, e.g. examples/quickstart.yaml")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of live progress bars")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the services to be SERVING before the run starts (default 60)")
    p.add_argument("--max-outage", type=float, default=600.0, help="seconds a stage waits for a service that went away before the run fails (default 600)")
    p.set_defaults(func=_run)

    p = sub.add_parser("runs", parents=[common], help="list runs and their phase; `selma runs delete RUN` deletes one")
    add_output_options(p)
    p.set_defaults(func=_runs)
    rsub = p.add_subparsers(dest="runs_command", metavar="ACTION")
    d = rsub.add_parser("delete", parents=[common], help="delete a run: its jobs and the artifacts nothing outside it depends on",
                        description="Delete a run through the serving service: every service's job records and scratch of the run, "
                        "and its artifacts except those a registered model or another run depends on (kept and listed). Refused "
                        "while one of its jobs is pending or running. Also removes the local run state <dir>/runs/RUN.json.")
    d.add_argument("run", help="run name (the SkillSet's metadata.name)")
    d.add_argument("--dry-run", action="store_true", help="list what would be deleted and kept; delete nothing")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the deletion (default 600)")
    d.set_defaults(func=_delete_run)

    p = sub.add_parser("status", parents=[common], help="show one run's stages")
    p.add_argument("run", help="run name (the SkillSet's metadata.name)")
    add_output_options(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("lineage", parents=[common], help="the tree from an artifact (e.g. a merged model) back to its prompts")
    p.add_argument("artifact", help="a registered model name, a <run>/<skill> expert, or an artifact id")
    add_output_options(p)
    p.set_defaults(func=_lineage)

    p = sub.add_parser("generate", parents=[common], help="generate images with a served model")
    p.add_argument("prompt", nargs="+", help="prompt text (several prompts allowed)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default="", help="registered model name (default: the base model)")
    g.add_argument("--experts", default="", help=f"per-request expert weights: {EXPERT_WEIGHTS_SYNTAX}")
    p.add_argument("-o", "--out", default="out.png", help="output PNG (several images: out-0.png, out-1.png, ...)")
    p.add_argument("--steps", type=int, default=0, help="denoising steps (0 = server default)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: server default)")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--height", type=int, default=0)
    p.add_argument("--seed", type=_seed_arg, default=None,
                   help="base seed in [0, 2^63) (default: a random one, printed so the images can be reproduced)")
    p.add_argument("--seed-policy", choices=[sp.value for sp in SeedPolicy], default=SeedPolicy.DERIVED.value,
                   help="how each image's seed derives from the base seed (default derived); "
                        "fixed: every image uses the base seed, so a printed per-image seed re-renders that image")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--priority", choices=PRIORITY_NAMES, default="normal",
                   help="place among waiting requests (default normal); high is served only to admin tokens, "
                        "others are served at normal")
    p.add_argument("--progress", action="store_true",
                   help="show the place in line and the images as they arrive (on stderr: a live bar on a terminal, "
                        "else one line per change)")
    add_output_options(p)
    p.set_defaults(func=_generate)


def _seed_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < SEED_MODULUS:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63); got {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    skillset = load_skillset(args.skillset)  # validate before anything starts
    console = Console(soft_wrap=True)  # long paths and URLs stay on one line in logs
    runs_dir = Path(args.dir) / "runs"
    with RunLock(runs_dir / f"{skillset.name}.lock"):
        state = RunState.open(runs_dir, skillset)
        with SelmaClient.for_cli(args) as client, Reporter(console, live=False if args.plain else None) as reporter:
            def waiting(service: str, address: str, left: float) -> None:
                reporter.note(f"waiting for the {service} service at {address} to be SERVING (up to {left:.0f} s more) ...")

            client.wait_ready(timeout=args.wait, on_wait=waiting)  # an unreachable endpoint fails here, naming it
            driver = RunDriver(client, skillset, state, reporter, max_outage=args.max_outage)
            try:
                result = driver.run_interruptible()
            except KeyboardInterrupt:
                console.print(f"run {skillset.name} interrupted: the services keep the work; `selma run {args.skillset}` resumes it")
                return 130
    console.print(f"run {skillset.name} succeeded: model [bold]{result['model_name']}[/bold] (merged model {result['merged_model']})", highlight=False)
    for skill, expert in result["experts"].items():
        console.print(f"  expert {skill}: {expert}", highlight=False)
    for skill, g in result.get("gate", {}).items():
        console.print(f"  gate {skill}: {g['candidates']} candidates rendered, {g['kept']} kept ({g['pass_rate_percent']:.1f}%), "
                      f"{g['prompts_kept']}/{g['prompts_total']} prompts with a kept image, dataset {g['dataset']}", highlight=False)
    console.print(f"try: selma generate \"a photo\" --model {result['model_name']} -o out.png", highlight=False)
    return 0


def _runs(args: argparse.Namespace) -> int:
    runs_dir = Path(args.dir) / "runs"
    records = [json.loads(path.read_text()) for path in sorted(runs_dir.glob("*.json"))] if runs_dir.exists() else []
    rows = [(d.get("name", ""), d.get("phase", "?"), d.get("updated_at", ""), d.get("model_name", ""), d.get("skillset", "")) for d in records]
    print_rows(args, ("run", "phase", "updated", "model", "skillset"), rows, title=f"runs in {runs_dir}", records=records)
    return 0


def stage_progress(st: dict[str, Any]) -> str:
    """A stage's progress cell: "-" until its total is known (never 0/0), "queued (position n)" while it waits for a slot."""
    if st.get("phase") == "pending" and st.get("job_id"):
        return f"queued (position {st['queue_position']})" if st.get("queue_position") else "queued"
    done, total = st.get("done", 0), st.get("total", 0)
    return f"{done}/{total}" if total else "-"


def _delete_run(args: argparse.Namespace) -> int:
    from selma.app.artifacts_cli import print_removed

    console = Console(soft_wrap=True)
    runs_dir = Path(args.dir) / "runs"
    local = runs_dir / f"{args.run}.json"
    with RunLock(runs_dir / f"{args.run}.lock"), SelmaClient.for_cli(args) as client:  # not while `selma run` drives it
        try:
            resp = client.delete_run(args.run, dry_run=args.dry_run, timeout=args.timeout)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND or not local.exists():
                raise
            # the services know nothing of it (never started, or deleted already): only the local state is left
            if not args.dry_run:
                local.unlink(missing_ok=True)
            console.print(f"run {args.run}: the services hold nothing of it; {'would remove' if args.dry_run else 'removed'} its local state {local}",
                          highlight=False)
            return 0
        if not resp.dry_run:
            local.unlink(missing_ok=True)
    verb = "would delete" if resp.dry_run else "deleted"
    print_removed(console, resp.removed, verb)
    for k in resp.kept:
        console.print(f"kept {k.artifact_id}: {k.dependant} depends on it", highlight=False)
    console.print(f"run {resp.run}{' (dry run)' if resp.dry_run else ''}: {verb} {len(resp.job_ids)} job record(s) and "
                  f"{len(resp.removed)} artifact/scratch item(s), {resp.bytes_freed} bytes; kept {len(resp.kept)} artifact(s) others depend on",
                  highlight=False)
    return 0


def _status(args: argparse.Namespace) -> int:
    state = RunState.load(Path(args.dir) / "runs", args.run)
    d = state.data
    rows = [(st.get("skill") or "-", st["stage"], st.get("phase", ""), stage_progress(st), st.get("job_id", ""), (st.get("output") or {}).get("id", ""))
            for st in d["stages"].values()]
    title = f"run {d['name']}: {d.get('phase')}" + (f" ({d['message']})" if d.get("message") else "")
    print_rows(args, ("skill", "stage", "phase", "progress", "job", "output"), rows, title=title, records=d)
    return 0


def _lineage(args: argparse.Namespace) -> int:
    with SelmaClient.for_cli(args) as client:
        artifact_id = client.resolve_artifact(args.artifact)  # a model name, <run>/<skill>, or an id
        manifests = client.lineage(artifact_id)
    by_id = {m.id: m for m in manifests}
    kinds = {v.number: enum_name(common_pb2.ArtifactKind, v.number) for v in common_pb2.ArtifactKind.DESCRIPTOR.values}

    expanded: set[str] = set()

    def add(node: Tree, aid: str) -> None:
        m = by_id.get(aid)
        if m is None:
            node.add(f"{aid} (missing)")
            return
        label = f"[bold]{kinds.get(m.kind, '?')}[/bold] {m.id}" + (f"  skill={m.skill}" if m.skill else "") + _gate_note(m)
        if aid in expanded:  # a DAG: an ancestor shared by several children is drawn once
            node.add(label + "  [dim](ancestors shown above)[/dim]")
            return
        expanded.add(aid)
        branch = node.add(label)
        for parent in m.parent_ids:
            add(branch, parent)

    if args.json or args.plain:
        rows = [(m.id, kinds.get(m.kind, "?"), m.skill, ", ".join(m.parent_ids)) for m in manifests]
        print_rows(args, ("id", "kind", "skill", "parents"), rows, records=[message_to_dict(m) for m in manifests])
        return 0
    root = Tree(f"lineage of {args.artifact}" + (f" ({artifact_id})" if artifact_id != args.artifact else ""))
    add(root, artifact_id)
    Console().print(root)
    return 0


def _gate_note(m: common_pb2.ArtifactManifest) -> str:
    """What lineage says of the gate's datasets: a kept dataset's numbers, a candidate round's index."""
    p = m.parameters
    if "kept" in p and "candidates" in p and "pass_rate_percent" in p:
        return f"  gate: kept {int(p['kept'])} of {int(p['candidates'])} candidates ({p['pass_rate_percent']:.1f}%)"
    if "candidate_round" in p:
        return f"  best-of-K candidate {int(p['candidate_round']['index'])}"
    return ""


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class GenerateProgressView:
    """``selma generate --progress``: where the request stands (place in line, batch, images), on stderr.

    A rich live bar on a terminal (like ``selma run``'s), else one plain line per change, so that
    stdout keeps only the result (and ``--json`` stays parseable)."""

    def __init__(self, console: Console, total: int, *, live: bool | None = None) -> None:
        self.console = console
        self.total = total
        self.live = console.is_terminal if live is None else live
        self.images = 0
        self._progress: Progress | None = None
        self._task: Any = None
        self._last = ""

    def __enter__(self) -> GenerateProgressView:
        if self.live:
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<40}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("sending", total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def _show(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text, completed=self.images)
        elif text != self._last:
            self.console.print(f"generate: {text}", highlight=False, markup=False)
        self._last = text

    def update(self, resp: Any) -> None:
        """One GenerateResponse: a progress message or an image."""
        if resp.HasField("progress"):
            p = resp.progress
            if p.queue_position:
                self._show(f"queued: {_ordinal(p.queue_position)} in line ({p.queue_length} waiting)")
            else:
                self._show(f"generating (batch of {p.batch_size} image{'s' if p.batch_size != 1 else ''})")
        elif resp.HasField("image"):
            self.images += 1
            self._show(f"generating: image {self.images}/{self.total} received")


def _generate(args: argparse.Namespace) -> int:
    # the CLI's one expert-weight grammar (selma.cli_options); no weights = 1/N each (the service's rule)
    experts: dict[str, float | None] = dict(parse_expert_weights(args.experts, "--experts")) if args.experts else {}
    out = Path(args.out)
    written = []
    # The base seed is chosen here, not by the service, so that it can be printed: with the policy it
    # reproduces every image of this call (the service reports only each image's derived seed).
    base_seed = secrets.randbits(63) if args.seed is None else args.seed
    policy = seed_policy(args.seed_policy)
    responses = []
    with SelmaClient.for_cli(args) as client:
        try:
            stream = client.generate(
                args.prompt, model_name=args.model, experts=experts or None, steps=args.steps, guidance_scale=args.guidance,
                width=args.width, height=args.height, seed=base_seed, seed_policy=policy.value, images_per_prompt=args.num_images,
                priority=args.priority, stream_progress=args.progress,
            )
            if args.progress:
                console = Console(stderr=True, soft_wrap=True)
                with GenerateProgressView(console, len(args.prompt) * args.num_images, live=False if args.plain or args.json else None) as view:
                    for resp in stream:
                        view.update(resp)
                        responses.append(resp)
            else:
                responses = list(stream)
        except grpc.RpcError as e:
            raise RunFailed(f"generate: {e.code().name}: {e.details()}") from None
        replica = last_target()[1]  # the serving replica the request was routed to
    responses = [r for r in responses if r.HasField("image")]  # progress-only messages (queue position) carry no image
    images = []
    for i, resp in enumerate(responses):
        path = out if len(responses) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(resp.image.png)
        written.append(path)
        images.append({"path": str(path), "seed": resp.image.seed, "model": resp.model.model_name or ("per-request expert mix" if experts else "base"),
                       "replica": replica, "merge_cache_hit": resp.model.merge_cache_hit})
    if args.json:
        sys.stdout.write(json.dumps({"base_seed": base_seed, "seed_policy": policy.value, "images": images}, indent=2) + "\n")
        return 0
    sys.stdout.write(f"base seed={base_seed}  seed policy={policy.value}  (reproduce all: --seed {base_seed} --seed-policy {policy.value})\n")
    if args.model or experts:  # the base model has nothing to merge or load
        hit = responses[0].model.merge_cache_hit if responses else False
        sys.stdout.write(f"served by {replica}: {'cache hit (already fused there)' if hit else 'cache miss (merged/loaded for this request)'}\n")
    for im in images:
        sys.stdout.write(f"{im['path']}  seed={im['seed']}  model={im['model']}  (this image alone: --seed {im['seed']} --seed-policy fixed)\n")
    return 0
