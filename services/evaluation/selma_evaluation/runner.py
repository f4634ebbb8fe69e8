"""One evaluation, start to finish: the worker behind ``selma eval execute --config URI``.

The job document (written by :mod:`selma_evaluation.core` when the job is started) names the
benchmark, the targets, the VQA backend and a storage prefix for the work.  The worker:

1. resolves the **items** (prompts with questions): DSG-1k (a category subset, the first N),
   or held-out prompt sets whose questions come inline or are written by an LLM backend —
   stored once under the work prefix, so a resumed job asks the same questions;
2. optionally runs a **merge-weight search** on validation prompts (never the test prompts):
   every trial is rendered as a per-request expert mix, answered and scored, the best merge
   becomes an extra target and may be registered on ServingService;
3. **renders** every target through ServingService's ``Generate`` with identical per-item
   seeds (``seed = derived(base_seed, item id)``, images ``seed + i``), so base and merged
   images differ only by the model;
4. **answers** every question about every image with the VQA backend, in batches;
5. **scores** (DSG dependency rule, TIFA choice mapping) and publishes the ``eval_report``
   artifact: report.json, tables, PNG charts, an HTML page with side-by-side image grids.

Everything expensive is persisted as it is produced (images, answers, trial scores), so a
killed worker resumes where it stopped.  Progress goes to ``<work>/progress.json`` for the
service to read, like the trainer's.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from selma.artifacts import ArtifactKind, ArtifactStore
from selma.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SelmaError,
    Unavailable,
)
from selma.seeds import stable_hash64
from selma.storage import Storage, open_storage
from selma_evaluation.settings import EvaluationSettings
from selma_evaluation.types import EvalItem, Question, ScoreTable

log = logging.getLogger(__name__)

JOB_FILE = "evaluation.json"
METRIC_NAMES = {"EVALUATION_METRIC_DSG": "dsg", "EVALUATION_METRIC_TIFA": "tifa"}
METRIC_ENUMS = {v: k for k, v in METRIC_NAMES.items()}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EvaluationInterrupted(Exception):
    """The worker was asked to stop (SIGTERM); everything done so far is kept."""


class EvaluationJobDoc(BaseModel):
    """What the service stores for a worker: the spec, resolved defaults and where to work."""

    job_id: str
    idempotency_key: str
    run: str = ""
    spec: dict[str, Any]
    report_id: str
    work_prefix: str
    serving_endpoint: str
    vqa: dict[str, Any] = Field(default_factory=dict)  # resolved VqaBackend (default filled in)
    metrics: list[str] = Field(default_factory=lambda: ["dsg"])
    labels: dict[str, str] = Field(default_factory=dict)

    @property
    def progress_key(self) -> str:
        return f"{self.work_prefix}/progress.json"


# ----------------------------------------------------------------------------------------------
# targets and merges


@dataclass(frozen=True)
class Target:
    """A model to render with: a registered name, a per-request expert mix, or the base."""

    label: str
    model_name: str = ""
    merge: dict[str, Any] | None = None  # proto-JSON MergeSpec

    @property
    def slug(self) -> str:
        return slug(self.label)

    def describe(self) -> str:
        if self.model_name:
            return f"registered model {self.model_name}"
        if self.merge:
            from selma.api import enum_name
            from selma.v1 import common_pb2

            method = enum_name(common_pb2.MergeMethod, self.merge.get("method")) or "mean_delta"
            experts = self.merge.get("experts", [])
            weights = ", ".join(f"{e.get('expert_id')}×{float(e.get('weight', 0.0)):.3g}" for e in experts)
            return f"base + {method} of {len(experts)} experts ({weights})"
        return "base model"


def slug(text: str) -> str:
    """A path-safe form of a label or item id (stable)."""
    s = _SAFE.sub("-", text).strip("-.") or "x"
    if s != text:
        s = f"{s[:48]}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    return s


def targets_from_spec(spec: dict[str, Any]) -> list[Target]:
    out = []
    for t in spec.get("targets", []):
        if t.get("model_name"):
            out.append(Target(t["label"], model_name=t["model_name"]))
        elif t.get("experts"):
            out.append(Target(t["label"], merge=t["experts"]))
        else:
            out.append(Target(t["label"]))
    return out


def search_grid(search: dict[str, Any], max_trials_default: int) -> list[dict[str, Any]]:
    """The merges a search evaluates (proto-JSON MergeSpecs), in trial order.

    Grid: methods × densities (for methods that use one) × per-expert weights from
    ``weight_values`` (all 1/N when empty).  Random: ``max_trials`` of those, sampled with the
    search seed.  A grid larger than ``max_trials`` is refused rather than silently cut.
    """
    experts = list(search.get("expert_ids", []))
    n = len(experts)
    methods = list(search.get("methods") or ["MERGE_METHOD_MEAN_DELTA"])
    densities = [float(d) for d in (search.get("densities") or [0.5])]
    values = [float(v) for v in search.get("weight_values") or []]
    weight_vectors: list[tuple[float, ...]] = [tuple(values_) for values_ in itertools.product(values, repeat=n)] if values else [(1.0 / n,) * n]
    # all-zero mixes render the base model: not a merge worth a trial
    weight_vectors = [w for w in weight_vectors if any(abs(x) > 0 for x in w)]
    seed = int(search.get("seed", 0))
    grid: list[dict[str, Any]] = []
    for method in methods:
        m = "MERGE_METHOD_MEAN_DELTA" if method in ("", "MERGE_METHOD_UNSPECIFIED") else method
        uses_density = m in ("MERGE_METHOD_TIES", "MERGE_METHOD_DARE_LINEAR", "MERGE_METHOD_DARE_TIES", "MERGE_METHOD_MAGNITUDE_PRUNE")
        for density in densities if uses_density else [0.0]:
            for w in weight_vectors:
                spec: dict[str, Any] = {"method": m, "experts": [{"expert_id": e, "weight": x} for e, x in zip(experts, w, strict=False)]}
                if uses_density:
                    spec["density"] = density
                if m.startswith("MERGE_METHOD_DARE"):
                    spec["seed"] = seed
                grid.append(spec)
    max_trials = int(search.get("max_trials") or max_trials_default)
    if search.get("strategy") == "MERGE_SEARCH_STRATEGY_RANDOM":
        if len(grid) > max_trials:
            grid = random.Random(seed).sample(grid, max_trials)
        return grid
    if len(grid) > max_trials:
        raise InvalidArgument(
            f"the search grid has {len(grid)} combinations (methods × densities × weight values^experts) but max_trials is {max_trials}: "
            "raise max_trials, give fewer weight values, or use strategy RANDOM",
            field="spec.merge_search.max_trials",
        )
    return grid


# ----------------------------------------------------------------------------------------------
# items


def normalise_prompt(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def read_prompt_records(store: ArtifactStore, refs: Iterable[dict[str, Any]], field_name: str) -> list[dict[str, Any]]:
    """The records of one or more prompt_set artifacts, in order, each with ``_set`` = its artifact id."""
    records: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        pid = (ref or {}).get("id", "")
        if not pid:
            raise InvalidArgument("a prompt set reference needs an artifact id", field=f"{field_name}[{i}].id")
        try:
            manifest = store.get(pid)
        except NotFound:
            raise NotFound(f"prompt set {pid} does not exist", field=f"{field_name}[{i}].id") from None
        if manifest.kind != ArtifactKind.PROMPT_SET.value:
            raise InvalidArgument(f"{pid} is a {manifest.kind} artifact, not a prompt_set", field=f"{field_name}[{i}].id")
        for line in store.read_bytes(manifest, "prompts.jsonl").decode().splitlines():
            if line.strip():
                rec = json.loads(line)
                rec["_set"] = pid
                rec.setdefault("skill", manifest.parameters.get("skill", ""))
                records.append(rec)
    # Prompt ids restart at p000000 in every set: two sets of one skill would collide, so their
    # records are told apart by the set's id.
    seen: dict[str, set[str]] = {}
    for rec in records:
        seen.setdefault(_base_item_id(rec), set()).add(rec["_set"])
    for rec in records:
        if len(seen[_base_item_id(rec)]) > 1:
            rec["_item_id"] = f"{rec.get('skill') or 'prompt'}/{rec['_set']}/{rec.get('id') or rec.get('index')}"
    return records


def prompt_set_refs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    refs = []
    if (spec.get("prompt_set") or {}).get("id"):
        refs.append(spec["prompt_set"])
    refs += list(spec.get("prompt_sets") or [])
    return refs


def validation_set_refs(search: dict[str, Any]) -> list[dict[str, Any]]:
    refs = []
    if (search.get("validation_prompt_set") or {}).get("id"):
        refs.append(search["validation_prompt_set"])
    refs += list(search.get("validation_prompt_sets") or [])
    return refs


def _base_item_id(rec: dict[str, Any]) -> str:
    return f"{rec.get('skill') or 'prompt'}/{rec.get('id') or rec.get('index')}"


def record_item_id(rec: dict[str, Any]) -> str:
    """An item id unique across prompt sets: ``<skill>/<prompt id>``, with the set id when two sets share it."""
    return rec.get("_item_id") or _base_item_id(rec)


def items_to_json(items: Sequence[EvalItem]) -> bytes:
    def q(x: Question) -> dict[str, Any]:
        return {"id": x.id, "text": x.text, "parents": list(x.parents), "category": x.category, "detail": x.detail,
                "tuple": x.tuple, "choices": list(x.choices), "answer": x.answer}

    return json.dumps([{"id": i.id, "prompt": i.prompt, "category": i.category, "skill": i.skill,
                        "questions": [q(x) for x in i.questions]} for i in items]).encode()


def items_from_json(raw: bytes) -> list[EvalItem]:
    out = []
    for d in json.loads(raw):
        qs = tuple(Question(id=x["id"], text=x["text"], parents=tuple(x.get("parents", ())), category=x.get("category", ""),
                            detail=x.get("detail", ""), tuple=x.get("tuple", ""), choices=tuple(x.get("choices", ())),
                            answer=x.get("answer", "yes")) for x in d["questions"])
        out.append(EvalItem(id=d["id"], prompt=d["prompt"], category=d["category"], questions=qs, skill=d.get("skill", "")))
    return out


# ----------------------------------------------------------------------------------------------
# rendering through ServingService


def item_seed(base_seed: int, item_id: str) -> int:
    """The first image's seed of an item: stable under subsetting and reordering of the benchmark.

    62 bits, so the SEQUENTIAL seeds ``seed + i`` of the item's images stay below 2**63.
    """
    return stable_hash64(f"selma-eval-seed\0{base_seed}\0{item_id}") & (2**62 - 1)


class ServingRenderer:
    """Renders targets with ServingService.Generate; waits out a serving restart (bounded).

    The channels authenticate as ``SELMA_TOKEN``/``SELMA_TLS_*`` say (the worker's own token and CA,
    from the launching service's environment or, in a Kubernetes Job, its Secrets).  A replicated
    endpoint (``a:1|b:2``, ``dns:///headless-service:port``) routes each target to the replica its
    model or mix hashes to (:mod:`selma.routing`), so the replicas' merge caches stay warm.
    """

    def __init__(self, endpoint: str, *, timeout: float = 600.0, unavailable_wait: float = 300.0) -> None:
        from selma.client import Endpoints, SelmaClient
        from selma.routing import RetryPolicy

        self.endpoint = endpoint
        self.timeout = timeout
        self.unavailable_wait = unavailable_wait
        mib = 1024 * 1024
        # no SDK back-off: _call below waits out an unavailable service, bounded by unavailable_wait
        self._client = SelmaClient(Endpoints(serving=endpoint), timeout=60.0, max_message_bytes=256 * mib, retry=RetryPolicy.off())

    def close(self) -> None:
        self._client.close()

    def _call(self, what: str, fn: Callable[[], Any], should_stop: Callable[[], bool]) -> Any:
        import grpc

        deadline = time.monotonic() + self.unavailable_wait
        delay = 1.0
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code = e.code()
                detail = e.details() or ""
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED) and time.monotonic() < deadline:
                    if should_stop():
                        raise EvaluationInterrupted() from None
                    log.warning("serving at %s answered %s to %s (%s); retrying in %.0f s", self.endpoint, code.name, what, detail, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                raise _domain_error(code, f"ServingService {what} failed: {detail}") from None

    def render(self, target: Target, prompt: str, seed: int, images: int, diffusion: dict[str, Any],
               should_stop: Callable[[], bool]) -> list[tuple[bytes, int]]:
        """``images`` PNGs of ``prompt`` with seeds ``seed``, ``seed + 1``, ...; [(png, seed)]."""
        from selma.api import dict_to_message
        from selma.v1 import common_pb2, serving_service_pb2

        req = serving_service_pb2.GenerateRequest(prompts=[prompt], images_per_prompt=images, seed=seed,
                                                  seed_policy=common_pb2.SEED_POLICY_SEQUENTIAL)
        if diffusion:
            req.diffusion.CopyFrom(dict_to_message(diffusion, common_pb2.DiffusionSettings))
        if target.model_name:
            req.model_name = target.model_name
        elif target.merge:
            req.experts.CopyFrom(dict_to_message(target.merge, common_pb2.MergeSpec))

        def call() -> list[tuple[bytes, int]]:
            return [(r.image.png, r.image.seed) for r in self._client.generate_request(req, timeout=self.timeout)]

        return self._call("Generate", call, should_stop)

    def register_merge(self, model_name: str, merge: dict[str, Any], run: str, key: str, should_stop: Callable[[], bool]) -> str:
        """Merge ``merge`` into a merged_model artifact and register it as ``model_name``; returns the name."""
        from selma.api import dict_to_message
        from selma.v1 import common_pb2, serving_service_pb2

        spec = serving_service_pb2.MergeJobSpec(run=run, model_name=model_name, register=True, replace=True)
        spec.merge.CopyFrom(dict_to_message(merge, common_pb2.MergeSpec))
        merges = self._client.jobs("merge")  # pinned to the replica that will serve model_name: it builds it warm
        job = self._call("StartMerge", lambda: merges.start(key, spec)[0], should_stop)
        while job.status.phase not in (common_pb2.JOB_PHASE_SUCCEEDED, common_pb2.JOB_PHASE_FAILED, common_pb2.JOB_PHASE_CANCELLED):
            if should_stop():
                raise EvaluationInterrupted()
            time.sleep(0.5)
            job = self._call("GetMerge", lambda job_id=job.status.job_id: merges.get(job_id), should_stop)
        if job.status.phase != common_pb2.JOB_PHASE_SUCCEEDED:
            raise FailedPrecondition(f"registering the best merge as {model_name!r} failed: {job.status.message}")
        return job.stats.registered_model_name or model_name


def _domain_error(code: Any, message: str) -> SelmaError:
    import grpc

    cls = {
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
        grpc.StatusCode.CANCELLED: Cancelled,
    }.get(code, Unavailable)
    return cls(message)


# ----------------------------------------------------------------------------------------------
# the worker


@dataclass
class _Scored:
    target: Target
    tables: dict[str, ScoreTable]
    images: dict[tuple[str, int], str] = field(default_factory=dict)  # → storage key of the PNG
    answers: dict[str, dict[tuple[str, int, str], str]] = field(default_factory=dict)


class EvaluationRunner:
    """Runs one evaluation job document; see the module docstring."""

    def __init__(self, doc: EvaluationJobDoc, settings: EvaluationSettings, *, storage: Storage | None = None,
                 renderer: ServingRenderer | None = None, should_stop: Callable[[], bool] = lambda: False) -> None:
        from selma.batch.progress import ProgressWriter

        self.doc = doc
        self.spec = doc.spec
        self.settings = settings
        self.storage = storage or open_storage(settings)
        self.store = ArtifactStore(self.storage)
        self.renderer = renderer or ServingRenderer(doc.serving_endpoint)
        self.should_stop = should_stop
        self.progress = ProgressWriter(self.storage, doc.progress_key, interval=settings.batch_progress_interval_seconds)
        self.ipp = int(self.spec.get("images_per_prompt") or 1)
        self.base_seed = int(self.spec.get("base_seed", 0))
        self.diffusion = dict(self.spec.get("diffusion") or {})
        if not self.diffusion.get("steps") and settings.eval_default_steps:
            self.diffusion["steps"] = settings.eval_default_steps
        self._vqa: Any = None
        self._mapper: Any = None
        self._lock = threading.Lock()
        self.stats: dict[str, Any] = {"images_rendered": 0, "images_total": 0, "questions_answered": 0, "questions_total": 0,
                                      "scores": [], "trials": []}

    # -- small helpers

    def _key(self, *parts: str) -> str:
        return "/".join([self.doc.work_prefix, *parts])

    def _check(self) -> None:
        if self.should_stop():
            raise EvaluationInterrupted()

    def _report_progress(self, phase: str, *, force: bool = False) -> None:
        self.progress.update(force=force, phase=phase, stats=self.stats)

    def _read_json(self, key: str) -> Any:
        try:
            return json.loads(self.storage.get_bytes(key))
        except NotFound:
            return None

    def _write_json(self, key: str, value: Any) -> None:
        self.storage.put_bytes(key, json.dumps(value).encode(), content_type="application/json")

    @property
    def vqa(self) -> Any:
        if self._vqa is None:
            from selma_evaluation.vqa import build_vqa

            self._vqa = build_vqa(self.doc.vqa, self.settings)
        return self._vqa

    @property
    def mapper(self) -> Any:
        if self._mapper is None:
            from selma_evaluation.tifa import ChoiceMapper

            self._mapper = ChoiceMapper(settings=self.settings)
        return self._mapper

    # -- items

    def test_items(self) -> list[EvalItem]:
        return self._items("items.json", self.spec.get("benchmark", ""), prompt_set_refs(self.spec), "spec.prompt_set")

    def validation_items(self) -> list[EvalItem]:
        search = self.spec.get("merge_search") or {}
        return self._items("validation-items.json", "EVALUATION_BENCHMARK_PROMPT_SET", validation_set_refs(search),
                           "spec.merge_search.validation_prompt_set", max_prompts=0, categories=())

    def _items(self, name: str, benchmark: str, refs: list[dict[str, Any]], field_name: str, max_prompts: int | None = None,
               categories: Sequence[str] | None = None) -> list[EvalItem]:
        stored = self._read_json(self._key(name))
        if stored is not None:
            return items_from_json(json.dumps(stored).encode())
        limit = int(self.spec.get("max_prompts") or 0) if max_prompts is None else max_prompts
        # categories select test prompts (DSG-1k sources or skills); validation prompts are all used
        wanted = list(self.spec.get("categories") or ()) if categories is None else list(categories)
        if benchmark == "EVALUATION_BENCHMARK_DSG_1K":
            from selma_evaluation.dsg import load_dsg1k

            items = load_dsg1k(wanted, limit)
        else:
            items = self._prompt_set_items(refs, field_name, limit, wanted)
        self.storage.put_bytes(self._key(name), items_to_json(items), content_type="application/json")
        return items

    def _needs_tifa(self) -> bool:
        """Multiple-choice questions are written when TIFA is reported or is the search's objective."""
        objective = (self.spec.get("merge_search") or {}).get("objective", "")
        return "tifa" in self.doc.metrics or objective == "EVALUATION_METRIC_TIFA"

    def _prompt_set_items(self, refs: list[dict[str, Any]], field_name: str, limit: int, wanted: Sequence[str]) -> list[EvalItem]:
        from selma_evaluation.questions import backend_from_spec, generate_questions, questions_from_records

        records = read_prompt_records(self.store, refs, field_name)
        if wanted:
            records = [r for r in records if r.get("skill") in wanted]
        if limit:
            records = records[:limit]
        if not records:
            raise FailedPrecondition("the prompt sets hold no prompts to evaluate (after the category filter)", field=field_name)
        with_questions = [r for r in records if r.get("questions")]
        without = [r for r in records if not r.get("questions")]
        items: dict[str, EvalItem] = {}
        if with_questions:
            for it in questions_from_records([{**r, "id": record_item_id(r), "category": r.get("skill", "")} for r in with_questions]):
                items[it.id] = it
        if without:
            self._report_progress("writing questions", force=True)
            backend = backend_from_spec(self.spec.get("question_backend") or {}, self.settings)
            try:
                generated = generate_questions([(record_item_id(r), r["text"], r.get("skill", "")) for r in without], backend,
                                               tifa=self._needs_tifa(), seed=self.base_seed)
            finally:
                backend.close()
            for it in generated:
                items[it.id] = it
        out = []
        for r in records:
            it = items[record_item_id(r)]
            out.append(EvalItem(id=it.id, prompt=it.prompt, category=it.category or r.get("skill", ""), questions=it.questions,
                                skill=r.get("skill", "")))
        return out

    # -- render + answer + score one target

    def _render_target(self, target: Target, items: Sequence[EvalItem], prefix: str) -> dict[tuple[str, int], str]:
        """Render what is missing; returns (item id, image index) → storage key of the PNG."""
        keys: dict[tuple[str, int], str] = {}
        present = {o.key for o in self.storage.list(self._key(prefix, target.slug) + "/")}
        for item in items:
            self._check()
            names = [self._key(prefix, target.slug, f"{slug(item.id)}-{i}.png") for i in range(self.ipp)]
            if not all(n in present for n in names):
                seed = item_seed(self.base_seed, item.id)
                out = self.renderer.render(target, item.prompt, seed, self.ipp, self.diffusion, self.should_stop)
                if len(out) != self.ipp:
                    raise FailedPrecondition(f"ServingService returned {len(out)} images for {item.id!r}, expected {self.ipp}")
                for name, (png, _seed) in zip(names, out, strict=False):
                    self.storage.put_bytes(name, png, content_type="image/png")
            for i, name in enumerate(names):
                keys[(item.id, i)] = name
            self.stats["images_rendered"] += self.ipp
            self._report_progress(f"rendering {target.label}")
        return keys

    def _answer_target(self, target: Target, items: Sequence[EvalItem], images: dict[tuple[str, int], str], prefix: str,
                       metrics: Sequence[str]) -> dict[tuple[str, int, str], str]:
        from PIL import Image

        from selma_evaluation.vqa import VqaQuery

        # answers are appended as numbered part files, one per batch: a resumed worker reads them all
        part_prefix = self._key(prefix, "answers", target.slug) + "/"
        answers: dict[tuple[str, int, str], str] = {}
        parts = self.storage.list(part_prefix)
        for obj in parts:
            for item_id, idx, qid, answer in json.loads(self.storage.get_bytes(obj.key)):
                answers[(item_id, int(idx), qid)] = answer
        next_part = len(parts)
        todo: list[tuple[tuple[str, int, str], Question]] = []
        for item in items:
            for q in item.questions:
                if not _wanted(q, metrics):
                    continue
                for i in range(self.ipp):
                    k3 = (item.id, i, q.id)
                    if k3 in answers:
                        self.stats["questions_answered"] += 1
                    else:
                        todo.append((k3, q))
        batch = max(1, int(getattr(self.vqa, "batch_size", 16) or 16)) * 4
        for start in range(0, len(todo), batch):
            self._check()
            chunk = todo[start:start + batch]
            queries = []
            decoded: dict[tuple[str, int], Any] = {}  # per chunk: memory stays bounded by the batch
            for (item_id, i, _qid), q in chunk:
                img = decoded.get((item_id, i))
                if img is None:
                    png = self.storage.get_bytes(images[(item_id, i)])
                    img = decoded[(item_id, i)] = Image.open(io.BytesIO(png)).convert("RGB")
                queries.append(VqaQuery(image=img, question=q.text, choices=q.choices))
            got = self.vqa.answer(queries)
            if len(got) != len(queries):
                raise FailedPrecondition(f"the VQA backend returned {len(got)} answers for {len(queries)} questions")
            for ((k3, _q), a) in zip(chunk, got, strict=False):
                answers[k3] = a
            self.stats["questions_answered"] += len(chunk)
            self._write_json(f"{part_prefix}part-{next_part:06d}.json", [[k3[0], k3[1], k3[2], a] for ((k3, _q), a) in zip(chunk, got, strict=False)])
            next_part += 1
            self._report_progress(f"answering {target.label}")
        return answers

    def _score(self, items: Sequence[EvalItem], answers: dict[tuple[str, int, str], str], metrics: Sequence[str]) -> dict[str, ScoreTable]:
        from selma_evaluation.vqa import is_yes

        tables: dict[str, ScoreTable] = {}
        if "dsg" in metrics:
            from selma_evaluation.dsg import score_dsg

            samples = []
            for item in items:
                yn = EvalItem(id=item.id, prompt=item.prompt, category=item.category, skill=item.skill,
                              questions=tuple(q for q in item.questions if not q.choices))
                if not yn.questions:
                    continue
                for i in range(self.ipp):
                    samples.append((yn, i, {q.id: is_yes(answers[(item.id, i, q.id)]) for q in yn.questions}))
            tables["dsg"] = score_dsg(samples)
        if "tifa" in metrics:
            from selma_evaluation.tifa import score_tifa

            samples = []
            for item in items:
                mc = EvalItem(id=item.id, prompt=item.prompt, category=item.category, skill=item.skill,
                              questions=tuple(q for q in item.questions if q.choices))
                if not mc.questions:
                    continue
                for i in range(self.ipp):
                    samples.append((mc, i, {q.id: answers[(item.id, i, q.id)] for q in mc.questions}))
            tables["tifa"] = score_tifa(samples, self.mapper)
        return tables

    def evaluate(self, target: Target, items: Sequence[EvalItem], prefix: str, metrics: Sequence[str]) -> _Scored:
        images = self._render_target(target, items, prefix)
        answers = self._answer_target(target, items, images, prefix, metrics)
        tables = self._score(items, answers, metrics)
        questions = {(it.id, q.id): q for it in items for q in it.questions}
        by_metric = {m: {k: v for k, v in answers.items() if _wanted(questions[(k[0], k[2])], [m])} for m in metrics}
        return _Scored(target, tables, images, by_metric)

    # -- merge search

    def search(self) -> tuple[dict[str, Any] | None, str]:
        search = self.spec.get("merge_search") or {}
        if not search:
            return None, ""
        objective = METRIC_NAMES.get(search.get("objective", ""), "dsg")
        items = self.validation_items()
        grid = search_grid(search, self.settings.eval_max_trials)
        trials: list[dict[str, Any]] = []
        for n, merge in enumerate(grid):
            self._check()
            key = self._key("search", f"trial-{n:04d}.json")
            done = self._read_json(key)
            if done is not None and done.get("merge") == merge:
                trials.append(done)
                self.stats["images_rendered"] += len(items) * self.ipp
                self.stats["questions_answered"] += sum(1 for it in items for q in it.questions if _wanted(q, [objective])) * self.ipp
            else:
                scored = self.evaluate(Target(f"trial-{n:04d}", merge=merge), items, "search", [objective])
                trial = {"index": n, "merge": merge, "validation_score_percent": scored.tables[objective].overall.score_percent}
                self._write_json(key, trial)
                trials.append(trial)
            self.stats["trials"] = trials
            self._report_progress("merge search", force=True)
        best = max(trials, key=lambda t: (t["validation_score_percent"], -t["index"]))
        self.stats["best_merge"] = best["merge"]
        registered = ""
        name = search.get("register_model_name", "")
        if name:
            registered = self.renderer.register_merge(name, best["merge"], self.doc.run, f"{self.doc.idempotency_key}/register-best",
                                                      self.should_stop)
            self.stats["registered_model_name"] = registered
        self._report_progress("merge search done", force=True)
        return best, registered

    # -- the whole job

    def run(self) -> dict[str, Any]:
        """Run (or resume) the evaluation; returns the published report's manifest as a dict."""
        from selma_evaluation.report import ReportInput, TargetResult, build_report, image_paths

        if self.store.exists(self.doc.report_id):
            return self.store.get(self.doc.report_id).model_dump(mode="json")
        self._report_progress("preparing", force=True)
        items = self.test_items()
        targets = targets_from_spec(self.spec)
        search = self.spec.get("merge_search") or {}
        if search:
            val_items = self.validation_items()
            check_disjoint(val_items, items)
            n_trials = len(search_grid(search, self.settings.eval_max_trials))
            objective = METRIC_NAMES.get(search.get("objective", ""), "dsg")
            self.stats["images_total"] += n_trials * len(val_items) * self.ipp
            self.stats["questions_total"] += n_trials * self.ipp * sum(1 for it in val_items for q in it.questions if _wanted(q, [objective]))
        n_targets = len(targets) + (1 if search else 0)
        self.stats["images_total"] += n_targets * len(items) * self.ipp
        self.stats["questions_total"] += n_targets * self.ipp * sum(1 for it in items for q in it.questions if _wanted(q, self.doc.metrics))
        self._report_progress("preparing", force=True)

        best, registered = self.search()
        if best is not None:
            label = "search-best"
            taken = {t.label for t in targets}
            while label in taken:
                label += "'"
            targets.append(Target(label, model_name=registered) if registered else Target(label, merge=best["merge"]))

        results: list[_Scored] = []
        for target in targets:
            scored = self.evaluate(target, items, "images", self.doc.metrics)
            results.append(scored)
            self.stats["scores"] = self.stats["scores"] + score_rows(target.label, scored.tables, items)
            self._report_progress(f"scored {target.label}", force=True)

        self._report_progress("writing report", force=True)
        seeds = {(it.id, i): item_seed(self.base_seed, it.id) + i for it in items for i in range(self.ipp)}
        inp = ReportInput(
            title=self.spec.get("labels", {}).get("title") or f"Evaluation {self.doc.idempotency_key}",
            benchmark="dsg-1k" if self.spec.get("benchmark") == "EVALUATION_BENCHMARK_DSG_1K" else "prompt-set",
            items=items,
            targets=[TargetResult(label=r.target.label, description=r.target.describe(), scores=r.tables, images=r.images, answers=r.answers)
                     for r in results],
            seeds=seeds,
            vqa=getattr(self.vqa, "name", "vqa"),
            plumbing_only=bool(getattr(self.vqa, "plumbing_only", False)),
            settings={"diffusion": self.diffusion, "images_per_prompt": self.ipp, "base_seed": self.base_seed,
                      "metrics": self.doc.metrics, "serving": self.doc.serving_endpoint},
            search=self.stats.get("trials") or None,
            best_merge=self.stats.get("best_merge"),
        )
        files = build_report(inp, with_images=False)
        pngs = {path: results[[r.target.label for r in results].index(label)].images[(item_id, i)]
                for (label, item_id, i), path in image_paths(inp).items()}
        parents = sorted({ref["id"] for ref in prompt_set_refs(self.spec) + validation_set_refs(search)})
        summary = {r.target.label: {m: round(t.overall.score_percent, 3) for m, t in r.tables.items()} for r in results}
        labels = {"selma.dev/run": self.doc.run} if self.doc.run else {}
        with self.store.writer(ArtifactKind.EVAL_REPORT, id=self.doc.report_id, parents=parents, labels=labels,
                               name=inp.title, parameters={"summary": summary, "benchmark": inp.benchmark, "vqa": inp.vqa,
                                                           "metrics": self.doc.metrics, "targets": [t.label for t in targets],
                                                           "best_merge": self.stats.get("best_merge"),
                                                           "registered_model_name": self.stats.get("registered_model_name", "")}) as w:
            have = w.existing()
            for path, data in sorted(files.items()):
                if path not in have:
                    w.put_bytes(path, data)
            for path, key in sorted(pngs.items()):  # one image in memory at a time
                if path not in have:
                    w.put_bytes(path, self.storage.get_bytes(key))
        manifest = self.store.get(self.doc.report_id)
        self.stats["report_html_uri"] = manifest.file_uri("index.html")
        self._report_progress("done", force=True)
        return manifest.model_dump(mode="json")

    def close(self) -> None:
        if self._vqa is not None:
            self._vqa.close()
        self.renderer.close()


def _wanted(q: Question, metrics: Sequence[str]) -> bool:
    """DSG asks the yes/no questions, TIFA the multiple-choice ones."""
    return ("tifa" in metrics and bool(q.choices)) or ("dsg" in metrics and not q.choices)


def check_disjoint(validation: Sequence[EvalItem], test: Sequence[EvalItem]) -> None:
    """Validation prompts must not be test prompts (the research code selected on its test set)."""
    test_texts = {normalise_prompt(i.prompt) for i in test}
    shared = [v.prompt for v in validation if normalise_prompt(v.prompt) in test_texts]
    if shared:
        raise InvalidArgument(
            f"{len(shared)} validation prompt(s) also appear among the test prompts (e.g. {shared[0]!r}): "
            "merge weights chosen on test prompts would overstate the result; use held-out validation prompts",
            field="spec.merge_search.validation_prompt_set",
        )


def score_rows(label: str, tables: dict[str, ScoreTable], items: Sequence[EvalItem]) -> list[dict[str, Any]]:
    """EvaluationScore rows (proto-JSON) for one target: overall, then per category (per skill for prompt sets)."""
    by_skill = any(it.skill for it in items)
    rows = []
    for metric, table in tables.items():
        def row(s: Any, category: str = "", skill: str = "", metric: str = metric) -> dict[str, Any]:
            return {"target_label": label, "metric": METRIC_ENUMS[metric], "category": category, "skill": skill,
                    "score_percent": s.score_percent, "question_micro_average_percent": s.micro_percent,
                    "prompt_count": s.prompt_count, "question_count": s.question_count}

        rows.append(row(table.overall))
        for cat, s in sorted(table.per_category.items()):
            rows.append(row(s, skill=cat) if by_skill else row(s, category=cat))
    return rows


def load_job_document(ref: str, settings: EvaluationSettings) -> EvaluationJobDoc:
    """The job document from an ``s3://``/``file://`` URI or a local path."""
    from pathlib import Path

    from selma.storage import resolve_uri

    try:
        if ref.startswith(("s3://", "file://")):
            st, key = resolve_uri(settings, ref)
            raw = st.get_bytes(key)
        else:
            raw = Path(ref).read_bytes()
        return EvaluationJobDoc.model_validate_json(raw)
    except SelmaError:
        raise
    except FileNotFoundError:
        raise NotFound(f"no evaluation job document at {ref}", field="config") from None
    except ValueError as e:
        raise InvalidArgument(f"evaluation job document {ref} is invalid: {e}", field="config") from None


def run_job_document(doc: EvaluationJobDoc, settings: EvaluationSettings, *, should_stop: Callable[[], bool] = lambda: False,
                     renderer: ServingRenderer | None = None) -> dict[str, Any]:
    """Run one evaluation; a domain error is written to the progress document before it propagates."""
    runner = EvaluationRunner(doc, settings, renderer=renderer, should_stop=should_stop)
    try:
        return runner.run()
    except SelmaError as e:
        runner.progress.update(force=True, phase="failed", error={"code": e.code.value, "message": str(e)})
        raise
    finally:
        runner.close()
