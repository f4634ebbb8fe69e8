"""Sharded dataset renders: the render service coordinates, batch workers render.

A dataset render with ``shards`` > 0 does not render in the service's process.  The service (the
*coordinator*, :class:`ShardedRender`) writes a work document, launches the shard workers through
the batch launchers — one Kubernetes **Indexed Job** whose completion index is the shard, or one
local worker process per shard — follows them, and publishes the one ``image_dataset`` artifact
when every shard is complete.

Byte-identical to a single-worker render: the batches are the same as in-process (batch ``k`` is
items ``[k·b, (k+1)·b)`` of the (prompt, image) order, seeds derived per image), and a shard is a
contiguous range of whole batches (:func:`shard_batches`), so neither the composition of a batch
nor any seed depends on the shard count.

Storage, under ``render/<job id>/``::

    work.json          what every worker renders: the normalised spec, the dataset id, the shard count
    shard-<i>.json     shard i's journal: images stored (path, size, sha256), attempts, resolved model, complete

A worker uploads each image straight under the (unpublished) dataset artifact's ``files/`` and
rewrites its journal after every batch, so a killed worker loses at most the batch in flight and
its next attempt renders only the images its journal lacks.  The coordinator adopts the files the
journals name into the artifact's writer and writes the manifest last: a reader never sees a
partial dataset.  After any failure a new attempt of the job launches only the shards whose
journal is not complete (an Indexed Job's completed shards exit at once).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from selma.api import enum_name
from selma.artifacts import ARTIFACTS_PREFIX, ArtifactKind, ArtifactStore, FileEntry
from selma.batch.launchers import ContextMonitor, Launcher, LaunchRequest, LiveLaunches, Outcome
from selma.batch.progress import read_progress
from selma.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from selma.jobs import Interrupted, JobContext, JobResult, OutputRef
from selma.storage import Storage
from selma.v1 import common_pb2, render_service_pb2
from selma_render.dataset import (
    METADATA_FILE,
    Item,
    _Attempt,
    _scheduler_enum_name,
    dataset_labels,
    dataset_parameters,
    load_prompts,
    metadata_jsonl,
    plan_dataset_items,
    resolve_prompt_set,
    resolved_record,
)
from selma_render.renderer import Renderer, encode_png
from selma_render.spec import parse_dataset_spec

if TYPE_CHECKING:
    from selma_render.settings import RenderSettings

log = logging.getLogger(__name__)

WORK_FILE = "work.json"


def work_prefix(job_id: str) -> str:
    """Storage prefix of a sharded render's work document and shard journals."""
    return f"render/{job_id}"


def shard_key(job_id: str, index: int) -> str:
    return f"{work_prefix(job_id)}/shard-{index}.json"


def effective_shards(requested: int, n_batches: int) -> int:
    """Shards actually used: never more than there are batches (a shard is at least one whole batch)."""
    return max(1, min(requested, n_batches))


def shard_batches(n_batches: int, shards: int, index: int) -> range:
    """The batches shard ``index`` of ``shards`` renders: a contiguous, balanced range."""
    return range(index * n_batches // shards, (index + 1) * n_batches // shards)


def shard_items(items: list[Item], batch_size: int, shards: int, index: int) -> list[Item]:
    """The images of shard ``index``, in dataset order (whole batches of the fixed plan)."""
    n_batches = -(-len(items) // batch_size)
    b = shard_batches(n_batches, shards, index)
    return items[b.start * batch_size : b.stop * batch_size]


@dataclass(frozen=True)
class Work:
    """The work document: everything a shard worker needs besides the settings."""

    job_id: str
    spec: dict[str, Any]
    dataset_id: str
    shards: int

    def to_json(self) -> bytes:
        return json.dumps({"job_id": self.job_id, "spec": self.spec, "dataset_id": self.dataset_id, "shards": self.shards}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Work:
        d = json.loads(data)
        return cls(job_id=d["job_id"], spec=d["spec"], dataset_id=d["dataset_id"], shards=int(d["shards"]))


def shard_progress(doc: dict[str, Any] | None, index: int, total: int) -> dict[str, Any]:
    """One entry of ``DatasetRenderStats.shards`` from a shard journal (or its absence)."""
    doc = doc or {}
    return {
        "index": index,
        "images_total": total,
        "images_done": len(doc.get("files") or []),
        "attempts": len(doc.get("attempts") or []),
        "complete": bool(doc.get("complete")),
    }


class ShardedRender:
    """The coordinator: launch the missing shards, follow them, publish the dataset (see the module docstring)."""

    def __init__(self, settings: RenderSettings, store: ArtifactStore, launchers: dict[str, Launcher]) -> None:
        self.settings = settings
        self.store = store
        self.launchers = launchers
        self.live = LiveLaunches()
        self._lock = threading.Lock()

    @property
    def storage(self) -> Storage:
        return self.store.storage

    def launcher_name(self, placement: dict[str, Any]) -> str:
        return enum_name(common_pb2.LauncherKind, placement.get("launcher"), field="spec.placement.launcher") or self.settings.batch_launcher

    def __call__(self, ctx: JobContext, dataset_id: str) -> JobResult:
        msg = json_format.ParseDict(ctx.spec, render_service_pb2.DatasetRenderSpec(), ignore_unknown_fields=True)
        spec = parse_dataset_spec(msg, self.settings)
        cfg = spec.config
        prompt_set = resolve_prompt_set(self.store, spec.prompt_set)
        prompts = load_prompts(self.store, prompt_set, spec.max_prompts)
        skill = spec.skill or prompt_set.labels.get("selma.dev/skill", "")
        items = plan_dataset_items(self.store, prompts, spec)
        n_batches = -(-len(items) // cfg.batch_size)
        shards = effective_shards(spec.shards, n_batches)
        totals = [len(shard_items(items, cfg.batch_size, shards, i)) for i in range(shards)]
        placement = dict(ctx.spec.get("placement") or {})
        name = self.launcher_name(placement)
        launcher = self.launchers[name]
        work = Work(job_id=ctx.job_id, spec=ctx.spec, dataset_id=dataset_id, shards=shards)
        work_key = f"{work_prefix(ctx.job_id)}/{WORK_FILE}"
        self.storage.put_bytes(work_key, work.to_json(), content_type="application/json")
        ctx.update(details={"render.dataset_id": dataset_id, "render.shards": str(shards), "launcher": name,
                            "render.work": self.storage.uri_for(work_key)},
                   stats={"prompts_total": len(prompts), "images_total": len(items)})

        outcomes: dict[int, Outcome] = {}
        if not self.store.exists(dataset_id):
            docs = self._journals(ctx.job_id, shards)
            missing = [i for i in range(shards) if not (docs[i] or {}).get("complete")]
            if missing:
                monitor = _ShardMonitor(self, ctx, shards, totals, len(prompts))
                monitor.poll({})
                outcomes = self._launch(launcher, name, ctx, work, missing, placement, monitor)
                monitor.poll({})
                for st in ("cancelled", "interrupted"):
                    if any(o.state == st for o in outcomes.values()):
                        raise (Cancelled("cancelled") if st == "cancelled" else Interrupted("service stopping"))
            docs = self._journals(ctx.job_id, shards)
            failed = [i for i in range(shards) if not (docs[i] or {}).get("complete")]
            if failed:
                raise FailedPrecondition(
                    f"shard(s) {', '.join(map(str, failed))} of {shards} did not finish ({self._why(outcomes, failed)}); their stored "
                    "images are kept: start the render again with the same idempotency key to render only what is missing"
                )
            self._publish(ctx, work, items, prompt_set.id, len(prompts), cfg, spec, skill, docs)
        manifest = self.store.get(dataset_id)
        docs = self._journals(ctx.job_id, shards)
        stats = self._stats(docs, totals, len(prompts))
        return JobResult(
            output=OutputRef(id=manifest.id, kind=manifest.kind.value, uri=manifest.uri, sha256=manifest.digest),
            stats=stats,
            message=f"rendered {len(items)} images in {shards} shard(s) into {manifest.id}",
        )

    # -- launching

    def _launch(self, launcher: Launcher, name: str, ctx: JobContext, work: Work, missing: list[int],
                placement: dict[str, Any], monitor: _ShardMonitor) -> dict[int, Outcome]:
        base = {"idempotency_key": ctx.idempotency_key, "run": ctx.spec.get("run", ""), "skill": ctx.spec.get("skill", ""),
                "config_uri": self.storage.uri_for(f"{work_prefix(ctx.job_id)}/{WORK_FILE}"), "expert_id": work.dataset_id,
                "placement": placement, "labels": dict(ctx.spec.get("labels") or {}), "task": "render",
                "service_settings": self.settings}
        if name == "kubernetes":
            # one Indexed Job for every shard: completed shards exit at once (their journal is complete)
            req = LaunchRequest(job_id=ctx.job_id, completions=work.shards, attempt=ctx.attempt, **base)
            return dict.fromkeys(missing, self.live.run(launcher, req, monitor))
        outcomes: dict[int, Outcome] = {}

        def one(i: int) -> None:
            req = LaunchRequest(job_id=f"{ctx.job_id}-shard-{i}", shard=i, **base)
            outcomes[i] = self.live.run(launcher, req, _ShardDetails(monitor, i))

        threads = [threading.Thread(target=one, args=(i,), name=f"render-shard-{i}", daemon=True) for i in missing]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outcomes

    @staticmethod
    def _why(outcomes: dict[int, Outcome], failed: list[int]) -> str:
        msgs = [f"shard {i}: {outcomes[i].message}" for i in failed if i in outcomes and outcomes[i].message]
        return "; ".join(msgs)[:600] or "no outcome"

    # -- journals and progress

    def _journals(self, job_id: str, shards: int) -> list[dict[str, Any] | None]:
        return [read_progress(self.storage, shard_key(job_id, i)) for i in range(shards)]

    def _stats(self, docs: list[dict[str, Any] | None], totals: list[int], n_prompts: int) -> dict[str, Any]:
        per = [shard_progress(d, i, totals[i]) for i, d in enumerate(docs)]
        stats: dict[str, Any] = {
            "prompts_total": n_prompts,
            "images_total": sum(totals),
            "images_done": sum(p["images_done"] for p in per),
            "shards": per,
        }
        resolved = next((d["resolved"] for d in docs if d and d.get("resolved")), None)
        if resolved:
            stats["model_resolved"] = resolved["model"]
            stats["scheduler_resolved"] = _scheduler_enum_name(resolved["scheduler"])
        return stats

    # -- publishing

    def _publish(self, ctx: JobContext, work: Work, items: list[Item], prompt_set_id: str, n_prompts: int, cfg: Any, spec: Any,
                 skill: str, docs: list[dict[str, Any] | None]) -> None:
        resolved = [d["resolved"] for d in docs if d and d.get("resolved")]
        if not resolved:
            raise FailedPrecondition(f"no shard of {ctx.job_id} recorded how it resolved the model; start the render again")
        if any(r != resolved[0] for r in resolved[1:]):
            raise FailedPrecondition(
                "the shard workers resolved the model differently (another revision, dtype or scheduler): "
                "their images cannot form one dataset; pin model.revision and precision, then start a new render"
            )
        entries = [FileEntry.model_validate(f) for d in docs for f in (d or {}).get("files") or []]
        expected = {it.path for it in items}
        if {e.path for e in entries} != expected:
            raise FailedPrecondition(f"the shard journals of {ctx.job_id} do not name every image of the dataset; start the render again")
        ctx.update(message="adopting the shards' images, writing metadata.jsonl and publishing")
        writer = self.store.writer(
            ArtifactKind.IMAGE_DATASET,
            id=work.dataset_id,
            parents=[prompt_set_id],
            parameters=dataset_parameters(prompt_set_id, n_prompts, items, cfg, resolved[0], spec.run, skill, spec.candidates),
            name=f"images for {skill or prompt_set_id}",
            labels=dataset_labels(dict(spec.labels), spec.run, skill),
        )
        with writer as w:
            w.adopt(entries)
            w.put_bytes(METADATA_FILE, metadata_jsonl(items, resolved[0], skill))


class _ShardMonitor(ContextMonitor):
    """Reads every shard journal on each launcher wake-up and reports per-shard progress."""

    def __init__(self, coord: ShardedRender, ctx: JobContext, shards: int, totals: list[int], n_prompts: int) -> None:
        self.coord = coord
        self.ctx = ctx
        self.shards = shards
        self.totals = totals
        self.n_prompts = n_prompts
        self.details: dict[str, str] = {}
        self._lock = threading.Lock()
        self._read_at = float("-inf")

    def poll(self, details: dict[str, str], message: str | None = None, attempt: int | None = None) -> None:
        with self._lock:
            fresh = {k: v for k, v in details.items() if self.details.get(k) != v}
            self.details.update(details)
            # every local shard's follower polls: read the N journals at most once per poll interval unless something changed
            now = time.monotonic()
            if not fresh and message is None and now - self._read_at < self.coord.settings.batch_poll_seconds:
                return
            self._read_at = now
            stats = self.coord._stats(self.coord._journals(self.ctx.job_id, self.shards), self.totals, self.n_prompts)
            complete = sum(1 for p in stats["shards"] if p["complete"])
            text = message or f"{complete} of {self.shards} shards complete"
            self.ctx.progress(stats["images_done"], stats["images_total"], unit="images", message=text, stats=stats, details=dict(self.details))


class _ShardDetails(ContextMonitor):
    """One local shard worker's view of the shared monitor: its launcher details get a ``render.shard.<i>.`` prefix."""

    def __init__(self, monitor: _ShardMonitor, index: int) -> None:
        self.monitor = monitor
        self.ctx = monitor.ctx
        self.index = index

    def poll(self, details: dict[str, str], message: str | None = None, attempt: int | None = None) -> None:
        prefix = f"render.shard.{self.index}."
        self.monitor.poll({prefix + k.removeprefix("local."): v for k, v in details.items()})


# --- the worker -------------------------------------------------------------------------------


class _Journal:
    """A shard's journal (``shard-<i>.json``), rewritten after every batch."""

    def __init__(self, storage: Storage, key: str) -> None:
        self.storage = storage
        self.key = key
        self.doc: dict[str, Any] = read_progress(storage, key) or {}
        self.doc.setdefault("files", [])
        self.doc.setdefault("attempts", [])

    def flush(self) -> None:
        self.storage.put_bytes(self.key, json.dumps(self.doc).encode(), content_type="application/json")


def render_shard(settings: RenderSettings, config_uri: str, index: int, *, renderer: Renderer | None = None,
                 storage: Storage | None = None) -> dict[str, Any]:
    """Render shard ``index`` of the work document at ``config_uri`` (``selma render shard``); returns its journal.

    Images already in the journal and in storage are skipped; the journal is rewritten after every batch.
    """
    from selma.storage import open_storage

    storage = storage or open_storage(settings)
    root = storage.uri.rstrip("/") + "/"
    if not config_uri.startswith(root):
        raise InvalidArgument(f"work document {config_uri} is not in this worker's storage {storage.uri}", field="config")
    try:
        work = Work.from_json(storage.get_bytes(config_uri[len(root):]))
    except NotFound:
        raise InvalidArgument(f"no render work document at {config_uri}", field="config") from None
    if not 0 <= index < work.shards:
        raise InvalidArgument(f"shard {index} is not in 0..{work.shards - 1}", field="shard")
    store = ArtifactStore(storage)
    msg = json_format.ParseDict(work.spec, render_service_pb2.DatasetRenderSpec(), ignore_unknown_fields=True)
    spec = parse_dataset_spec(msg, settings)
    cfg = spec.config
    prompt_set = resolve_prompt_set(store, spec.prompt_set)
    items = plan_dataset_items(store, load_prompts(store, prompt_set, spec.max_prompts), spec)
    mine = shard_items(items, cfg.batch_size, work.shards, index)
    journal = _Journal(storage, shard_key(work.job_id, index))
    if journal.doc.get("complete") or store.exists(work.dataset_id):
        log.info("shard %d of %s is already complete", index, work.job_id)
        return journal.doc
    present = _present_images(store, work.dataset_id)
    kept = {f["path"]: f for f in journal.doc["files"] if present.get(f["path"]) == f["size"]}
    journal.doc["files"] = sorted(kept.values(), key=lambda f: f["path"])
    renderer = renderer or Renderer(settings)
    model = renderer.load(cfg, field="spec.settings.model.source")
    r = renderer.resolve(model, cfg, prefix="spec.settings")
    journal.doc["resolved"] = resolved_record(model, r)
    attempt: dict[str, Any] = {"rendered": 0, "pod": settings.batch_pod_name, "node": settings.batch_node_name}
    journal.doc["attempts"].append(attempt)
    journal.doc["images_total"] = len(mine)
    journal.flush()
    state = _Attempt(batch_size=cfg.batch_size, oom_retries=0)
    ctx = _WorkerContext()
    from selma_render.dataset import DatasetRenderJob

    batches = DatasetRenderJob(settings, store, renderer)
    for start in range(0, len(mine), cfg.batch_size):
        todo = [it for it in mine[start : start + cfg.batch_size] if it.path not in kept]
        if not todo:
            continue
        for chunk, images in batches._render_batch(ctx, model, r, todo, state):  # noqa: SLF001 - the same batching as in-process
            for it, image in zip(chunk, images, strict=True):
                entry = store.put_staged_bytes(work.dataset_id, it.path, encode_png(image))
                kept[it.path] = entry.model_dump()
        attempt["rendered"] += len(todo)
        journal.doc["files"] = sorted(kept.values(), key=lambda f: f["path"])
        journal.flush()
    journal.doc["complete"] = True
    journal.flush()
    log.info("shard %d of %s complete: %d images (%d rendered in this attempt)", index, work.job_id, len(mine), attempt["rendered"])
    return journal.doc


def _present_images(store: ArtifactStore, dataset_id: str) -> dict[str, int]:
    prefix = f"{ARTIFACTS_PREFIX}/{dataset_id}/files/"
    try:
        return {o.key[len(prefix):]: o.size for o in store.storage.list(prefix)}
    except NotFound:
        return {}


class _WorkerContext:
    """What the in-process batch loop needs of a job context, in a worker: warnings go to the log."""

    def warn(self, message: str) -> None:
        log.warning("%s", message)
