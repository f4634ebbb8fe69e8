"""LoRA adapters as plain tensors: reading experts, validating them, writing diffusers and kohya files.

An adapter is a mapping ``module name → LoraModule(A, B, alpha)`` over UNet modules (names as
in ``unet.named_modules()``, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``).
Its weight delta is ΔW = (alpha / r)·B·A.  Only safetensors files are read.

The scale convention is :mod:`selma.lora_format`'s: files carry α/r in their up matrices, so
alpha here comes only from per-module ``….alpha`` tensors in a file (else alpha = r), never from
``expert.json``; files written here are exact at scale 1.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from selma.artifacts import ArtifactKind, ArtifactStore, Manifest
from selma.errors import FailedPrecondition, InvalidArgument, NotFound, quote
from selma.jobs import recorded_expert, run_stage_key
from selma.lora_format import check_format, fold_scale

log = logging.getLogger(__name__)

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
FUSED_FILE = "fused_unet_weights.safetensors"
EXPERT_JSON = "expert.json"
MERGE_JSON = "merge.json"

# Key suffixes (down = A, up = B) in the layouts we accept as input.
_SUFFIXES = {
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_A.default.weight": "A",
    ".lora_B.default.weight": "B",
}
_ALPHA_SUFFIX = ".alpha"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: A (r × in[…]), B (out × r[×1×1]) and alpha; ΔW = (alpha/r)·B·A."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module adapts (out, in[, kh, kw])."""
        return (int(self.B.shape[0]),) + tuple(int(s) for s in self.A.shape[1:])

    def delta(self) -> torch.Tensor:
        """ΔW in fp32, shaped like the base weight."""
        d = self.B.float().flatten(1) @ self.A.float().flatten(1)
        return (d * self.scale).reshape(self.weight_shape)


def block_of(module: str) -> str | None:
    """The UNet block a module belongs to: "down", "mid", "up", or None (embeddings, conv_in/out)."""
    if module.startswith("down_blocks."):
        return "down"
    if module.startswith("mid_block."):
        return "mid"
    if module.startswith("up_blocks."):
        return "up"
    return None


MAX_VALUE_SETTING = "serving_max_adapter_value"


def check_tensor_values(tensors: Mapping[str, torch.Tensor], *, what: str, max_abs: float = math.inf) -> None:
    """Every tensor finite and at most ``max_abs`` in magnitude (the ``serving_max_adapter_value`` setting).

    An adapter or merge with values like 1e30 is not wrong in shape but turns every image black:
    FAILED_PRECONDITION naming ``what`` (the expert or model) and the first bad tensor.
    """
    for key, tensor in tensors.items():
        if tensor.numel() == 0:
            continue
        t = tensor.detach()
        if not bool(torch.isfinite(t).all()):
            raise FailedPrecondition(f"{what}: tensor {quote(key, 200)} has non-finite values (NaN or inf)", field="experts")
        if math.isfinite(max_abs):
            peak = float(t.abs().max())
            if peak > max_abs:
                raise FailedPrecondition(
                    f"{what}: tensor {quote(key, 200)} has values up to {peak:g} in magnitude, over "
                    f"SELMA_{MAX_VALUE_SETTING.upper()}={max_abs:g}; the adapter is broken (retrain it)",
                    field="experts",
                )


def parse_state_dict(sd: Mapping[str, torch.Tensor], *, what: str, max_abs: float = math.inf) -> dict[str, LoraModule]:
    """UNet LoRA tensors (diffusers ``unet.….lora.down/up.weight`` or PEFT ``lora_A/lora_B``) → modules.

    A module's alpha is its ``….alpha`` tensor if the file has one, else its rank (scale 1, the
    convention of :mod:`selma.lora_format` and diffusers' default).  Every A and B is finite and at
    most ``max_abs`` in magnitude (:func:`check_tensor_values`).
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in sd.items():
        if key.startswith(("text_encoder", "lora_te")):
            raise InvalidArgument(f"{what} adapts the text encoder ({key}); only UNet LoRAs can be merged and served", field="experts")
        if key.startswith("lora_unet_"):
            raise InvalidArgument(f"{what} is in kohya format; give the diffusers file ({DIFFUSERS_FILE})", field="experts")
        name = key.removeprefix("unet.").removeprefix("base_model.model.")
        if name.endswith(_ALPHA_SUFFIX):
            alphas[name[: -len(_ALPHA_SUFFIX)]] = float(tensor.float().item())
            continue
        for suffix, part in _SUFFIXES.items():
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise InvalidArgument(f"{what} has an unexpected tensor {key!r}; expected diffusers LoRA keys (….lora.down.weight / ….lora.up.weight)", field="experts")
    if not parts:
        raise InvalidArgument(f"{what} holds no LoRA tensors", field="experts")
    check_tensor_values({k: v for k, v in sd.items() if not k.endswith(_ALPHA_SUFFIX)}, what=what, max_abs=max_abs)
    out: dict[str, LoraModule] = {}
    for module, p in sorted(parts.items()):
        if set(p) != {"A", "B"}:
            raise InvalidArgument(f"{what}: module {module} has only its {'down' if 'A' in p else 'up'} matrix", field="experts")
        A, B = p["A"], p["B"]
        if A.dim() not in (2, 4) or B.dim() != A.dim() or B.shape[1] != A.shape[0] or (B.dim() == 4 and tuple(B.shape[2:]) != (1, 1)):
            raise InvalidArgument(f"{what}: module {module} has incompatible shapes down {tuple(A.shape)} / up {tuple(B.shape)}", field="experts")
        a = alphas.get(module, float(A.shape[0]))
        if not math.isfinite(a) or a <= 0:
            raise InvalidArgument(f"{what}: alpha must be a positive number; got {a}", field="experts")
        out[module] = LoraModule(A=A.detach(), B=B.detach(), alpha=a)
    return out


def read_safetensors(data: bytes, *, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InvalidArgument(f"{what} is not a readable safetensors file: {e}", field="experts") from None


@dataclass(frozen=True)
class BaseModelId:
    """Which base model an adapter belongs to (ModelRef source/revision/variant)."""

    source: str
    revision: str = ""
    variant: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BaseModelId:
        d = d or {}
        return cls(source=str(d.get("source", "")).rstrip("/"), revision=str(d.get("revision", "") or ""), variant=str(d.get("variant", "") or ""))

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "revision": self.revision, "variant": self.variant}

    def __str__(self) -> str:
        extra = "".join(f"@{x}" for x in (self.revision, self.variant) if x)
        return f"{self.source}{extra}"


@dataclass(frozen=True)
class Adapter:
    """A parsed expert (or merged model) LoRA with what it was trained on."""

    id: str
    base_model: BaseModelId
    modules: dict[str, LoraModule] = field(hash=False, compare=False)
    manifest: Manifest | None = field(default=None, hash=False, compare=False)
    info: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    @property
    def rank(self) -> int:
        return max(self.ranks)

    @property
    def nbytes(self) -> int:
        return sum(m.A.numel() * m.A.element_size() + m.B.numel() * m.B.element_size() for m in self.modules.values())


def resolve_expert(store: ArtifactStore, ref: str, *, field_name: str = "expert_id") -> Manifest:
    """An expert artifact by id or ``<run>/<skill>``: the expert that run recorded (its training job's output).

    Labels never decide: a later artifact carrying the same run/skill labels does not shadow the
    run's expert.  To choose among experts by labels, ask ListExperts and pass the id.
    """
    if not ref:
        raise InvalidArgument("expert_id is empty; give an expert artifact id or <run>/<skill>", field=field_name)
    if "/" in ref:
        run, _, skill = ref.partition("/")
        expert_id = recorded_expert(store.storage, run, skill)
        if expert_id is None:
            raise NotFound(
                f"run {run!r} has recorded no expert for skill {skill!r} (its training job {run_stage_key(run, skill, 'training')!r} "
                "has not succeeded); `selma experts list` (ListExperts) lists experts by label; pass one by id",
                field=field_name,
            )
        ref = expert_id
    try:
        manifest = store.get(ref)
    except InvalidArgument:
        raise InvalidArgument(f"expert id {ref!r} is neither an artifact id nor <run>/<skill>", field=field_name) from None
    except NotFound:
        raise NotFound(f"expert {ref!r} does not exist; `selma experts list` (ListExperts) shows what exists", field=field_name) from None
    if manifest.kind != ArtifactKind.EXPERT:
        raise InvalidArgument(f"{ref} is a {manifest.kind.value} artifact, not an expert", field=field_name)
    return manifest


def expert_info(store: ArtifactStore, manifest: Manifest) -> dict[str, Any]:
    """expert.json (falling back to the manifest parameters, which carry the same fields)."""
    info = dict(manifest.parameters)
    try:
        info.update(json.loads(store.read_bytes(manifest, EXPERT_JSON)))
    except NotFound:
        pass
    except ValueError as e:
        raise FailedPrecondition(f"expert {manifest.id} has an unreadable {EXPERT_JSON}: {e}") from None
    return info


def load_expert(store: ArtifactStore, manifest: Manifest, *, max_abs: float = math.inf) -> Adapter:
    """Read and validate one expert artifact's diffusers LoRA (values finite and at most ``max_abs``)."""
    info = expert_info(store, manifest)
    what = f"expert {manifest.id}"
    try:
        data = store.read_bytes(manifest, DIFFUSERS_FILE)
    except NotFound:
        raise FailedPrecondition(f"{what} has no {DIFFUSERS_FILE}; it may be unfinished or in another format") from None
    check_format(info, what=what)  # every format reads the same way: the file carries the scale
    modules = parse_state_dict(read_safetensors(data, what=what), what=what, max_abs=max_abs)
    base = BaseModelId.from_dict(info.get("base_model"))
    if not base.source:
        raise FailedPrecondition(f"{what} does not say which base model it was trained on (expert.json base_model.source)")
    return Adapter(id=manifest.id, base_model=base, modules=modules, manifest=manifest, info=info)


class ExpertCache:
    """Parsed experts by artifact id (artifacts are immutable, so entries never go stale)."""

    def __init__(self, store: ArtifactStore, max_entries: int = 32, *, max_abs: float = math.inf) -> None:
        self.store = store
        self.max_entries = max_entries
        self.max_abs = max_abs  # largest |value| an expert's tensors may hold (serving_max_adapter_value)
        self._items: OrderedDict[str, Adapter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: str, *, field_name: str = "expert_id") -> Adapter:
        manifest = resolve_expert(self.store, ref, field_name=field_name)
        with self._lock:
            if manifest.id in self._items:
                self._items.move_to_end(manifest.id)
                return self._items[manifest.id]
        adapter = load_expert(self.store, manifest, max_abs=self.max_abs)
        with self._lock:
            self._items[manifest.id] = adapter
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return adapter


def validate_compatible(adapters: list[Adapter]) -> None:
    """Experts merge only if they share a base model and adapt the same modules with the same shapes."""
    if not adapters:
        raise InvalidArgument("give at least one expert to merge", field="experts")
    first = adapters[0]
    for other in adapters[1:]:
        if other.base_model != first.base_model:
            raise FailedPrecondition(
                f"experts {first.id} and {other.id} were trained on different base models ({first.base_model} vs {other.base_model}); "
                "merge only experts of one base model",
                field="experts",
            )
        if set(other.modules) != set(first.modules):
            missing = sorted(set(first.modules) ^ set(other.modules))
            raise InvalidArgument(
                f"experts {first.id} and {other.id} adapt different modules (e.g. {missing[0]}); they must target the same modules",
                field="experts",
            )
        for name, m in first.modules.items():
            if other.modules[name].weight_shape != m.weight_shape:
                raise InvalidArgument(
                    f"experts {first.id} and {other.id} disagree on the shape of {name}: {m.weight_shape} vs {other.modules[name].weight_shape}",
                    field="experts",
                )


def check_against_unet(adapter_modules: Mapping[str, tuple[int, ...]], unet: torch.nn.Module, *, what: str) -> None:
    """Every adapted module must exist in the base UNet with a weight of the adapter's shape."""
    for name, shape in adapter_modules.items():
        try:
            mod = unet.get_submodule(name)
        except AttributeError:
            raise InvalidArgument(f"{what} adapts {name}, which the base model does not have; it was trained on another architecture", field="experts") from None
        weight = getattr(mod, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(shape):
            got = tuple(weight.shape) if weight is not None else None
            raise InvalidArgument(f"{what}: {name} has shape {tuple(shape)} but the base model's weight is {got}", field="experts")


# --- writing --------------------------------------------------------------------------------


def to_diffusers(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(A, B) at scale 1 → diffusers keys ``unet.<module>.lora.down/up.weight`` (load_lora_weights reads them)."""
    out: dict[str, torch.Tensor] = {}
    for name, (A, B) in modules.items():
        out[f"unet.{name}.lora.down.weight"] = A.contiguous()
        out[f"unet.{name}.lora.up.weight"] = B.contiguous()
    return out


def to_kohya(modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(A, B) at scale 1 → kohya keys ``lora_unet_<module_with_underscores>.lora_down/up.weight`` + ``.alpha`` = rank."""
    out: dict[str, torch.Tensor] = {}
    for name, (A, B) in modules.items():
        stem = "lora_unet_" + name.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = A.contiguous()
        out[f"{stem}.lora_up.weight"] = B.contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(A.shape[0]))
    return out


def unit_scale(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's (A, B) with alpha/r folded into B, so the file is exact at scale 1."""
    return {n: (m.A, fold_scale(m.B, m.alpha, m.rank)) for n, m in adapter.modules.items()}


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    return save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata={"format": "pt", **(metadata or {})})


def adapter_file(adapter: Adapter, fmt: str) -> bytes:
    """An adapter as a safetensors file in ``fmt`` ("diffusers" or "kohya")."""
    modules = unit_scale(adapter)
    if fmt == "kohya":
        return safetensors_bytes(to_kohya(modules))
    if fmt == "diffusers":
        return safetensors_bytes(to_diffusers(modules))
    raise InvalidArgument(f"unknown adapter format {fmt!r}; use diffusers or kohya", field="format")


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_model_name(name: str, *, field_name: str = "model_name") -> str:
    """Registered model names: lower-case DNS labels, 1..63 characters, not "base"."""
    if not name:
        raise InvalidArgument("model_name is required", field=field_name)
    if not _DNS_LABEL.match(name):
        raise InvalidArgument(f"model_name {name!r} must be a lower-case DNS label (a-z, 0-9, '-', 1..63 characters)", field=field_name)
    if name == "base":
        raise InvalidArgument('"base" names the base model; choose another model_name', field=field_name)
    return name
