"""The one scale convention for every LoRA file selma writes or reads.

A LoRA adds ΔW = (α/r)·B·A to a weight.  **Every adapter file selma publishes carries that scale in
its tensors**: the up matrix B is stored pre-multiplied by α/r, so the file is exact at scale 1
(α = r) in any reader, whether or not it understands alpha metadata.  This holds for an expert's
diffusers and kohya files, a merged model's adapter and every ``ExportAdapter`` file (kohya files
state ``….alpha`` = r).  The expert metadata says so: ``expert.json`` has ``lora_format: 2``,
``alpha`` equal to ``rank`` (the file's own scale) and the alpha the expert was trained with as
``trained_alpha`` (provenance only, never applied again).

Readers therefore apply a scale only from per-module ``….alpha`` tensors *inside* an adapter file
(PEFT or kohya-style files), never from ``expert.json``.  Experts published before format 2 (no
``lora_format`` key) were written by the same trainer, whose files already carried the scale, but
their ``expert.json`` stated the training alpha as ``alpha``; reading them by the same rule loads
them at their trained strength (earlier services applied α/r a second time).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from selma.errors import FailedPrecondition

LORA_FORMAT = 2


def fold_scale(B: torch.Tensor, alpha: float, rank: int) -> torch.Tensor:
    """B·(α/r): the up matrix of a file that is exact at scale 1 (fp32 arithmetic, B's dtype kept)."""
    scale = float(alpha) / int(rank)
    return B if scale == 1.0 else (B.float() * scale).to(B.dtype)


def expert_scale_fields(rank: int, trained_alpha: float) -> dict[str, Any]:
    """The ``expert.json`` fields that state the convention for an expert whose files carry the scale."""
    return {"lora_format": LORA_FORMAT, "rank": int(rank), "alpha": float(rank), "trained_alpha": float(trained_alpha)}


def check_format(info: Mapping[str, Any], *, what: str) -> int:
    """The adapter format an expert's metadata declares (1 for experts published before the field existed)."""
    raw = info.get("lora_format", 1)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise FailedPrecondition(f"{what} has an invalid lora_format {raw!r} in expert.json")
    if raw > LORA_FORMAT:
        raise FailedPrecondition(f"{what} has lora_format {raw}, newer than this service reads ({LORA_FORMAT}); upgrade the service")
    return raw


def trained_alpha(info: Mapping[str, Any]) -> float:
    """The alpha an expert was trained with (format 2: ``trained_alpha``; format 1 stated it as ``alpha``)."""
    value = info.get("trained_alpha", info.get("alpha"))
    try:
        return float(value) if value else float(info.get("rank", 0) or 0)
    except (TypeError, ValueError):
        return 0.0
