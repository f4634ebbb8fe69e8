"""Training checkpoints in storage: safetensors for tensors, JSON for scalars, never pickle.

A checkpoint ``<work>/checkpoints/step-00000500/`` holds

* ``lora.safetensors``   the trainable LoRA parameters by their module-path names (fp32);
* ``state.safetensors``  optimizer moments and step counters, and the RNG states (torch CPU,
  the trainer's noise generator, CUDA, numpy's MT19937 keys, Python's ``random`` state);
* ``best.safetensors``   with early stopping, the LoRA parameters at the best validation loss so
  far (so a resumed run exports the same best adapter as an uninterrupted one);
* ``state.json``         step, data cursor, early-stopping state, optimizer param groups, LR-scheduler and grad-scaler
  state, loss history, the RNG scalars, and the sha256 of both tensor files.

Each object is written atomically and ``state.json`` is written last: it is the commit point,
so a trainer killed mid-save leaves a checkpoint without ``state.json`` that is ignored.  On
load, a checkpoint whose files are missing, unreadable or do not match the recorded sha256 is
*corrupt*: the loader falls back to the previous one and reports it (the job status shows a
warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from selma.errors import NotFound, SelmaError
from selma.storage import Storage

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"step-(\d{8})/state\.json$")


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    cursor: int
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    loss_history: list[list[float]] = field(default_factory=list)
    interval_loss: float = 0.0
    validation: dict[str, Any] = field(default_factory=dict)  # early stopping: best, best step, evaluations without improvement, history
    best_lora: dict[str, torch.Tensor] | None = None


@dataclass
class CheckpointInfo:
    step: int
    uri: str
    created_at: str
    loss: float


def _digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def capture_rng(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states: tensors for safetensors, scalars for JSON."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {"numpy": [name, int(pos), int(has_gauss), float(cached)], "python": [version, gauss_next]}
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    name, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((name, tensors["rng.numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(int(x) for x in tensors["rng.python"].tolist()), gauss_next))


class CheckpointStore:
    """Saves, lists, loads (with fallback) and prunes checkpoints under one storage prefix."""

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"

    def _dir(self, step: int) -> str:
        return f"{self.prefix}step-{step:08d}/"

    def steps(self) -> list[int]:
        """Committed checkpoint steps (those with a state.json), oldest first."""
        try:
            objs = self.storage.list(self.prefix)
        except NotFound:
            return []
        return sorted(int(m.group(1)) for o in objs if (m := _STEP_RE.search(o.key)))

    def save(self, state: TrainState, generator: torch.Generator) -> CheckpointInfo:
        d = self._dir(state.step)
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_state_keys: dict[str, list[str]] = {}
        for idx, st in state.optimizer["state"].items():
            keys = []
            for k, v in st.items():
                t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
                opt_tensors[f"optimizer.{idx}.{k}"] = t.detach().cpu().contiguous()
                keys.append(k)
            opt_state_keys[str(idx)] = keys
        rng_tensors, rng_scalars = capture_rng(generator)
        lora_bytes = st_save({k: v.detach().cpu().contiguous() for k, v in state.lora.items()})
        state_bytes = st_save({**opt_tensors, **rng_tensors})
        self.storage.put_bytes(d + "lora.safetensors", lora_bytes)
        self.storage.put_bytes(d + "state.safetensors", state_bytes)
        files = {"lora.safetensors": _digest(lora_bytes), "state.safetensors": _digest(state_bytes)}
        if state.best_lora is not None:
            best_bytes = st_save({k: v.detach().cpu().contiguous() for k, v in state.best_lora.items()})
            self.storage.put_bytes(d + "best.safetensors", best_bytes)
            files["best.safetensors"] = _digest(best_bytes)
        created = datetime.now(timezone.utc).isoformat()
        doc = {
            "format": 1,
            "step": state.step,
            "cursor": state.cursor,
            "created_at": created,
            "interval_loss": state.interval_loss,
            "loss_history": state.loss_history,
            "optimizer_param_groups": state.optimizer["param_groups"],
            "optimizer_state_keys": opt_state_keys,
            "lr_scheduler": state.lr_scheduler,
            "scaler": state.scaler,
            "rng": rng_scalars,
            "validation": state.validation,
            "files": files,
        }
        self.storage.put_bytes(d + "state.json", json.dumps(doc, default=_json_default).encode(), content_type="application/json")
        return CheckpointInfo(step=state.step, uri=self.storage.uri_for(d.rstrip("/")), created_at=created, loss=state.interval_loss)

    def load_latest(self, generator: torch.Generator) -> tuple[TrainState | None, list[str]]:
        """The newest loadable checkpoint (RNG restored) and warnings about corrupt newer ones."""
        warnings: list[str] = []
        bad: list[int] = []
        for step in reversed(self.steps()):
            try:
                state = self._load(step, generator)
            except (SelmaError, ValueError, KeyError, OSError, RuntimeError, json.JSONDecodeError) as e:
                bad.append(step)
                log.warning("checkpoint at step %d is unusable: %s", step, e)
                continue
            if bad:
                warnings.append(f"checkpoint {', '.join(map(str, bad))} corrupt; resumed from {step}")
            return state, warnings
        if bad:
            warnings.append(f"checkpoint {', '.join(map(str, bad))} corrupt; no usable checkpoint, started from step 0")
        return None, warnings

    def _load(self, step: int, generator: torch.Generator) -> TrainState:
        d = self._dir(step)
        doc = json.loads(self.storage.get_bytes(d + "state.json"))
        blobs = {}
        for name, sha in doc["files"].items():
            b = self.storage.get_bytes(d + name)
            if _digest(b) != sha:
                raise ValueError(f"{name} sha256 mismatch")
            blobs[name] = b
        lora = st_load(blobs["lora.safetensors"])
        tensors = st_load(blobs["state.safetensors"])
        opt_state: dict[int, dict[str, Any]] = {}
        for idx, keys in doc["optimizer_state_keys"].items():
            opt_state[int(idx)] = {k: tensors[f"optimizer.{idx}.{k}"] for k in keys}
        groups = []
        for g in doc["optimizer_param_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        restore_rng(tensors, doc["rng"], generator)
        return TrainState(
            step=int(doc["step"]),
            cursor=int(doc["cursor"]),
            lora=lora,
            optimizer={"state": opt_state, "param_groups": groups},
            lr_scheduler=doc["lr_scheduler"],
            scaler=doc.get("scaler"),
            rng=doc["rng"],
            loss_history=doc.get("loss_history", []),
            interval_loss=float(doc.get("interval_loss", 0.0)),
            validation=doc.get("validation") or {},
            best_lora=st_load(blobs["best.safetensors"]) if "best.safetensors" in blobs else None,
        )

    def info(self) -> list[CheckpointInfo]:
        out = []
        for step in self.steps():
            try:
                doc = json.loads(self.storage.get_bytes(self._dir(step) + "state.json"))
                out.append(CheckpointInfo(step=step, uri=self.storage.uri_for(self._dir(step).rstrip("/")), created_at=doc["created_at"], loss=float(doc.get("interval_loss", 0))))
            except (SelmaError, ValueError, KeyError):
                continue
        return out

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` checkpoints (0 = keep all); commit point first."""
        if keep <= 0:
            return
        for step in self.steps()[:-keep]:
            d = self._dir(step)
            self.storage.delete(d + "state.json")
            self.storage.delete_prefix(d)


def _json_default(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")
