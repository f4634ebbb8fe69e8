"""Merging expert LoRAs, always on their weight deltas ΔWᵢ = (αᵢ/rᵢ)·BᵢAᵢ, never on A and B separately.

SELMA's merge (``mean_delta``) is ΔW = Σᵢ wᵢ·ΔWᵢ with wᵢ = 1/N over the experts given (the
research code divides by the length of a string; we do not).  It is exact as a LoRA of rank
Σrᵢ: stack the A's (A' = [A₁; …; A_N]) and scale the B's (B' = [w₁(α₁/r₁)B₁ | … ]), so that
B'A' = ΔW.  The same result can be truncated by SVD to a smaller rank (the relative Frobenius
error is reported) or added into the base weights.

The ablation methods act entry-wise on the full deltas, in one of two variants.  ``peft`` (the
default) follows PEFT's ``merge_utils`` exactly, so a merge equals PEFT's ``add_weighted_adapter``
with the SVD combination types on the same adapters:

* ``magnitude_prune``: keep each ΔWᵢ's top ⌊density·n⌋ entries by magnitude, then Σ wᵢ·ΔW̃ᵢ.
* ``dare_linear``: keep each entry with probability ``density`` (seeded), rescale by 1/density, Σ wᵢ·ΔW̃ᵢ.
* ``ties``: magnitude-trim, elect a sign per entry from the unweighted trimmed deltas (``total``:
  sign of Σ ΔW̃ᵢ; ``frequency``: the sign most experts hold; a tie goes to +), then
  Σ_agree wᵢ·ΔW̃ᵢ divided by the number of agreeing experts.
* ``dare_ties``: DARE dropping instead of the magnitude trim, then TIES election and mean.

``selma`` is the weight-normalised variant: keep ⌈density·n⌉ entries (at least 1), elect signs
from vᵢ = wᵢ·ΔW̃ᵢ (``frequency`` ties broken by the total), then Σ_agree vᵢ / Σ_agree wᵢ · Σᵢ wᵢ.
It does not change when all weights are scaled together, and with the default weights 1/N it is
the TIES paper's disjoint mean (λ = 1), where PEFT's ``ties`` gives that mean divided by N; at
density 1 with agreeing signs and weights summing to 1 it equals ``mean_delta``.

Their results are full-rank; they are exported by SVD to ``output_rank`` (or to the experts'
common rank, which must then be equal), or fused.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from selma import specs
from selma.api import enum_name
from selma.errors import FailedPrecondition, InvalidArgument
from selma.specs import bounded_weight, expert_weights
from selma.v1 import common_pb2
from selma_serving.lora import Adapter, LoraModule, block_of, validate_compatible

METHODS = ("mean_delta", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_ELECTIONS = ("total", "frequency")
VARIANTS = ("peft", "selma")
_TIES_METHODS = ("ties", "dare_ties")


@dataclass(frozen=True)
class ExpertWeight:
    """One expert in a request: a reference (id or ``<run>/<skill>``), its weight and per-block overrides."""

    ref: str
    weight: float | None = None
    down: float | None = None
    mid: float | None = None
    up: float | None = None


@dataclass(frozen=True)
class MergeParams:
    """A merge as requested (mirrors ``selma.v1.MergeSpec``)."""

    experts: tuple[ExpertWeight, ...]
    method: str = "mean_delta"
    density: float = 0.0
    sign_election: str = "total"
    output_rank: int = 0
    fuse: bool = False
    seed: int = 0
    variant: str = "peft"


@dataclass(frozen=True)
class ResolvedMerge:
    """A merge as executed: artifact ids, every weight filled in. Hashable: it is the cache key."""

    expert_ids: tuple[str, ...]
    weights: tuple[float, ...]
    block_weights: tuple[tuple[float | None, float | None, float | None], ...]
    method: str
    density: float
    sign_election: str
    output_rank: int
    fuse: bool
    seed: int
    variant: str = ""

    def weight(self, i: int, module: str) -> float:
        """Expert i's weight for a module: its block override if set, else its weight."""
        block = block_of(module)
        if block is not None:
            override = self.block_weights[i][("down", "mid", "up").index(block)]
            if override is not None:
                return override
        return self.weights[i]

    def to_dict(self) -> dict[str, Any]:
        """JSON form, shaped like ``selma.v1.MergeSpec`` (proto field names)."""
        experts = []
        for eid, w, (down, mid, up) in zip(self.expert_ids, self.weights, self.block_weights, strict=True):
            e: dict[str, Any] = {"expert_id": eid, "weight": w}
            bw = {k: v for k, v in (("down", down), ("mid", mid), ("up", up)) if v is not None}
            if bw:
                e["block_weights"] = bw
            experts.append(e)
        return {
            "experts": experts,
            "method": self.method,
            "density": self.density,
            "sign_election": self.sign_election,
            "output_rank": self.output_rank,
            "fuse": self.fuse,
            "seed": self.seed,
            "variant": self.variant,
        }


def _finite(x: float | None, what: str, max_abs: float = math.inf) -> float | None:
    if x is None:
        return None
    if not isinstance(x, int | float) or not math.isfinite(x):
        raise InvalidArgument(f"{what} must be a finite number; got {x!r}", field=what)
    return bounded_weight(float(x), what, max_abs, MAX_WEIGHT_SETTING) if math.isfinite(max_abs) else float(x)


MAX_WEIGHT_SETTING = "serving_max_merge_weight"


def resolve(params: MergeParams, adapters: Sequence[Adapter], *, default_density: float = 0.5, max_weight: float = math.inf) -> ResolvedMerge:
    """Check a merge's parameters against its (already loaded) experts and fill in every default.

    Weights and block weights are finite and at most ``max_weight`` in magnitude (the service's
    ``serving_max_merge_weight``)."""
    if not params.experts:
        raise InvalidArgument("give at least one expert to merge", field="experts")
    if len(adapters) != len(params.experts):
        raise InvalidArgument("internal: one adapter per expert expected", field="experts")
    if params.method not in METHODS:
        raise InvalidArgument(f"unknown merge method {params.method!r}; use one of {', '.join(METHODS)}", field="method")
    if params.variant not in VARIANTS:
        raise InvalidArgument(f"unknown merge variant {params.variant!r}; use peft or selma", field="variant")
    if params.sign_election not in SIGN_ELECTIONS:
        raise InvalidArgument(f"unknown sign election {params.sign_election!r}; use total or frequency", field="sign_election")
    ids = [a.id for a in adapters]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InvalidArgument(f"expert {dupes[0]} is listed twice; give each expert once with its weight", field="experts")
    validate_compatible(list(adapters))
    weights = tuple(expert_weights([e.weight for e in params.experts], max_abs=max_weight, setting=MAX_WEIGHT_SETTING))
    blocks = tuple(
        (_finite(e.down, "experts.block_weights.down", max_weight), _finite(e.mid, "experts.block_weights.mid", max_weight),
         _finite(e.up, "experts.block_weights.up", max_weight))
        for e in params.experts
    )
    if params.method in _TIES_METHODS and any(w < 0 for w in weights + tuple(x for b in blocks for x in b if x is not None)):
        raise InvalidArgument(f"{params.method} elects signs and needs weights >= 0", field="experts.weight")
    density = specs.density(params.density) or default_density
    if params.method == "mean_delta":
        density = 0.0  # ignored: keep it out of the cache key
    if params.output_rank < 0:
        raise InvalidArgument(f"output_rank must be >= 0; got {params.output_rank}", field="output_rank")
    output_rank = 0 if params.fuse else params.output_rank
    if params.method != "mean_delta" and not params.fuse and output_rank == 0:
        ranks = sorted({r for a in adapters for r in a.ranks})
        if len(ranks) > 1:
            raise FailedPrecondition(
                f"{params.method} keeps the experts' common rank, but their ranks differ ({', '.join(map(str, ranks))}); "
                "set output_rank or fuse",
                field="output_rank",
            )
    uses_seed = params.method.startswith("dare")
    return ResolvedMerge(
        expert_ids=tuple(ids),
        weights=weights,
        block_weights=blocks,
        method=params.method,
        density=density,
        sign_election=params.sign_election if params.method in _TIES_METHODS else "total",
        output_rank=output_rank,
        fuse=params.fuse,
        seed=int(params.seed) if uses_seed else 0,
        variant="" if params.method == "mean_delta" else params.variant,  # mean_delta is one merge in both
    )


# --- entry-wise operators on deltas ------------------------------------------------------------


def keep_count(numel: int, density: float, variant: str = "peft") -> int:
    """Entries kept at ``density``: ⌊density·n⌋ as PEFT (all at density ≥ 1), or ⌈density·n⌉ and at least 1 (selma)."""
    if variant == "peft":
        return numel if density >= 1 else int(density * numel)
    return max(1, min(numel, math.ceil(density * numel - 1e-9)))


def magnitude_trim(t: torch.Tensor, density: float, variant: str = "peft") -> torch.Tensor:
    """Zero all but the ``keep_count`` largest-magnitude entries."""
    flat = t.flatten()
    k = keep_count(flat.numel(), density, variant)
    if k >= flat.numel():
        return t.clone()
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(t.shape)


def derived_seed(seed: int, module: str, expert_id: str) -> int:
    """A 63-bit seed per (merge seed, module, expert): masks do not depend on module or expert order."""
    digest = hashlib.sha256(f"selma-dare\0{seed}\0{module}\0{expert_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def dare_mask(shape: torch.Size | tuple[int, ...], density: float, seed: int) -> torch.Tensor:
    """Bernoulli(density) keep-mask from a seeded CPU generator (same on every device)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen) < density


def elect_and_mean(trimmed: Sequence[torch.Tensor], weights: Sequence[float], sign_election: str, variant: str = "peft") -> torch.Tensor:
    """TIES sign election and disjoint mean, in the given variant (see the module docstring)."""
    w = torch.tensor(list(weights), dtype=torch.float32).reshape(-1, *([1] * trimmed[0].dim()))
    stacked = torch.stack(list(trimmed))
    v = stacked * w
    if variant == "peft":
        votes = stacked.sign().sum(0) if sign_election == "frequency" else stacked.sum(0)
        agree = stacked.sign() == torch.where(votes >= 0, 1.0, -1.0)
        return (v * agree).sum(0) / agree.sum(0).clamp(min=1)
    total = v.sum(0)
    if sign_election == "frequency":
        elected = torch.sign(torch.sign(v).sum(0))
        elected = torch.where(elected == 0, torch.sign(total), elected)
    else:
        elected = torch.sign(total)
    agree = (torch.sign(v) == elected) & (elected != 0)
    agree_weight = (agree * w).sum(0)
    merged = (v * agree).sum(0) / torch.where(agree_weight > 0, agree_weight, torch.ones_like(agree_weight))
    return merged * float(sum(weights))


def combine(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    *,
    density: float = 1.0,
    sign_election: str = "total",
    masks: Sequence[torch.Tensor] | None = None,
    variant: str = "peft",
) -> torch.Tensor:
    """Combine full deltas of one module entry-wise (``masks``: DARE keep-masks, one per expert)."""
    if method == "mean_delta":
        return sum(w * d for w, d in zip(weights, deltas, strict=True))
    if method == "magnitude_prune":
        return sum(w * magnitude_trim(d, density, variant) for w, d in zip(weights, deltas, strict=True))
    if method in ("dare_linear", "dare_ties"):
        if masks is None:
            raise ValueError("DARE needs masks")
        dropped = [d * m / density for d, m in zip(deltas, masks, strict=True)]
        if method == "dare_linear":
            return sum(w * d for w, d in zip(weights, dropped, strict=True))
        return elect_and_mean(dropped, weights, sign_election, variant)
    if method == "ties":
        return elect_and_mean([magnitude_trim(d, density, variant) for d in deltas], weights, sign_election, variant)
    raise InvalidArgument(f"unknown merge method {method!r}", field="method")


# --- rank reduction -----------------------------------------------------------------------------


def _factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Split the top-``rank`` singular triplets into (A, B) (√S each side), zero-padded to ``rank``."""
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B = U[:, :k] * root
    A = root[:, None] * Vh[:k]
    if k < rank:  # a module smaller than the rank: zero rows keep one rank across the file
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    total = float(S.square().sum())
    err = math.sqrt(max(float(S[k:].square().sum()), 0.0) / total) if total > 0 else 0.0
    A = A.reshape((rank,) + weight_shape[1:])
    B = B.reshape((weight_shape[0], rank) + ((1, 1) if len(weight_shape) == 4 else ()))
    return A.contiguous(), B.contiguous(), err


def svd_truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` LoRA (A, B) of a full delta, and the relative Frobenius error ‖ΔW − BA‖/‖ΔW‖."""
    U, S, Vh = torch.linalg.svd(delta.float().flatten(1), full_matrices=False)
    return _factors(U, S, Vh, rank, tuple(delta.shape))


def svd_truncate_factored(A: torch.Tensor, B: torch.Tensor, rank: int, weight_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """As :func:`svd_truncate` for ΔW = B·A given as factors (R = rank of the factors): two QRs and an R×R SVD."""
    Qb, Rb = torch.linalg.qr(B.float().flatten(1))
    Qa, Ra = torch.linalg.qr(A.float().flatten(1).T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return _factors(Qb @ U, S, Vh @ Qa.T, rank, weight_shape)


# --- the merge ------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    """A merge's output: a LoRA (``lora``: module → (A, B) at scale 1) or full deltas (``deltas``, when fused)."""

    merge: ResolvedMerge
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    deltas: dict[str, torch.Tensor] | None = None
    rank: int = 0
    svd_errors: list[float] = field(default_factory=list)
    weight_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def svd_error_max(self) -> float:
        return max(self.svd_errors, default=0.0)

    @property
    def svd_error_mean(self) -> float:
        return sum(self.svd_errors) / len(self.svd_errors) if self.svd_errors else 0.0

    def effective_deltas(self) -> dict[str, torch.Tensor]:
        """ΔW per module as this result applies it (B·A for a LoRA)."""
        if self.deltas is not None:
            return self.deltas
        assert self.lora is not None
        return {
            n: (B.flatten(1) @ A.flatten(1)).reshape(self.weight_shapes[n])
            for n, (A, B) in self.lora.items()
        }


def merge(
    adapters: Sequence[Adapter],
    rm: ResolvedMerge,
    *,
    progress: Callable[[int, int], None] | None = None,
    check_cancelled: Callable[[], None] | None = None,
) -> MergeResult:
    """Merge validated experts (``resolve`` first) module by module."""
    modules = sorted(adapters[0].modules)
    result = MergeResult(merge=rm, weight_shapes={n: adapters[0].modules[n].weight_shape for n in modules})
    exact_cat = rm.method == "mean_delta" and not rm.fuse and rm.output_rank == 0
    if rm.fuse:
        result.deltas = {}
        result.rank = 0
    else:
        result.lora = {}
        result.rank = rm.output_rank or (sum(a.rank for a in adapters) if rm.method == "mean_delta" else adapters[0].rank)
    with torch.no_grad():
        for done, name in enumerate(modules, 1):
            if check_cancelled is not None:
                check_cancelled()
            parts: list[LoraModule] = [a.modules[name] for a in adapters]
            ws = [rm.weight(i, name) for i in range(len(adapters))]
            shape = parts[0].weight_shape
            if rm.method == "mean_delta" and not rm.fuse:
                # Exact factors: A' stacks the A's, B' concatenates the scaled, weighted B's.
                A = torch.cat([p.A.float().flatten(1) for p in parts]).reshape((-1,) + shape[1:])
                B = torch.cat([p.B.float().flatten(1) * (w * p.scale) for p, w in zip(parts, ws, strict=True)], dim=1)
                B = B.reshape((shape[0], B.shape[1]) + ((1, 1) if len(shape) == 4 else ()))
                if exact_cat:
                    result.lora[name] = (A.contiguous(), B.contiguous())  # type: ignore[index]
                else:
                    a2, b2, err = svd_truncate_factored(A, B, rm.output_rank, shape)
                    result.lora[name] = (a2, b2)  # type: ignore[index]
                    result.svd_errors.append(err)
            else:
                deltas = [p.delta() for p in parts]
                masks = None
                if rm.method.startswith("dare"):
                    masks = [dare_mask(shape, rm.density, derived_seed(rm.seed, name, a.id)) for a in adapters]
                delta = combine(deltas, ws, rm.method, density=rm.density, sign_election=rm.sign_election, masks=masks,
                                variant=rm.variant)
                if rm.fuse:
                    result.deltas[name] = delta  # type: ignore[index]
                else:
                    a2, b2, err = svd_truncate(delta, result.rank)
                    result.lora[name] = (a2, b2)  # type: ignore[index]
                    result.svd_errors.append(err)
            if progress is not None:
                progress(done, len(modules))
    return result


def adapter_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """ΔW per module of a single adapter (a registered expert or merged LoRA)."""
    with torch.no_grad():
        return {n: m.delta() for n, m in adapter.modules.items()}


def params_from_dict(d: dict[str, Any]) -> MergeParams:
    """A ``selma.v1.MergeSpec`` in JSON form (``selma.api.message_to_dict``) → MergeParams."""
    specs.check_known_fields(d, {"experts", "method", "density", "sign_election", "output_rank", "fuse", "seed", "variant"}, "merge")
    experts = []
    for i, e in enumerate(d.get("experts") or []):
        e = specs.parse_mapping(e, f"experts[{i}]")
        bw = specs.parse_mapping(e.get("block_weights"), f"experts[{i}].block_weights")
        experts.append(
            ExpertWeight(
                ref=specs.parse_str(e.get("expert_id"), f"experts[{i}].expert_id"),
                weight=specs.parse_float(e.get("weight"), "experts.weight"),
                down=specs.parse_float(bw.get("down"), "experts.block_weights.down"),
                mid=specs.parse_float(bw.get("mid"), "experts.block_weights.mid"),
                up=specs.parse_float(bw.get("up"), "experts.block_weights.up"),
            )
        )
        if not experts[-1].ref:
            raise InvalidArgument(f"experts[{i}].expert_id is empty; give an expert id or <run>/<skill>", field=f"experts[{i}].expert_id")
    return MergeParams(
        experts=tuple(experts),
        method=enum_name(common_pb2.MergeMethod, d.get("method"), field="method") or "mean_delta",
        density=specs.parse_float(d.get("density"), "density", 0.0) or 0.0,
        sign_election=enum_name(common_pb2.SignElection, d.get("sign_election"), field="sign_election") or "total",
        output_rank=specs.parse_int(d.get("output_rank"), "output_rank"),
        fuse=specs.parse_bool(d.get("fuse"), "fuse"),
        seed=specs.parse_int(d.get("seed"), "seed"),
        variant=enum_name(common_pb2.MergeVariant, d.get("variant"), field="variant") or "peft",
    )
