"""The SELMA loop in ShapesWorld, through the real services, and the ablation table it produces.

Library functions (no gRPC; they read and publish artifacts in the artifact store):

* :func:`publish_heldout`  held-out ``prompt_set`` artifacts per skill whose records carry inline
  DSG questions (:func:`selma_shapesworld.world.questions_for_caption`), so ``selma eval`` with a
  PROMPT_SET benchmark and the ``shapesworld_judge`` VQA scores them with the judge.  Captions
  come from the grammar (:func:`selma_shapesworld.grammar.grammar_captions`) with seeds of their
  own, and are checked by text against the run's training prompt sets (and the skill's seed
  examples): no held-out caption was trained on.
* :func:`gate_dataset`  the data-quality gate: a new ``image_dataset`` with only the images the
  judge verifies against their caption (strict by default: nothing else in the image).
* :func:`mix_datasets`  one ``image_dataset`` with every skill's images, for the paper's
  "one LoRA on all skills' data" baseline.

The driver (:class:`TableRunner`, ``selma shapesworld table``) runs, per seed, through gRPC
(:class:`selma.app.runner.RunDriver`, so every job has a deterministic idempotency key and a re-run
attaches to finished work): the SkillSet run (prompts with the grammar backend → images
rendered by the base model itself → one LoRA expert per skill → merge), the gated datasets →
gated experts → gated merge, the mixed LoRA, and one evaluation of every configuration on the
held-out prompts with the judge.  The table (rows: configurations; columns: skills and overall;
cells: mean ± std over seeds of the DSG-style score, %) is written as Markdown with how it was
obtained, and optionally into a README between ``<!-- shapesworld-table:start -->`` and
``<!-- shapesworld-table:end -->``.

Commands (``register_loop`` adds them under ``selma shapesworld``; ``python -m
selma_shapesworld.loop`` runs them stand-alone): ``table``, ``heldout``, ``gate``, ``mix``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import shlex
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma.errors import FailedPrecondition, InvalidArgument, SelmaError

if TYPE_CHECKING:
    from selma.artifacts import ArtifactStore, Manifest

log = logging.getLogger(__name__)

DEFAULT_SKILLSET = Path(str(resources.files("selma_shapesworld") / "data" / "skillset.yaml"))  # package data
README_START = "<!-- shapesworld-table:start -->"
README_END = "<!-- shapesworld-table:end -->"
MIXED_SKILL = "mixed"
HELDOUT_BACKEND = "shapesworld_grammar_heldout"


def _norm(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " , ").split())


def _seed_of(*parts: Any) -> int:
    """A 31-bit seed from parts (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------ held-out prompts


def question_dicts(text: str) -> list[dict[str, Any]]:
    """The caption's DSG questions in the inline prompt-set record form (selma_evaluation.questions)."""
    from selma_shapesworld.world import questions_for_caption

    return [{"id": q.id, "text": q.text, "parents": list(q.parents), "category": q.category, "detail": q.detail, "tuple": q.tuple}
            for q in questions_for_caption(text)]


def heldout_captions(examples: Sequence[str], n: int, seed: int, exclude: Iterable[str] = ()) -> list[str]:
    """``n`` distinct captions of the kinds of ``examples``, none of them in ``exclude`` (compared normalised).

    FailedPrecondition when the grammar cannot give ``n`` new ones (the training set took them).
    """
    from selma_shapesworld.grammar import grammar_captions

    taken = {_norm(t) for t in exclude} | {_norm(e) for e in examples}
    out: list[str] = []
    for attempt in range(200):
        for cap in grammar_captions(list(examples), 64, _seed_of("heldout", seed, attempt)):
            if _norm(cap) not in taken:
                taken.add(_norm(cap))
                out.append(cap)
                if len(out) == n:
                    return out
    raise FailedPrecondition(f"only {len(out)} held-out captions of this kind are left outside the training prompts; ask for fewer", field="n")


def prompt_texts(store: ArtifactStore, prompt_set_id: str) -> list[str]:
    """The texts of a prompt_set artifact's records."""
    raw = store.read_bytes(prompt_set_id, "prompts.jsonl").decode()
    return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]


def publish_heldout(
    store: ArtifactStore,
    *,
    run: str,
    skill: str,
    examples: Sequence[str],
    n: int,
    seed: int,
    training_prompt_sets: Sequence[str] = (),
    purpose: str = "test",
) -> Manifest:
    """Publish (or return, if already published) a held-out prompt set with inline DSG questions.

    The artifact id derives from ``run``/``skill``/``purpose``, so a re-run finds it; its parents
    are the training prompt sets it is disjoint from.
    """
    from selma.artifacts import ArtifactKind, new_artifact_id

    if n < 1:
        raise InvalidArgument(f"held-out prompts per skill must be >= 1; got {n}", field="n")
    key = f"{run}/{skill}/heldout-{purpose}"
    aid = new_artifact_id(ArtifactKind.PROMPT_SET, key)
    if store.exists(aid):
        return store.get(aid)
    exclude: list[str] = []
    for pid in training_prompt_sets:
        exclude += prompt_texts(store, pid)
    caps = heldout_captions(examples, n, _seed_of(purpose, seed, skill), exclude)
    records = [{"id": f"p{i:06d}", "index": i, "text": t, "skill": skill, "questions": question_dicts(t)} for i, t in enumerate(caps)]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    params = {"skill": skill, "count": len(records), "threshold": 0.0, "backend": HELDOUT_BACKEND, "model": "shapesworld-grammar",
              "seed": seed, "purpose": purpose, "disjoint_from": list(training_prompt_sets), "questions": "world.questions_for_caption"}
    with store.writer(ArtifactKind.PROMPT_SET, id=aid, parents=list(training_prompt_sets), parameters=params,
                      name=f"held-out {purpose} prompts for {skill}", labels={"selma.dev/run": run, "selma.dev/skill": skill}) as w:
        w.put_bytes("prompts.jsonl", body)
    return store.get(aid)


# ------------------------------------------------------------------------------------ datasets


def _dataset_rows(store: ArtifactStore, dataset_id: str, field_name: str) -> tuple[Manifest, list[dict[str, Any]]]:
    from selma.artifacts import ArtifactKind

    m = store.get(dataset_id)
    if m.kind != ArtifactKind.IMAGE_DATASET:
        raise InvalidArgument(f"{dataset_id} is a {m.kind.value} artifact, not an image_dataset", field=field_name)
    raw = store.read_bytes(m, "metadata.jsonl").decode()
    return m, [json.loads(line) for line in raw.splitlines() if line.strip()]


def gate_dataset(
    store: ArtifactStore, dataset_id: str, *, run: str, skill: str, strict: bool = True, judge: Any = None, key: str | None = None
) -> Manifest:
    """Publish (or return) the dataset restricted to the images the judge verifies against their caption.

    Same format as the render service's (``metadata.jsonl`` rows unchanged, images under their
    own names); parents: the source dataset; parameters: kept/total (also per skill), strictness.
    A caption outside the ShapesWorld grammar counts as rejected.
    """
    from PIL import Image

    from selma.artifacts import ArtifactKind, new_artifact_id
    from selma_shapesworld.judge import Judge

    key = key or f"{run}/{skill}/gate"
    aid = new_artifact_id(ArtifactKind.IMAGE_DATASET, key)
    if store.exists(aid):
        return store.get(aid)
    judge = judge or Judge()
    source, rows = _dataset_rows(store, dataset_id, "dataset")
    kept: list[dict[str, Any]] = []
    per_skill: dict[str, dict[str, int]] = {}
    with store.writer(ArtifactKind.IMAGE_DATASET, id=aid, parents=[source.id], name=f"judge-gated images for {skill}",
                      labels={"selma.dev/run": run, "selma.dev/skill": skill}) as w:
        have = w.existing()
        for row in rows:
            data = store.read_bytes(source, row["file_name"])
            image = Image.open(io.BytesIO(data)).convert("RGB")
            try:
                ok = judge.verify(image, row["text"], strict=strict)
            except InvalidArgument:
                ok = False
            s = per_skill.setdefault(str(row.get("skill") or skill), {"kept": 0, "total": 0})
            s["total"] += 1
            if ok:
                s["kept"] += 1
                kept.append(row)
                if row["file_name"] not in have:
                    w.put_bytes(row["file_name"], data)
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())
        log.info("gate %s/%s: the judge accepted %d of %d images of %s", run, skill, len(kept), len(rows), source.id)
        w.parameters.update({"source_dataset": source.id, "kept": len(kept), "total": len(rows), "per_skill": per_skill,
                             "strict": strict, "gate": "selma_shapesworld.judge.verify", "skill": skill, "run": run,
                             "format": "imagefolder", "images": len(kept)})
    return store.get(aid)


def mix_datasets(store: ArtifactStore, datasets: Mapping[str, str], *, run: str, key: str | None = None) -> Manifest:
    """Publish (or return) one dataset with the images of every skill's dataset (``images/<skill>/…``).

    Rows keep their fields, with ``file_name`` moved under the skill and ``skill`` set; parents:
    every source dataset; parameters: images per skill.
    """
    from selma.artifacts import ArtifactKind, new_artifact_id

    key = key or f"{run}/{MIXED_SKILL}/mix"
    aid = new_artifact_id(ArtifactKind.IMAGE_DATASET, key)
    if store.exists(aid):
        return store.get(aid)
    if not datasets:
        raise InvalidArgument("give at least one dataset to mix", field="datasets")
    out_rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    ids = []
    with store.writer(ArtifactKind.IMAGE_DATASET, id=aid, parents=list(datasets.values()), name="all skills' images, mixed",
                      labels={"selma.dev/run": run, "selma.dev/skill": MIXED_SKILL}) as w:
        have = w.existing()
        for skill, did in datasets.items():
            source, rows = _dataset_rows(store, did, f"datasets[{skill}]")
            ids.append(source.id)
            counts[skill] = len(rows)
            for row in rows:
                name = f"images/{skill}/{row['file_name'].removeprefix('images/')}"
                if name not in have:
                    w.put_bytes(name, store.read_bytes(source, row["file_name"]))
                out_rows.append({**row, "file_name": name, "skill": skill, "source_dataset": source.id})
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in out_rows).encode())
        w.parameters.update({"sources": dict(datasets), "per_skill": counts, "images": len(out_rows), "skill": MIXED_SKILL,
                             "run": run, "format": "imagefolder"})
    return store.get(aid)


# ------------------------------------------------------------------------------------ the table


@dataclass
class TableConfig:
    """What ``selma shapesworld table`` runs; ``None`` = the SkillSet's own value."""

    skillset: Path = DEFAULT_SKILLSET
    seeds: tuple[int, ...] = (0, 1, 2)
    prompts_per_skill: int | None = None
    steps: int | None = None
    eval_per_skill: int = 40
    skills: tuple[str, ...] = ()
    model: str | None = None
    strict_gate: bool = True
    render_steps: int | None = None
    images_per_prompt: int | None = None
    command: str = ""


@dataclass
class SeedResult:
    """One seed's scores (target label → skill or "" for overall → %) and facts."""

    seed: int
    run: str
    scores: dict[str, dict[str, float]]
    facts: dict[str, Any] = field(default_factory=dict)


def _read_template(path: Path) -> dict[str, Any]:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"SkillSet template {path} does not exist; pass --skillset (the default is selma_shapesworld/data/skillset.yaml)",
                              field="skillset") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"SkillSet template {path} is not valid YAML: {e}", field="skillset") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict) or not isinstance(raw.get("metadata"), dict):
        raise InvalidArgument(f"{path} is not a SkillSet (apiVersion, kind, metadata, spec)", field="skillset")
    return raw


def configured_skillset(cfg: TableConfig, seed: int) -> Any:
    """The SkillSet for one seed: the template with the table's overrides, run name ``<name>-<digest>-s<seed>``.

    The digest covers every override, so a table with other settings is a different run
    (its jobs' idempotency keys differ) and the same settings resume the same run.
    """
    import yaml

    from selma.app.skillset import parse_skillset

    raw = _read_template(cfg.skillset)
    spec = raw["spec"]
    if cfg.skills:
        unknown = set(cfg.skills) - {s["name"] for s in spec["skills"]}
        if unknown:
            raise InvalidArgument(f"unknown skill(s) {sorted(unknown)}; the SkillSet has {[s['name'] for s in spec['skills']]}", field="skills")
        spec["skills"] = [s for s in spec["skills"] if s["name"] in cfg.skills]
    for s in spec["skills"]:
        if cfg.prompts_per_skill:
            s["count"] = cfg.prompts_per_skill
    spec.setdefault("prompts", {})["seed"] = seed
    spec.setdefault("render", {})["baseSeed"] = seed
    if cfg.render_steps:
        spec["render"].setdefault("diffusion", {})["steps"] = cfg.render_steps
    if cfg.images_per_prompt:
        spec["render"]["imagesPerPrompt"] = cfg.images_per_prompt
    tc = spec["training"]["config"]
    tc["seed"] = seed
    if cfg.steps:
        tc["maxSteps"] = cfg.steps
        tc["checkpointEvery"] = max(1, min(int(tc.get("checkpointEvery", cfg.steps)), cfg.steps))
    if cfg.model:
        tc["baseModel"] = {"source": cfg.model}
        spec["render"].pop("model", None)
    tc["baseModel"]["source"] = service_model_source(tc["baseModel"]["source"])
    if "model" in spec["render"]:
        spec["render"]["model"]["source"] = service_model_source(spec["render"]["model"]["source"])
    base = raw["metadata"]["name"]
    digest_doc = {k: v for k, v in raw.items() if k != "metadata"}
    digest_doc["spec"] = {**spec, "prompts": {**spec["prompts"], "seed": None}, "render": {**spec["render"], "baseSeed": None},
                          "training": {**spec["training"], "config": {**tc, "seed": None}}}
    digest = hashlib.sha256(json.dumps([digest_doc, cfg.eval_per_skill, cfg.strict_gate], sort_keys=True, default=str).encode()).hexdigest()[:6]
    name = f"{base[:40]}-{digest}-s{seed}"
    raw["metadata"]["name"] = name
    spec.setdefault("merge", {})["modelName"] = name
    spec.pop("evaluation", None)  # the table evaluates every configuration itself
    return parse_skillset(yaml.safe_dump(raw, sort_keys=False), source=f"{cfg.skillset} (seed {seed})")


def template_model(cfg: TableConfig) -> str:
    """The base model reference as the user gave it (before :func:`service_model_source`)."""
    if cfg.model:
        return cfg.model
    raw = _read_template(cfg.skillset)
    return str(raw["spec"]["training"]["config"]["baseModel"]["source"])


def service_model_source(source: str) -> str:
    """``shapesworld://NAME`` as the absolute path of its packaged weights; other sources unchanged.

    Not every service's request validation knows the ``shapesworld://`` scheme (the render
    service accepts hub ids, absolute paths, s3:// and tiny://), while all of them load an
    absolute pipeline directory, so the loop hands them the path that scheme stands for.
    """
    if source.startswith("shapesworld://"):
        from selma_shapesworld.plugin import model_path as shapesworld_model_path

        return str(shapesworld_model_path(source))
    return source


class TableRunner:
    """Drives the table's jobs through the services (see the module docstring)."""

    def __init__(self, client: Any, store: ArtifactStore, cfg: TableConfig, state_dir: Path, reporter: Any, judge: Any = None) -> None:
        self.judge = judge  # the gate's judge; None = selma_shapesworld.judge.Judge()
        self.client = client
        self.store = store
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.reporter = reporter
        self.local_seconds: dict[str, float] = {}  # this process's own work per seed: held-out sets, gate, mix

    def _timed(self, stage: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            self.local_seconds[stage] = self.local_seconds.get(stage, 0.0) + time.perf_counter() - t0

    def run_seed(self, seed: int) -> SeedResult:
        """Run (or attach to) every job of one seed and return its scores."""
        from selma.app.runner import RunDriver, RunLock, RunState
        from selma.v1 import common_pb2, evaluation_service_pb2, serving_service_pb2, training_service_pb2

        ss = configured_skillset(self.cfg, seed)
        run = ss.name
        self.local_seconds = {}
        note = self.reporter.note
        runs_dir = self.state_dir / "runs"
        with RunLock(runs_dir / f"{run}.lock"):
            state = RunState.open(runs_dir, ss)
            driver = RunDriver(self.client, ss, state, self.reporter)
            note(f"seed {seed} (run {run}): prompts → render → one expert per skill → merge")
            result = driver.run()
            stages = state.data["stages"]
            prompt_sets = {s.name: stages[f"{s.name}/prompts"]["output"]["id"] for s in ss.skills}
            datasets = {s.name: stages[f"{s.name}/render"]["output"]["id"] for s in ss.skills}
            experts = dict(result["experts"])

            note(f"seed {seed}: held-out prompts, judge gate, mixed dataset")
            heldout = {}
            for s in ss.skills:
                examples = list(s.inline.seed_examples) if s.inline is not None else []
                heldout[s.name] = self._timed("heldout", publish_heldout, self.store, run=run, skill=s.name, examples=examples,
                                              n=self.cfg.eval_per_skill, seed=seed, training_prompt_sets=list(prompt_sets.values())).id
            gated = {s.name: self._timed("gate", gate_dataset, self.store, datasets[s.name], run=run, skill=s.name, strict=self.cfg.strict_gate,
                                         judge=self.judge)
                     for s in ss.skills}
            mixed = self._timed("mix", mix_datasets, self.store, datasets, run=run)

            def train(label: str, skill: str, dataset_id: str) -> str:
                spec = training_service_pb2.ExpertTrainingSpec(run=run, skill=skill, dataset=common_pb2.ArtifactRef(id=dataset_id),
                                                               config=ss.training_config_for(skill), placement=ss.placement)
                return driver.drive("training", label, spec).status.output.id

            note(f"seed {seed}: gated experts and their merge, the mixed LoRA")
            gated_experts = {}
            for s in ss.skills:
                if gated[s.name].parameters.get("kept", 0) > 0:
                    gated_experts[s.name] = train(f"{s.name}-gated", f"{s.name}-gated", gated[s.name].id)
            gated_model = ""
            if gated_experts:
                merge = common_pb2.MergeSpec(method=ss.merge_method, density=ss.merge_density, output_rank=ss.merge_output_rank)
                for name in gated_experts:
                    merge.experts.add(expert_id=gated_experts[name])
                gated_model = f"{run}-gated"[:63]
                driver.drive("merge", "gated", serving_service_pb2.MergeJobSpec(run=run, model_name=gated_model, merge=merge,
                                                                                 register=True, load=True, replace=True))
            mixed_expert = train(MIXED_SKILL, MIXED_SKILL, mixed.id)

            ev = evaluation_service_pb2.EvaluationSpec(run=run, benchmark=evaluation_service_pb2.EVALUATION_BENCHMARK_PROMPT_SET,
                                                     diffusion=ss.render.diffusion, images_per_prompt=1, base_seed=seed,
                                                     metrics=[evaluation_service_pb2.EVALUATION_METRIC_DSG], placement=ss.placement)
            ev.vqa.shapesworld_judge.SetInParent()
            ev.labels["title"] = f"ShapesWorld table, seed {seed}"
            for s in ss.skills:
                ev.prompt_sets.add(id=heldout[s.name])
            ev.targets.add(label="base")
            for s in ss.skills:
                t = ev.targets.add(label=f"expert-{s.name}")
                t.experts.method = common_pb2.MERGE_METHOD_MEAN_DELTA
                t.experts.experts.add(expert_id=experts[s.name], weight=1.0)
            t = ev.targets.add(label="mixed")
            t.experts.method = common_pb2.MERGE_METHOD_MEAN_DELTA
            t.experts.experts.add(expert_id=mixed_expert, weight=1.0)
            ev.targets.add(label="merged", model_name=ss.model_name)
            if gated_model:
                ev.targets.add(label="merged-gated", model_name=gated_model)
            note(f"seed {seed}: evaluating {len(ev.targets)} configurations on {len(ss.skills)}×{self.cfg.eval_per_skill} held-out prompts with the judge")
            # The key names the spec's digest: a table whose evaluation changed (other targets, say) starts a new
            # evaluation while the training jobs before it are still attached to, not refused as a key clash.
            ev_digest = hashlib.sha256(ev.SerializeToString(deterministic=True)).hexdigest()[:8]
            job = driver.drive("evaluation", f"eval-{ev_digest}", ev)
            scores: dict[str, dict[str, float]] = {}
            for row in job.stats.scores:
                if row.metric == evaluation_service_pb2.EVALUATION_METRIC_DSG and not row.category:
                    scores.setdefault(row.target_label, {})[row.skill] = row.score_percent
            if not gated_model:
                # No image passed the gate: there is no gated expert, so that configuration is the base model
                # itself (rendering it again would give the base's images and scores exactly).
                scores["merged-gated"] = dict(scores["base"])
            # This process's own stages (held-out sets, gate, mix) as the run that did the work measured them: a re-run
            # that only finds the published artifacts would report ~0 s.
            job_times = self.job_times(state, f"eval-{ev_digest}")  # one Get per job, for both timings below
            local_seconds = (state.data.get("table") or {}).get("local_seconds") or {
                k: round(v, 1) for k, v in self.local_seconds.items()}
            facts = {
                "prompts": {s.name: _count(self.store, prompt_sets[s.name]) for s in ss.skills},
                "images": {s.name: datasets_images(self.store, datasets[s.name]) for s in ss.skills},
                "gate": {s.name: {"kept": gated[s.name].parameters.get("kept", 0), "total": gated[s.name].parameters.get("total", 0)} for s in ss.skills},
                "heldout": {s.name: self.cfg.eval_per_skill for s in ss.skills},
                "experts": experts, "gated_experts": gated_experts, "mixed_expert": mixed_expert, "merged_model": result["merged_model"],
                "eval_report": job.status.output.id, "stage_seconds": stage_seconds(job_times), "span_seconds": span_seconds(job_times),
                "local_seconds": local_seconds,
                "skills": [s.name for s in ss.skills],
                "model": template_model(self.cfg), "steps": ss.training_config.max_steps,
                "rank": ss.training_config.lora.rank, "render": _diffusion_text(ss.render),
            }
            state.set(phase="succeeded", table={"scores": scores, "local_seconds": local_seconds})
        return SeedResult(seed=seed, run=run, scores=scores, facts=facts)

    def job_times(self, state: Any, evaluation: str) -> list[tuple[str, float, float]]:
        """(stage label, started, finished) in epoch seconds of every finished job of the run.

        ``evaluation``: the current evaluation's stage label (earlier evaluations of the run are left out).
        """
        out = []
        for st in state.data["stages"].values():
            if not st.get("job_id") or (st["stage"] == "evaluation" and st.get("skill") != evaluation):
                continue
            job = self.client.jobs(st["stage"]).get(st["job_id"])
            s = job.status
            if s.HasField("started_at") and s.HasField("finished_at"):
                label = st["stage"] + ("-gated" if str(st.get("skill") or "").endswith("-gated") or st.get("skill") == "gated" else "")
                if st.get("skill") == MIXED_SKILL:
                    label = "training-mixed"
                out.append((label, s.started_at.ToDatetime().timestamp(), s.finished_at.ToDatetime().timestamp()))
        return out


def stage_seconds(job_times: Sequence[tuple[str, float, float]]) -> dict[str, float]:
    """Seconds each job took on its service (started → finished), summed per stage, from :meth:`TableRunner.job_times`."""
    out: dict[str, float] = {}
    for label, start, end in job_times:
        out[label] = round(out.get(label, 0.0) + end - start, 1)
    return out


def span_seconds(job_times: Sequence[tuple[str, float, float]]) -> float:
    """Wall time of a seed's jobs: first start to last finish (the same when a re-run only attaches)."""
    return round(max(e for _, _, e in job_times) - min(s for _, s, _ in job_times), 1) if job_times else 0.0


def _count(store: ArtifactStore, prompt_set_id: str) -> int:
    return len(prompt_texts(store, prompt_set_id))


def datasets_images(store: ArtifactStore, dataset_id: str) -> int:
    return len(_dataset_rows(store, dataset_id, "dataset")[1])


def _diffusion_text(render: Any) -> str:
    d = render.diffusion
    from selma.api import enum_name
    from selma.v1 import common_pb2

    sched = enum_name(common_pb2.Scheduler, d.scheduler)
    g = f", guidance {d.guidance_scale:g}" if d.HasField("guidance_scale") else ""
    return f"{sched} {d.steps} steps{g}, {d.width}×{d.height}"


# ------------------------------------------------------------------------------------ table text

ROW_LABELS = (("base", "base model"), ("expert-*", "single-skill expert: {skill}"), ("mixed", "one LoRA on all skills' data (mixed)"),
              ("merged", "merged experts (SELMA)"), ("merged-gated", "merged experts, judge-gated data"))


def table_rows(results: Sequence[SeedResult]) -> tuple[list[str], list[tuple[str, list[list[float]]]]]:
    """(columns, [(row name, per column the per-seed values)]) from seed results; columns = skills + overall."""
    skills = list(results[0].facts["skills"])
    columns = [*skills, "overall"]
    rows = []
    for key, title in ROW_LABELS:
        labels = [(f"expert-{s}", title.format(skill=s)) for s in skills] if key == "expert-*" else [(key, title)]
        for label, name in labels:
            cells = []
            for col in columns:
                sk = "" if col == "overall" else col
                cells.append([r.scores[label][sk] for r in results if label in r.scores and sk in r.scores[label]])
            rows.append((name, cells))
    return columns, rows


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def render_table(results: Sequence[SeedResult], cfg: TableConfig, wall_seconds: float) -> str:
    """The Markdown table with how it was obtained."""
    columns, rows = table_rows(results)
    seeds = ", ".join(str(r.seed) for r in results)
    spread = "mean ± sample standard deviation over seeds" if len(results) > 1 else "one seed, no spread"
    f0 = results[0].facts
    lines = [
        f"DSG-style score (%, mean over held-out prompts; a question counts only if its parent questions pass), judged by the "
        f"ShapesWorld judge; {spread} ({seeds}).",
        "",
        "| configuration | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")

    def per_skill(key: str, fmt: Any) -> str:
        return ", ".join(f"{s} {fmt([r.facts[key][s] for r in results])}" for s in f0["skills"])

    def mean_int(v: list[int]) -> str:
        return f"{statistics.fmean(v):.0f}"

    def kept(v: list[dict]) -> str:
        k, t = sum(x["kept"] for x in v), sum(x["total"] for x in v)
        return f"{k}/{t}"

    stage: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.facts["stage_seconds"].items():
            stage.setdefault(k, []).append(v)
    for r in results:
        for k, v in r.facts.get("local_seconds", {}).items():
            stage.setdefault(k, []).append(v)
    timing = ", ".join(f"{k} {statistics.fmean(v):.0f} s" for k, v in sorted(stage.items()))
    spans = ", ".join(f"seed {r.seed} {r.facts.get('span_seconds', 0.0) / 60:.1f} min" for r in results)
    lines += [
        "",
        f"How it was obtained: `{cfg.command or 'selma shapesworld table'}` (this invocation's wall time {wall_seconds / 60:.1f} min; "
        f"per seed, first job start to last job end: {spans}). "
        f"Base model `{f0['model']}`; prompts from the ShapesWorld grammar backend through the prompt service "
        f"(accepted per skill, mean over seeds: {per_skill('prompts', mean_int)}); images rendered by the base model itself "
        f"({f0['render']}; per skill: {per_skill('images', mean_int)}); one LoRA expert per skill "
        f"(rank {f0['rank']}, {f0['steps']} steps); merge = mean of the experts' deltas; the mixed LoRA: the same training "
        f"on all skills' images together; single experts evaluated as the base plus that expert at weight 1. "
        f"Gate: the judge's {'strict' if cfg.strict_gate else 'lenient'} caption check kept {per_skill('gate', kept)} images "
        f"(all seeds together); a skill with no kept image has no gated expert"
        f"{'; in seeds where no image passed, the gated row is the base model' if any(not r.facts.get('gated_experts') for r in results) else ''}. "
        f"Held-out test prompts: {per_skill('heldout', mean_int)} per seed, generated apart from and checked against the training "
        f"prompts, questions from the grammar. Job time per seed (mean, summed per stage; jobs of different skills overlap): {timing}.",
    ]
    return "\n".join(lines) + "\n"


def replace_readme_section(path: Path, text: str) -> None:
    """Replace what lies between the table markers in ``path`` (atomically); InvalidArgument without markers."""
    doc = path.read_text()
    start, end = doc.find(README_START), doc.find(README_END)
    if start < 0 or end < start:
        raise InvalidArgument(f"{path} has no '{README_START}' … '{README_END}' markers; add them where the table goes", field="readme")
    body = (f"{README_START}\n<!-- generated by `selma shapesworld table`; do not edit by hand, re-run it -->\n{text}{README_END}")
    new = doc[:start] + body + doc[end + len(README_END):]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def run_table(cfg: TableConfig, *, client: Any, store: ArtifactStore, state_dir: Path, reporter: Any,
              judge: Any = None) -> tuple[str, list[SeedResult], float]:
    """Run (or resume) every seed; returns (Markdown, seed results, wall seconds).  ``judge``: the gate's (default the real judge)."""
    t0 = time.perf_counter()
    runner = TableRunner(client, store, cfg, state_dir, reporter, judge=judge)
    results = [runner.run_seed(seed) for seed in cfg.seeds]
    wall = time.perf_counter() - t0
    text = render_table(results, cfg, wall)
    return text, results, wall


# ------------------------------------------------------------------------------------ CLI


def register_loop(actions: argparse._SubParsersAction) -> None:
    """Add ``table``, ``heldout``, ``gate`` and ``mix`` to ``selma shapesworld``'s subcommands."""
    p = actions.add_parser("table", help="reproduce the SELMA ablation table in ShapesWorld through the services (resumable)",
                           description="Per seed: SkillSet run (grammar prompts, images from the base model, one expert per skill, merge), "
                           "judge-gated experts and merge, one LoRA on mixed data, then one evaluation of all on held-out prompts with "
                           "the judge. Starts the services (selma up) unless --endpoints is given. Re-running attaches to finished jobs.")
    p.add_argument("--skillset", type=Path, default=DEFAULT_SKILLSET, help="SkillSet template (default: the one shipped in selma_shapesworld/data/skillset.yaml)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--prompts-per-skill", type=int, default=0, help="training prompts per skill (default: the SkillSet's counts)")
    p.add_argument("--steps", type=int, default=0, help="LoRA training steps (default: the SkillSet's maxSteps)")
    p.add_argument("--eval-per-skill", type=int, default=40, help="held-out test prompts per skill (default 40)")
    p.add_argument("--skills", default="", help="comma-separated subset of the SkillSet's skills (default all)")
    p.add_argument("--model", default="", help="base model override, e.g. tiny://sd (default: the SkillSet's)")
    p.add_argument("--render-steps", type=int, default=0, help="denoising steps for training images and evaluation (default: the SkillSet's)")
    p.add_argument("--images-per-prompt", type=int, default=0, help="training images per prompt (default: the SkillSet's)")
    p.add_argument("--lenient-gate", action="store_true", help="gate with the judge's non-strict check (extra objects allowed)")
    p.add_argument("--out", type=Path, default=None, help="write the Markdown table here (and raw scores to <out>.json)")
    p.add_argument("--readme", type=Path, default=None, help="replace the table between the shapesworld-table markers in this file")
    p.add_argument("--dir", type=Path, default=Path(".selma-shapesworld"), help="state and local-stack data directory (default .selma-shapesworld)")
    p.add_argument("--endpoints", default="", help="use running services (endpoints file) instead of starting them")
    p.add_argument("--storage", default="", help="artifact storage URI of those services (default: SELMA_STORAGE_URI / their default)")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of progress bars")
    p.set_defaults(func=_table)

    p = actions.add_parser("heldout", help="publish a held-out prompt set with inline DSG questions for one skill")
    p.add_argument("--run", required=True)
    p.add_argument("--skill", required=True)
    p.add_argument("--examples", required=True, help="'|'-separated ShapesWorld captions of the skill's kind")
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", default="", help="comma-separated training prompt_set ids to stay disjoint from")
    p.add_argument("--purpose", default="test", help="test or validation (part of the artifact id)")
    p.add_argument("--storage", default="")
    p.set_defaults(func=_heldout)

    p = actions.add_parser("gate", help="keep the images of an image_dataset that the judge verifies against their captions")
    p.add_argument("dataset", help="image_dataset artifact id")
    p.add_argument("--run", required=True)
    p.add_argument("--skill", required=True)
    p.add_argument("--lenient", action="store_true", help="allow extra objects")
    p.add_argument("--storage", default="")
    p.set_defaults(func=_gate)

    p = actions.add_parser("mix", help="one image_dataset with every given skill's images")
    p.add_argument("datasets", nargs="+", help="SKILL=DATASET_ID ...")
    p.add_argument("--run", required=True)
    p.add_argument("--storage", default="")
    p.set_defaults(func=_mix)


def _store(uri: str) -> ArtifactStore:
    from selma.artifacts import ArtifactStore
    from selma.config import SelmaSettings
    from selma.storage import open_storage

    return ArtifactStore(open_storage(SelmaSettings(), uri or None))


def _heldout(args: argparse.Namespace) -> int:
    m = publish_heldout(_store(args.storage), run=args.run, skill=args.skill, examples=[e.strip() for e in args.examples.split("|") if e.strip()],
                        n=args.n, seed=args.seed, training_prompt_sets=[x for x in args.exclude.split(",") if x], purpose=args.purpose)
    sys.stdout.write(m.id + "\n")
    return 0


def _gate(args: argparse.Namespace) -> int:
    m = gate_dataset(_store(args.storage), args.dataset, run=args.run, skill=args.skill, strict=not args.lenient)
    sys.stdout.write(json.dumps({"id": m.id, "kept": m.parameters.get("kept"), "total": m.parameters.get("total")}) + "\n")
    return 0


def _mix(args: argparse.Namespace) -> int:
    pairs = dict(x.split("=", 1) for x in args.datasets if "=" in x)
    if len(pairs) != len(args.datasets):
        raise InvalidArgument("give datasets as SKILL=DATASET_ID", field="datasets")
    sys.stdout.write(mix_datasets(_store(args.storage), pairs, run=args.run).id + "\n")
    return 0


def stack_env(model: str) -> dict[str, str]:
    """Settings for a local stack that serves ``model`` as its base (evaluation's "base" target renders it).

    The loop's requests name ``model`` by its path (:func:`service_model_source`), so a local
    ``model`` directory is one the services allow requests to name (SELMA_MODEL_ALLOWED_DIRS).
    """
    env = {
        "SELMA_PROMPTS_PRELOAD_DEFAULT_BACKEND": "false",  # the grammar backend needs no LLM
        "SELMA_RENDER_DEFAULT_MODEL": model,
        "SELMA_TRAINING_DEFAULT_MODEL": model,
        "SELMA_SERVING_BASE_MODEL": model,
    }
    if Path(model).is_absolute():
        env["SELMA_MODEL_ALLOWED_DIRS"] = str(Path(model).resolve())
    return env


def _command_line() -> str:
    argv = sys.argv[sys.argv.index("table"):] if "table" in sys.argv else ["table"]
    return "selma shapesworld " + " ".join(shlex.quote(a) for a in argv)


def _table(args: argparse.Namespace) -> int:
    from rich.console import Console

    from selma.app.local_stack import LocalStack
    from selma.app.runner import Reporter
    from selma.client import Endpoints, SelmaClient

    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise InvalidArgument(f"--seeds {args.seeds!r} is not a comma-separated list of integers", field="seeds") from None
    if not seeds:
        raise InvalidArgument("give at least one seed", field="seeds")
    cfg = TableConfig(skillset=args.skillset, seeds=seeds, prompts_per_skill=args.prompts_per_skill or None, steps=args.steps or None,
                      eval_per_skill=args.eval_per_skill, skills=tuple(s for s in args.skills.split(",") if s),
                      model=args.model or None, strict_gate=not args.lenient_gate, render_steps=args.render_steps or None,
                      images_per_prompt=args.images_per_prompt or None, command=_command_line())
    model = configured_skillset(cfg, seeds[0]).training_config.base_model.source
    console = Console(soft_wrap=True)
    stack = None
    state_dir = args.dir.resolve()
    if args.endpoints:
        endpoints = Endpoints.load(args.endpoints)
        store = _store(args.storage)
    else:
        stack = LocalStack(state_dir / "stack", extra_env=stack_env(model))
        console.print(f"starting the services (selma up) in {stack.data_dir}, base model {model} …")
        endpoints = stack.start(timeout=300)
        store = _store((stack.data_dir / "storage").as_uri())
    try:
        with SelmaClient(endpoints) as client, Reporter(console, live=False if args.plain else None) as reporter:
            text, results, wall = run_table(cfg, client=client, store=store, state_dir=state_dir, reporter=reporter)
    finally:
        if stack is not None:
            stack.stop()
    console.print(text, highlight=False, markup=False)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(args.out.suffix + ".json").write_text(json.dumps(
            {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": cfg.command, "wall_seconds": round(wall, 1),
             "seeds": [{"seed": r.seed, "run": r.run, "scores": r.scores, "facts": r.facts} for r in results]}, indent=2))
    if args.readme:
        replace_readme_section(args.readme, text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m selma_shapesworld.loop COMMAND …`` (the same commands as ``selma shapesworld``)."""
    from selma.logs import configure_logging

    configure_logging("INFO", "text")
    parser = argparse.ArgumentParser(prog="selma shapesworld")
    register_loop(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SelmaError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
