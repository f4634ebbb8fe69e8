"""Tiny, randomly initialised models that exist without any download, for tests and the local demo.

They have the real architectures at toy sizes, so every service runs the same code on them
as on ``stabilityai/stable-diffusion-2-base`` or an SDXL checkpoint on a GPU cluster: they are
saved with ``save_pretrained`` (safetensors) and loaded with ``DiffusionPipeline.from_pretrained``
/ ``AutoPipelineForText2Image.from_pretrained`` / ``AutoModelForCausalLM.from_pretrained``.
Their images and text are noise; only shapes, plumbing and speed are meaningful.

``build_tiny(root)`` lays them out as::

    root/
      tiny-models.json   index: builder version, seed, library versions, per-component class,
                         parameter count and sha256 of the weights
      tokenizer/         CLIPTokenizer (byte-level BPE, 1000 ids) trained on selma/data
      tiny-sd/           StableDiffusionPipeline, SD 1.x architecture, 64x64 images
      tiny-sdxl/         StableDiffusionXLPipeline, two text encoders (the second projected), 64x64
      tiny-lm/           GPT2LMHeadModel + a GPT-2-style tokenizer with SmolLM2's ChatML template
      .build.lock        serialises concurrent build_tiny calls on one machine

Schedulers are those the real checkpoints ship: SD 1.x / SD 2-base use ``PNDMScheduler``
(PLMS, ``skip_prk_steps=True``, ``steps_offset=1``, scaled-linear betas 0.00085-0.012) and
SDXL-base uses ``EulerDiscreteScheduler`` with the same betas.  Swap one in with
``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`` as for a real model.

Weights depend only on the seed (and the library versions): each component is initialised
from its own generator state derived from ``(seed, component)``, so the same seed gives
bit-identical safetensors and changing one component's config leaves the others unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
)

from selma import __version__
from selma.errors import FailedPrecondition, InvalidArgument
from selma.models._hf import no_progress_bars
from selma.models.tokenizer import train_clip_tokenizer, train_lm_tokenizer

logger = logging.getLogger(__name__)

# Bump whenever a config below (or the corpus) changes, so build_tiny rebuilds stale trees.
BUILDER_VERSION = 1
INDEX_FILE = "tiny-models.json"
TOKENIZER_DIR = "tokenizer"
SD_DIR = "tiny-sd"
SDXL_DIR = "tiny-sdxl"
LM_DIR = "tiny-lm"
IMAGE_SIZE = 64

# --- configs: data, shared by the builders and documented in one place -------------------------

# SD 1.x UNet layout at toy width (diffusers' own SD test config); sample_size 32 latents x
# VAE factor 2 = 64 px images by default.  cross_attention_dim = text encoder hidden size.
SD_UNET: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
# SDXL UNet at toy width (diffusers' SDXL test config): text_time conditioning with
# 6 time ids x 8 + pooled text 32 = 80; cross attention over both encoders' states, 32 + 32.
SDXL_UNET: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=80,
    cross_attention_dim=64,
    norm_num_groups=1,
)
VAE: dict[str, Any] = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    sample_size=IMAGE_SIZE,
)
# SD 1.x uses OpenAI CLIP (quick_gelu); SDXL's second encoder is OpenCLIP (gelu) with a projection.
TEXT_ENCODER: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=5,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="quick_gelu",
)
TEXT_ENCODER_2: dict[str, Any] = {**TEXT_ENCODER, "hidden_act": "gelu"}
# Exactly the scheduler_config.json of runwayml/stable-diffusion-v1-5 and stable-diffusion-2-base.
SD_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler.
SDXL_SCHEDULER: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)
# n_positions leaves room for few-shot prompts of a byte-level tokenizer with a tiny vocabulary.
LM: dict[str, Any] = dict(n_positions=1024, n_embd=64, n_layer=2, n_head=2)


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """Where ``build_tiny`` put each model, and whether this call built them (False: reused)."""

    root: Path
    seed: int
    tokenizer: Path
    sd: Path
    sdxl: Path
    lm: Path
    built: bool
    index: dict[str, Any]

    @classmethod
    def at(cls, root: str | os.PathLike[str], index: dict[str, Any], *, built: bool) -> TinyModels:
        root = Path(root)
        return cls(
            root=root,
            seed=int(index["seed"]),
            tokenizer=root / TOKENIZER_DIR,
            sd=root / SD_DIR,
            sdxl=root / SDXL_DIR,
            lm=root / LM_DIR,
            built=built,
            index=index,
        )


# --- helpers ------------------------------------------------------------------------------------


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgument(f"seed must be an integer in [0, 2**63); got {seed!r}", field="seed")
    return seed


def component_seed(seed: int, component: str) -> int:
    """The generator seed of one component: a hash of (seed, name), independent of build order."""
    digest = hashlib.sha256(f"selma-tiny:{seed}:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    # Model constructors draw their init from the global CPU generator; fork it so the caller's
    # random state is untouched and each component starts from its own seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, component))
        yield


@contextlib.contextmanager
def _staged_dir(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty sibling directory that replaces ``out_dir`` on success and is removed on failure.

    Readers see the old directory or the complete new one (or, for an instant between two
    renames, none), never a half-written one; a failed build leaves the old one in place.
    """
    final = Path(out_dir).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        stage.rename(final)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if stage.exists():
            shutil.rmtree(stage)


def _n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def weights_sha256(model_dir: str | os.PathLike[str]) -> str:
    """One sha256 over every ``*.safetensors`` file under ``model_dir`` (relative paths + bytes)."""
    from selma.artifacts import tree_sha256

    root = Path(model_dir)
    return tree_sha256(root, [f.relative_to(root).as_posix() for f in sorted(root.rglob("*.safetensors"))])


def _clip_text_config(tokenizer: CLIPTokenizer, base: dict[str, Any]) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **base,
    )


# --- builders -------------------------------------------------------------------------------------


def build_tokenizer(out_dir: str | os.PathLike[str], *, tokenizer: CLIPTokenizer | None = None) -> dict[str, Any]:
    """Save the CLIP-style tokenizer (trained on the shipped corpus unless given) to ``out_dir``.

    Returns its index entry.
    """
    tokenizer = tokenizer or train_clip_tokenizer()
    with _staged_dir(out_dir) as stage:
        tokenizer.save_pretrained(stage)
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}


def build_tiny_sd(
    out_dir: str | os.PathLike[str], seed: int = 0, *, tokenizer: CLIPTokenizer | None = None
) -> dict[str, Any]:
    """Build and save a tiny SD-1.x-architecture ``StableDiffusionPipeline`` (64x64) to ``out_dir``.

    Random weights from config under ``seed``; ``tokenizer`` defaults to a freshly trained one.
    Returns the component's index entry (class, parameter count, weights digest).
    """
    _check_seed(seed)
    tokenizer = tokenizer or train_clip_tokenizer()
    with _seeded(seed, "sd/text_encoder"):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, TEXT_ENCODER))
    with _seeded(seed, "sd/unet"):
        unet = UNet2DConditionModel(**SD_UNET)
    with _seeded(seed, "sd/vae"):
        vae = AutoencoderKL(**VAE)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with _staged_dir(out_dir) as stage, no_progress_bars():
        pipe.save_pretrained(stage, safe_serialization=True)
    return {
        "class": "StableDiffusionPipeline",
        "image_size": IMAGE_SIZE,
        "parameters": _n_params(text_encoder, unet, vae),
        "weights_sha256": weights_sha256(out_dir),
    }


def build_tiny_sdxl(
    out_dir: str | os.PathLike[str], seed: int = 0, *, tokenizer: CLIPTokenizer | None = None
) -> dict[str, Any]:
    """Build and save a tiny SDXL-architecture ``StableDiffusionXLPipeline`` (64x64) to ``out_dir``.

    Two text encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``) share one
    tokenizer; the UNet takes SDXL's text_time conditioning.  Returns the index entry.
    """
    _check_seed(seed)
    tokenizer = tokenizer or train_clip_tokenizer()
    with _seeded(seed, "sdxl/text_encoder"):
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, TEXT_ENCODER))
    with _seeded(seed, "sdxl/text_encoder_2"):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer, TEXT_ENCODER_2))
    with _seeded(seed, "sdxl/unet"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    with _seeded(seed, "sdxl/vae"):
        vae = AutoencoderKL(**VAE)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
    with _staged_dir(out_dir) as stage, no_progress_bars():
        pipe.save_pretrained(stage, safe_serialization=True)
    return {
        "class": "StableDiffusionXLPipeline",
        "image_size": IMAGE_SIZE,
        "parameters": _n_params(text_encoder, text_encoder_2, unet, vae),
        "weights_sha256": weights_sha256(out_dir),
    }


def build_tiny_lm(
    out_dir: str | os.PathLike[str], seed: int = 0, *, tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[str, Any]:
    """Build and save a tiny GPT-2 causal LM and its tokenizer to ``out_dir``.

    Loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``; the tokenizer
    has SmolLM2-Instruct's ChatML template, so chat-style prompting code runs unchanged.
    It generates garbage: it is for plumbing tests.  Returns the index entry.
    """
    _check_seed(seed)
    tokenizer = tokenizer or train_lm_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LM,
    )
    with _seeded(seed, "lm/model"):
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    with _staged_dir(out_dir) as stage, no_progress_bars():
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    return {"class": "GPT2LMHeadModel", "parameters": _n_params(model), "weights_sha256": weights_sha256(out_dir)}


# --- the whole tree ------------------------------------------------------------------------------


def read_index(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The index ``build_tiny`` wrote under ``root``, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(root) / INDEX_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _is_current(root: Path, index: dict[str, Any] | None, seed: int) -> bool:
    if not index or index.get("builder_version") != BUILDER_VERSION or index.get("seed") != seed:
        return False
    markers = [
        root / TOKENIZER_DIR / "tokenizer.json",
        root / SD_DIR / "model_index.json",
        root / SDXL_DIR / "model_index.json",
        root / LM_DIR / "config.json",
    ]
    return all(m.is_file() for m in markers)


def load_tiny(root: str | os.PathLike[str]) -> TinyModels:
    """The tiny models already built under ``root``; FailedPrecondition when there are none."""
    root = Path(root)
    index = read_index(root)
    if index is None or not _is_current(root, index, index.get("seed", -1)):
        raise FailedPrecondition(
            f"no current tiny models under {root}; build them with `selma models build-tiny --out {root}`"
        )
    return TinyModels.at(root, index, built=False)


def build_tiny(root: str | os.PathLike[str], seed: int = 0, *, force: bool = False) -> TinyModels:
    """Build the tokenizer, tiny SD, tiny SDXL and tiny LM under ``root`` (layout: module docstring).

    Idempotent: when ``root`` already holds a complete tree from this builder version and seed,
    nothing is rebuilt (``TinyModels.built`` is False) unless ``force``.  Concurrent callers
    on one machine serialise on a lock file; each component directory is replaced atomically
    and the index is written last, so a tree with an index is always complete.
    """
    _check_seed(seed)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = read_index(root)
        if not force and _is_current(root, index, seed):
            logger.info("tiny models under %s are current (seed %d); not rebuilding", root, seed)
            return TinyModels.at(root, index, built=False)

        t0 = time.perf_counter()
        (root / INDEX_FILE).unlink(missing_ok=True)
        clip_tokenizer = train_clip_tokenizer()
        components: dict[str, Any] = {TOKENIZER_DIR: build_tokenizer(root / TOKENIZER_DIR, tokenizer=clip_tokenizer)}
        components[SD_DIR] = build_tiny_sd(root / SD_DIR, seed, tokenizer=clip_tokenizer)
        components[SDXL_DIR] = build_tiny_sdxl(root / SDXL_DIR, seed, tokenizer=clip_tokenizer)
        components[LM_DIR] = build_tiny_lm(root / LM_DIR, seed)
        index = {
            "builder_version": BUILDER_VERSION,
            "seed": seed,
            "versions": {"selma": __version__, **{d: dist_version(d) for d in ("torch", "diffusers", "transformers")}},
            "components": components,
        }
        tmp = root / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, root / INDEX_FILE)
        logger.info("built tiny models under %s (seed %d) in %.1f s", root, seed, time.perf_counter() - t0)
        return TinyModels.at(root, index, built=True)
