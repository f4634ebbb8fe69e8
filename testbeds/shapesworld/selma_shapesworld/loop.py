"""The SELMA loop in ShapesWorld, through the real services, and the ablation table it produces.

Library functions (no gRPC; they read and publish artifacts in the artifact store):

* :func:`publish_heldout`  held-out ``prompt_set`` artifacts per skill whose records carry inline
  DSG questions (:func:`selma_shapesworld.world.questions_for_caption`), so ``selma eval`` with a
  PROMPT_SET benchmark and the ``shapesworld_judge`` VQA scores them with the judge.  Captions
  come from the grammar (:func:`selma_shapesworld.grammar.grammar_captions`) with seeds of their
  own, and are checked by text against the run's training prompt sets (and the skill's seed
  examples): no held-out caption was trained on.
* :func:`publish_oracle`  ground-truth renders of a prompt set's captions (one scene each that the
  caption describes exactly): the oracle experts' data, the table's upper bound.
* :func:`mix_datasets`  one ``image_dataset`` with every skill's images, for the paper's
  "one LoRA on all skills' data" baseline.

The driver (:class:`TableRunner`, ``selma shapesworld table``) runs, per seed, through gRPC
(:class:`selma.app.runner.RunDriver`, so every job has a deterministic idempotency key and a re-run
attaches to finished work): the SkillSet run with its gate stage (prompts with the grammar backend →
best-of-K candidate rounds rendered by the base model itself → the product's gate job, the judge
answering each caption's DSG questions → one LoRA expert per skill on the kept images → merge);
SELMA as in the paper (the same recipe on the first candidate of every prompt, ungated → merge);
the oracle (ground-truth renders of the same captions → experts → merge); one LoRA on all skills'
gated data; and one evaluation of every configuration on held-out prompts with the judge.  The
table (rows: configurations; columns: skills, overall and the paired difference to the base;
cells: mean ± std over seeds of the DSG-style score, %) is written as Markdown with how it was
obtained, and optionally into a README between ``<!-- shapesworld-table:start -->`` and
``<!-- shapesworld-table:end -->``.  Its text depends only on the jobs' records, so a re-run that
attaches to them writes the same bytes.

Commands (``register_loop`` adds them under ``selma shapesworld``; ``python -m
selma_shapesworld.loop`` runs them stand-alone): ``table``, ``heldout``, ``mix``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import os
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

DEFAULT_SKILLSET = Path(str(resources.files("selma_shapesworld") / "data" / "skillset-gated.yaml"))  # package data
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
    raise FailedPrecondition(
        f"the ShapesWorld grammar has {len(out)} caption(s) of this kind left outside the {len(taken) - len(out)} "
        f"training prompts and examples, and {n} held-out prompts were asked for; ask for fewer held-out prompts "
        f"or fewer training prompts (selma shapesworld table: --eval-per-skill, --prompts-per-skill; "
        f"selma shapesworld heldout: --n)",
        field="n",
    )


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


def publish_oracle(store: ArtifactStore, prompt_set_id: str, *, run: str, skill: str, seed: int, size: int, key: str | None = None) -> Manifest:
    """Publish (or return) the oracle's training data: one ground-truth render of every caption of a prompt set.

    Each image is a scene the caption describes exactly (:func:`selma_shapesworld.world.scene_for_caption`,
    drawn from a seed per caption), so experts trained on it show what right data is worth: the
    table's upper bound for self-rendered, gated data.  Same format as the render service's datasets
    (``metadata.jsonl`` rows with ``file_name``, ``text``, ``prompt_id``, ``skill``, ``seed``);
    parents: the prompt set.
    """
    import numpy as np

    from selma.artifacts import ArtifactKind, new_artifact_id
    from selma_shapesworld.world import render, scene_for_caption

    key = key or f"{run}/{skill}/oracle"
    aid = new_artifact_id(ArtifactKind.IMAGE_DATASET, key)
    if store.exists(aid):
        return store.get(aid)
    raw = store.read_bytes(prompt_set_id, "prompts.jsonl").decode()
    records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    rows: list[dict[str, Any]] = []
    with store.writer(ArtifactKind.IMAGE_DATASET, id=aid, parents=[prompt_set_id], name=f"ground-truth renders for {skill}",
                      labels={"selma.dev/run": run, "selma.dev/skill": skill}) as w:
        for i, rec in enumerate(records):
            image_seed = _seed_of("oracle", seed, skill, i)
            scene = scene_for_caption(rec["text"], np.random.default_rng(image_seed), size=size)
            buf = io.BytesIO()
            render(scene).save(buf, format="PNG")
            name = f"images/{i:06d}-0.png"
            w.put_bytes(name, buf.getvalue())
            rows.append({"file_name": name, "text": rec["text"], "prompt_id": rec.get("id", f"p{i:06d}"), "prompt_index": i,
                         "image_index": 0, "seed": image_seed, "model": "shapesworld-ground-truth", "width": size, "height": size,
                         "skill": skill})
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        w.parameters.update({"prompt_set": prompt_set_id, "images": len(rows), "skill": skill, "run": run, "seed": seed,
                             "renderer": "selma_shapesworld.world.render(scene_for_caption)", "format": "imagefolder"})
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
    """What ``selma shapesworld table`` runs; ``None`` = the SkillSet template's own value."""

    skillset: Path = DEFAULT_SKILLSET
    seeds: tuple[int, ...] = (0, 1, 2)
    prompts_per_skill: int | None = None
    steps: int | None = None  # the training steps' cap (maxSteps); with epochs, steps follow the data up to it
    epochs: float | None = None
    eval_per_skill: int = 64
    skills: tuple[str, ...] = ()
    model: str | None = None
    render_steps: int | None = None
    gate_threshold: float | None = None
    candidates: int | None = None  # best-of-K
    target_kept: int | None = None
    max_candidates: int | None = None
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
        raise InvalidArgument(f"SkillSet template {path} does not exist; pass --skillset (the default is selma_shapesworld/data/skillset-gated.yaml)",
                              field="skillset") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"SkillSet template {path} is not valid YAML: {e}", field="skillset") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("spec"), dict) or not isinstance(raw.get("metadata"), dict):
        raise InvalidArgument(f"{path} is not a SkillSet (apiVersion, kind, metadata, spec)", field="skillset")
    if not isinstance(raw["spec"].get("gate"), dict):
        raise InvalidArgument(f"SkillSet template {path} has no gate: section; the table's SELMA run gates its data "
                              "(see selma_shapesworld/data/skillset-gated.yaml)", field="skillset")
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
    gate = spec["gate"]
    for key, value in (("threshold", cfg.gate_threshold), ("candidatesPerPrompt", cfg.candidates), ("targetKept", cfg.target_kept),
                       ("maxCandidates", cfg.max_candidates)):
        if value is not None:
            gate[key] = value
    # SELMA as in the paper trains on round 0 of the candidates: it must be one image of every prompt.
    if int(spec["render"].get("imagesPerPrompt", 1) or 1) != 1:
        raise InvalidArgument("the table's template must render one image per candidate (spec.render.imagesPerPrompt: 1); "
                              "best-of-K comes from spec.gate.candidatesPerPrompt", field="skillset")
    budget = int(gate.get("maxCandidates") or 0)
    fewest = min(int(s.get("count", 0) or 0) for s in spec["skills"])
    if budget and budget < fewest:
        raise InvalidArgument(f"spec.gate.maxCandidates {budget} is below the prompts per skill ({fewest}): the first round must "
                              "render the first candidate of every prompt (SELMA as in the paper trains on it); raise it or use "
                              "fewer prompts", field="max_candidates")
    tc = spec["training"]["config"]
    tc["seed"] = seed
    if cfg.steps:
        tc["maxSteps"] = cfg.steps
        tc["checkpointEvery"] = max(1, min(int(tc.get("checkpointEvery", cfg.steps)), cfg.steps))
    if cfg.epochs:
        tc["epochs"] = cfg.epochs
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
    identity = model_identity(tc["baseModel"]["source"])
    digest = hashlib.sha256(json.dumps([digest_doc, cfg.eval_per_skill, identity], sort_keys=True, default=str).encode()).hexdigest()[:6]
    name = f"{base[:40]}-{digest}-s{seed}"
    raw["metadata"]["name"] = name
    spec.setdefault("merge", {})["modelName"] = name
    spec.pop("evaluation", None)  # the table evaluates every configuration itself
    return parse_skillset(yaml.safe_dump(raw, sort_keys=False), source=f"{cfg.skillset} (seed {seed})")


def model_identity(source: str) -> str:
    """What the base model is, for the run name: a local pipeline directory by the sha256 of its files, else the reference.

    The same path with other weights (the ShapesWorld base retrained, say) is another run: its jobs'
    idempotency keys differ, so a table never attaches to experts trained on the old weights.
    """
    path = Path(source)
    if not path.is_absolute() or not path.is_dir():
        return source
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    stamp = tuple((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _directory_digest(str(path), stamp)


@functools.lru_cache(maxsize=8)
def _directory_digest(root: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the files' relative names and bytes; cached by (name, size, mtime), so a table's seeds hash a model once."""
    from selma.artifacts import tree_sha256

    return f"sha256:{tree_sha256(root, [name for name, _, _ in stamp])}"


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


# Expert sets beside the run's own (gated) experts; each trains under its own stage name
# (``training-<set>``, idempotency key ``<run>/<skill>/training-<set>``) and merges as ``merge-<set>``.
EXPERT_SETS = ("ungated", "oracle")


class TableRunner:
    """Drives the table's jobs through the services (see the module docstring)."""

    def __init__(self, client: Any, store: ArtifactStore, cfg: TableConfig, state_dir: Path, reporter: Any) -> None:
        self.client = client
        self.store = store
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.reporter = reporter
        self.local_seconds: dict[str, float] = {}  # this process's own work per seed: held-out sets, oracle renders, mix

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
        skills = [s.name for s in ss.skills]
        self.local_seconds = {}
        note = self.reporter.note
        runs_dir = self.state_dir / "runs"
        with RunLock(runs_dir / f"{run}.lock"):
            state = RunState.open(runs_dir, ss)
            driver = RunDriver(self.client, ss, state, self.reporter)
            k = ss.gate.candidates_per_prompt or 1
            note(f"seed {seed} (run {run}): prompts → best-of-{k} render rounds and the gate → one expert per skill → merge")
            result = driver.run_interruptible()
            stages = state.data["stages"]
            prompt_sets = {s: stages[f"{s}/prompts"]["output"]["id"] for s in skills}
            # Round 0 renders candidate 0 of every prompt: one image per prompt, the paper's (ungated) training data.
            first_round = {s: stages[f"{s}/render"]["output"]["id"] for s in skills}
            gate = {s: dict(stages[f"{s}/gate"]["summary"]) for s in skills}
            kept = {s: gate[s]["dataset"] for s in skills}
            experts = dict(result["experts"])

            note(f"seed {seed}: held-out prompts, ground-truth renders (oracle), all skills' gated data (mixed)")
            heldout = {}
            for s in ss.skills:
                examples = list(s.inline.seed_examples) if s.inline is not None else []
                heldout[s.name] = self._timed("heldout", publish_heldout, self.store, run=run, skill=s.name, examples=examples,
                                              n=self.cfg.eval_per_skill, seed=seed, training_prompt_sets=list(prompt_sets.values())).id
            size = ss.render.diffusion.width or 64
            oracle_data = {s: self._timed("oracle-data", publish_oracle, self.store, prompt_sets[s], run=run, skill=s, seed=seed, size=size).id
                           for s in skills}
            mixed = self._timed("mix", mix_datasets, self.store, kept, run=run)

            def train(skill: str | None, expert_set: str, dataset_id: str) -> str:
                config = ss.training_config_for(skill) if skill else ss.training_config
                spec = training_service_pb2.ExpertTrainingSpec(run=run, skill=skill or MIXED_SKILL, dataset=common_pb2.ArtifactRef(id=dataset_id),
                                                               config=config, placement=ss.placement, distributed=ss.training_distributed)
                return driver.drive("training", skill, spec, stage=f"training-{expert_set}").status.output.id

            def merge(expert_set: str, model_name: str, ids: Mapping[str, str]) -> str:
                spec = common_pb2.MergeSpec(method=ss.merge_method, density=ss.merge_density, output_rank=ss.merge_output_rank)
                for name in sorted(ids):
                    spec.experts.add(expert_id=ids[name])
                driver.drive("merge", None, serving_service_pb2.MergeJobSpec(run=run, model_name=model_name, merge=spec, register=True,
                                                                              load=True, replace=True), stage=f"merge-{expert_set}")
                return model_name

            note(f"seed {seed}: the paper's ungated experts, the oracle's experts, their merges, the mixed LoRA")
            data = {"ungated": first_round, "oracle": oracle_data}
            sets = {name: {s: train(s, name, data[name][s]) for s in skills} for name in EXPERT_SETS}
            models = {name: merge(name, f"{run}-{name}"[:63], ids) for name, ids in sets.items()}
            mixed_expert = train(None, MIXED_SKILL, mixed.id)

            ev = evaluation_service_pb2.EvaluationSpec(run=run, benchmark=evaluation_service_pb2.EVALUATION_BENCHMARK_PROMPT_SET,
                                                     diffusion=ss.render.diffusion, images_per_prompt=1, base_seed=seed,
                                                     metrics=[evaluation_service_pb2.EVALUATION_METRIC_DSG], placement=ss.placement)
            ev.vqa.shapesworld_judge.SetInParent()
            ev.labels["title"] = f"ShapesWorld table, seed {seed}"
            for s in skills:
                ev.prompt_sets.add(id=heldout[s])
            ev.targets.add(label="base")
            ev.targets.add(label="merged-ungated", model_name=models["ungated"])
            ev.targets.add(label="merged", model_name=ss.model_name)
            t = ev.targets.add(label="mixed")
            t.experts.method = common_pb2.MERGE_METHOD_MEAN_DELTA
            t.experts.experts.add(expert_id=mixed_expert, weight=1.0)
            for s in skills:
                t = ev.targets.add(label=f"expert-{s}")
                t.experts.method = common_pb2.MERGE_METHOD_MEAN_DELTA
                t.experts.experts.add(expert_id=experts[s], weight=1.0)
            ev.targets.add(label="merged-oracle", model_name=models["oracle"])
            note(f"seed {seed}: evaluating {len(ev.targets)} configurations on {len(skills)}×{self.cfg.eval_per_skill} held-out prompts with the judge")
            # The key names the spec's digest: a table whose evaluation changed (other targets, say) starts a new
            # evaluation while the training jobs before it are still attached to, not refused as a key clash.
            ev_digest = hashlib.sha256(ev.SerializeToString(deterministic=True)).hexdigest()[:8]
            job = driver.drive("evaluation", f"eval-{ev_digest}", ev)
            scores: dict[str, dict[str, float]] = {}
            for row in job.stats.scores:
                if row.metric == evaluation_service_pb2.EVALUATION_METRIC_DSG and not row.category:
                    scores.setdefault(row.target_label, {})[row.skill] = row.score_percent
            # This process's own stages (held-out sets, oracle renders, mix; seconds) as the run that did the work measured
            # them (a re-run that only finds the published artifacts would report ~0 s); raw facts only, not in the table's
            # text, which depends on the jobs' records alone.
            jobs = self.finished_jobs(state, f"eval-{ev_digest}")  # one Get per job, for the timings and the steps below
            local_seconds = (state.data.get("table") or {}).get("local_seconds") or {
                k: round(v, 1) for k, v in self.local_seconds.items()}
            tc = ss.training_config
            facts = {
                "prompts": {s: _count(self.store, prompt_sets[s]) for s in skills},
                "gate": {s: {k: gate[s][k] for k in ("candidates", "kept", "pass_rate_percent", "prompts_kept", "prompts_total", "round")}
                         for s in skills},
                "heldout": {s: self.cfg.eval_per_skill for s in skills},
                "experts": experts, "ungated_experts": sets["ungated"], "oracle_experts": sets["oracle"], "mixed_expert": mixed_expert,
                "merged_model": result["merged_model"], "models": models, "datasets": {"prompt_sets": prompt_sets, "kept": kept, "first_round": first_round,
                                                                                         "oracle": oracle_data, "mixed": mixed.id},
                "eval_report": job.status.output.id, "stage_seconds": stage_seconds(jobs), "span_seconds": span_seconds(jobs),
                "steps": training_steps(jobs), "local_seconds": local_seconds, "skills": skills,
                "model": template_model(self.cfg), "rank": tc.lora.rank, "alpha": tc.lora.alpha, "learning_rate": tc.learning_rate,
                "epochs": tc.epochs if tc.HasField("epochs") else None, "max_steps": tc.max_steps, "batch_size": tc.batch_size,
                "render": _diffusion_text(ss.render), "merge": enum_text(ss.merge_method),
                "gate_settings": {"threshold": ss.gate.threshold if ss.gate.HasField("threshold") else 1.0, "k": k,
                                  "target_kept": ss.gate.target_kept, "max_candidates": ss.gate.max_candidates},
            }
            state.set(phase="succeeded", table={"scores": scores, "local_seconds": local_seconds})
        return SeedResult(seed=seed, run=run, scores=scores, facts=facts)

    def finished_jobs(self, state: Any, evaluation: str) -> list[tuple[str, float, float, int]]:
        """(stage label, started, finished, training steps or 0) of every finished job of the run, in epoch seconds.

        ``evaluation``: the current evaluation's stage label (earlier evaluations of the run are left out).
        Labels: the stage kind (gate and render rounds count as ``gate`` and ``render``), training split
        into ``training`` (gated experts), ``training-ungated``, ``training-oracle`` and ``training-mixed``.
        """
        out = []
        for st in state.data["stages"].values():
            if not st.get("job_id") or (st["stage"] == "evaluation" and st.get("skill") != evaluation):
                continue
            kind = str(st["stage"]).split("-")[0]  # render-3 → render, gate-2 → gate
            job = self.client.jobs(kind).get(st["job_id"])
            s = job.status
            if not (s.HasField("started_at") and s.HasField("finished_at")):
                continue
            stage = str(st["stage"])
            label = stage if kind in ("training", "merge") else kind  # training-ungated, merge-oracle, …; render-3 → render
            steps = int(job.stats.max_steps) if kind == "training" else 0
            out.append((label, s.started_at.ToDatetime().timestamp(), s.finished_at.ToDatetime().timestamp(), steps))
        return out


def stage_seconds(jobs: Sequence[tuple[str, float, float, int]]) -> dict[str, float]:
    """Seconds each job took on its service (started → finished), summed per stage, from :meth:`TableRunner.finished_jobs`."""
    out: dict[str, float] = {}
    for label, start, end, _ in jobs:
        out[label] = round(out.get(label, 0.0) + end - start, 1)
    return out


def span_seconds(jobs: Sequence[tuple[str, float, float, int]]) -> float:
    """Wall time of a seed's jobs: first start to last finish (the same when a re-run only attaches)."""
    return round(max(j[2] for j in jobs) - min(j[1] for j in jobs), 1) if jobs else 0.0


def training_steps(jobs: Sequence[tuple[str, float, float, int]]) -> dict[str, list[int]]:
    """Optimizer steps of each training job (resolved from epochs and the data), per training label."""
    out: dict[str, list[int]] = {}
    for label, _, _, steps in jobs:
        if label.startswith("training"):
            out.setdefault(label, []).append(steps)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _count(store: ArtifactStore, prompt_set_id: str) -> int:
    return len(prompt_texts(store, prompt_set_id))


def enum_text(value: int) -> str:
    from selma.api import enum_name
    from selma.v1 import common_pb2

    return enum_name(common_pb2.MergeMethod, value)


def _diffusion_text(render: Any) -> str:
    d = render.diffusion
    from selma.api import enum_name
    from selma.v1 import common_pb2

    sched = enum_name(common_pb2.Scheduler, d.scheduler)
    g = f", guidance {d.guidance_scale:g}" if d.HasField("guidance_scale") else ""
    return f"{sched} {d.steps} steps{g}, {d.width}×{d.height}"


# ------------------------------------------------------------------------------------ table text

ROW_LABELS = (
    ("base", "base model"),
    ("merged-ungated", "SELMA as in the paper: merged experts, one ungated image per prompt"),
    ("merged", "SELMA with the gate: merged experts, best-of-K gated data"),
    ("mixed", "one LoRA on all skills' gated data (mixed)"),
    ("expert-*", "single expert (gated data): {skill}"),
    ("merged-oracle", "oracle: merged experts on ground-truth renders"),
)
DIFF_COLUMN = "Δ overall vs base (paired)"


def table_rows(results: Sequence[SeedResult]) -> tuple[list[str], list[tuple[str, list[list[float]], list[float]]]]:
    """(columns, [(row name, per column the per-seed values, per-seed overall − base overall)]); columns = skills + overall.

    The difference pairs each seed's row with that seed's base (same held-out prompts, same seeds of
    the images), so the spread between seeds' prompt sets cancels out of it.
    """
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
            diffs = [] if label == "base" else [r.scores[label][""] - r.scores["base"][""] for r in results
                                                if "" in r.scores.get(label, {}) and "" in r.scores.get("base", {})]
            rows.append((name, cells, diffs))
    return columns, rows


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}"


def paired(diffs: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean) of per-seed differences; SE None with one seed."""
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None
    return mean, se


def _diff_cell(diffs: list[float]) -> str:
    if not diffs:
        return "–"
    mean, se = paired(diffs)
    if se is None:
        return f"{mean:+.1f}"
    return f"{mean:+.1f} ± {se:.1f}" + (" (> 2 SE)" if abs(mean) > 2 * se else "")


def render_table(results: Sequence[SeedResult], cfg: TableConfig) -> str:
    """The Markdown table with how it was obtained; a re-run that attaches to the same jobs gives the same bytes."""
    columns, rows = table_rows(results)
    seeds = ", ".join(str(r.seed) for r in results)
    spread = "mean ± sample standard deviation over seeds" if len(results) > 1 else "one seed, no spread"
    f0 = results[0].facts
    lines = [
        f"DSG-style score (%, mean over held-out prompts; a question counts only if its parent questions pass), judged by the "
        f"ShapesWorld judge; {spread} ({seeds}). Last column: the row's overall score minus the base's in the same seed, mean "
        f"over seeds ± its standard error.",
        "",
        "| configuration | " + " | ".join([*columns, DIFF_COLUMN]) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for name, cells, diffs in rows:
        lines.append(f"| {name} | " + " | ".join([*(_cell(c) for c in cells), _diff_cell(diffs)]) + " |")

    def per_skill(fn: Any) -> str:
        return ", ".join(f"{s} {fn(s)}" for s in f0["skills"])

    def mean_of(key: str) -> Any:
        return lambda s: f"{statistics.fmean(r.facts[key][s] for r in results):.0f}"

    def gate_text(s: str) -> str:
        c = sum(r.facts["gate"][s]["candidates"] for r in results)
        k = sum(r.facts["gate"][s]["kept"] for r in results)
        pk = sum(r.facts["gate"][s]["prompts_kept"] for r in results)
        pt = sum(r.facts["gate"][s]["prompts_total"] for r in results)
        return f"{k} of {c} candidates kept ({100 * k / c if c else 0:.1f}%; {pk}/{pt} prompts)"

    def steps_text(label: str) -> str:
        values = [v for r in results for v in r.facts["steps"].get(label, [])]
        if not values:
            return "–"
        lo, hi = min(values), max(values)
        return f"{lo}" if lo == hi else f"{lo}–{hi}"

    stage: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.facts["stage_seconds"].items():
            stage.setdefault(k, []).append(v)
    timing = ", ".join(f"{k} {statistics.fmean(v):.0f} s" for k, v in sorted(stage.items()))
    spans = ", ".join(f"seed {r.seed} {r.facts.get('span_seconds', 0.0) / 60:.1f} min" for r in results)
    g = f0["gate_settings"]
    recipe = f"LoRA rank {f0['rank']} (alpha {f0['alpha']:g}), learning rate {f0['learning_rate']:g}, batch {f0['batch_size']}, "
    recipe += (f"{f0['epochs']:g} epochs over each expert's data (at most {f0['max_steps']} steps)" if f0.get("epochs")
               else f"{f0['max_steps']} steps")
    lines += [
        "",
        f"How it was obtained: `{cfg.command or 'selma shapesworld table'}` (per seed, first job start to last job end: {spans}). "
        f"Base model `{f0['model']}`; prompts from the ShapesWorld grammar backend through the prompt service (per skill, mean "
        f"over seeds: {per_skill(mean_of('prompts'))}); candidate images rendered by the base model itself ({f0['render']}). "
        f"The run's gate stage (`spec.gate`): the ShapesWorld judge answers each caption's DSG questions, an image is kept at a score "
        f">= {g['threshold']:g}; best-of-{g['k']} rounds render another candidate for prompts without a kept image until "
        f"{g['target_kept'] or 'every prompt has'} kept images or {g['max_candidates'] or 'K × prompts'} candidates per skill; all seeds "
        f"together: {per_skill(gate_text)}. Experts: {recipe}; steps per expert: gated {steps_text('training')}, ungated "
        f"{steps_text('training-ungated')}, oracle {steps_text('training-oracle')}, mixed {steps_text('training-mixed')}. "
        f"SELMA as in the paper trains the same recipe on the first candidate of every prompt (one image per prompt, no gate); "
        f"the oracle on one ground-truth render of every training caption; the mixed LoRA on all skills' gated images together; "
        f"single experts are the base plus that expert at weight 1; merges: {f0['merge']}. Held-out test prompts: "
        f"{per_skill(mean_of('heldout'))} per seed, generated apart from and checked against the training prompts, questions "
        f"from the grammar. Job time per seed (mean, summed per stage; jobs of different skills overlap): {timing}.",
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


def run_table(cfg: TableConfig, *, client: Any, store: ArtifactStore, state_dir: Path, reporter: Any) -> tuple[str, list[SeedResult], float]:
    """Run (or resume) every seed; returns (Markdown, seed results, this invocation's wall seconds)."""
    t0 = time.perf_counter()
    runner = TableRunner(client, store, cfg, state_dir, reporter)
    results = [runner.run_seed(seed) for seed in cfg.seeds]
    wall = time.perf_counter() - t0
    return render_table(results, cfg), results, wall


# ------------------------------------------------------------------------------------ CLI


def register_loop(actions: argparse._SubParsersAction) -> None:
    """Add ``table``, ``heldout`` and ``mix`` to ``selma shapesworld``'s subcommands."""
    p = actions.add_parser("table", help="reproduce the SELMA table in ShapesWorld through the services (resumable)",
                           description="Per seed: the SkillSet run with its gate stage (grammar prompts, best-of-K candidates from the base "
                           "model, the judge keeps the right ones, one expert per skill, merge); SELMA as in the paper (experts on the first "
                           "candidate of every prompt, no gate); an oracle (experts on ground-truth renders of the same captions); one LoRA "
                           "on all skills' gated data; then one evaluation of all on held-out prompts with the judge. Starts the services "
                           "(selma up) unless --endpoints is given. Re-running attaches to finished jobs and writes the same table.")
    p.add_argument("--skillset", type=Path, default=DEFAULT_SKILLSET,
                   help="SkillSet template with a gate: section (default: selma_shapesworld/data/skillset-gated.yaml)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--prompts-per-skill", type=int, default=0, help="training prompts per skill (default: the SkillSet's counts)")
    p.add_argument("--steps", type=int, default=0, help="most LoRA training steps per expert (default: the SkillSet's maxSteps)")
    p.add_argument("--epochs", type=float, default=0.0, help="passes over each expert's data; steps follow the data up to --steps "
                   "(default: the SkillSet's epochs)")
    p.add_argument("--eval-per-skill", type=int, default=64, help="held-out test prompts per skill and seed (default 64)")
    p.add_argument("--skills", default="", help="comma-separated subset of the SkillSet's skills (default all)")
    p.add_argument("--model", default="", help="base model override, e.g. tiny://sd (default: the SkillSet's)")
    p.add_argument("--render-steps", type=int, default=0, help="denoising steps for training images and evaluation (default: the SkillSet's)")
    p.add_argument("--gate-threshold", type=float, default=None, help="the gate's keep threshold, a DSG score in [0, 1] (default: the SkillSet's)")
    p.add_argument("--candidates", type=int, default=0, help="best-of-K: candidates per prompt (default: the SkillSet's candidatesPerPrompt)")
    p.add_argument("--target-kept", type=int, default=None, help="kept images per skill that end the rounds (default: the SkillSet's targetKept)")
    p.add_argument("--max-candidates", type=int, default=None, help="candidate budget per skill (default: the SkillSet's maxCandidates)")
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
    # The four skills' candidate rounds render side by side, one pipeline call per OMP_NUM_THREADS cores
    # (a single one-threaded call leaves the other cores idle); the user's own settings win.
    try:
        threads = max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        threads = 1
    calls = str(max(1, min(4, (os.cpu_count() or 1) // threads)))
    for name in ("SELMA_RENDER_MAX_CONCURRENT_JOBS", "SELMA_RENDER_DEVICE_CONCURRENCY"):
        if name not in os.environ:
            env[name] = calls
    return env


# Flags that say where output goes or how to reach the services, not what is computed: left out of the
# command the table names, so a re-run with --readme (or against other endpoints) writes the same bytes.
_OUTPUT_FLAGS = {"--out": True, "--readme": True, "--dir": True, "--endpoints": True, "--storage": True, "--plain": False}


def _command_line(argv: Sequence[str] | None = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    argv = argv[argv.index("table"):] if "table" in argv else ["table"]
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _OUTPUT_FLAGS:
            skip = _OUTPUT_FLAGS[name] and "=" not in a
            continue
        kept.append(a)
    return "selma shapesworld " + " ".join(shlex.quote(a) for a in kept)


def _table(args: argparse.Namespace) -> int:
    from rich.console import Console

    from selma.app.local_stack import LocalStack, sigterm_interrupts
    from selma.app.runner import Reporter
    from selma.client import Endpoints, SelmaClient

    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise InvalidArgument(f"--seeds {args.seeds!r} is not a comma-separated list of integers", field="seeds") from None
    if not seeds:
        raise InvalidArgument("give at least one seed", field="seeds")
    cfg = TableConfig(skillset=args.skillset, seeds=seeds, prompts_per_skill=args.prompts_per_skill or None, steps=args.steps or None,
                      epochs=args.epochs or None, eval_per_skill=args.eval_per_skill, skills=tuple(s for s in args.skills.split(",") if s),
                      model=args.model or None, render_steps=args.render_steps or None, gate_threshold=args.gate_threshold,
                      candidates=args.candidates or None, target_kept=args.target_kept, max_candidates=args.max_candidates,
                      command=_command_line())
    model = configured_skillset(cfg, seeds[0]).training_config.base_model.source
    console = Console(soft_wrap=True)
    stack = None
    state_dir = args.dir.resolve()
    try:
        if args.endpoints:
            endpoints = Endpoints.load(args.endpoints)
            store = _store(args.storage)
        else:
            stack = LocalStack(state_dir / "stack", extra_env=stack_env(model))
            sigterm_interrupts()  # a SIGTERM (also while the services start) stops the stack in the finally below, as Ctrl-C does
            console.print(f"starting the services (selma up) in {stack.data_dir}, base model {model} …")
            endpoints = stack.start(timeout=300)
            store = _store((stack.data_dir / "storage").as_uri())
        with SelmaClient(endpoints) as client, Reporter(console, live=False if args.plain else None) as reporter:
            text, results, wall = run_table(cfg, client=client, store=store, state_dir=state_dir, reporter=reporter)
    finally:
        if stack is not None:
            stack.stop()
    console.print(text, highlight=False, markup=False)
    console.print(f"(this invocation: {wall / 60:.1f} min)", highlight=False, markup=False)
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
