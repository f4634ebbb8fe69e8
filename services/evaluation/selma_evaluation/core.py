"""The Evaluation RPCs' core (no gRPC): validate a spec, store the job document, launch, follow.

Evaluations are batch work like expert training, so they run the same way: the service
validates everything it can before anything is created (benchmark, categories, prompt sets,
targets, VQA model reference, merge-search grid, validation/test overlap, placement), stores
an :class:`~selma_evaluation.runner.EvaluationJobDoc` and starts a :class:`selma.jobs.JobManager`
job whose function hands ``selma eval execute --config URI`` to a batch launcher
(:mod:`selma.batch`) — a local subprocess, or a Kubernetes Job on a cluster — and follows the worker's
progress document until it exits.  A re-start with the same key resumes the worker's stored
work (images, answers, trials).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from selma.api import enum_name, output_ref
from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.batch.launchers import (
    RELAUNCH_CAUSE,
    ContextMonitor,
    Launcher,
    LiveLaunches,
    default_launchers,
    launch_attempt,
)
from selma.errors import Aborted, Cancelled, FailedPrecondition, InvalidArgument, NotFound, SelmaError, error_for_code
from selma.jobs import Interrupted, JobContext, JobManager, JobRecord, JobResult, job_id_for, spec_digest
from selma.specs import bounded_weight, density, expert_weights, parse_float
from selma.storage import Storage, open_storage
from selma.v1 import common_pb2
from selma_evaluation.runner import (
    METRIC_NAMES,
    EvaluationJobDoc,
    normalise_prompt,
    prompt_set_refs,
    read_prompt_records,
    search_grid,
    validation_set_refs,
)
from selma_evaluation.settings import EvaluationSettings
from selma_evaluation.targets import check_targets_exist

log = logging.getLogger(__name__)

KIND = "evaluation"
MAX_IMAGES_PER_PROMPT = 16
_BENCHMARKS = ("EVALUATION_BENCHMARK_DSG_1K", "EVALUATION_BENCHMARK_PROMPT_SET")


def resolve_vqa(vqa: dict[str, Any], settings: Any) -> dict[str, Any]:
    """The VQA backend with every default filled in (what the worker gets); bad input fails here.

    A transformers model reference that cannot exist (a missing path, a hub id that is not
    cached while the hub is off limits) is NOT_FOUND before any job starts.
    """
    from selma_evaluation.vqa import resolve_backend

    resolved = resolve_backend(vqa, settings)
    if "transformers" in resolved:
        check_model_reference(resolved["transformers"]["model"]["source"], settings, field="spec.vqa.transformers.model.source")
    return resolved


def check_model_reference(source: str, settings: Any, *, field: str) -> None:
    """Paths must exist; hub ids must be cached when the hub is off limits (offline clusters, CI)."""
    if source.startswith(("s3://", "file://")):
        from selma.storage import resolve_uri

        st, key = resolve_uri(settings, source.rstrip("/") + "/config.json")
        if not st.exists(key):
            raise NotFound(f"VQA model {source} has no config.json: not a transformers model directory", field=field)
        return
    if source.startswith(("/", ".", "~")) or Path(source).expanduser().exists():
        if not (Path(source).expanduser() / "config.json").is_file():
            raise NotFound(f"VQA model path {source} does not exist or has no config.json", field=field)
        return
    if settings.hf_offline:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(source, "config.json", cache_dir=str(settings.resolved_model_cache_dir))
            if not isinstance(hit, str):  # the user's own Hugging Face cache
                hit = try_to_load_from_cache(source, "config.json")
        except Exception:  # noqa: BLE001 - a malformed id: say so below
            hit = None
        if not isinstance(hit, str):
            raise NotFound(f"VQA model {source!r} is not in the model cache and the hub is off limits (hf_offline): "
                           "pre-load it into the cache or give a local path", field=field)


class EvaluationCore:
    """Start, get, watch, cancel and list evaluation jobs, launched as batch workers (selma.batch)."""

    def __init__(self, settings: EvaluationSettings, storage: Storage | None = None, launchers: dict[str, Launcher] | None = None) -> None:
        self.settings = settings
        self.storage = storage or open_storage(settings)
        self.store = ArtifactStore(self.storage)
        # hosted beside training (the default), both share one set of launchers and so one local worker pool
        self.launchers = launchers or default_launchers(settings)
        self._own_launchers = launchers is None  # shared ones (hosted beside training) are closed by their owner
        self.manager = JobManager(self.storage, KIND, self._run, max_concurrent=settings.eval_max_jobs,
                                  max_admitted=settings.eval_admission_limit, max_waiting=settings.eval_max_queued_jobs,
                                  waiting_setting="eval_max_queued_jobs", watchdog_seconds=settings.job_watchdog_seconds)
        self._live = LiveLaunches()
        from selma_evaluation.gate import GateCore

        self.gate = GateCore(settings, self.storage, self.store)  # gate jobs: VQA scoring in this process

    # -- validation

    def serving_endpoint(self) -> str:
        if self.settings.eval_serving_endpoint:
            return self.settings.eval_serving_endpoint
        from selma.client import Endpoints

        try:
            endpoint = Endpoints.load().serving
        except SelmaError:
            endpoint = ""
        if not endpoint:
            raise FailedPrecondition("evaluations render through ServingService, but no endpoint is configured: set SELMA_EVAL_SERVING_ENDPOINT=host:port")
        return endpoint

    def prepare(self, idempotency_key: str, spec: dict[str, Any]) -> EvaluationJobDoc:
        """Validate a start request completely; nothing is created."""
        if not idempotency_key or len(idempotency_key) > 256 or not idempotency_key.isascii() or not idempotency_key.isprintable():
            raise InvalidArgument("idempotency_key must be 1..256 printable ASCII characters, e.g. '<run>/eval'", field="idempotency_key")
        benchmark = spec.get("benchmark", "")
        if benchmark not in _BENCHMARKS:
            raise InvalidArgument(f"benchmark must be one of {', '.join(_BENCHMARKS)}; got {benchmark or 'none'}", field="spec.benchmark")
        metrics = [METRIC_NAMES.get(m) for m in spec.get("metrics") or ["EVALUATION_METRIC_DSG"]]
        if None in metrics:
            raise InvalidArgument("metrics must be EVALUATION_METRIC_DSG or EVALUATION_METRIC_TIFA", field="spec.metrics")
        metrics = sorted(set(metrics), key=["dsg", "tifa"].index)  # type: ignore[arg-type]
        ipp = int(spec.get("images_per_prompt") or 0)
        if not 0 <= ipp <= MAX_IMAGES_PER_PROMPT:
            raise InvalidArgument(f"images_per_prompt must be in 0..{MAX_IMAGES_PER_PROMPT}; got {ipp}", field="spec.images_per_prompt")
        max_prompts = int(spec.get("max_prompts") or 0)
        if max_prompts < 0:
            raise InvalidArgument(f"max_prompts must be >= 0; got {max_prompts}", field="spec.max_prompts")
        refs = prompt_set_refs(spec)
        if benchmark == "EVALUATION_BENCHMARK_DSG_1K":
            from selma_evaluation.dsg import load_dsg1k

            if refs:
                raise InvalidArgument("prompt_set / prompt_sets are only used with EVALUATION_BENCHMARK_PROMPT_SET", field="spec.prompt_set")
            if "tifa" in metrics:
                raise InvalidArgument("DSG-1k has yes/no questions only; TIFA needs multiple-choice questions: "
                                      "evaluate TIFA on EVALUATION_BENCHMARK_PROMPT_SET", field="spec.metrics")
            test_texts = [i.prompt for i in load_dsg1k(spec.get("categories") or (), max_prompts)]
        else:
            if not refs:
                raise InvalidArgument("EVALUATION_BENCHMARK_PROMPT_SET needs prompt_set (and optionally prompt_sets): held-out prompt_set artifacts",
                                      field="spec.prompt_set")
            records = read_prompt_records(self.store, refs, "spec.prompt_set")
            wanted = set(spec.get("categories") or [])
            if wanted:
                unknown = wanted - {r.get("skill", "") for r in records}
                if unknown:
                    raise InvalidArgument(f"categories {sorted(unknown)} match no prompt's skill in the prompt sets", field="spec.categories")
                records = [r for r in records if r.get("skill") in wanted]
            test_texts = [r.get("text", "") for r in records][: max_prompts or None]
        if not test_texts:
            raise FailedPrecondition("no prompts to evaluate", field="spec.prompt_set")
        if len(test_texts) > self.settings.eval_max_prompts:
            raise InvalidArgument(f"{len(test_texts)} prompts exceed this service's limit of {self.settings.eval_max_prompts}: "
                                  "set max_prompts or choose categories", field="spec.max_prompts")

        targets = spec.get("targets") or []
        search = spec.get("merge_search") or {}
        if not targets and not search:
            raise InvalidArgument("give at least one target (e.g. label 'base' with no model) or a merge_search", field="spec.targets")
        seen: set[str] = set()
        for i, t in enumerate(targets):
            label = t.get("label", "")
            if not label or len(label) > 64:
                raise InvalidArgument("every target needs a label of 1..64 characters (shown in reports)", field=f"spec.targets[{i}].label")
            if label in seen:
                raise InvalidArgument(f"target label {label!r} is used twice", field=f"spec.targets[{i}].label")
            seen.add(label)
            merge = t.get("experts")
            if merge is not None:
                if not merge.get("experts"):
                    raise InvalidArgument("an experts target needs at least one expert", field=f"spec.targets[{i}].experts.experts")
                for j, e in enumerate(merge["experts"]):
                    if not e.get("expert_id"):
                        raise InvalidArgument("expert_id is required", field=f"spec.targets[{i}].experts.experts[{j}].expert_id")
                # the merge's own rule (selma.specs): finite weights, every expert has one or none has
                expert_weights([e.get("weight") for e in merge["experts"]], f"spec.targets[{i}].experts.experts.weight",
                               max_abs=self.settings.eval_max_merge_weight, setting="eval_max_merge_weight")
        if search and not search.get("expert_ids"):
            raise InvalidArgument("merge_search needs at least one expert id", field="spec.merge_search.expert_ids")
        serving_endpoint = self.serving_endpoint()
        # through ServingService's API, which renders every target: an unknown model or expert is NOT_FOUND now, not a failed job later
        check_targets_exist(serving_endpoint, targets, (search.get("expert_ids") or []) if search else [])
        if search:
            self._validate_search(search, test_texts)

        vqa = resolve_vqa(dict(spec.get("vqa") or {}), self.settings)
        if spec.get("question_backend"):
            from selma_evaluation.questions import resolve_question_backend

            resolve_question_backend(spec["question_backend"], self.settings)
        placement = dict(spec.get("placement") or {})
        launcher = enum_name(common_pb2.LauncherKind, placement.get("launcher"), field="spec.placement.launcher") or self.settings.batch_launcher
        from selma.batch.kube import validate_placement

        validate_placement(placement)
        self.launchers[launcher].validate(placement)
        job_id = job_id_for(KIND, idempotency_key)
        return EvaluationJobDoc(
            job_id=job_id,
            idempotency_key=idempotency_key,
            run=spec.get("run", ""),
            spec=spec,
            report_id=new_artifact_id(ArtifactKind.EVAL_REPORT, idempotency_key),
            work_prefix=f"evaluation/{job_id}",
            serving_endpoint=serving_endpoint,
            vqa=vqa,
            metrics=metrics,
            labels=dict(spec.get("labels") or {}),
        )

    def _validate_search(self, search: dict[str, Any], test_texts: list[str]) -> None:
        f = "spec.merge_search"
        if not search.get("expert_ids"):
            raise InvalidArgument("merge_search needs at least one expert id", field=f"{f}.expert_ids")
        vrefs = validation_set_refs(search)
        if not vrefs:
            raise InvalidArgument("merge_search needs validation_prompt_set: held-out prompts, never the test prompts", field=f"{f}.validation_prompt_set")
        for i, v in enumerate(search.get("weight_values") or []):
            w = parse_float(v, f"{f}.weight_values[{i}]")
            if w is not None:
                bounded_weight(w, f"{f}.weight_values[{i}]", self.settings.eval_max_merge_weight, "eval_max_merge_weight")
        for i, d in enumerate(search.get("densities") or []):
            density(d, f"{f}.densities[{i}]")  # the merge's own rule (selma.specs)
        max_trials = int(search.get("max_trials") or 0)
        if max_trials < 0 or max_trials > 10_000:
            raise InvalidArgument(f"max_trials must be in 0..10000; got {max_trials}", field=f"{f}.max_trials")
        if search.get("objective") not in (None, "", "EVALUATION_METRIC_UNSPECIFIED", *METRIC_NAMES):
            raise InvalidArgument("objective must be EVALUATION_METRIC_DSG or EVALUATION_METRIC_TIFA", field=f"{f}.objective")
        if not search_grid(search, self.settings.eval_max_trials):
            raise InvalidArgument("the search has no trial: every weight combination is all zeros", field=f"{f}.weight_values")
        records = read_prompt_records(self.store, vrefs, f"{f}.validation_prompt_set")
        test = {normalise_prompt(t) for t in test_texts}
        shared = [r.get("text", "") for r in records if normalise_prompt(r.get("text", "")) in test]
        if shared:
            raise InvalidArgument(
                f"{len(shared)} validation prompt(s) also appear among the test prompts (e.g. {shared[0]!r}): validation and "
                "test prompts must not overlap, or the chosen merge is tuned on the test set", field=f"{f}.validation_prompt_set")

    # -- the RPC operations

    def start(self, idempotency_key: str, spec: dict[str, Any], *, validate_only: bool = False) -> tuple[JobRecord | None, bool, EvaluationJobDoc]:
        doc = self.prepare(idempotency_key, spec)
        if validate_only:
            return None, False, doc
        try:
            existing = self.manager.get(doc.job_id)
        except NotFound:
            existing = None
        if existing is None or existing.spec_digest == spec_digest(spec):
            key = self._doc_key(doc.job_id)
            if not self.storage.exists(key):
                self.storage.put_bytes(key, doc.model_dump_json(indent=2).encode(), content_type="application/json")
        rec, created = self.manager.start(idempotency_key, spec, run=doc.run, labels=doc.labels)
        return rec, created, doc

    @staticmethod
    def _doc_key(job_id: str) -> str:
        return f"evaluation/{job_id}/job.json"

    def get(self, job_id: str) -> JobRecord:
        return self.manager.get(job_id)

    def watch(self, job_id: str, **kwargs: Any) -> Any:
        return self.manager.watch(job_id, **kwargs)

    def list(self, **kwargs: Any) -> tuple[list[JobRecord], str]:
        return self.manager.list(**kwargs)

    def cancel(self, job_id: str, reason: str = "") -> JobRecord:
        self.manager.cancel(job_id, reason or "cancelled by client")
        self._live.cancel(job_id)
        return self.manager.get(job_id)

    def recover(self) -> list[str]:
        return self.manager.recover() + self.gate.recover()

    def shutdown(self, wait: bool = True) -> None:
        self.gate.shutdown(wait=wait)
        self.manager.shutdown(wait=wait)
        if self._own_launchers:
            for launcher in self.launchers.values():
                launcher.close()

    # -- the job function

    def _run(self, ctx: JobContext) -> JobResult:
        from selma.batch.launchers import LaunchRequest
        from selma.batch.progress import read_progress

        key = self._doc_key(ctx.job_id)
        doc = EvaluationJobDoc.model_validate_json(self.storage.get_bytes(key))
        placement = dict(doc.spec.get("placement") or {})
        name = enum_name(common_pb2.LauncherKind, placement.get("launcher"), field="spec.placement.launcher") or self.settings.batch_launcher
        launcher = self.launchers[name]
        ctx.update(stats={"launcher": "LAUNCHER_KIND_" + name.upper()}, details={"launcher": name, "config.uri": self.storage.uri_for(key)})
        if not self.store.exists(doc.report_id):
            req = LaunchRequest(job_id=doc.job_id, idempotency_key=doc.idempotency_key, run=doc.run or "eval", skill="evaluation",
                                config_uri=self.storage.uri_for(key), expert_id=doc.report_id, placement=placement, labels=doc.labels, task="eval",
                                service_settings=self.settings, attempt=launch_attempt(ctx.restarts))
            monitor = _EvalMonitor(self, ctx, doc, name)
            outcome = self._live.run(launcher, req, monitor)
            if outcome.state == "cancelled":
                raise Cancelled(outcome.message or "cancelled")
            if outcome.state == "interrupted":
                raise Interrupted(outcome.message)
            if outcome.state != "succeeded":
                progress = read_progress(self.storage, doc.progress_key) or {}
                err = progress.get("error") or {}
                if err:
                    raise error_for_code(err.get("code", ""), err.get("message", outcome.message))
                raise Aborted(f"{outcome.message}; re-start the evaluation with the same key to resume its stored work")
        try:
            manifest = self.store.get(doc.report_id)
        except NotFound:
            raise FailedPrecondition(f"the evaluation worker exited cleanly but report {doc.report_id} is not published") from None
        progress = read_progress(self.storage, doc.progress_key) or {}
        stats = stats_from_progress(progress, name)
        # The worker's final counts, not the last poll's: a finished job says what it did.
        total = stats["images_total"] + stats["questions_total"]
        ctx.progress(stats["images_rendered"] + stats["questions_answered"], total or None, unit="images+answers")
        stats["report_html_uri"] = manifest.file_uri("index.html")
        summary = manifest.parameters.get("summary", {})
        text = "; ".join(f"{label}: " + ", ".join(f"{m.upper()} {v:.1f}" for m, v in s.items()) for label, s in summary.items())
        return JobResult(output=output_ref(manifest), stats=stats, message=f"report {manifest.id}: {text}")


def stats_from_progress(doc: dict[str, Any], launcher: str) -> dict[str, Any]:
    """EvaluationStats (proto-JSON) from the worker's progress document."""
    s = dict(doc.get("stats") or {})
    out: dict[str, Any] = {k: int(s.get(k, 0)) for k in ("images_rendered", "images_total", "questions_answered", "questions_total")}
    out["scores"] = list(s.get("scores") or [])
    out["trials"] = [{"index": t["index"], "merge": t["merge"], "validation_score_percent": t["validation_score_percent"]} for t in s.get("trials") or []]
    if s.get("best_merge"):
        out["best_merge"] = s["best_merge"]
    if s.get("registered_model_name"):
        out["registered_model_name"] = s["registered_model_name"]
    if s.get("report_html_uri"):
        out["report_html_uri"] = s["report_html_uri"]
    out["launcher"] = "LAUNCHER_KIND_" + launcher.upper()
    return out


class _EvalMonitor(ContextMonitor):
    """The launcher's view of an evaluation job: progress from the worker, cancel/stop signals."""

    def __init__(self, core: EvaluationCore, ctx: JobContext, doc: EvaluationJobDoc, launcher: str) -> None:
        self.core, self.ctx, self.doc, self.launcher = core, ctx, doc, launcher

    def poll(self, details: dict[str, str], message: str | None = None, attempt: int | None = None) -> None:
        from selma.batch.progress import read_progress

        doc = read_progress(self.core.storage, self.doc.progress_key) or {}
        stats = stats_from_progress(doc, self.launcher)
        done = stats["images_rendered"] + stats["questions_answered"]
        total = stats["images_total"] + stats["questions_total"]
        known = set(self.core.manager.get(self.ctx.job_id).warnings)
        for w in doc.get("warnings", []):
            if w not in known:
                self.ctx.warn(w)
        if message is None:
            message = (f"{doc.get('phase', 'starting')}: {stats['images_rendered']}/{stats['images_total']} images, "
                       f"{stats['questions_answered']}/{stats['questions_total']} answers")
        if attempt is not None:
            details = {**details, "attempt": str(attempt)}
            self.ctx.launched(attempt, cause=details.get(RELAUNCH_CAUSE, ""))
        self.ctx.progress(done, total or None, unit="images+answers", message=message, stats=stats, details=details)
