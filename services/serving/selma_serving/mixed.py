"""Several expert mixes in one batch: a shared base forward plus per-row LoRA deltas, unfused (LoRAX-style).

A fused mix (:func:`selma_serving.engine.fused_copy`) costs a merge and a UNet copy of the adapted
weights per mix, and one pipeline call per mix.  When many small mixes wait at once, building
each is the expensive part.  Here every image row keeps its own mix: each adapted module of the
base UNet becomes a :class:`RowLora` computing, for batch row ``j`` with mix ``m(j)``,

    y_j = W x_j + b + Σ_k c_{m(j),k} · B_k (A_k x_j),     c_{m,k} = w_{m,k}(module) · scale_k

(``w`` is the mix's weight for expert ``k``, block overrides included; ``scale_k`` = α_k/r_k).  It
is evaluated as two small products over the experts' factors stacked once per call —
``h = x A_catᵀ`` (all experts' ranks side by side), ``h ← h ⊙ S[row]`` with ``S`` the per-row
coefficients repeated over each expert's rank, ``y += h B_catᵀ`` — so a row pays for the ranks of
the experts present in the call, never for a weight-sized delta.  A Conv2d target uses the base
convolution's stride/padding for A and a 1×1 convolution for B, which is exactly the delta a
diffusers conv LoRA adds.

Why not PEFT's mixed-batch inference: ``adapter_names=[...]`` selects *one* adapter per row,
while a selma row carries a weighted mix of several experts (and per-block weights); expressing
a mix there means one PEFT adapter per distinct mix (a merge again).  Only mixes that are exactly
a weighted sum of the experts' LoRAs qualify: ``mean_delta`` at the exact rank
(:func:`mixable`); TIES/DARE/magnitude pruning act entry-wise on the full deltas and are fused.

Rows under classifier-free guidance: diffusers runs the UNet on ``[uncond rows; cond rows]``, so
a UNet batch of ``n = k·R`` rows for ``R`` images maps row ``j`` to image ``j mod R``; any other
batch size is an error (never a silently wrong mix).

Each call gets its own UNet object (:func:`mixed_unet`): a copy of the base UNet's module tree
sharing every parameter and buffer, with the adapted modules wrapped, so the base and the fused
copies are never touched and concurrent calls share no state.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from selma_serving.lora import Adapter
from selma_serving.merge import MergeParams, ResolvedMerge


def mixable(params: MergeParams) -> bool:
    """A mix that is exactly the weighted sum of its experts' LoRAs (so it can run unfused per row)."""
    return params.method == "mean_delta" and params.output_rank == 0 and bool(params.experts)


@dataclass(frozen=True)
class RowMix:
    """One image row's mix: its resolved merge and the experts it names (in ``rm.expert_ids`` order)."""

    rm: ResolvedMerge
    adapters: tuple[Adapter, ...]


class RowLora(torch.nn.Module):
    """``base(x)`` plus each batch row's own weighted sum of LoRA deltas (see the module docstring)."""

    def __init__(self, base: torch.nn.Module, A: torch.Tensor, B: torch.Tensor, coef: torch.Tensor) -> None:
        super().__init__()
        if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            raise TypeError(f"per-row LoRA wraps Linear or Conv2d modules, not {type(base).__name__}")
        if isinstance(base, torch.nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise TypeError("per-row LoRA needs an ungrouped, zero-padded Conv2d")
        self.base = base
        self.A = A  # (Σr, in[, kh, kw]): every expert's down matrix, stacked
        self.B = B  # (out, Σr[, 1, 1]): every expert's up matrix, side by side
        self.coef = coef  # (rows, Σr): row j's coefficient for each rank column (0 = expert not in its mix)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        n, rows = x.shape[0], self.coef.shape[0]
        if n % rows:
            raise RuntimeError(f"per-row LoRA: a batch of {n} rows does not map onto {rows} images")
        coef = self.coef.repeat(n // rows, 1).to(device=x.device, dtype=x.dtype)  # [uncond; cond] halves: row j is image j mod R
        A, B = self.A.to(device=x.device, dtype=x.dtype), self.B.to(device=x.device, dtype=x.dtype)
        if isinstance(self.base, torch.nn.Linear):
            h = F.linear(x, A) * coef.view(n, *([1] * (x.dim() - 2)), -1)
            return y + F.linear(h, B)
        conv = self.base
        h = F.conv2d(x, A, None, conv.stride, conv.padding, conv.dilation) * coef.view(n, -1, 1, 1)
        return y + F.conv2d(h, B)


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def row_factors(mixes: Sequence[RowMix], rows: Sequence[int], module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(A_cat, B_cat, coef) of one module for image rows whose mixes are ``mixes[rows[j]]``; None if no row adapts it."""
    experts: dict[str, Any] = {}  # expert id -> its LoraModule here, in first-seen order
    for mix in mixes:
        for a in mix.adapters:
            if module in a.modules:
                experts.setdefault(a.id, a.modules[module])
    if not experts:
        return None
    offsets = dict(zip(experts, itertools.accumulate((m.rank for m in experts.values()), initial=0), strict=False))
    total = sum(m.rank for m in experts.values())
    per_mix = torch.zeros(len(mixes), total)
    for i, mix in enumerate(mixes):
        for k, a in enumerate(mix.adapters):
            m = a.modules.get(module)
            if m is not None:
                per_mix[i, offsets[a.id]:offsets[a.id] + m.rank] = mix.rm.weight(k, module) * m.scale
    A = torch.cat([m.A.float().flatten(1) for m in experts.values()])
    B = torch.cat([m.B.float().flatten(1) for m in experts.values()], dim=1)
    first = next(iter(experts.values()))
    if first.A.dim() == 4:
        A = A.reshape((total,) + tuple(first.A.shape[1:]))
        B = B.reshape(B.shape[0], total, 1, 1)
    return A.contiguous(), B.contiguous(), per_mix[torch.as_tensor(list(rows), dtype=torch.long)]


def mixed_unet(base_unet: torch.nn.Module, mixes: Sequence[RowMix], rows: Sequence[int]) -> torch.nn.Module:
    """A UNet for one batched call whose image ``j`` runs with mix ``mixes[rows[j]]``.

    The module tree is copied, every parameter and buffer shared with ``base_unet`` (which is not
    modified); the modules any of the mixes adapts are wrapped in :class:`RowLora`."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(base_unet.parameters(), base_unet.buffers())}
    unet = copy.deepcopy(base_unet, memo)
    names = sorted({n for mix in mixes for a in mix.adapters for n in a.modules})
    with torch.no_grad():
        for name in names:
            factors = row_factors(mixes, rows, name)
            if factors is not None:
                base = unet.get_submodule(name)
                w = base.weight  # on the base weight's device and dtype once, not at every forward
                A, B, coef = (t.to(device=w.device, dtype=w.dtype) for t in factors)
                _set_submodule(unet, name, RowLora(base, A, B, coef))
    return unet
