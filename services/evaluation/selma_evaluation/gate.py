"""The gate stage (no gRPC): keep only the rendered images a VQA model finds right for their prompts.

A gate job scores every candidate image of one or more image datasets (the best-of-K rounds of
one skill) against its prompt's DSG-style questions and publishes the kept images — DSG score at
or above the threshold — as a new ``image_dataset`` whose parents are the candidate datasets:

* ``metadata.jsonl``: the kept rows, unchanged but for ``gate`` (score, threshold), so training
  reads it like any rendered dataset;
* ``gate.jsonl``: every candidate (kept or not) with its score, pass/fail and each question with
  its answer and score;
* parameters: per-skill numbers (candidates, kept, pass rate, prompts with a kept image) and the
  gate settings.

Questions come from the prompt-set records (inline), from an LLM (DSG generation,
:mod:`selma_evaluation.questions`) or from the VQA backend itself (a plugin with a question
grammar: the ShapesWorld judge).  Scores are journaled per dataset under
``gate/scores/<digest>/<dataset>.<content digest>/`` (:func:`journal_prefix`) where the digest covers what
a score depends on (VQA backend, question source, prompt set), so a resumed job — or the next round's job over the same datasets —
never asks the VQA model about an image twice.  The threshold is applied when publishing, not
journaled: two gates differing only in threshold share their scores.

The jobs run in the service's process (:class:`selma.jobs.JobManager`), like dataset renders.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from selma import plugins
from selma.api import output_ref
from selma.artifacts import ArtifactKind, ArtifactStore, Manifest, new_artifact_id
from selma.errors import FailedPrecondition, InvalidArgument, NotFound, SelmaError
from selma.jobs import JobContext, JobManager, JobRecord, JobResult
from selma.retention import GATE_SCORES_PREFIX
from selma.specs import candidates_per_prompt, gate_budget, gate_threshold, parse_mapping
from selma.storage import Storage
from selma_evaluation import metrics
from selma_evaluation.dsg import question_scores
from selma_evaluation.settings import EvaluationSettings
from selma_evaluation.types import EvalItem
from selma_evaluation.vqa import VqaModel, VqaQuery, build_vqa, is_yes, resolve_backend

log = logging.getLogger(__name__)

KIND = "gate"
SOURCES = ("GATE_QUESTION_SOURCE_GENERATED", "GATE_QUESTION_SOURCE_INLINE", "GATE_QUESTION_SOURCE_VQA_BACKEND")
CHUNK = 32  # images scored between journal writes (and cancellation checks)


@dataclass(frozen=True)
class GateConfig:
    """A validated ``GateSettings``."""

    vqa: dict[str, Any]  # resolved VqaBackend dict
    question_source: str  # one of SOURCES, or "" = inline when every record has questions, else generated
    question_backend: dict[str, Any]
    threshold: float
    per_prompt: int
    target_kept: int
    max_candidates: int


def parse_gate_settings(d: Mapping[str, Any] | None, settings: EvaluationSettings, *, prefix: str = "spec.gate") -> GateConfig:
    """Validate a proto-JSON ``GateSettings`` (the same rules a SkillSet's ``gate:`` section gets)."""
    d = parse_mapping(d or {}, prefix)
    source = str(d.get("question_source") or "")
    if source in ("GATE_QUESTION_SOURCE_UNSPECIFIED",):
        source = ""
    if source and source not in SOURCES:
        raise InvalidArgument(f"must be one of {', '.join(SOURCES)}; got {source}", field=f"{prefix}.question_source")
    target, budget = gate_budget(d.get("target_kept"), d.get("max_candidates"), prefix)
    with _fields_under(prefix):  # the evaluation's rules name spec.vqa...; here they are spec.gate.vqa...
        vqa = resolve_backend(dict(d.get("vqa") or {}), settings)
    if d.get("question_backend") and source in ("", "GATE_QUESTION_SOURCE_GENERATED"):
        from selma_evaluation.questions import resolve_question_backend

        with _fields_under(prefix):  # an endpoint the service may not call, or a bad backend, fails at Start
            resolve_question_backend(d["question_backend"], settings)
    if source == "GATE_QUESTION_SOURCE_VQA_BACKEND" and _backend_questions(vqa) is None:
        raise InvalidArgument(f"the VQA backend {next(iter(vqa))} writes no questions of its own: use GATE_QUESTION_SOURCE_GENERATED or "
                              "GATE_QUESTION_SOURCE_INLINE", field=f"{prefix}.question_source")
    return GateConfig(
        vqa=vqa,
        question_source=source,
        question_backend=dict(d.get("question_backend") or {}),
        threshold=gate_threshold(d.get("threshold"), f"{prefix}.threshold"),
        per_prompt=candidates_per_prompt(d.get("candidates_per_prompt"), f"{prefix}.candidates_per_prompt"),
        target_kept=target,
        max_candidates=budget,
    )


@contextmanager
def _fields_under(prefix: str) -> Iterator[None]:
    """Re-raise an evaluation-spec error (``spec.vqa…``, ``spec.question_backend…``) with the field under ``prefix``."""
    try:
        yield
    except SelmaError as e:
        field = e.field or ""
        if not field.startswith("spec.") or field.startswith(prefix):
            raise
        moved = prefix + field.removeprefix("spec")
        raise type(e)(e.message.replace(field, moved), field=moved) from None


def _backend_questions(vqa: Mapping[str, Any]) -> Callable[[str], list[dict[str, Any]]] | None:
    plugin = plugins.registry().vqa_backends.get(next(iter(vqa), ""))
    return plugin.questions if plugin is not None else None


# ------------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class Scored:
    """One candidate's verdict before the threshold: its DSG score and every question's answer."""

    file_name: str
    prompt_id: str
    score: float
    questions: tuple[dict[str, Any], ...]  # {"id", "text", "parents", "answer", "score"}
    error: str = ""  # why it could not be scored (it then fails the gate)

    def record(self) -> dict[str, Any]:
        return {"file_name": self.file_name, "prompt_id": self.prompt_id, "score": self.score, "questions": list(self.questions),
                **({"error": self.error} if self.error else {})}


def score_images(vqa: VqaModel, items: Sequence[tuple[str, str, Any, EvalItem | None]]) -> list[Scored]:
    """Score ``[(file_name, prompt_id, PIL image, item)]``: each image's DSG score over its item's yes/no questions.

    An item of None (no questions could be written for the prompt) scores 0 with the reason.
    """
    queries: list[VqaQuery] = []
    spans: list[tuple[int, int]] = []
    for _, _, image, item in items:
        start = len(queries)
        for q in (item.questions if item else ()):
            queries.append(VqaQuery(image=image, question=q.text))
        spans.append((start, len(queries)))
    answers = vqa.answer(queries) if queries else []
    out = []
    for (file_name, prompt_id, _, item), (a, b) in zip(items, spans, strict=True):
        if item is None or a == b:
            out.append(Scored(file_name, prompt_id, 0.0, (), error="no questions for this prompt"))
            continue
        raw = answers[a:b]
        scores = question_scores(item, {q.id: is_yes(ans) for q, ans in zip(item.questions, raw, strict=True)})
        qs = tuple({"id": q.id, "text": q.text, "parents": list(q.parents), "answer": ans, "score": scores[q.id]}
                   for q, ans in zip(item.questions, raw, strict=True))
        out.append(Scored(file_name, prompt_id, sum(scores.values()) / len(scores), qs))
    return out


def passes(score: float, threshold: float) -> bool:
    """The gate's rule: kept at or above the threshold (with a float tolerance: 2/3 >= 0.6667 is meant)."""
    return score >= threshold - 1e-9


# ------------------------------------------------------------------------------------ the job


class GateCore:
    """Start, get, watch, cancel and list gate jobs (the job runs in this process)."""

    def __init__(self, settings: EvaluationSettings, storage: Storage, store: ArtifactStore) -> None:
        self.settings = settings
        self.storage = storage
        self.store = store
        self.manager = JobManager(storage, KIND, self._run, max_concurrent=settings.eval_gate_max_jobs,
                                  watchdog_seconds=settings.job_watchdog_seconds)

    # -- validation

    def prepare(self, idempotency_key: str, spec: dict[str, Any]) -> tuple[GateConfig, Manifest, list[Manifest]]:
        """Validate a start request completely; nothing is created."""
        if not idempotency_key or len(idempotency_key) > 256 or not idempotency_key.isascii() or not idempotency_key.isprintable():
            raise InvalidArgument("idempotency_key must be 1..256 printable ASCII characters, e.g. '<run>/<skill>/gate'", field="idempotency_key")
        cfg = parse_gate_settings(spec.get("gate"), self.settings)
        prompt_set = self._artifact(spec.get("prompt_set"), ArtifactKind.PROMPT_SET, "spec.prompt_set")
        refs = spec.get("datasets") or []
        if not refs:
            raise InvalidArgument("give at least one candidate image dataset", field="spec.datasets")
        datasets = [self._artifact(r, ArtifactKind.IMAGE_DATASET, f"spec.datasets[{i}]") for i, r in enumerate(refs)]
        total = sum(int(m.parameters.get("images") or 0) for m in datasets)
        if total > self.settings.eval_gate_max_candidates:
            raise InvalidArgument(f"{total} candidate images exceed this service's limit of {self.settings.eval_gate_max_candidates} "
                                  "(SELMA_EVAL_GATE_MAX_CANDIDATES)", field="spec.datasets")
        return cfg, prompt_set, datasets

    def _artifact(self, ref: Any, kind: ArtifactKind, fld: str) -> Manifest:
        aid = str((ref or {}).get("id") or "")
        if not aid:
            raise InvalidArgument(f"{fld} needs an artifact id", field=f"{fld}.id")
        try:
            m = self.store.get(aid)
        except NotFound:
            raise NotFound(f"artifact {aid} does not exist", field=f"{fld}.id") from None
        if m.kind != kind:
            raise InvalidArgument(f"{aid} is a {ArtifactKind(m.kind).value} artifact, not a {kind.value}", field=f"{fld}.id")
        return m

    # -- the RPC operations

    def start(self, idempotency_key: str, spec: dict[str, Any], *, validate_only: bool = False) -> tuple[JobRecord | None, bool]:
        self.prepare(idempotency_key, spec)
        if validate_only:
            return None, False
        return self.manager.start(idempotency_key, spec, run=spec.get("run", ""), skill=spec.get("skill", ""), labels=dict(spec.get("labels") or {}))

    def get(self, job_id: str) -> JobRecord:
        return self.manager.get(job_id)

    def watch(self, job_id: str, **kwargs: Any) -> Any:
        return self.manager.watch(job_id, **kwargs)

    def list(self, **kwargs: Any) -> tuple[list[JobRecord], str]:
        return self.manager.list(**kwargs)

    def cancel(self, job_id: str, reason: str = "") -> JobRecord:
        self.manager.cancel(job_id, reason or "cancelled by client")
        return self.manager.get(job_id)

    def recover(self) -> list[str]:
        return self.manager.recover()

    def shutdown(self, wait: bool = True) -> None:
        self.manager.shutdown(wait=wait)

    # -- questions

    def questions(self, cfg: GateConfig, prompt_set: Manifest) -> dict[str, EvalItem | None]:
        """Each prompt id's questions (None: none could be written for it), cached for generated questions."""
        from selma_evaluation.questions import backend_from_spec, questions_from_records, try_generate_questions

        records = [json.loads(line) for line in self.store.read_bytes(prompt_set, "prompts.jsonl").decode().splitlines() if line.strip()]
        source = cfg.question_source or ("GATE_QUESTION_SOURCE_INLINE" if records and all(r.get("questions") for r in records)
                                         else "GATE_QUESTION_SOURCE_GENERATED")
        out: dict[str, EvalItem | None] = {}
        if source == "GATE_QUESTION_SOURCE_INLINE":
            for item in questions_from_records(records):
                out[item.id] = _yes_no(item)
            return out
        if source == "GATE_QUESTION_SOURCE_VQA_BACKEND":
            write = _backend_questions(cfg.vqa)
            assert write is not None  # checked by parse_gate_settings
            for r in records:
                try:
                    qs = write(str(r.get("text", "")))
                except InvalidArgument as e:  # a prompt outside the backend's grammar: its images cannot pass
                    log.warning("gate: no questions for prompt %s: %s", r.get("id"), e.message)
                    qs = []
                out[str(r["id"])] = _yes_no(questions_from_records([{**r, "questions": qs}])[0]) if qs else None
            return out
        # generated: written once per prompt set and question backend, then read back (a resumed job asks the LLM nothing)
        digest = _digest({"prompt_set": prompt_set.id, "backend": cfg.question_backend})
        key = f"gate/questions/{digest}.json"
        if self.storage.exists(key):
            stored = json.loads(self.storage.get_bytes(key))
        else:
            backend = backend_from_spec(cfg.question_backend, self.settings)
            try:
                prompts = [(str(r["id"]), str(r.get("text", "")), str(r.get("skill", ""))) for r in records]
                result = try_generate_questions(prompts, backend, tifa=False)
            finally:
                close = getattr(backend, "close", None)
                if close:
                    close()
            stored = {it.id: [{"id": q.id, "text": q.text, "parents": list(q.parents)} for q in it.questions if not q.choices]
                      for it in result.items}
            self.storage.put_bytes(key, json.dumps(stored).encode(), content_type="application/json")
        for r in records:
            qs = stored.get(str(r["id"]))
            out[str(r["id"])] = questions_from_records([{**r, "questions": qs}])[0] if qs else None
        return out

    # -- the job function

    def _run(self, ctx: JobContext) -> JobResult:
        from PIL import Image

        spec = ctx.spec
        cfg, prompt_set, datasets = self.prepare(ctx.idempotency_key, spec)
        skill = str(spec.get("skill") or "")
        run = str(spec.get("run") or "")
        items = self.questions(cfg, prompt_set)
        digest = _digest({"vqa": cfg.vqa, "source": cfg.question_source, "backend": cfg.question_backend, "prompt_set": prompt_set.id})
        rows: list[tuple[Manifest, dict[str, Any]]] = []
        for m in datasets:
            for line in self.store.read_bytes(m, "metadata.jsonl").decode().splitlines():
                if line.strip():
                    rows.append((m, json.loads(line)))
        total = len(rows)
        wanted = {(m.id, r["file_name"]) for m, r in rows}
        scored: dict[tuple[str, str], dict[str, Any]] = {}
        kept_prompts: list[str] = []  # one entry per kept candidate (running totals: no re-count per chunk)

        def add(set_id: str, rec: dict[str, Any]) -> None:
            key = (set_id, rec["file_name"])
            if key in wanted and key not in scored:
                scored[key] = rec
                if passes(rec["score"], cfg.threshold):
                    kept_prompts.append(str(rec.get("prompt_id", "")))

        for m in datasets:
            for rec in self._journal(digest, m):
                add(m.id, rec)
        from_journal = len(scored)
        metrics.GATE_IMAGES_JOURNALED.inc(from_journal)
        answered = 0
        stats = {"candidates_total": total, "prompts_total": len(items), "candidates_from_journal": from_journal}

        def report(message: str) -> None:
            done, kept = len(scored), len(kept_prompts)
            ctx.progress(done, total, unit="images", message=message,
                         stats={**stats, "candidates_scored": done, "kept": kept, "questions_answered": answered,
                                "prompts_kept": len(set(kept_prompts)), "pass_rate_percent": 100.0 * kept / done if done else 0.0})

        report(f"scoring {total} candidates ({from_journal} journaled)")
        pending = [(m, r) for m, r in rows if (m.id, r["file_name"]) not in scored]
        if pending:
            vqa = build_vqa(cfg.vqa, self.settings)
            try:
                for start in range(0, len(pending), CHUNK):
                    ctx.check_cancelled()
                    chunk = pending[start:start + CHUNK]
                    batch = []
                    for m, r in chunk:
                        image = Image.open(io.BytesIO(self.store.read_bytes(m, r["file_name"]))).convert("RGB")
                        pid = str(r.get("prompt_id", ""))
                        batch.append((r["file_name"], pid, image, items.get(pid)))
                    t0 = time.perf_counter()
                    results = score_images(vqa, batch)
                    per_image = (time.perf_counter() - t0) / max(len(batch), 1)
                    for _ in batch:
                        metrics.GATE_IMAGE_SECONDS.observe(per_image)
                    n_questions = sum(len(s.questions) for s in results)
                    metrics.GATE_QUESTIONS_ANSWERED.inc(n_questions)
                    answered += n_questions
                    # the journal first, then the counts: a kill between the two re-scores nothing
                    by_set: dict[str, tuple[Manifest, list[dict[str, Any]]]] = {}
                    for (m, _), s in zip(chunk, results, strict=True):
                        by_set.setdefault(m.id, (m, []))[1].append(s.record())
                    for set_id, (m, recs) in by_set.items():
                        self.storage.put_bytes(f"{journal_prefix(digest, m)}{recs[0]['file_name'].replace('/', '_')}.json",
                                               json.dumps(recs).encode(), content_type="application/json")
                        for rec in recs:
                            add(set_id, rec)
                            # each candidate once, when the VQA model scored it (not again when a later round reads the journal)
                            metrics.GATE_VERDICTS.labels(verdict="kept" if passes(rec["score"], cfg.threshold) else "rejected").inc()
                    report(f"scored {start + len(chunk)}/{len(pending)} new candidates")
            finally:
                vqa.close()
        manifest = self._publish(ctx.idempotency_key, cfg, prompt_set, datasets, rows, scored, prompts_total=len(items), run=run, skill=skill,
                                 labels=dict(spec.get("labels") or {}))
        report(f"kept {manifest.parameters['kept']} of {total} candidates")
        p = manifest.parameters
        return JobResult(output=output_ref(manifest), message=(f"kept {p['kept']} of {p['candidates']} candidates ({p['pass_rate_percent']:.1f}%), "
                                                               f"{p['prompts_kept']}/{p['prompts_total']} prompts with a kept image"))

    def _journal(self, digest: str, dataset: Manifest) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for info in self.storage.list(journal_prefix(digest, dataset)):
            out.extend(json.loads(self.storage.get_bytes(info.key)))
        return out

    def _publish(
        self, key: str, cfg: GateConfig, prompt_set: Manifest, datasets: list[Manifest], rows: list[tuple[Manifest, dict[str, Any]]],
        scored: Mapping[tuple[str, str], dict[str, Any]], *, prompts_total: int, run: str, skill: str, labels: dict[str, str],
    ) -> Manifest:
        aid = new_artifact_id(ArtifactKind.IMAGE_DATASET, key)
        if self.store.exists(aid):
            return self.store.get(aid)
        kept_rows: list[dict[str, Any]] = []
        candidates: list[dict[str, Any]] = []
        prompts_kept: set[str] = set()
        files: list[tuple[Manifest, str]] = []
        seen: set[str] = set()
        for m, r in rows:
            s = scored[(m.id, r["file_name"])]
            ok = passes(s["score"], cfg.threshold)
            candidates.append({"dataset": m.id, "file_name": r["file_name"], "prompt_id": r.get("prompt_id", ""), "prompt_index": r.get("prompt_index"),
                               "image_index": r.get("image_index"), "candidate": _candidate(m, r), "seed": r.get("seed"), "text": r.get("text", ""),
                               "score": s["score"],
                               "passed": ok, "questions": s["questions"], **({"error": s["error"]} if s.get("error") else {})})
            if ok:
                if r["file_name"] in seen:
                    raise FailedPrecondition(f"two candidate datasets hold {r['file_name']}: candidates of different rounds must have "
                                             "different image indices", field="spec.datasets")
                seen.add(r["file_name"])
                kept_rows.append({**r, "gate": {"score": s["score"], "threshold": cfg.threshold}})
                prompts_kept.add(str(r.get("prompt_id", "")))
                files.append((m, r["file_name"]))
        n = len(rows)
        params = {
            "format": "imagefolder", "images": len(kept_rows), "run": run, "skill": skill, "prompt_set": prompt_set.id,
            "source_datasets": [m.id for m in datasets], "candidates": n, "kept": len(kept_rows),
            "pass_rate_percent": 100.0 * len(kept_rows) / n if n else 0.0,
            "prompts_total": prompts_total,
            "prompts_kept": len(prompts_kept), "threshold": cfg.threshold, "vqa": cfg.vqa,
            "question_source": cfg.question_source or "GATE_QUESTION_SOURCE_UNSPECIFIED", "candidates_per_prompt": cfg.per_prompt,
            "per_skill": {skill: {"candidates": n, "kept": len(kept_rows), "prompts_kept": len(prompts_kept)}},
        }
        all_labels = {**labels, **({"selma.dev/run": run} if run else {}), **({"selma.dev/skill": skill} if skill else {}), "selma.dev/stage": "gate"}
        with self.store.writer(ArtifactKind.IMAGE_DATASET, id=aid, parents=[m.id for m in datasets], parameters=params,
                               name=f"gated images for {skill or prompt_set.id}", labels=all_labels) as w:
            have = w.existing()
            for m, name in files:
                if name not in have:
                    w.put_bytes(name, self.store.read_bytes(m, name))
            w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in kept_rows).encode())
            w.put_bytes("gate.jsonl", "".join(json.dumps(c) + "\n" for c in candidates).encode())
        log.info("gate %s: kept %d of %d candidates of %s", key, len(kept_rows), n, skill or prompt_set.id)
        return self.store.get(aid)


def journal_prefix(digest: str, dataset: Manifest) -> str:
    """Where a gate keeps its scores of one candidate dataset: ``gate/scores/<digest>/<dataset id>.<content digest>/``.

    ``digest`` covers what a score depends on besides the image (VQA backend, question source,
    prompt set); the dataset's content digest makes a journal belong to those very images, so a
    dataset id published again with other images (its run deleted, then re-rendered under the same
    key) is scored afresh.  :mod:`selma.retention` collects a journal with its dataset.
    """
    return f"{GATE_SCORES_PREFIX}{digest}/{dataset.id}.{dataset.digest[:16]}/"


def _candidate(m: Manifest, row: Mapping[str, Any]) -> int:
    """A row's best-of-K candidate index: its render's round (DatasetRenderSpec.candidates), else its image index."""
    rnd = m.parameters.get("candidate_round")
    return int(rnd["index"]) if isinstance(rnd, Mapping) else int(row.get("image_index") or 0)


def pass_at_k(candidates: Sequence[Mapping[str, Any]], ks: Sequence[int], prompts_total: int) -> dict[int, int]:
    """K → prompts with at least one passing image among their first K candidates (``gate.jsonl`` rows).

    Exact for a gate over best-of-K rounds without a target or budget: round k renders candidate k
    of every prompt without a kept image, so a prompt's first passing candidate is always rendered.
    """
    first: dict[str, int] = {}
    for c in candidates:
        if c.get("passed"):
            pid = str(c.get("prompt_id", ""))
            k = int(c.get("candidate", c.get("image_index") or 0))
            first[pid] = min(first.get(pid, k), k)
    if len(first) > prompts_total:
        raise InvalidArgument(f"{len(first)} prompts passed but the prompt set has {prompts_total}", field="prompts_total")
    return {k: sum(1 for v in first.values() if v < k) for k in ks}


def _yes_no(item: EvalItem) -> EvalItem | None:
    """The item with its yes/no (DSG) questions only; None when it has none."""
    from dataclasses import replace

    qs = tuple(q for q in item.questions if not q.choices)
    return replace(item, questions=qs) if qs else None


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
