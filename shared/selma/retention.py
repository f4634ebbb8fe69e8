"""Retention: what storage keeps, deleting a run, and collecting everything nothing references.

Storage holds artifacts (``artifacts/<id>/``), aliases (registered model names), durable job
records (``jobs/<kind>/<job_id>.json``) and job scratch (``training/<job_id>/``,
``evaluation/<job_id>/``, ``prompts/state/<job_id>/``: checkpoints, progress, resumable state) and
the gate's score journals (``gate/scores/<digest>/<dataset>.<content digest>/``: what the VQA
model said of a candidate dataset's images, kept while that dataset is).

**What is kept (the roots).** Every artifact an alias names (a registered model); every artifact
a stored job record mentions (its output, its inputs, the config and cache ids in its stats),
whatever the job's phase; and, while any job is PENDING, RUNNING or CANCELLING, everything that
job may be using: the artifact ids its idempotency key derives (its output while it is written)
and anything written since the oldest such job was created.  Anything younger than the grace
period is kept too.  Everything reachable from a root through lineage parents is kept.

**What is collected.** Published artifacts nothing keeps (failed attempts' outputs, superseded
latent caches, what a deleted run or model left), staging leftovers (an artifact prefix with no
manifest: a writer that died) and the scratch of jobs whose record is gone, both once older than
the grace period; gate score journals whose dataset is collected or gone.

**Crash safety.** The plan is computed before anything is deleted, and only what it names is
deleted, so a retained artifact is never touched.  Artifacts are deleted children first, each
manifest first (``ArtifactStore.delete``), so at any instant every published artifact's parents
are published and a half-deleted artifact is merely an unpublished leftover that the next run
removes.  Job records are re-read between batches: a job that starts during collection protects
what it uses from the next batch on.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import ValidationError

from selma.artifacts import (
    ALIASES_PREFIX,
    ARTIFACTS_PREFIX,
    MANIFEST_NAME,
    Alias,
    ArtifactKind,
    ArtifactStore,
    Manifest,
    new_artifact_id,
)
from selma.errors import FailedPrecondition, InvalidArgument, NotFound, SelmaError
from selma.storage import ObjectInfo, Storage

log = logging.getLogger(__name__)

JOBS_PREFIX = "jobs/"
# Where jobs keep scratch, one folder per job id (training/evaluation work prefixes, prompt state).
GATE_SCORES_PREFIX = "gate/scores/"  # the gate's score journals: <digest>/<dataset id>.<content digest>/ (selma_evaluation.gate)
SCRATCH_PREFIXES = ("training/", "evaluation/", "prompts/state/", "render/")  # render/: sharded renders' work docs and shard journals
ACTIVE_PHASES = frozenset({"PENDING", "RUNNING", "CANCELLING"})
RUN_LABEL = "selma.dev/run"

_JOB_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*-[0-9a-f]{16}$")
_KIND_PREFIXES = "|".join(sorted((re.escape(k.id_prefix) for k in ArtifactKind), key=len, reverse=True))
# An artifact id inside any string of a job record (a bare id, or a URI ending in artifacts/<id>/...).
_ARTIFACT_REF_RE = re.compile(rf"(?<![a-z0-9-])((?:{_KIND_PREFIXES})-[0-9a-f]{{20}})(?![0-9a-z-])")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------- job records


@dataclass(frozen=True)
class StoredJob:
    """A job record as storage holds it, read as plain JSON (any service's kind)."""

    key: str
    job_id: str
    kind: str
    phase: str
    run: str
    idempotency_key: str
    created_at: datetime | None
    refs: frozenset[str]
    model_names: frozenset[str] = frozenset()  # registered model names the job uses or registers

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def derived_ids(self) -> set[str]:
        """Every artifact id this job's idempotency key derives (its outputs while they are written)."""
        if not self.idempotency_key:
            return set()
        return {new_artifact_id(kind, self.idempotency_key) for kind in ArtifactKind}


def artifact_refs(value: Any) -> set[str]:
    """Artifact ids mentioned anywhere in a JSON value (ids, and URIs ending in artifacts/<id>/...)."""
    out: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            out.update(_ARTIFACT_REF_RE.findall(v))
        elif isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


_MODEL_NAME_KEYS = frozenset({"model_name", "modelName", "registered_model_name", "registeredModelName"})


def model_names(value: Any) -> set[str]:
    """Registered model names a JSON value mentions (``model_name`` fields at any depth)."""
    out: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Mapping):
            for k, item in v.items():
                if k in _MODEL_NAME_KEYS and isinstance(item, str) and item:
                    out.add(item)
                else:
                    stack.append(item)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return out


def active_jobs_using_model(storage: Storage, name: str) -> list[StoredJob]:
    """Pending or running jobs (any service) whose spec or stats name the registered model ``name``."""
    return [j for j in load_jobs(storage) if j.active and name in j.model_names]


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def load_jobs(storage: Storage) -> list[StoredJob]:
    """Every job record under ``jobs/``.  An unreadable record counts as active (it might be)."""
    try:
        objects = storage.list(JOBS_PREFIX)
    except NotFound:
        return []
    out = []
    for obj in objects:
        if not obj.key.endswith(".json"):
            continue
        try:
            raw = storage.get_bytes(obj.key)
        except NotFound:  # deleted since the listing
            continue
        kind = obj.key[len(JOBS_PREFIX):].split("/", 1)[0]
        job_id = obj.key.rsplit("/", 1)[-1].removesuffix(".json")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError as e:
            log.warning("job record %s is unreadable (%s); treating it as active", obj.uri, e)
            out.append(StoredJob(obj.key, job_id, kind, "PENDING", "", "", None, frozenset(_ARTIFACT_REF_RE.findall(raw.decode(errors="replace")))))
            continue
        out.append(
            StoredJob(
                key=obj.key,
                job_id=str(doc.get("job_id") or job_id),
                kind=str(doc.get("kind") or kind),
                phase=str(doc.get("phase") or "PENDING"),
                run=str(doc.get("run") or ""),
                idempotency_key=str(doc.get("idempotency_key") or ""),
                created_at=_parse_time(doc.get("created_at")),
                refs=frozenset(artifact_refs(doc)),
                model_names=frozenset(model_names(doc)),
            )
        )
    return out


# -------------------------------------------------------------------------------- the inventory


@dataclass
class _Prefix:
    """The objects under one artifact id's prefix."""

    artifact_id: str
    objects: list[ObjectInfo] = field(default_factory=list)

    @property
    def has_manifest(self) -> bool:
        return any(o.key.endswith(f"/{MANIFEST_NAME}") and o.key.count("/") == 2 for o in self.objects)

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def newest(self) -> datetime | None:
        times = [o.modified for o in self.objects if o.modified is not None]
        return max(times) if times else None


@dataclass
class _Inventory:
    prefixes: dict[str, _Prefix]
    manifests: dict[str, Manifest]  # published and readable
    unreadable: set[str]  # published, manifest unreadable: kept, never guessed at
    aliases: dict[str, str]  # alias name -> artifact id


def _inventory(store: ArtifactStore) -> _Inventory:
    storage = store.storage
    prefixes: dict[str, _Prefix] = {}
    try:
        objects = storage.list(f"{ARTIFACTS_PREFIX}/")
    except NotFound:
        objects = []
    for obj in objects:
        parts = obj.key.split("/")
        if len(parts) < 3:
            continue
        prefixes.setdefault(parts[1], _Prefix(parts[1])).objects.append(obj)
    manifests: dict[str, Manifest] = {}
    unreadable: set[str] = set()
    for aid, prefix in prefixes.items():
        if not prefix.has_manifest:
            continue
        try:
            manifests[aid] = store.get(aid)
        except NotFound:  # deleted since the listing
            continue
        except (FailedPrecondition, InvalidArgument) as e:
            log.warning("keeping artifact prefix %s: its manifest is unreadable (%s)", aid, e)
            unreadable.add(aid)
    return _Inventory(prefixes, manifests, unreadable, _aliases(store))


def _aliases(store: ArtifactStore) -> dict[str, str]:
    """Alias name → artifact id.  An unreadable alias stops everything: its target cannot be known, so nothing is safe to remove."""
    try:
        objects = store.storage.list(f"{ALIASES_PREFIX}/")
    except NotFound:
        return {}
    out = {}
    for obj in objects:
        try:
            alias = Alias.model_validate_json(store.storage.get_bytes(obj.key))
        except NotFound:  # deleted since the listing
            continue
        except ValidationError as e:
            raise FailedPrecondition(f"alias {obj.uri} is unreadable ({e.error_count()} errors); repair or delete it before collecting garbage") from None
        out[alias.name] = alias.artifact_id
    return out


def _closure(seeds: Iterable[str], manifests: Mapping[str, Manifest]) -> set[str]:
    """The seeds and all their ancestors (ids without a manifest are included, not followed)."""
    seen: set[str] = set()
    stack = list(seeds)
    while stack:
        aid = stack.pop()
        if aid in seen:
            continue
        seen.add(aid)
        m = manifests.get(aid)
        if m is not None:
            stack.extend(m.parents)
    return seen


def _children_first(ids: Iterable[str], manifests: Mapping[str, Manifest]) -> list[str]:
    """``ids`` ordered so that every artifact comes before its parents (a DAG: depth-first post-order)."""
    wanted = set(ids)
    children: dict[str, list[str]] = {aid: [] for aid in wanted}
    for aid in wanted:
        for p in manifests[aid].parents if aid in manifests else ():
            if p in wanted:
                children[p].append(aid)
    order: list[str] = []
    done: set[str] = set()
    for root in sorted(wanted):
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            aid, expanded = stack.pop()
            if aid in done:
                continue
            if expanded:
                done.add(aid)
                order.append(aid)
                continue
            stack.append((aid, True))
            stack.extend((c, False) for c in sorted(children[aid]) if c not in done)
    return order  # each artifact after all its descendants


# ------------------------------------------------------------------------------ garbage collection


@dataclass(frozen=True)
class Removal:
    """One thing collection removes (or, in a dry run, would remove)."""

    what: str  # "artifact", "staging" or "scratch"
    key: str  # the artifact id, or the storage prefix
    kind: str  # the artifact kind ("" for scratch)
    size: int
    reason: str


@dataclass
class GcReport:
    """What a collection removed (or would remove) and what it kept."""

    dry_run: bool
    removals: list[Removal] = field(default_factory=list)
    retained: int = 0
    skipped: list[str] = field(default_factory=list)  # planned, then kept: a job started using it meanwhile

    @property
    def bytes_freed(self) -> int:
        return sum(r.size for r in self.removals)


@dataclass
class _Protection:
    roots: set[str]
    newer_than: datetime  # an artifact published at or after this is kept
    modified_since: datetime  # an object modified at or after this is kept (whole seconds: S3's precision)
    job_ids: set[str]


def _protection(inv: _Inventory, jobs: list[StoredJob], *, now: datetime, grace: timedelta) -> _Protection:
    roots = set(inv.aliases.values()) | set(inv.unreadable)
    newer_than = modified_since = now - grace
    for job in jobs:
        roots |= job.refs
        if job.active:
            roots |= job.derived_ids()
            created = job.created_at or datetime.min.replace(tzinfo=timezone.utc)  # unknown age: nothing may go
            newer_than = min(newer_than, created)
            modified_since = min(modified_since, created.replace(microsecond=0))
    for aid, m in inv.manifests.items():
        if m.created_at >= newer_than:
            roots.add(aid)
    return _Protection(roots, newer_than, modified_since, {j.job_id for j in jobs})


def plan_gc(store: ArtifactStore, *, grace: timedelta, now: datetime | None = None) -> tuple[list[Removal], int]:
    """What collection would remove now, in a safe deletion order, and how many artifacts it keeps."""
    now = now or _utcnow()
    storage = store.storage
    inv = _inventory(store)
    prot = _protection(inv, load_jobs(storage), now=now, grace=grace)
    retained = _closure(prot.roots, inv.manifests)
    removals: list[Removal] = []
    garbage = [aid for aid in inv.manifests if aid not in retained]
    for aid in _children_first(garbage, inv.manifests):
        m = inv.manifests[aid]
        removals.append(Removal("artifact", aid, m.kind.value, inv.prefixes[aid].size, "no registered model, job or retained artifact references it"))
    for aid, prefix in sorted(inv.prefixes.items()):
        if aid in inv.manifests or aid in inv.unreadable or aid in retained:
            continue
        newest = prefix.newest
        if newest is None or newest >= prot.modified_since:
            continue
        removals.append(Removal("staging", f"{ARTIFACTS_PREFIX}/{aid}/", _kind_of(aid), prefix.size, "unpublished leftover (no manifest) older than the grace period"))
    for area in SCRATCH_PREFIXES:
        try:
            names = storage.list_dirs(area)
        except NotFound:
            continue
        for name in names:
            if not _JOB_ID_RE.match(name) or name in prot.job_ids:
                continue
            objects = storage.list(f"{area}{name}/")
            times = [o.modified for o in objects if o.modified is not None]
            if not objects or not times or max(times) >= prot.modified_since:
                continue
            removals.append(Removal("scratch", f"{area}{name}/", "", sum(o.size for o in objects), "scratch of a job that no longer exists"))
    removals += _gate_score_removals(storage, inv, retained, prot)
    return removals, len(retained & set(inv.manifests))


def _gate_score_removals(storage: Storage, inv: _Inventory, retained: set[str], prot: _Protection) -> list[Removal]:
    """The gate's score journals (``gate/scores/<digest>/<dataset>/``) of datasets that are gone or collected now.

    A journal only saves asking the VQA model again about a dataset's images, so it lives as long
    as its dataset: it goes with the dataset (after it, in the plan's order) or, when the dataset
    is already gone, once older than the grace period like any leftover.
    """
    out: list[Removal] = []
    try:
        digests = storage.list_dirs(GATE_SCORES_PREFIX)
    except NotFound:
        return out
    for digest in digests:
        for folder in storage.list_dirs(f"{GATE_SCORES_PREFIX}{digest}/"):
            dataset, _, content = folder.partition(".")  # <dataset id>.<content digest> (selma_evaluation.gate.journal_prefix)
            m = inv.manifests.get(dataset)
            if dataset in inv.unreadable or (dataset in retained and m is not None and m.digest.startswith(content)):
                continue
            prefix = f"{GATE_SCORES_PREFIX}{digest}/{folder}/"
            objects = storage.list(prefix)
            if not objects:
                continue
            if dataset not in inv.manifests or dataset in retained:
                # the dataset is gone (or is another dataset under the same id now): only once older than the grace
                # period, as a journal written beside a dataset published after this inventory would look the same
                times = [o.modified for o in objects if o.modified is not None]
                if not times or max(times) >= prot.modified_since:
                    continue
                why = "gate scores of a dataset that no longer exists"
            else:
                why = "gate scores of a dataset collected now"  # no job references it: its journal goes with it
            out.append(Removal("cache", prefix, "", sum(o.size for o in objects), why))
    return out


def _kind_of(artifact_id: str) -> str:
    for k in sorted(ArtifactKind, key=lambda k: len(k.id_prefix), reverse=True):
        if artifact_id.startswith(k.id_prefix + "-"):
            return k.value
    return ""


def collect_garbage(
    store: ArtifactStore,
    *,
    dry_run: bool = False,
    grace: timedelta = timedelta(hours=1),
    batch: int = 25,
    on_progress: Callable[[int, int], None] | None = None,
) -> GcReport:
    """Remove what no retained artifact references (see the module docstring); ``dry_run`` removes nothing.

    A dry run reports exactly the set a real run started at the same moment would remove.  Job
    records are re-read every ``batch`` removals; what a job started since then uses is skipped.
    """
    if grace < timedelta(0):
        raise InvalidArgument(f"the grace period must not be negative; got {grace}", field="grace")
    removals, retained = plan_gc(store, grace=grace)
    report = GcReport(dry_run=dry_run, retained=retained)
    if dry_run:
        report.removals = removals
        return report
    storage = store.storage
    protected: set[str] = set()
    new_jobs: set[str] = set()
    for i, r in enumerate(removals):
        if i and i % max(1, batch) == 0:
            protected, new_jobs = _newly_protected(store, removals)
        if (r.what == "scratch" and r.key.rstrip("/").rsplit("/", 1)[-1] in new_jobs) or (r.what != "scratch" and _artifact_id(r) in protected):
            report.skipped.append(r.key)
            log.info("gc: keeping %s: a job started using it", r.key)
            continue
        if r.what == "artifact":
            store.delete(r.key)  # manifest first: readers stop seeing it before any file goes
        else:
            storage.delete_prefix(r.key)
        report.removals.append(r)
        log.info("gc: removed %s %s (%d bytes): %s", r.what, r.key, r.size, r.reason)
        if on_progress:
            on_progress(i + 1, len(removals))
    log.info("gc: removed %d items (%d bytes); %d artifacts retained", len(report.removals), report.bytes_freed, report.retained)
    return report


def _artifact_id(r: Removal) -> str:
    if r.what == "staging":
        return r.key.split("/")[1]
    if r.what == "cache":
        return r.key.rstrip("/").rsplit("/", 1)[-1].partition(".")[0]  # gate/scores/<digest>/<dataset>.<content>/: its dataset
    return r.key


def _newly_protected(store: ArtifactStore, removals: list[Removal]) -> tuple[set[str], set[str]]:
    """(planned artifact ids a job now references, with their planned ancestors; the ids of every job now stored)."""
    jobs = load_jobs(store.storage)
    seeds: set[str] = set()
    for job in jobs:
        seeds |= job.refs
        if job.active:
            seeds |= job.derived_ids()
    planned = {_artifact_id(r) for r in removals if r.what != "scratch"}
    protected: set[str] = set()
    stack = list(seeds & planned)
    while stack:
        aid = stack.pop()
        if aid in protected:
            continue
        protected.add(aid)
        try:
            stack.extend(p for p in store.get(aid).parents if p in planned)
        except SelmaError:  # already gone, or never published (a staging prefix)
            continue
    return protected, {j.job_id for j in jobs}


# ------------------------------------------------------------------------------- deleting a run


@dataclass
class RunDeletion:
    """What deleting a run removes (or, in a dry run, would remove) and what it keeps."""

    run: str
    dry_run: bool
    jobs: list[str] = field(default_factory=list)  # job ids whose records go
    artifacts: list[Removal] = field(default_factory=list)
    scratch: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # artifact id -> what depends on it

    @property
    def bytes_freed(self) -> int:
        return sum(r.size for r in self.artifacts)


def delete_run(store: ArtifactStore, run: str, *, dry_run: bool = False) -> RunDeletion:
    """Delete a run: its jobs' records and scratch, and its artifacts that nothing outside it depends on.

    The run's artifacts are its jobs' outputs and every artifact labelled ``selma.dev/run=<run>``.
    One of them is kept (and reported with its dependant) when a registered model, an artifact of
    another run or another run's job depends on it through lineage.  FAILED_PRECONDITION while any
    of the run's jobs is pending or running; NOT_FOUND when no job or artifact belongs to the run.
    """
    if not isinstance(run, str) or not run or len(run) > 63:
        raise InvalidArgument("run is required: the run name (the SkillSet's metadata.name), at most 63 characters", field="run")
    storage = store.storage
    jobs = load_jobs(storage)
    mine = [j for j in jobs if j.run == run]
    active = [j for j in mine if j.active]
    if active:
        names = ", ".join(f"{j.job_id} ({j.phase.lower()})" for j in active[:5])
        raise FailedPrecondition(f"run {run!r} has {len(active)} unfinished job(s): {names}; cancel them or wait, then delete the run", field="run")
    inv = _inventory(store)
    owned = {aid for aid, m in inv.manifests.items() if m.labels.get(RUN_LABEL) == run}
    for j in mine:
        owned |= {aid for aid in j.refs if aid in inv.manifests and _is_output(aid, j, inv.manifests)}
    if not mine and not owned:
        raise NotFound(f"no run named {run!r}: no job or artifact carries it; `selma runs` lists runs", field="run")
    why: dict[str, str] = {}
    sources: list[tuple[str, Iterable[str]]] = [(f"registered model {name}", [aid]) for name, aid in sorted(inv.aliases.items())]
    sources += [(f"job {j.job_id}" + (f" of run {j.run}" if j.run else ""), sorted(j.refs)) for j in jobs if j.run != run]
    sources += [(f"{m.kind.value} {aid}" + (f" of run {m.labels[RUN_LABEL]}" if m.labels.get(RUN_LABEL) else ""), m.parents)
                for aid, m in sorted(inv.manifests.items()) if aid not in owned]
    for label, seeds in sources:
        for aid in _closure(seeds, inv.manifests):
            if aid in owned and aid not in why:
                why[aid] = label
    result = RunDeletion(run=run, dry_run=dry_run, kept=dict(sorted(why.items())))
    result.jobs = sorted(j.job_id for j in mine)
    doomed = _children_first((a for a in owned if a not in why), inv.manifests)
    result.artifacts = [Removal("artifact", aid, inv.manifests[aid].kind.value, inv.prefixes[aid].size, f"artifact of run {run}") for aid in doomed]
    job_ids = {j.job_id for j in mine}
    for area in SCRATCH_PREFIXES:
        try:
            names = storage.list_dirs(area)
        except NotFound:
            continue
        result.scratch += [f"{area}{n}/" for n in names if n in job_ids]
    if dry_run:
        return result
    # Records first: no service attaches a new Start to a finished job whose outputs are going.
    for j in mine:
        storage.delete(j.key)
    for r in result.artifacts:
        store.delete(r.key)
    for prefix in result.scratch:
        storage.delete_prefix(prefix)
    log.info("deleted run %s: %d job records, %d artifacts (%d bytes), %d scratch prefixes; kept %d artifacts others depend on",
             run, len(result.jobs), len(result.artifacts), result.bytes_freed, len(result.scratch), len(result.kept))
    return result


def _is_output(aid: str, job: StoredJob, manifests: Mapping[str, Manifest]) -> bool:
    """Whether ``aid``, mentioned by ``job``, is one of its outputs rather than an input from elsewhere."""
    m = manifests[aid]
    if m.labels.get(RUN_LABEL) == job.run:
        return True
    return aid in job.derived_ids()


__all__ = [
    "ACTIVE_PHASES",
    "active_jobs_using_model",
    "SCRATCH_PREFIXES",
    "GcReport",
    "Removal",
    "RunDeletion",
    "StoredJob",
    "artifact_refs",
    "collect_garbage",
    "delete_run",
    "load_jobs",
    "model_names",
    "plan_gc",
]
