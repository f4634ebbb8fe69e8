"""The one seed derivation of SELMA: every image's generator seed is a pure function of
(policy, base seed, prompt index, image index, images per prompt).

Render (dataset renders and previews) and serving (``Generate``) both call :func:`derive_seed`,
so an image of a rendered dataset is reproduced by ``Generate`` with the same prompts, seed
policy, base seed and diffusion settings.  The functions here are render's original ones,
kept bit for bit: rendered datasets are the long-lived artifacts (their metadata records the
seeds), so their values are the ones that stay; serving's former derived hash (and its FIXED
seed without the ``mod 2**63``) was dropped in their favour.

Policies (``selma.v1.SeedPolicy``):

* ``derived`` (default): ``int.from_bytes(sha256(b"selma-render-seed/v1:<base>:<prompt>:<image>")[:8], "big") >> 1``,
  a 63-bit value.  Stable across versions, platforms and batch layouts; neighbouring images get
  unrelated seeds, so a dataset never reuses noise.
* ``sequential``: ``(base + prompt_index * images_per_prompt + image_index) mod 2**63``.
* ``fixed``: every image uses ``base mod 2**63``; with the seed reported for one image it
  re-renders exactly that image (Preview or Generate with ``seed_policy=FIXED`` and that seed).

Seeds always fit a signed 64-bit integer (the proto's ``int64``) and ``torch.Generator.manual_seed``.

Never change the value of an existing function here: a new derivation gets a new policy or a new
domain string (``.../v2``), or the seeds recorded in existing datasets stop reproducing them.
"""

from __future__ import annotations

import hashlib
from enum import Enum

__all__ = ["SEED_MODULUS", "SeedPolicy", "derive_seed", "seed_policy", "stable_hash64"]

SEED_MODULUS = 2**63

_PROTO_PREFIX = "SEED_POLICY_"


class SeedPolicy(str, Enum):
    """Mirrors ``selma.v1.SeedPolicy`` (without UNSPECIFIED, which means DERIVED)."""

    DERIVED = "derived"
    SEQUENTIAL = "sequential"
    FIXED = "fixed"


def stable_hash64(text: str) -> int:
    """The first 8 bytes of ``sha256(text)`` as a big-endian unsigned integer: the hash every stable seed is cut from.

    Callers put a domain string of their own at the front of ``text`` (``"selma-render-seed/v1:"``,
    ``"selma-eval-seed\\0"``) so that different uses never share seeds.
    """
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def seed_policy(value: SeedPolicy | str | int | None) -> SeedPolicy:
    """A :class:`SeedPolicy` from any of its spellings.

    Accepts a :class:`SeedPolicy`, its short name (``"derived"``), the proto name
    (``"SEED_POLICY_DERIVED"``), the proto enum number, or UNSPECIFIED in any form
    (``None``, ``""``, ``0``, ``"SEED_POLICY_UNSPECIFIED"``, ``"unspecified"``), which means DERIVED.
    Raises :class:`ValueError` for anything else.
    """
    if isinstance(value, SeedPolicy):
        return value
    if value is None:
        return SeedPolicy.DERIVED
    if isinstance(value, int) and not isinstance(value, bool):
        from selma.v1 import common_pb2

        try:
            value = common_pb2.SeedPolicy.Name(value)
        except ValueError:
            raise ValueError(f"unknown seed policy value {value}") from None
    if not isinstance(value, str):
        raise ValueError(f"unknown seed policy {value!r}")
    name = value.strip().lower()
    name = name.removeprefix(_PROTO_PREFIX.lower())
    if name in ("", "unspecified"):
        return SeedPolicy.DERIVED
    try:
        return SeedPolicy(name)
    except ValueError:
        raise ValueError(f"unknown seed policy {value!r}") from None


def derive_seed(policy: SeedPolicy | str | int | None, base_seed: int, prompt_index: int, image_index: int, images_per_prompt: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` under ``policy`` (any spelling :func:`seed_policy` takes)."""
    policy = seed_policy(policy)
    if policy is SeedPolicy.FIXED:
        return base_seed % SEED_MODULUS
    if policy is SeedPolicy.SEQUENTIAL:
        return (base_seed + prompt_index * images_per_prompt + image_index) % SEED_MODULUS
    return stable_hash64(f"selma-render-seed/v1:{base_seed}:{prompt_index}:{image_index}") >> 1
