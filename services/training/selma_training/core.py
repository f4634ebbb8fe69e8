"""The training service's core (no gRPC): validate, store the job document, launch, follow.

``TrainingCore.start`` validates everything a trainer would trip over — run/skill names, the
dataset (exists, is an image_dataset, every image captioned), the config (preset, ranges,
resolution vs. the model) and the placement — and asks the launcher for a preflight (the
Kubernetes API answers and lets us list Jobs) *before* anything is created.  It then
publishes the resolved :class:`~selma_training.config.TrainingJob` as a ``training_config``
artifact (id derived from the idempotency key) and starts a :class:`selma.jobs.JobManager`
job whose function launches the trainer with that document's URI and follows it: progress,
checkpoints, warnings and launcher details flow from the trainer's progress object into the
job record (and Prometheus) at each launcher wake-up.

After a restart, ``recover`` re-queues unfinished jobs (a Kubernetes Job is adopted, not
created twice: the create is idempotent by name) and, for the Kubernetes launcher, rebuilds
records for our Jobs found by label that the store no longer knows.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

from selma.api import enum_name, output_ref
from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.batch.kube import KubernetesLauncher, validate_placement
from selma.batch.launchers import (
    RELAUNCH_CAUSE,
    ContextMonitor,
    Launcher,
    LaunchRequest,
    LiveLaunches,
    Outcome,
    default_launchers,
    launch_attempt,
)
from selma.batch.progress import read_progress
from selma.errors import (
    Aborted,
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SelmaError,
    error_for_code,
    quote,
)
from selma.jobs import (
    EXPERT_TRAINING_KIND,
    Interrupted,
    JobContext,
    JobManager,
    JobRecord,
    JobResult,
    job_id_for,
    spec_digest,
)
from selma.storage import Storage, open_storage
from selma.v1 import common_pb2
from selma_training import metrics
from selma_training.config import (
    PRESET_DESCRIPTIONS,
    PRESETS_NAMES,
    TrainingJob,
    check_limits,
    from_proto_dict,
    parse_config,
    preset_config,
    to_proto_dict,
)
from selma_training.data import load_dataset, split_validation
from selma_training.distributed import resolve_distributed
from selma_training.settings import TrainingSettings
from selma_training.trainer import JOB_FILE

log = logging.getLogger(__name__)

KIND = EXPERT_TRAINING_KIND
# Run and skill names are label values (letters, digits, '-', '_'); the Job name is derived
# from them DNS-safely with a hash (kube.job_name), so underscores are fine here.
_NAME = re.compile(r"^[a-z0-9]([-_a-z0-9]*[a-z0-9])?$")


class Prepared:
    """A validated start request: the job document and the launcher that will run it."""

    def __init__(self, job: TrainingJob, launcher: str, placement: dict[str, Any]) -> None:
        self.job, self.launcher, self.placement = job, launcher, placement

    @property
    def resolved_config(self) -> dict[str, Any]:
        return to_proto_dict(self.job.config)


def _ts(value: str | None) -> str | None:
    if not value:
        return None
    return datetime.fromisoformat(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stats_from_progress(doc: dict[str, Any]) -> dict[str, Any]:
    """ExpertTrainingStats (proto-JSON dict) from the trainer's progress document."""
    stats: dict[str, Any] = {}
    for k in ("step", "max_steps", "epoch", "resumed_from_step", "peak_memory_bytes", "train_images", "validation_images", "best_step"):
        if doc.get(k) is not None:
            stats[k] = int(doc[k])
    for k in ("loss", "loss_ema", "learning_rate", "steps_per_second", "validation_loss", "best_validation_loss"):
        v = doc.get(k)
        if isinstance(v, (int, float)) and v == v:
            stats[k] = float(v)
    if "checkpoints" in doc:
        stats["checkpoints"] = [{"step": c["step"], "uri": c["uri"], "created_at": _ts(c.get("created_at")), "loss": c.get("loss", 0.0)}
                                for c in doc["checkpoints"]]
    if "loss_history" in doc:
        stats["loss_history"] = [{"step": int(s), "loss": float(l)} for s, l in doc["loss_history"]]
    if doc.get("validation_history"):
        stats["validation_history"] = [{"step": int(s), "loss": float(l)} for s, l in doc["validation_history"]]
    if doc.get("stopped_early"):
        stats["stopped_early"] = True
    if doc.get("latent_cache"):
        c = doc["latent_cache"]
        stats["latent_cache"] = {"id": c["id"], "kind": "ARTIFACT_KIND_LATENT_CACHE", "uri": c.get("uri", ""), "sha256": c.get("sha256", "")}
        stats["latent_cache_hit"] = bool(doc.get("latent_cache_hit"))
    return stats


class _JobMonitor(ContextMonitor):
    def __init__(self, core: TrainingCore, ctx: JobContext, job: TrainingJob) -> None:
        self.core, self.ctx, self.job = core, ctx, job

    def poll(self, details: dict[str, str], message: str | None = None, attempt: int | None = None) -> None:
        doc = read_progress(self.core.storage, self.job.progress_key) or {}
        stats = stats_from_progress(doc)
        details = dict(details)
        if doc.get("pod"):
            details["kubernetes.pod"] = doc["pod"]
        if doc.get("node"):
            details["kubernetes.node"] = doc["node"]
        if attempt is not None:
            details["attempt"] = str(attempt)
            self.ctx.launched(attempt, cause=details.get(RELAUNCH_CAUSE, ""))
        known = set(self.core.manager.get(self.ctx.job_id).warnings)
        for w in doc.get("warnings", []):
            if w not in known:
                if "corrupt" in w:
                    metrics.CHECKPOINT_FALLBACKS.inc()
                self.ctx.warn(w)
        skill = self.job.skill
        step, total = int(doc.get("step", 0) or 0), int(doc.get("max_steps") or self.job.config.max_steps)
        metrics.TRAINING_STEP.labels(skill).set(step)
        metrics.TRAINING_MAX_STEPS.labels(skill).set(total)
        if "loss" in stats:
            metrics.TRAINING_LOSS.labels(skill).set(stats["loss"])
        if "validation_loss" in stats:
            metrics.TRAINING_VALIDATION_LOSS.labels(skill).set(stats["validation_loss"])
        if stats.get("steps_per_second"):
            metrics.TRAINING_STEPS_PER_SECOND.labels(skill).set(stats["steps_per_second"])
            metrics.TRAINING_ETA.labels(skill).set((total - step) / stats["steps_per_second"])
        phase = doc.get("phase", "starting")
        if message is None:
            message = f"{phase}: step {step}/{total}" + (f", loss {stats['loss']:.4f}" if "loss" in stats else "")
        self.ctx.progress(step, total, unit="steps", message=message, stats=stats, details=details)


class TrainingCore:
    """Start, get, watch, cancel and list expert-training jobs."""

    def __init__(self, settings: TrainingSettings, *, storage: Storage | None = None, launchers: dict[str, Launcher] | None = None) -> None:
        self.settings = settings
        self.storage = storage or open_storage(settings)
        self.store = ArtifactStore(self.storage)
        self.launchers: dict[str, Launcher] = launchers or default_launchers(settings)
        self.manager = JobManager(self.storage, KIND, self._run, max_concurrent=settings.training_max_jobs,
                                  max_admitted=settings.training_admission_limit, max_waiting=settings.training_max_queued_jobs,
                                  waiting_setting="training_max_queued_jobs", watchdog_seconds=settings.job_watchdog_seconds)
        self._live = LiveLaunches()

    # -- validation

    def prepare(self, idempotency_key: str, spec: dict[str, Any]) -> Prepared:
        """Validate a start request completely; nothing is created."""
        if not idempotency_key or len(idempotency_key) > 256 or not idempotency_key.isascii() or not idempotency_key.isprintable():
            raise InvalidArgument("idempotency_key must be 1..256 printable ASCII characters, e.g. '<run>/train/<skill>'", field="idempotency_key")
        run, skill = spec.get("run", ""), spec.get("skill", "")
        for name, value in (("run", run), ("skill", skill)):
            if not value:
                raise InvalidArgument(f"{name} is required", field=f"spec.{name}")
            if len(value) > 63 or not _NAME.match(value):
                raise InvalidArgument(f"{name} {quote(value)} must be lowercase letters, digits, '-' or '_', at most 63 characters (it labels the Kubernetes Job)", field=f"spec.{name}")
        dataset_id = (spec.get("dataset") or {}).get("id", "")
        if not dataset_id:
            raise InvalidArgument("dataset.id is required: the image_dataset artifact to train on", field="spec.dataset.id")
        config, _info = from_proto_dict(spec.get("config") or {}, default_model=self.settings.training_default_model)
        check_limits(config, self.settings)
        dataset, examples = load_dataset(self.store, dataset_id)
        split_validation(len(examples), config.validation_fraction, config.seed)  # too small to hold out a split: refused now, not in the Job
        want = (spec.get("dataset") or {}).get("sha256", "")
        if want and want != dataset.digest:
            raise FailedPrecondition(f"dataset {dataset_id} has sha256 {dataset.digest}, not the {want} the request pins; it changed or the reference is stale",
                                     field="spec.dataset.sha256")
        placement = dict(spec.get("placement") or {})
        launcher = enum_name(common_pb2.LauncherKind, placement.get("launcher"), field="spec.placement.launcher") or self.settings.batch_launcher
        validate_placement(placement)  # the proto's ranges hold for every launcher
        self.launchers[launcher].validate(placement)
        nodes, per_node = resolve_distributed(spec, placement, config.gradient_accumulation_steps, self.settings, launcher)
        job_id = job_id_for(KIND, idempotency_key)
        job = TrainingJob(
            job_id=job_id,
            idempotency_key=idempotency_key,
            run=run,
            skill=skill,
            dataset_id=dataset.id,
            config=config,
            expert_id=new_artifact_id(ArtifactKind.EXPERT, idempotency_key),
            work_prefix=f"training/{job_id}",
            config_artifact_id=new_artifact_id(ArtifactKind.TRAINING_CONFIG, idempotency_key),
            labels=dict(spec.get("labels") or {}),
            spec=spec,
            nodes=nodes,
            processes_per_node=per_node,
        )
        return Prepared(job, launcher, placement)

    # -- the RPC operations

    def start(self, idempotency_key: str, spec: dict[str, Any], *, validate_only: bool = False) -> tuple[JobRecord | None, bool, Prepared]:
        prepared = self.prepare(idempotency_key, spec)
        if validate_only:
            return None, False, prepared
        job = prepared.job
        try:
            existing = self.manager.get(job.job_id)
        except NotFound:
            existing = None
        if existing is None or existing.spec_digest == spec_digest(spec):
            if existing is None or existing.phase.terminal:
                self.launchers[prepared.launcher].preflight()
            self._publish_job(prepared)
        rec, created = self.manager.start(idempotency_key, spec, run=job.run, skill=job.skill, labels=job.labels)
        return rec, created, prepared

    def _publish_job(self, prepared: Prepared) -> None:
        job = prepared.job
        if self.store.exists(job.config_artifact_id):
            return
        with self.store.writer(ArtifactKind.TRAINING_CONFIG, id=job.config_artifact_id, parents=[job.dataset_id],
                               parameters={"config": job.config.model_dump(mode="json"), "launcher": prepared.launcher, "skill": job.skill, "run": job.run},
                               labels={"selma.dev/run": job.run, "selma.dev/skill": job.skill}, name=f"{job.skill} training config") as w:
            w.put_bytes(JOB_FILE, job.model_dump_json(indent=2).encode())
            w.put_bytes("config.json", job.config.model_dump_json(indent=2).encode())

    def job_document(self, rec: JobRecord) -> TrainingJob:
        config_id = new_artifact_id(ArtifactKind.TRAINING_CONFIG, rec.idempotency_key)
        return TrainingJob.model_validate_json(self.store.read_bytes(config_id, JOB_FILE))

    def get(self, job_id: str) -> JobRecord:
        return self.manager.get(job_id)

    def watch(self, job_id: str, **kwargs: Any) -> Any:
        return self.manager.watch(job_id, **kwargs)

    def list(self, **kwargs: Any) -> tuple[list[JobRecord], str]:
        return self.manager.list(**kwargs)

    def cancel(self, job_id: str, reason: str = "") -> JobRecord:
        rec = self.manager.cancel(job_id, reason or "cancelled by client")
        # a running launch is woken at once; a Job this service instance did not launch is deleted by name
        if not self._live.cancel(job_id) and rec.details.get("kubernetes.job") and "kubernetes" in self.launchers:
            launcher = self.launchers["kubernetes"]
            if isinstance(launcher, KubernetesLauncher):
                launcher.cancel_by_name(rec.details["kubernetes.job"])
        return self.manager.get(job_id)

    @staticmethod
    def presets() -> list[tuple[str, str, dict[str, Any]]]:
        """(preset, description, full proto-JSON config) for every preset."""
        return [(p, PRESET_DESCRIPTIONS[p], to_proto_dict(parse_config(preset_config(p)))) for p in PRESETS_NAMES]

    # -- lifecycle

    def recover(self) -> list[str]:
        """Re-queue unfinished jobs; with Kubernetes as default, adopt our Jobs the records do not know.

        Free slots are given only after that: an adopted Job holds one, so waiting jobs must not take it first.
        """
        requeued = self.manager.recover(admit=False)
        try:
            self._adopt_unknown_jobs(requeued)
        finally:
            self.manager.admit()
        return requeued

    def _adopt_unknown_jobs(self, requeued: list[str]) -> None:
        """Records for our Kubernetes Jobs (found by label) that the store does not know; their ids join ``requeued``."""
        if self.settings.batch_launcher == "kubernetes":
            try:
                found = self.launchers["kubernetes"].discover()
            except SelmaError as e:
                log.warning("could not list training Jobs to re-adopt them: %s", e)
                found = []
            for item in found:
                if item.get("task", "train") != "train":
                    continue  # evaluation Jobs are adopted by the evaluation core
                try:
                    self.manager.get(item["job_id"])
                    continue
                except (NotFound, InvalidArgument):
                    pass
                if not item.get("idempotency_key") or not item.get("job_id"):
                    continue
                try:
                    from selma_training.trainer import load_job_document

                    doc = load_job_document(item["config_uri"], self.settings)
                    # its Job runs (or ran) in the cluster: it holds a slot, like the jobs re-attached above
                    self.manager.start(doc.idempotency_key, doc.spec, run=doc.run, skill=doc.skill, labels=doc.labels, reattach=True)
                    requeued.append(doc.job_id)
                    log.info("re-adopted Kubernetes Job %s as %s", item["name"], doc.job_id)
                except SelmaError as e:
                    log.warning("cannot re-adopt Job %s: %s", item["name"], e)

    def shutdown(self, wait: bool = True) -> None:
        self.manager.shutdown(wait=wait)
        for launcher in self.launchers.values():
            launcher.close()  # the local warm worker (workers were stopped above)

    # -- the job function

    def _run(self, ctx: JobContext) -> JobResult:
        rec = self.manager.get(ctx.job_id)
        job = self.job_document(rec)
        placement = dict(job.spec.get("placement") or {})
        name = enum_name(common_pb2.LauncherKind, placement.get("launcher"), field="spec.placement.launcher") or self.settings.batch_launcher
        launcher = self.launchers[name]
        config_uri = self.store.get(job.config_artifact_id).file_uri(JOB_FILE)
        req = LaunchRequest(job_id=job.job_id, idempotency_key=job.idempotency_key, run=job.run, skill=job.skill,
                            config_uri=config_uri, expert_id=job.expert_id, placement=placement, labels=job.labels,
                            service_settings=self.settings,
                            nodes=job.nodes if job.world_size > 1 else 0, processes_per_node=job.processes_per_node,
                            attempt=launch_attempt(ctx.restarts))
        config_ref = {"id": job.config_artifact_id, "kind": "ARTIFACT_KIND_TRAINING_CONFIG", "uri": self.store.get(job.config_artifact_id).uri}
        ctx.update(
            stats={"resolved_config": to_proto_dict(job.config), "config_artifact": config_ref, "max_steps": job.config.max_steps,
                   "launcher": "LAUNCHER_KIND_" + name.upper()},
            details={"launcher": name, "checkpoint.uri": self.storage.uri_for(job.checkpoint_prefix.rstrip("/")), "config.uri": config_uri,
                     **({"distributed": f"{job.nodes} node(s) x {job.processes_per_node} process(es)"} if job.world_size > 1 else {})},
        )
        if self.store.exists(job.expert_id):  # finished before a restart: nothing to launch
            return self._succeeded(ctx, job, Outcome("succeeded", "already trained"))
        monitor = _JobMonitor(self, ctx, job)
        outcome = self._live.run(launcher, req, monitor)
        if outcome.state == "succeeded":
            return self._succeeded(ctx, job, outcome)
        if outcome.state == "cancelled":
            raise Cancelled(outcome.message or "cancelled")
        if outcome.state == "interrupted":
            raise Interrupted(outcome.message)
        doc = read_progress(self.storage, job.progress_key) or {}
        err = doc.get("error") or {}
        if err:
            raise error_for_code(err.get("code", ""), f"{err.get('message', '')} ({outcome.message})")
        ctx.update(details={"failure.reason": outcome.reason})
        raise Aborted(f"{outcome.message}; re-start the job with the same key to resume from its last checkpoint")

    def _succeeded(self, ctx: JobContext, job: TrainingJob, outcome: Outcome) -> JobResult:
        try:
            manifest = self.store.get(job.expert_id)
        except NotFound:
            raise FailedPrecondition(f"the trainer reported success but expert {job.expert_id} is not published") from None
        doc = read_progress(self.storage, job.progress_key) or {}
        stats = stats_from_progress(doc)
        p = manifest.parameters
        stats["step"] = int(p.get("trained_steps", p.get("steps", job.config.max_steps)))
        if p.get("final_loss") is not None:
            stats["loss"] = float(p["final_loss"])
        stats["loss_history"] = [{"step": int(s), "loss": float(l)} for s, l in p.get("loss_history", [])]
        if p.get("validation_history"):
            stats["validation_history"] = [{"step": int(s), "loss": float(l)} for s, l in p["validation_history"]]
            stats["best_validation_loss"] = float(p["best_validation_loss"])
            stats["best_step"] = int(p["best_step"])
            stats["stopped_early"] = bool(p.get("stopped_early"))
        for k in ("train_images", "validation_images"):
            if p.get(k) is not None:
                stats[k] = int(p[k])
        total = int(stats.get("max_steps") or job.config.max_steps)
        ctx.progress(stats["step"], total, unit="steps", stats=stats)
        best = f"; stopped early, exported the best (step {stats['best_step']}, validation loss {stats['best_validation_loss']:.4f})" if stats.get("stopped_early") else ""
        return JobResult(output=output_ref(manifest), stats=stats,
                         message=f"trained {stats['step']} steps; final loss {stats.get('loss', float('nan')):.4f}{best}; expert {manifest.id}")
