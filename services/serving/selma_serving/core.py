"""The serving service's core, without gRPC: experts, merge jobs, registered models, export, lineage.

``ServingCore`` owns the artifact store, the expert cache, the generation :class:`Engine`, the
:class:`ModelRegistry` and the merge :class:`~selma.jobs.JobManager`.  The servicer converts
protobuf to the plain dicts and dataclasses used here and back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from selma.api import enum_proto_name, output_ref
from selma.artifacts import ARTIFACTS_PREFIX, ArtifactKind, ArtifactStore, Manifest
from selma.errors import FailedPrecondition, InvalidArgument, NotFound
from selma.jobs import JobContext, JobManager, JobResult
from selma.retention import GcReport, RunDeletion, collect_garbage, delete_run
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma_serving import metrics
from selma_serving.engine import Engine
from selma_serving.lora import (
    DIFFUSERS_FILE,
    FUSED_FILE,
    MERGE_JSON,
    Adapter,
    ExpertCache,
    adapter_file,
    check_model_name,
    check_tensor_values,
    expert_info,
    safetensors_bytes,
    to_diffusers,
)
from selma_serving.merge import MergeParams, MergeResult, ResolvedMerge, merge, params_from_dict, resolve
from selma_serving.registry import ModelRegistry, load_adapter
from selma_serving.settings import ServingSettings

log = logging.getLogger(__name__)

MERGE_JOB_KIND = "merge"


def spec_json_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """A merge in ``ResolvedMerge.to_dict`` form → ``selma.v1.MergeSpec`` JSON (enum names as the proto spells them)."""
    out = dict(d)
    for key, enum in (("method", common_pb2.MergeMethod), ("sign_election", common_pb2.SignElection), ("variant", common_pb2.MergeVariant)):
        if out.get(key):
            out[key] = enum_proto_name(enum, out[key], field=key)
    if "variant" not in out and out.get("method", "MERGE_METHOD_MEAN_DELTA") != "MERGE_METHOD_MEAN_DELTA":
        out["variant"] = "MERGE_VARIANT_SELMA"  # merges stored before variants existed used selma's
    if "seed" in out:
        out["seed"] = str(out["seed"])
    return out


def spec_json(rm: ResolvedMerge) -> dict[str, Any]:
    """A resolved merge in ``selma.v1.MergeSpec`` JSON form."""
    return spec_json_from_dict(rm.to_dict())


@dataclass
class ExportedFile:
    """An adapter file ready to stream."""

    file_name: str
    data: bytes
    sha256: str
    fmt: str
    rank: int


class ServingCore:
    """Everything the ServingService does, transport-neutral."""

    def __init__(self, settings: ServingSettings, *, store: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.store = store or ArtifactStore(open_storage(settings))
        self.experts = ExpertCache(self.store, settings.serving_expert_cache, max_abs=settings.serving_max_adapter_value)
        self.engine = Engine(settings, self.experts)
        self.registry = ModelRegistry(self.store, self.engine)
        self.jobs = JobManager(self.store.storage, MERGE_JOB_KIND, self._run_merge, max_concurrent=settings.serving_merge_workers,
                               watchdog_seconds=settings.job_watchdog_seconds)
        self._retention = threading.Lock()  # one deletion or collection at a time per replica

    def start(self) -> None:
        """Load the base model and resume unfinished merge jobs (call before reporting SERVING)."""
        self.engine.load_base()
        self.jobs.recover()

    def shutdown(self) -> None:
        self.jobs.shutdown(wait=True, timeout=10)

    # --- experts

    def list_experts(self, *, run: str = "", skill: str = "", base_model_source: str = "") -> list[Manifest]:
        """Expert artifacts, newest first, filtered by run, skill and base model."""
        labels = {k: v for k, v in (("selma.dev/run", run), ("selma.dev/skill", skill)) if v}
        out = []
        for m in reversed(self.store.list(ArtifactKind.EXPERT, labels=labels or None)):
            if base_model_source:
                source = str((m.parameters.get("base_model") or {}).get("source", "")).rstrip("/")
                if source != base_model_source.rstrip("/"):
                    continue
            out.append(m)
        return out

    def expert_details(self, manifest: Manifest) -> dict[str, Any]:
        return expert_info(self.store, manifest)

    # --- merging

    def prepare_merge(self, params: MergeParams, *, for_serving: bool) -> tuple[list[Adapter], ResolvedMerge]:
        """Load and validate the experts of a merge (errors name the expert); fill every default."""
        adapters = [self.experts.get(e.ref, field_name=f"merge.experts[{i}].expert_id") for i, e in enumerate(params.experts)]
        rm = resolve(params, adapters, default_density=self.settings.serving_default_density,
                     max_weight=self.settings.serving_max_merge_weight)
        if for_serving:
            for a in adapters:
                self.engine.check_base(a.base_model, f"expert {a.id}")
        return adapters, rm

    def validate_merge_spec(self, spec: dict[str, Any]) -> ResolvedMerge:
        """Check a MergeJobSpec (JSON form) fully, without starting anything."""
        register = spec.get("register", True)
        name = spec.get("model_name", "")
        if register or name:
            check_model_name(name, field_name="spec.model_name")
        params = params_from_dict(spec.get("merge") or {})
        _, rm = self.prepare_merge(params, for_serving=bool(register))
        return rm

    def start_merge(self, idempotency_key: str, spec: dict[str, Any]) -> tuple[Any, bool]:
        if not idempotency_key or len(idempotency_key) > 256 or not idempotency_key.isprintable() or not idempotency_key.isascii():
            raise InvalidArgument("idempotency_key is required: 1..256 printable ASCII characters", field="idempotency_key")
        self.validate_merge_spec(spec)
        return self.jobs.start(idempotency_key, spec, run=spec.get("run", ""), labels=spec.get("labels") or {})

    def run_merge(self, adapters: list[Adapter], rm: ResolvedMerge, **kwargs: Any) -> MergeResult:
        t0 = time.perf_counter()
        result = merge(adapters, rm, **kwargs)
        metrics.MERGE_SECONDS.labels("job").observe(time.perf_counter() - t0)
        return result

    def check_result(self, result: MergeResult) -> None:
        """The probe of a merge before it is published: its deltas (fused) or LoRA factors finite and
        within ``serving_max_adapter_value`` (FAILED_PRECONDITION naming the tensor)."""
        tensors = dict(result.deltas or {})
        for name, (a, b) in (result.lora or {}).items():
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, b
        check_tensor_values(tensors, what=f"the merge of {', '.join(result.merge.expert_ids)}", max_abs=self.settings.serving_max_adapter_value)

    def merged_files(self, adapters: list[Adapter], result: MergeResult) -> dict[str, bytes]:
        """The merged-model artifact's files: the LoRA (or fused weights) and merge.json."""
        rm = result.merge
        info = {
            "method": rm.method,
            "experts": rm.to_dict()["experts"],
            "base_model": adapters[0].base_model.to_dict(),
            "rank": result.rank,
            "alpha": result.rank,
            "fused": rm.fuse,
            "density": rm.density,
            "sign_election": rm.sign_election,
            "variant": rm.variant,
            "seed": rm.seed,
            "output_rank": rm.output_rank,
            "svd_relative_error_max": result.svd_error_max,
            "svd_relative_error_mean": result.svd_error_mean,
            "skills": sorted({str(a.info.get("skill", "")) for a in adapters if a.info.get("skill")}),
            "merge": rm.to_dict(),
        }
        files = {MERGE_JSON: json.dumps(info, indent=2, sort_keys=True).encode()}
        if rm.fuse:
            # Fused: the adapted modules' full weights (base + ΔW in fp32, cast to the base dtype).
            unet = self.engine.base_unet
            weights = {}
            for name, delta in (result.deltas or {}).items():
                w = unet.get_submodule(name).weight
                weights[f"unet.{name}.weight"] = (w.detach().float() + delta.to(w.device)).to(w.dtype)
            files[FUSED_FILE] = safetensors_bytes(weights, {"selma.fused": "1"})
        else:
            files[DIFFUSERS_FILE] = safetensors_bytes(to_diffusers(result.lora or {}))
        return files

    def _run_merge(self, ctx: JobContext) -> JobResult:
        spec = ctx.spec
        params = params_from_dict(spec.get("merge") or {})
        register = spec.get("register", True)
        adapters, rm = self.prepare_merge(params, for_serving=bool(register))
        artifact_id = self.store.new_id(ArtifactKind.MERGED_MODEL, ctx.idempotency_key)
        modules_total = len(adapters[0].modules)
        stats: dict[str, Any] = {
            "expert_count": len(adapters),
            "modules_total": modules_total,
            "resolved_merge": spec_json(rm),
        }
        ctx.update(stats=stats, message="merging")
        if self.store.exists(artifact_id):  # an earlier attempt published it: only registration is left
            manifest = self.store.get(artifact_id)
            info = json.loads(self.store.read_bytes(manifest, MERGE_JSON))
            stats.update(
                modules_merged=modules_total,
                output_rank=int(info.get("rank", 0)),
                svd_relative_error_max=float(info.get("svd_relative_error_max", 0.0)),
                svd_relative_error_mean=float(info.get("svd_relative_error_mean", 0.0)),
            )
        else:
            if rm.fuse:
                self.engine.load_base()  # fused weights need the base weights

            def progress(done: int, total: int) -> None:
                ctx.progress(done, total, unit="modules", stats={"modules_merged": done})

            result = self.run_merge(adapters, rm, progress=progress, check_cancelled=ctx.check_cancelled)
            self.check_result(result)
            files = self.merged_files(adapters, result)
            ctx.check_cancelled()
            labels = {"selma.dev/run": spec.get("run", "")} if spec.get("run") else {}
            skills = json.loads(files[MERGE_JSON])["skills"]
            if len(skills) == 1:
                labels["selma.dev/skill"] = skills[0]
            with self.store.writer(
                ArtifactKind.MERGED_MODEL,
                id=artifact_id,
                parents=[a.id for a in adapters],
                parameters=json.loads(files[MERGE_JSON]),
                name=spec.get("model_name") or None,
                labels=labels,
            ) as w:
                for path, data in sorted(files.items()):
                    w.put_bytes(path, data)
            manifest = w.manifest
            assert manifest is not None
            stats.update(
                modules_merged=modules_total,
                output_rank=result.rank,
                svd_relative_error_max=result.svd_error_max,
                svd_relative_error_mean=result.svd_error_mean,
            )
        stats["output_bytes"] = manifest.size
        message = f"merged {len(adapters)} experts ({rm.method}) into {manifest.id}"
        if register:
            name = spec["model_name"]
            self.registry.register(name, manifest, replace=bool(spec.get("replace")), load=bool(spec.get("load")))
            stats["registered_model_name"] = name
            message += f", registered as {name}"
        return JobResult(output=output_ref(manifest), stats=stats, message=message)

    # --- models

    def resolve_artifact(self, *, id: str = "", uri: str = "", kind: ArtifactKind | None = None, sha256: str = "") -> Manifest:  # noqa: A002
        """An ArtifactRef → manifest: by id, or by the id at the end of its uri; kind and sha256 checked."""
        from_uri = uri.rstrip("/").rsplit("/", 1)[-1] if uri else ""
        if not id and not from_uri:
            raise InvalidArgument("artifact needs an id or a uri", field="artifact")
        if id and from_uri and id != from_uri:
            raise InvalidArgument(f"artifact id {id!r} and uri {uri!r} disagree", field="artifact")
        if uri and uri.rstrip("/") != self.store.storage.uri_for(f"{ARTIFACTS_PREFIX}/{from_uri}"):
            # Never resolve another store's artifact by its id here: same id, different bytes (or none).
            raise InvalidArgument(
                f"artifact uri {uri!r} is not in this service's artifact store ({self.store.uri}); "
                "copy the artifact there, or pass the id of an artifact in this store",
                field="artifact.uri",
            )
        manifest = self.store.get(id or from_uri)
        if kind is not None and manifest.kind != kind:
            raise InvalidArgument(f"artifact {manifest.id} is a {manifest.kind.value}, not a {kind.value}", field="artifact.kind")
        if sha256 and sha256 != manifest.digest:
            raise FailedPrecondition(f"artifact {manifest.id} has sha256 {manifest.digest}, not {sha256}", field="artifact.sha256")
        return manifest

    # --- export and lineage

    def export(self, *, model_name: str = "", expert_id: str = "", fmt: str = "diffusers") -> ExportedFile:
        """A registered model's or an expert's LoRA as one safetensors file (scale 1)."""
        if bool(model_name) == bool(expert_id):
            raise InvalidArgument("give exactly one of model_name or expert_id", field="source")
        if model_name:
            entry = self.registry.get(model_name)
            adapter = load_adapter(self.store, entry.manifest, max_abs=self.settings.serving_max_adapter_value)
            stem = model_name
        else:
            adapter = self.experts.get(expert_id)
            stem = adapter.id
        data = adapter_file(adapter, fmt)
        return ExportedFile(
            file_name=f"{stem}_{fmt}.safetensors",
            data=data,
            sha256=hashlib.sha256(data).hexdigest(),
            fmt=fmt,
            rank=adapter.rank,
        )

    def lineage(self, artifact_id: str, max_depth: int = 0) -> list[Manifest]:
        """The artifact and its ancestors breadth first, each once, up to ``max_depth`` generations (0 = all)."""
        if max_depth < 0:
            raise InvalidArgument(f"max_depth must be >= 0; got {max_depth}", field="max_depth")
        if max_depth == 0:
            return self.store.lineage(artifact_id)
        first = self.store.get(artifact_id)
        out, seen = [first], {artifact_id}
        queue = deque((p, 1) for p in first.parents)
        while queue:
            parent, depth = queue.popleft()
            if parent in seen or depth > max_depth:
                continue
            seen.add(parent)
            try:
                m = self.store.get(parent)
            except NotFound:
                continue
            out.append(m)
            queue.extend((p, depth + 1) for p in m.parents)
        return out

    # --- retention

    @property
    def gc_grace(self) -> timedelta:
        return timedelta(seconds=self.settings.serving_gc_grace_seconds)

    def collect_garbage(self, *, dry_run: bool) -> GcReport:
        """Remove what nothing retained references (selma.retention); ``dry_run`` removes nothing."""
        with self._retention:
            return collect_garbage(self.store, dry_run=dry_run, grace=self.gc_grace)

    def delete_run(self, run: str, *, dry_run: bool) -> RunDeletion:
        """Delete a run's job records, scratch and the artifacts nothing outside it depends on."""
        with self._retention:
            return delete_run(self.store, run, dry_run=dry_run)
