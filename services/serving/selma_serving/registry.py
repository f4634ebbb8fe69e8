"""Registered models: names (artifact aliases) pointing at merged-model or expert artifacts.

The registration itself lives in the artifact store (``ArtifactStore.set_alias``), so every
replica sees the same names; what each replica holds in memory (the fused UNet) is local.
A registered model is served fused: its delta is added into a UNet copy that shares all
other weights with the base model.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch

from selma.artifacts import ArtifactKind, ArtifactStore, Manifest
from selma.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SelmaError
from selma.retention import active_jobs_using_model
from selma_serving import metrics
from selma_serving.engine import Engine, fused_copy
from selma_serving.lora import (
    DIFFUSERS_FILE,
    FUSED_FILE,
    MERGE_JSON,
    Adapter,
    BaseModelId,
    check_model_name,
    load_expert,
    parse_state_dict,
    read_safetensors,
)
from selma_serving.merge import adapter_deltas

log = logging.getLogger(__name__)

_SERVABLE = (ArtifactKind.MERGED_MODEL, ArtifactKind.EXPERT)


@dataclass
class ModelEntry:
    """A registered model as ListModels reports it."""

    name: str
    manifest: Manifest
    kind: str  # "merged" or "expert"
    state: str  # REGISTERED, LOADING, LOADED, FAILED
    registered_at: datetime
    base_model: BaseModelId
    merge: dict[str, Any] | None
    fused_only: bool
    loaded_at: datetime | None = None
    memory_bytes: int = 0
    error: str = ""


@dataclass
class _Loaded:
    artifact_id: str
    unet: torch.nn.Module
    loaded_at: datetime
    nbytes: int


def read_merge_json(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    try:
        return json.loads(store.read_bytes(manifest, MERGE_JSON))
    except NotFound:
        raise FailedPrecondition(f"merged model {manifest.id} has no {MERGE_JSON}") from None
    except ValueError as e:
        raise FailedPrecondition(f"merged model {manifest.id} has an unreadable {MERGE_JSON}: {e}") from None


def load_adapter(store: ArtifactStore, manifest: Manifest, *, max_abs: float = math.inf) -> Adapter:
    """The LoRA of a merged model (scale 1, alpha = rank) or an expert; FailedPrecondition if stored fused only
    or if a tensor is not finite or over ``max_abs`` in magnitude."""
    if manifest.kind == ArtifactKind.EXPERT:
        return load_expert(store, manifest, max_abs=max_abs)
    info = read_merge_json(store, manifest)
    if info.get("fused"):
        raise FailedPrecondition(f"merged model {manifest.id} is stored as fused weights only; it has no adapter to export")
    data = store.read_bytes(manifest, DIFFUSERS_FILE)
    modules = parse_state_dict(read_safetensors(data, what=f"merged model {manifest.id}"), what=f"merged model {manifest.id}", max_abs=max_abs)
    return Adapter(id=manifest.id, base_model=BaseModelId.from_dict(info.get("base_model")), modules=modules, manifest=manifest, info=info)


class ModelRegistry:
    """Register, load, unload and look up named models for one Engine."""

    def __init__(self, store: ArtifactStore, engine: Engine) -> None:
        self.store = store
        self.engine = engine
        engine.registry = self
        self._loaded: dict[str, _Loaded] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()

    # --- description

    def _describe(self, name: str, manifest: Manifest, registered_at: datetime) -> ModelEntry:
        if manifest.kind == ArtifactKind.EXPERT:
            info = dict(manifest.parameters)
            base = BaseModelId.from_dict(info.get("base_model"))
            merge, fused_only, kind = None, False, "expert"
        else:
            info = read_merge_json(self.store, manifest)
            base = BaseModelId.from_dict(info.get("base_model"))
            merge = info.get("merge")
            fused_only, kind = bool(info.get("fused")), "merged"
        entry = ModelEntry(name, manifest, kind, "REGISTERED", registered_at, base, merge, fused_only)
        with self._lock:
            loaded = self._loaded.get(name)
            if name in self._loading and self._loading[name].locked():
                entry.state = "LOADING"
            if loaded is not None and loaded.artifact_id == manifest.id:
                entry.state, entry.loaded_at, entry.memory_bytes = "LOADED", loaded.loaded_at, loaded.nbytes
            elif name in self._failed:
                entry.state, entry.error = "FAILED", self._failed[name]
        return entry

    def get(self, name: str) -> ModelEntry:
        check_model_name(name)
        try:
            alias = self.store.get_alias(name)
        except NotFound:
            self._drop(name)  # deleted through another replica: free what this one held
            raise NotFound(f"no model registered as {name!r}; `selma models list` (ListModels) shows the names", field="model_name") from None
        manifest = self.store.get(alias.artifact_id)
        if manifest.kind not in _SERVABLE:
            raise NotFound(f"{name!r} names a {manifest.kind.value} artifact, not a model", field="model_name")
        return self._describe(name, manifest, alias.updated_at)

    def list(self) -> list[ModelEntry]:
        out = []
        for alias in self.store.list_aliases():
            if alias.name == "base":
                continue
            try:
                manifest = self.store.get(alias.artifact_id)
                if manifest.kind in _SERVABLE:
                    out.append(self._describe(alias.name, manifest, alias.updated_at))
            except (NotFound, FailedPrecondition, InvalidArgument) as e:
                log.warning("skipping alias %s: %s", alias.name, e)
        return out

    # --- registration

    def register(self, name: str, manifest: Manifest, *, replace: bool = False, load: bool = False) -> tuple[ModelEntry, bool]:
        """Point ``name`` at a merged-model or expert artifact (idempotent for the same artifact)."""
        check_model_name(name)
        if manifest.kind not in _SERVABLE:
            raise InvalidArgument(f"{manifest.id} is a {manifest.kind.value} artifact; register a merged model or an expert", field="artifact")
        base = BaseModelId.from_dict(
            manifest.parameters.get("base_model") if manifest.kind == ArtifactKind.EXPERT else read_merge_json(self.store, manifest).get("base_model")
        )
        self.engine.check_base(base, f"artifact {manifest.id}")
        created = True
        try:
            current = self.store.get_alias(name)
        except NotFound:
            current = None
        if current is not None and current.artifact_id == manifest.id:
            created = False
        elif current is not None and not replace:
            raise AlreadyExists(f"model name {name!r} already points at {current.artifact_id}; set replace to point it at {manifest.id}", field="model_name")
        if created:
            self.store.set_alias(name, manifest.id)
            self._drop(name)
            log.info("registered model %s -> %s", name, manifest.id)
        if load:
            self.load(name)
        return self.get(name), created

    # --- memory

    def _drop(self, name: str) -> None:
        with self._lock:
            self._loaded.pop(name, None)
            self._failed.pop(name, None)

    def load(self, name: str) -> tuple[ModelEntry, float]:
        """Fuse the model into a UNet copy (once); returns (entry, seconds spent, 0 if already loaded)."""
        entry = self.get(name)
        if entry.state == "LOADED":
            return entry, 0.0
        with self._lock:
            lock = self._loading.setdefault(name, threading.Lock())
        with lock:
            entry = self.get(name)
            if entry.state == "LOADED":
                return entry, 0.0
            t0 = time.perf_counter()
            try:
                unet, nbytes = self._fuse(entry.manifest)
            except SelmaError as e:
                with self._lock:
                    self._failed[name] = str(e)
                raise FailedPrecondition(f"cannot load model {name!r}: {e}", field="model_name") from e
            seconds = time.perf_counter() - t0
            with self._lock:
                self._loaded[name] = _Loaded(entry.manifest.id, unet, datetime.now(timezone.utc), nbytes)
                self._failed.pop(name, None)
            metrics.MODEL_LOAD_SECONDS.labels("registered").observe(seconds)
            log.info("loaded model %s (%s, %d bytes fused) in %.2f s", name, entry.manifest.id, nbytes, seconds)
        return self.get(name), seconds

    def _fuse(self, manifest: Manifest) -> tuple[torch.nn.Module, int]:
        base_unet = self.engine.base_unet
        if manifest.kind == ArtifactKind.MERGED_MODEL and read_merge_json(self.store, manifest).get("fused"):
            what = f"merged model {manifest.id}"
            weights = read_safetensors(self.store.read_bytes(manifest, FUSED_FILE), what=what)
            prefix = "unet."
            return fused_copy(base_unet, weights={k.removeprefix(prefix).removesuffix(".weight"): v for k, v in weights.items()}, what=what)
        max_abs = self.engine.settings.serving_max_adapter_value
        adapter = load_adapter(self.store, manifest, max_abs=max_abs)
        self.engine.check_base(adapter.base_model, f"artifact {manifest.id}")
        return fused_copy(base_unet, deltas=adapter_deltas(adapter), max_abs=max_abs, what=f"artifact {manifest.id}")

    def unload(self, name: str) -> ModelEntry:
        self.get(name)  # NotFound for unknown names
        self._drop(name)
        return self.get(name)

    def delete(self, name: str) -> tuple[ModelEntry, bool]:
        """Unregister ``name`` and unload it; returns (the entry as it was, whether it was loaded).

        The artifact stays: garbage collection removes it once nothing else references it.
        """
        entry = self.get(name)  # NotFound for unknown names
        users = active_jobs_using_model(self.store.storage, name)
        if users:
            names = ", ".join(f"{j.job_id} ({j.phase.lower()})" for j in users[:5])
            raise FailedPrecondition(f"model {name!r} is used by {len(users)} unfinished job(s): {names}; wait for them or cancel them, then delete it",
                                     field="model_name")
        self.store.delete_alias(name)
        with self._lock:
            was_loaded = self._loaded.pop(name, None) is not None
            self._failed.pop(name, None)
        log.info("deleted model %s (was %s)", name, entry.manifest.id)
        return entry, was_loaded

    def unet(self, name: str) -> tuple[torch.nn.Module, ModelEntry]:
        """The fused UNet of a registered model, loading it on first use."""
        unet, entry, _ = self.unet_and_hit(name)
        return unet, entry

    def unet_and_hit(self, name: str) -> tuple[torch.nn.Module, ModelEntry, bool]:
        """(UNet, entry, hit): hit when this replica already held the model's current artifact fused."""
        entry, seconds = self.load(name)
        with self._lock:
            loaded = self._loaded.get(name)
        if loaded is None:  # unloaded between load() and here: load again
            entry, seconds = self.load(name)
            with self._lock:
                loaded = self._loaded[name]
        return loaded.unet, entry, seconds == 0.0
