"""Per-image seeds: every image's generator seed is a pure function of (base seed, prompt index, image index).

Policies (``selma.v1.SeedPolicy``):

* ``derived`` (default): ``int.from_bytes(sha256(b"selma-render-seed/v1:<base>:<prompt>:<image>")[:8], "big") >> 1``,
  a 63-bit value.  Stable across versions, platforms and batch layouts; neighbouring images get
  unrelated seeds, so a dataset never reuses noise.
* ``sequential``: ``(base + prompt_index * images_per_prompt + image_index) mod 2**63``.
* ``fixed``: every image uses ``base`` itself; with the seed reported for one image it re-renders
  exactly that image (Preview with ``seed_policy=FIXED, base_seed=<seed>``).

Seeds always fit a signed 64-bit integer (the proto's ``int64``) and ``torch.Generator.manual_seed``.
"""

from __future__ import annotations

import hashlib
from enum import Enum

SEED_MODULUS = 2**63


class SeedPolicy(str, Enum):
    """Mirrors ``selma.v1.SeedPolicy`` (without UNSPECIFIED, which means DERIVED)."""

    DERIVED = "derived"
    SEQUENTIAL = "sequential"
    FIXED = "fixed"


def derive_seed(policy: SeedPolicy, base_seed: int, prompt_index: int, image_index: int, images_per_prompt: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` under ``policy``."""
    if policy is SeedPolicy.FIXED:
        return base_seed % SEED_MODULUS
    if policy is SeedPolicy.SEQUENTIAL:
        return (base_seed + prompt_index * images_per_prompt + image_index) % SEED_MODULUS
    digest = hashlib.sha256(f"selma-render-seed/v1:{base_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
