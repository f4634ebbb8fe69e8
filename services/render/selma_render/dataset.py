"""Dataset renders: a prompt set becomes an ``image_dataset`` artifact in Hugging Face ``imagefolder`` layout.

Artifact files (``datasets.load_dataset("imagefolder", data_dir=<downloaded artifact>)`` loads it)::

    metadata.jsonl          one line per image, ordered by (prompt_index, image_index):
                            {"file_name": "images/000000-0.png", "text": <prompt>, "prompt_id", "prompt_index",
                             "image_index", "seed", "model", "scheduler", "steps", "guidance_scale", "width",
                             "height", "negative_prompt", "skill"}
    images/<pppppp>-<i>.png one PNG per (prompt index, image index)

Parents: the prompt set.  Labels: ``selma.dev/run``, ``selma.dev/skill`` and the job's labels.

Resumable and never partial: the artifact id is derived from the job's idempotency key, images
are uploaded into its writer as each batch finishes and the writer's journal is checkpointed
after every batch, so a killed process loses at most the batch in flight.  The next attempt
(same key: a restarted service re-queues the job; a client re-starts a failed or cancelled one)
reopens the writer, skips every image already stored and renders only the rest.  The manifest
— the artifact's commit point — is written once the last image and ``metadata.jsonl`` are in.

Batches are planned deterministically: batch ``k`` is items ``[k·b, (k+1)·b)`` of the
(prompt, image) order, the last one possibly short (it is rendered, unlike the research code).
A resumed job therefore renders the same batches, with the same composition, as an
uninterrupted one, and produces byte-identical images; :func:`reproduce_image` (``selma render
reproduce``) re-renders any single image exactly by re-planning its batch from the manifest.  On out-of-memory a batch is retried in
halves down to one image; the smaller size is kept for the rest of the attempt; at size one the
job fails with RESOURCE_EXHAUSTED, keeping every stored image for a later resume.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from selma.artifacts import ArtifactKind, ArtifactStore, Manifest, new_artifact_id
from selma.errors import FailedPrecondition, InvalidArgument, NotFound
from selma.jobs import JobContext, JobResult, OutputRef
from selma.pipelines import ModelSpec
from selma.seeds import SeedPolicy, derive_seed
from selma.v1 import common_pb2, render_service_pb2
from selma_render.metrics import IMAGE_SECONDS, IMAGES_RENDERED, OOM_RETRIES
from selma_render.renderer import (
    LoadedModel,
    OutOfMemory,
    Renderer,
    ResolvedRender,
    encode_png,
    free_device_memory,
    is_out_of_memory,
)
from selma_render.settings import RenderSettings
from selma_render.spec import (
    CandidateSpec,
    DatasetSpec,
    PromptSetRef,
    RenderConfig,
    parse_dataset_spec,
    scheduler_enum,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from PIL.Image import Image

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.jsonl"
METADATA_FILE = "metadata.jsonl"
JOB_KIND = "dataset_render"
# The writer must not checkpoint on its own in the middle of a batch (it does every N uploads
# or 30 s); we checkpoint at batch boundaries, so the journal always holds whole batches.
_WRITER_CHECKPOINT_EVERY = 1_000_000
_PRE_UPLOAD_CHECKPOINT_AFTER = 20.0


@dataclass(frozen=True)
class Prompt:
    """One record of a prompt set."""

    id: str
    index: int
    text: str


@dataclass(frozen=True)
class Item:
    """One image to render: which prompt, which image of it, and its seed."""

    prompt: Prompt
    image_index: int
    seed: int

    @property
    def path(self) -> str:
        return image_path(self.prompt.index, self.image_index)


def image_path(prompt_index: int, image_index: int) -> str:
    """Path of an image inside the dataset artifact, e.g. ``images/000012-1.png``."""
    return f"images/{prompt_index:06d}-{image_index}.png"


def resolve_prompt_set(store: ArtifactStore, ref: PromptSetRef, *, field: str = "spec.prompt_set") -> Manifest:
    """The published prompt set named by ``ref`` (an id, or the artifact's URI in this service's store)."""
    artifact_id = ref.id
    if ref.uri:
        root, sep, tail = ref.uri.rstrip("/").rpartition("/artifacts/")
        if not sep or not tail or "/" in tail:
            raise InvalidArgument(f"prompt set uri must look like <storage root>/artifacts/<id>; got {ref.uri!r}", field=f"{field}.uri")
        if artifact_id and artifact_id != tail:
            raise InvalidArgument(f"prompt_set id {artifact_id!r} and uri {ref.uri!r} name different artifacts", field=f"{field}.uri")
        artifact_id = tail
    try:
        manifest = store.get(artifact_id)
    except NotFound:
        raise NotFound(
            f"prompt set {artifact_id} does not exist in {store.uri}; generate it with PromptService first or check the id",
            field=f"{field}.id",
        ) from None
    except InvalidArgument as e:
        raise InvalidArgument(e.message, field=f"{field}.id") from None
    if ref.uri and manifest.uri.rstrip("/") != ref.uri.rstrip("/"):
        raise InvalidArgument(
            f"prompt set {ref.uri} is not in this service's artifact store ({store.uri}); copy it there first", field=f"{field}.uri"
        )
    if manifest.kind != ArtifactKind.PROMPT_SET:
        raise InvalidArgument(f"artifact {artifact_id} is a {manifest.kind.value}, not a prompt set", field=f"{field}.id")
    if ref.sha256 and ref.sha256 != manifest.digest:
        raise FailedPrecondition(
            f"prompt set {artifact_id} has sha256 {manifest.digest}, not the {ref.sha256} the request expects", field=f"{field}.sha256"
        )
    if not any(f.path == PROMPTS_FILE for f in manifest.files):
        raise FailedPrecondition(f"prompt set {artifact_id} has no {PROMPTS_FILE}; it was not written by PromptService", field=f"{field}.id")
    return manifest


def load_prompts(store: ArtifactStore, manifest: Manifest, max_prompts: int = 0) -> list[Prompt]:
    """The prompts of a prompt set in file order (the first ``max_prompts`` if > 0), validated."""
    out: list[Prompt] = []
    seen: set[int] = set()
    for lineno, line in enumerate(store.read_bytes(manifest, PROMPTS_FILE).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FailedPrecondition(f"{PROMPTS_FILE} of {manifest.id}, line {lineno}, is not JSON: {e}") from None
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise FailedPrecondition(f"{PROMPTS_FILE} of {manifest.id}, line {lineno}, has no prompt text")
        index = rec.get("index", len(out))
        if not isinstance(index, int) or isinstance(index, bool) or index < 0 or index in seen:
            raise FailedPrecondition(f"{PROMPTS_FILE} of {manifest.id}, line {lineno}: index {index!r} is not a new non-negative integer")
        seen.add(index)
        out.append(Prompt(id=str(rec.get("id") or f"p{index:06d}"), index=index, text=text))
        if max_prompts and len(out) >= max_prompts:
            break
    if not out:
        raise FailedPrecondition(f"prompt set {manifest.id} holds no prompts")
    return out


def plan_items(prompts: list[Prompt], cfg: RenderConfig) -> list[Item]:
    """Every image of the dataset in (prompt, image) order, each with its seed."""
    return [
        Item(prompt=p, image_index=i, seed=derive_seed(cfg.seed_policy, cfg.base_seed, p.index, i, cfg.images_per_prompt))
        for p in prompts
        for i in range(cfg.images_per_prompt)
    ]


def plan_dataset_items(store: ArtifactStore, prompts: list[Prompt], spec: DatasetSpec) -> list[Item]:
    """The images a dataset render makes: :func:`plan_items`, or one best-of-K candidate round.

    Candidate ``k`` of prompt ``i`` is image ``k`` of a render with ``per_prompt`` images per prompt
    (its seed and file name), so it does not depend on which rounds ran before; prompts with a kept
    image in ``skip_kept_in`` are left out, and at most ``max_images`` are rendered, in prompt order.
    """
    c = spec.candidates
    cfg = spec.config
    if c is None:
        return plan_items(prompts, cfg)
    skip = kept_prompt_ids(store, c.skip_kept_in) if c.skip_kept_in else set()
    ipp = cfg.images_per_prompt
    items = [
        Item(prompt=p, image_index=c.index * ipp + j, seed=derive_seed(cfg.seed_policy, cfg.base_seed, p.index, c.index * ipp + j, c.per_prompt * ipp))
        for p in prompts
        if p.id not in skip
        for j in range(ipp)
    ]
    items = items[: c.max_images] if c.max_images else items
    if not items:
        raise FailedPrecondition(f"candidate round {c.index} has nothing to render: every prompt has a kept image in {c.skip_kept_in} "
                                 "or max_images is spent", field="spec.candidates")
    return items


def kept_prompt_ids(store: ArtifactStore, dataset_id: str) -> set[str]:
    """Prompt ids with at least one image in an image dataset (a gated one: its kept images)."""
    try:
        m = store.get(dataset_id)
    except NotFound:
        raise NotFound(f"gated dataset {dataset_id} does not exist", field="spec.candidates.skip_kept_in.id") from None
    if m.kind != ArtifactKind.IMAGE_DATASET:
        raise InvalidArgument(f"{dataset_id} is not an image dataset", field="spec.candidates.skip_kept_in.id")
    rows = store.read_bytes(m, METADATA_FILE).decode().splitlines()
    return {str(json.loads(r).get("prompt_id", "")) for r in rows if r.strip()}


def resolved_record(model: LoadedModel, r: ResolvedRender) -> dict[str, Any]:
    """How a render resolved (model, scheduler, size...): what ``metadata.jsonl`` and the manifest record.

    Plain JSON, so shard workers can hand it to the coordinating service in their journals.
    """
    return {
        "source": model.resolved.source,
        "model": model_ref_dict(model),
        "scheduler": r.scheduler,
        "scheduler_requested": r.scheduler_key,
        "steps": r.steps,
        "guidance_scale": r.guidance_scale,
        "width": r.width,
        "height": r.height,
        "negative_prompt": r.negative_prompt,
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def metadata_jsonl(items: list[Item], resolved: dict[str, Any], skill: str) -> bytes:
    """``metadata.jsonl``: imagefolder's ``file_name`` + ``text`` and the lineage of every image."""
    lines = []
    for it in items:
        rec: dict[str, Any] = {
            "file_name": it.path,
            "text": it.prompt.text,
            "prompt_id": it.prompt.id,
            "prompt_index": it.prompt.index,
            "image_index": it.image_index,
            "seed": it.seed,
            "model": resolved["source"],
            "scheduler": resolved["scheduler"],
            "scheduler_requested": resolved["scheduler_requested"],
            "steps": resolved["steps"],
            "guidance_scale": resolved["guidance_scale"],
            "width": resolved["width"],
            "height": resolved["height"],
            "negative_prompt": resolved["negative_prompt"],
            "skill": skill,
        }
        lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode("utf-8")


def dataset_parameters(
    prompt_set_id: str, n_prompts: int, items: list[Item], cfg: RenderConfig, resolved: dict[str, Any], run: str, skill: str,
    candidates: CandidateSpec | None = None,
) -> dict[str, Any]:
    """The image dataset manifest's parameters (what :func:`reproduce_image` re-plans a batch from)."""
    extra: dict[str, Any] = {}
    if candidates is not None:  # a best-of-K round: the gate reads the candidate index, reproduce_image the plan
        extra["candidate_round"] = {"index": candidates.index, "per_prompt": candidates.per_prompt,
                                    "skip_kept_in": candidates.skip_kept_in, "max_images": candidates.max_images}
    return {
        **extra,
        "prompt_set": prompt_set_id,
        "prompts": n_prompts,
        "images": len(items),
        "images_per_prompt": cfg.images_per_prompt,
        "model": resolved["model"],
        "scheduler": resolved["scheduler"],
        "steps": resolved["steps"],
        "guidance_scale": resolved["guidance_scale"],
        "width": resolved["width"],
        "height": resolved["height"],
        "negative_prompt": resolved["negative_prompt"],
        "seed_policy": cfg.seed_policy.value,
        "base_seed": cfg.base_seed,
        "batch_size": cfg.batch_size,
        "dtype": resolved["dtype"],
        "run": run,
        "skill": skill,
        "format": "imagefolder",
    }


def dataset_labels(spec_labels: dict[str, str], run: str, skill: str) -> dict[str, str]:
    """The dataset's labels: the job's, plus ``selma.dev/run`` and ``selma.dev/skill``."""
    labels = dict(spec_labels)
    if run:
        labels["selma.dev/run"] = run
    if skill:
        labels["selma.dev/skill"] = skill
    return labels


def model_ref_dict(model: LoadedModel) -> dict[str, str]:
    m = model.resolved
    return {"source": m.source, "revision": m.revision, "variant": m.variant, "vae_source": m.vae_source}


@dataclass
class _Attempt:
    """Mutable numbers of one attempt (batch size after back-off, retries, throughput)."""

    batch_size: int
    oom_retries: int
    rendered: int = 0
    render_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.rendered / self.render_seconds if self.render_seconds > 0 else 0.0


class DatasetRenderJob:
    """The job function behind StartDatasetRender (see the module docstring)."""

    def __init__(
        self, settings: RenderSettings, store: ArtifactStore, renderer: Renderer, *, sharded: Callable[[JobContext, str], JobResult] | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.renderer = renderer
        self.sharded = sharded  # the coordinator of renders with shards > 0 (selma_render.shards)

    def __call__(self, ctx: JobContext) -> JobResult:
        spec = parse_dataset_spec(json_format.ParseDict(ctx.spec, render_service_pb2.DatasetRenderSpec(), ignore_unknown_fields=True), self.settings)
        if spec.shards and self.sharded is not None:
            return self.sharded(ctx, new_artifact_id(ArtifactKind.IMAGE_DATASET, ctx.idempotency_key))
        cfg = spec.config
        prompt_set = resolve_prompt_set(self.store, spec.prompt_set)
        prompts = load_prompts(self.store, prompt_set, spec.max_prompts)
        skill = spec.skill or prompt_set.labels.get("selma.dev/skill", "") or str(prompt_set.parameters.get("skill", "") or "")
        items = plan_dataset_items(self.store, prompts, spec)
        total = len(items)
        dataset_id = new_artifact_id(ArtifactKind.IMAGE_DATASET, ctx.idempotency_key)
        ctx.update(
            message=f"loading model {cfg.model.source}",
            stats={"prompts_total": len(prompts), "images_total": total},
            details={"render.dataset_id": dataset_id},
        )

        model = self.renderer.load(cfg, field="spec.settings.model.source")
        r = self.renderer.resolve(model, cfg, prefix="spec.settings")
        ctx.update(details={"render.device": str(model.device), "render.dtype": str(model.dtype).removeprefix("torch.")})
        state = _Attempt(batch_size=cfg.batch_size, oom_retries=int(ctx.stats.get("oom_retries", 0) or 0))
        base_stats: dict[str, Any] = {
            "prompts_total": len(prompts),
            "images_total": total,
            "model_load_seconds": model.load_seconds,
            "model_resolved": model_ref_dict(model),
            "scheduler_resolved": _scheduler_enum_name(r.scheduler),
        }

        resolved = resolved_record(model, r)
        labels = dataset_labels(dict(spec.labels), spec.run, skill)
        parameters = dataset_parameters(prompt_set.id, len(prompts), items, cfg, resolved, spec.run, skill, spec.candidates)

        writer = self.store.writer(
            ArtifactKind.IMAGE_DATASET,
            id=dataset_id,
            parents=[prompt_set.id],
            parameters=parameters,
            name=f"images for {skill or prompt_set.id}",
            labels=labels,
            checkpoint_every=_WRITER_CHECKPOINT_EVERY,
        )
        with writer as w:
            stored = set(w.existing())
            done = skipped = sum(1 for it in items if it.path in stored)

            def stats() -> dict[str, Any]:
                return {
                    **base_stats,
                    "images_done": done,
                    "images_skipped_existing": skipped,
                    "images_per_second": state.images_per_second,
                    "current_batch_size": state.batch_size,
                    "oom_retries": state.oom_retries,
                }

            if skipped:
                log.info("%s: resuming dataset %s: %d of %d images already stored", ctx.job_id, dataset_id, skipped, total)
            n_batches = -(-total // cfg.batch_size)
            ctx.progress(done, total, unit="images", message=f"rendering {total - done} of {total} images", stats=stats())
            last_checkpoint = time.monotonic()
            for b in range(n_batches):
                todo = [it for it in items[b * cfg.batch_size : (b + 1) * cfg.batch_size] if it.path not in stored]
                if not todo:
                    continue
                ctx.check_cancelled()  # cancel / shutdown take effect between batches; stored images stay
                for chunk, images in self._render_batch(ctx, model, r, todo, state):
                    if time.monotonic() - last_checkpoint > _PRE_UPLOAD_CHECKPOINT_AFTER:
                        w.checkpoint()  # resets the writer's 30 s timer so it cannot fire mid-batch
                        last_checkpoint = time.monotonic()
                    for it, image in zip(chunk, images, strict=True):
                        w.put_bytes(it.path, encode_png(image))
                w.checkpoint()
                last_checkpoint = time.monotonic()
                done += len(todo)
                ctx.progress(done, total, message=f"rendered batch {b + 1}/{n_batches}", stats=stats())
            ctx.update(message="writing metadata.jsonl and publishing")
            w.put_bytes(METADATA_FILE, metadata_jsonl(items, resolved, skill))
        manifest = w.manifest
        assert manifest is not None  # the writer published on a clean exit
        final = stats()
        return JobResult(
            output=OutputRef(id=manifest.id, kind=manifest.kind.value, uri=manifest.uri, sha256=manifest.digest),
            stats=final,
            message=f"rendered {total - skipped} images ({skipped} were already stored) into {manifest.id}",
        )

    def _render_batch(
        self, ctx: JobContext, model: LoadedModel, r: ResolvedRender, items: list[Item], state: _Attempt
    ) -> Iterator[tuple[list[Item], list[Image]]]:
        """Render ``items`` in pipeline calls of at most ``state.batch_size``, halving it on out-of-memory."""
        pos = 0
        while pos < len(items):
            size = min(state.batch_size, len(items) - pos)
            chunk = items[pos : pos + size]
            t0 = time.perf_counter()
            oom = False
            try:
                images = self.renderer.generate(model, r, [it.prompt.text for it in chunk], [it.seed for it in chunk])
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                oom = True
            if oom:  # outside the except block, so the failed call's tensors can be freed
                free_device_memory(model.device)
                if size == 1:
                    raise OutOfMemory(
                        f"the device ran out of memory rendering a single {r.width}x{r.height} image; the "
                        f"{state.rendered} images rendered in this attempt are kept: lower the resolution or run on a "
                        "device with more memory, then start again with the same idempotency key to resume",
                        field="spec.settings.batch_size",
                    )
                state.batch_size = max(1, size // 2)
                state.oom_retries += 1
                OOM_RETRIES.inc()
                ctx.warn(f"out of memory at batch size {size}; retrying at {state.batch_size}")
                continue
            seconds = time.perf_counter() - t0
            state.rendered += size
            state.render_seconds += seconds
            IMAGES_RENDERED.labels("dataset").inc(size)
            for _ in range(size):
                IMAGE_SECONDS.labels("dataset").observe(seconds / size)
            yield chunk, images
            pos += size


@dataclass(frozen=True)
class Reproduction:
    """The stored and the re-rendered bytes of one dataset image."""

    file_name: str
    seed: int
    stored: bytes
    rendered: bytes

    @property
    def identical(self) -> bool:
        return self.stored == self.rendered


def reproduce_image(store: ArtifactStore, renderer: Renderer, dataset_id: str, file_name: str) -> Reproduction:
    """Re-render one image of a published dataset exactly as the job did.

    The image's batch is re-planned from the manifest's parameters and rendered with the same
    composition, so the result is byte-identical to the stored file on the same kind of device
    and precision (unless the job had to shrink that batch after running out of memory).
    """
    manifest = store.get(dataset_id)
    if manifest.kind != ArtifactKind.IMAGE_DATASET:
        raise InvalidArgument(f"artifact {dataset_id} is a {manifest.kind.value}, not an image dataset", field="dataset_id")
    p = manifest.parameters
    try:
        model = p["model"]
        cfg = RenderConfig(
            model=ModelSpec(source=model["source"], revision=model.get("revision", ""), variant=model.get("variant", ""), vae_source=model.get("vae_source", "")),
            scheduler=p.get("scheduler_requested", p["scheduler"]),
            steps=int(p["steps"]),
            guidance_scale=p["guidance_scale"],
            width=int(p["width"]),
            height=int(p["height"]),
            negative_prompt=p.get("negative_prompt", ""),
            images_per_prompt=int(p["images_per_prompt"]),
            base_seed=int(p["base_seed"]),
            seed_policy=SeedPolicy(p["seed_policy"]),
            batch_size=int(p["batch_size"]),
            precision={"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(p.get("dtype", ""), ""),
        )
        prompt_set, n_prompts = p["prompt_set"], int(p["prompts"])
    except (KeyError, TypeError, ValueError) as e:
        raise FailedPrecondition(f"dataset {dataset_id} was not written by this render service version (parameter {e} missing or bad)") from None
    rnd = p.get("candidate_round")
    candidates = CandidateSpec(**rnd) if isinstance(rnd, dict) else None
    items = plan_dataset_items(store, load_prompts(store, store.get(prompt_set), n_prompts), DatasetSpec(
        prompt_set=PromptSetRef(id=prompt_set), config=cfg, candidates=candidates))
    position = next((i for i, it in enumerate(items) if it.path == file_name), None)
    if position is None:
        raise NotFound(f"dataset {dataset_id} has no image {file_name!r}", field="file_name")
    start = position - position % cfg.batch_size
    batch = items[start : start + cfg.batch_size]
    loaded = renderer.load(cfg, field="model")
    r = renderer.resolve(loaded, cfg)
    images = renderer.generate(loaded, r, [it.prompt.text for it in batch], [it.seed for it in batch])
    return Reproduction(
        file_name=file_name,
        seed=items[position].seed,
        stored=store.read_bytes(manifest, file_name),
        rendered=encode_png(images[position - start]),
    )


def _scheduler_enum_name(scheduler: str) -> str:
    return common_pb2.Scheduler.Name(scheduler_enum(scheduler))
