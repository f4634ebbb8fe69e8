"""The ShapesWorld base model: a small Stable-Diffusion-architecture pipeline for 64x64 world renders.

It is built from exactly the diffusers/transformers classes of a real SD 1.x checkpoint, so the
render, training (LoRA) and serving services load and use it unchanged
(``load_pipeline(ModelSpec("shapesworld://base"), settings)``):

* ``CLIPTokenizer``: byte-level BPE trained on the world's caption grammar with selma's
  deterministic trainer, merged until every grammar word is one token; ``model_max_length`` 24;
* ``CLIPTextModel``: hidden 64, 2 layers, 4 heads, FFN 128, 24 positions (trained jointly with
  the UNet);
* ``AutoencoderKL``: 64x64x3 <-> 32x32x3 (one downsample; the latent is tied to the
  2x2-average-pooled image, so it is an image the UNet can learn like pixel space), trained first as an autoencoder on
  world renders; its ``scaling_factor`` is measured so that scaled latents have unit variance;
* ``UNet2DConditionModel``: on 32x32x3 latents with cross-attention to the text states;
* ``DDIMScheduler`` (``squaredcos_cap_v2`` betas, epsilon prediction, no x0 clipping).

This module holds the configs (data, in one place) and the builders; ``pretrain.py`` trains them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from selma.models import tokenizer as tokenizer_mod

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64
LATENT_SIZE = 32
MODEL_MAX_LENGTH = 24

# Every module constructor below is data: change one and the others' initial weights stay the same
# (each component is initialised from its own generator, see ``component_seed``).
VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    # two blocks = one downsample: 64 px -> 32x32 latents, so a small shape (8-11 px) still spans
    # 4-5 latent pixels (at 16x16 latents it spanned 2-3 and the UNet drew blobs); narrow at full
    # resolution, where a CPU step spends most of its time
    block_out_channels=(16, 32),
    layers_per_block=1,
    # three latent channels, trained to stay close to the 2x2-average-pooled image (see
    # ``pretrain.PretrainConfig.vae_pixel_tie``): a free 4-channel latent scored 2 % on single
    # objects after the same UNet training, the image-like latent is what a small UNet learns well
    latent_channels=3,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    scaling_factor=1.0,  # replaced by the measured value after the autoencoder is trained
)
TEXT_ENCODER: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=MODEL_MAX_LENGTH,
    projection_dim=64,
    hidden_act="quick_gelu",
)
UNET: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=3,
    out_channels=3,
    # 32x32 -> 16x16 -> 8x8; cross-attention at 16x16, 8x8 and the mid block
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=16,
    cross_attention_dim=64,  # = text encoder hidden size
)
# Training noise schedule; the saved inference scheduler is DDIM over the same betas.
NOISE_SCHEDULE: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
)
INFERENCE_SCHEDULER: dict[str, Any] = dict(
    **NOISE_SCHEDULE,
    clip_sample=False,  # latent space: never clip x0 to [-1, 1]
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)


def component_seed(seed: int, component: str) -> int:
    """The generator seed of one component: a hash of (seed, name), independent of build order."""
    digest = hashlib.sha256(f"selma-shapesworld:{seed}:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int, component: str) -> Iterator[None]:
    """Run the block on the global CPU generator seeded for ``component``, restoring the caller's state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed(seed, component))
        yield


# --- tokenizer ------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], *, model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer on ``texts`` (the world's captions), merged until every word is one token.

    Uses selma's deterministic BPE trainer with CLIPTokenizer's own normalizer and pre-tokenizer;
    the vocabulary is laid out like OpenAI CLIP's (byte symbols, the same with ``</w>``, merges,
    then ``<|startoftext|>``, ``<|endoftext|>``).  Unknown words still encode, byte by byte.
    """
    texts = [t.replace("<|", " ") for t in texts]
    counts = tokenizer_mod._word_counts(texts, CLIPTokenizer().backend_tokenizer)
    # Train to exhaustion (no pair left = every word merged into one token); the trainer warns
    # when it stops below the requested size, which is the point here, so mute that one warning.
    trainer_log = logging.getLogger(tokenizer_mod.__name__)
    level = trainer_log.level
    trainer_log.setLevel(logging.ERROR)
    try:
        ordinary, merges = tokenizer_mod.train_bpe(
            counts, tokenizer_mod.bytes_to_unicode(), vocab_size=1 << 20, end_of_word_suffix="</w>"
        )
    finally:
        trainer_log.setLevel(level)
    vocab = {tok: i for i, tok in enumerate([*ordinary, tokenizer_mod.CLIP_BOS, tokenizer_mod.CLIP_EOS])}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    longest = max((len(tok(t).input_ids) for t in texts), default=0)
    if longest > model_max_length:
        raise ValueError(f"a caption needs {longest} tokens but model_max_length is {model_max_length}")
    return tok


def grammar_words(texts: Iterable[str]) -> list[str]:
    """The distinct words of ``texts`` as CLIPTokenizer pre-tokenizes them (lower-cased, punctuation split)."""
    return sorted(tokenizer_mod._word_counts(texts, CLIPTokenizer().backend_tokenizer))


# --- components ---------------------------------------------------------------------------------------


def build_vae(seed: int) -> AutoencoderKL:
    """The autoencoder, randomly initialised from ``seed``."""
    with seeded(seed, "vae"):
        return AutoencoderKL(**VAE)


def build_text_encoder(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """The CLIP text encoder sized for ``tokenizer``, randomly initialised from ``seed``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER,
    )
    with seeded(seed, "text_encoder"):
        return CLIPTextModel(config)


def build_unet(seed: int, config: dict[str, Any] | None = None) -> UNet2DConditionModel:
    """The latent UNet (``config`` overrides :data:`UNET`), randomly initialised from ``seed``."""
    with seeded(seed, "unet"):
        return UNet2DConditionModel(**{**UNET, **(config or {})})


def noise_scheduler() -> DDPMScheduler:
    """The training-time noise schedule."""
    return DDPMScheduler(**NOISE_SCHEDULE)


def assemble_pipeline(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """The components as a standard ``StableDiffusionPipeline`` (no safety checker, DDIM sampling)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**INFERENCE_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(texts: Sequence[str], seed: int = 0, *, unet_config: dict[str, Any] | None = None) -> StableDiffusionPipeline:
    """A randomly initialised base pipeline with a tokenizer trained on ``texts`` (for tests and pretraining)."""
    tok = train_tokenizer(texts)
    return assemble_pipeline(build_vae(seed), build_text_encoder(tok, seed), tok, build_unet(seed, unet_config))


def n_params(*modules: torch.nn.Module) -> int:
    """Total parameter count of ``modules``."""
    return sum(p.numel() for m in modules for p in m.parameters())
