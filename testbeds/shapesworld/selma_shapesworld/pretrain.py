"""Pretraining the ShapesWorld base model from scratch, deterministically from a seed, on a CPU.

``pretrain(out_dir, config)`` runs four phases and writes a standard diffusers
``StableDiffusionPipeline`` directory (safetensors only) to ``out_dir``:

1. **tokenizer**: CLIP BPE on the world's captions (every grammar word one token);
2. **autoencoder**: ``AutoencoderKL`` on renders of a *uniform* mix of scene kinds (so it can
   reconstruct any scene the later SELMA loop asks for), MSE + L1 + a tiny KL term + a tie of
   the 32x32x3 latent to the 2x2-average-pooled image (so the latent is an image, which a small
   UNet learns as well as pixel space); then the training scenes are encoded once (posterior
   means), their per-channel mean is folded into the autoencoder (:func:`fold_latent_shift`:
   zero-mean latents, exactly the same decoded images) and ``scaling_factor`` is
   ``latent_scaling`` (1: pixel-like magnitudes, objects about ±1.7 on a zero background); at the
   end the posterior is folded to a point at its mean (:func:`fold_posterior_to_mean`), so training
   on the model with sampled latents sees the latents the UNet learned from;
3. **text encoder + UNet**, jointly, DDPM on the cached latents: ``squaredcos_cap_v2`` betas,
   epsilon prediction with min-SNR-γ loss weights, 10 % empty captions (for classifier-free
   guidance), AdamW with linear warmup then cosine decay, gradient clipping, EMA weights (saved).
   The caption mix is the world's skewed default (mostly single objects), so the model learns
   single shapes best and stays weak at counting, relations and attribute binding;
4. **decoder fine-tune**: the autoencoder's decoder alone (encoder frozen, so the latent space
   the UNet learned is unchanged) for sharper edges and small shapes: after the autoencoder
   phase the judge accepts 81 % of training-scene reconstructions, after this one 93 % (strict).

Determinism: every random draw comes from a generator seeded from ``(seed, purpose, step)``:
the scenes (``world.dataset`` seeds), the initial weights, each step's batch (a fixed
permutation per epoch), noise, timesteps and caption drops.  So the same seed, config and
thread count on the same CPU type and library versions give bit-identical safetensors, and a
run resumed from a checkpoint equals an uninterrupted one.  What varies: the thread count
(intra-op reductions split differently: 1 and 2 threads differ in the last float bits, which
compound over training into visibly different, equally good weights), the CPU's instruction set
(oneDNN/MKL pick AVX2 vs AVX-512 kernels) and torch/diffusers versions.

Checkpoints (``<checkpoint_dir>/``): ``vae``/``unet``/``decoder.safetensors`` (weights, EMA
weights and AdamW state) with ``vae``/``unet``/``decoder.json`` (step, config, losses), the latent cache
``latents.safetensors`` + ``latents.json``, and ``loss-log.jsonl``.  Each is written to a temporary
file and renamed, so a killed run resumes from its last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from selma.errors import FailedPrecondition, InvalidArgument
from selma_shapesworld import model as M
from selma_shapesworld import world

logger = logging.getLogger(__name__)

RECORD_FILE = "shapesworld-base.json"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the trained weights (with the seed and the thread count)."""

    seed: int = 0
    # tokenizer corpus: this many scenes of every kind
    tokenizer_scenes_per_kind: int = 1000
    # autoencoder
    vae_steps: int = 300
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_warmup: int = 50
    vae_scenes: int = 4096
    vae_kl_weight: float = 1e-6
    # weight of MSE(latent mean, 2x2 average-pooled image): keeps the latent an image, which the
    # small UNet learns as well as pixel space, while the decoder adds the full-resolution edges
    vae_pixel_tie: float = 1.0
    # latent scaling factor; 0 = 1 / std of the shifted latents (SD's convention).  1 keeps pixel-like
    # magnitudes: with 1 / std (3.8: the background dominates the std) objects reached ±6 and the
    # model drew them too small or not at all (judge 23 % on single objects, against 58 % with 1; n=48, CFG 4)
    latent_scaling: float = 1.0
    # autoencoder decoder fine-tune after the UNet (encoder frozen, so the latent space the UNet
    # learned stays the same): sharper edges and small shapes at no cost to the UNet
    decoder_steps: int = 600
    decoder_lr: float = 5e-4
    # text encoder + UNet
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    unet_scenes: int = 24576
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    snr_gamma: float = 5.0
    uncond_prob: float = 0.1
    size_words: float = 0.2  # share of training captions that name sizes ("a small red circle")
    # share of single-object scenes in the UNet's training scenes; the rest is split equally between
    # the four skill kinds (count, relation, binding, multi).  0.8 (the world's default mix) leaves
    # the model weak at the skills; lower shares cover them more often, still less than single objects.
    single_share: float = 0.8
    # bookkeeping (do not change the weights)
    checkpoint_every: int = 200
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("vae_steps", "unet_steps", "vae_pixel_tie", "latent_scaling"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name} must be >= 0", field=name.replace("_", "-"))
        for name in ("vae_batch", "unet_batch", "vae_scenes", "unet_scenes", "tokenizer_scenes_per_kind", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be >= 1", field=name.replace("_", "-"))
        if not 0.0 <= self.single_share < 1.0:
            raise InvalidArgument(f"single_share must be in [0, 1); got {self.single_share}", field="single-share")
        if isinstance(self.seed, bool) or not 0 <= self.seed < 2**31:
            raise InvalidArgument(f"seed must be in [0, 2**31); got {self.seed}", field="seed")

    def unet_mix(self) -> dict[str, float]:
        """Scene-kind weights of the UNet's training scenes (``single_share`` single, the rest split over the skills)."""
        if self.single_share == 0.8:
            return dict(world.DEFAULT_MIX)  # the published default, exactly (its scenes are drawn from these weights)
        rest = (1.0 - self.single_share) / 4
        return {"single": self.single_share, "count": rest, "relation": rest, "binding": rest, "multi": rest}

    def weights_fields(self, phase: str = "unet") -> dict[str, Any]:
        """The fields that determine a phase's result (its checkpoint must match them to be resumed).

        ``vae``: the autoencoder; ``latents``: + the UNet's training scenes and tokenizer; ``unet``: all.
        """
        d = dataclasses.asdict(self)
        d.pop("checkpoint_every")
        d.pop("log_every")
        decoder = {k: d.pop(k) for k in ("decoder_steps", "decoder_lr")}
        vae = {k: v for k, v in d.items() if k in ("seed", "grad_clip", "min_lr_ratio") or k.startswith("vae_")}
        if phase == "vae":
            return vae
        if phase == "decoder":
            return {**vae, **decoder}
        if phase == "latents":
            return {**vae, **{k: d[k] for k in ("unet_scenes", "size_words", "single_share", "tokenizer_scenes_per_kind", "latent_scaling")}}
        if phase == "all":
            return {**d, **decoder}
        return d


# --- small utilities ---------------------------------------------------------------------------


def _gen(seed: int, *purpose: Any) -> torch.Generator:
    return torch.Generator().manual_seed(M.component_seed(seed, ":".join(map(str, purpose))))


def _world_seed(seed: int, purpose: str) -> int:
    return M.component_seed(seed, purpose) % (2**32)


def _lr(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """PIL RGB images -> uint8 tensor (N, 3, H, W)."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, Any] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    if meta is not None:
        _atomic_json(meta, path.with_suffix(".json"))


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            out[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        i, _, k = key.partition(".")
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def _strip(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _params_dict(params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {str(i): p.detach().clone() for i, p in enumerate(params)}


class _LossLog:
    """Appends one JSON line per logged step to ``loss-log.jsonl``; keeps running means for the record."""

    def __init__(self, path: Path, phase: str, every: int) -> None:
        self.path, self.phase, self.every = path, phase, every
        self.acc: dict[str, list[float]] = {}

    def add(self, step: int, lr: float, **values: float) -> dict[str, float] | None:
        for k, v in values.items():
            self.acc.setdefault(k, []).append(v)
        if (step + 1) % self.every:
            return None
        means = {k: float(np.mean(v)) for k, v in self.acc.items()}
        self.acc = {}
        with self.path.open("a") as f:
            f.write(json.dumps({"phase": self.phase, "step": step + 1, "lr": lr, **means}) + "\n")
        return means


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


# --- phases ----------------------------------------------------------------------------------------


def build_tokenizer(cfg: PretrainConfig) -> Any:
    """The tokenizer, trained on captions of every kind, with and without size words."""
    texts: list[str] = []
    for kind in world.KINDS:
        pairs = world.dataset(_world_seed(cfg.seed, f"tokenizer:{kind}"), cfg.tokenizer_scenes_per_kind, mix={kind: 1.0}, size_words=0.5)
        texts += [c for _, c in pairs]
    return M.train_tokenizer(texts)


def _check_meta(path: Path, cfg: PretrainConfig, phase: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    # a field added since the checkpoint was written counts at its default (the value those weights were made with)
    stored = {**PretrainConfig().weights_fields(phase), **(meta.get("config") or {})}
    if stored != cfg.weights_fields(phase):
        raise FailedPrecondition(
            f"checkpoint {path} was written with a different config or seed; use a fresh --checkpoint-dir "
            "or the same settings to resume",
            field="checkpoint_dir",
        )
    return meta


def train_vae(
    cfg: PretrainConfig,
    ckpt: Path,
    *,
    progress: bool,
    on_step: Callable[[str, int], None] | None,
    phase: str = "vae",
    vae: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Phase 2 (``vae``): the autoencoder; or phase 4 (``decoder``): fine-tune the decoder of ``vae``.

    Resumed from ``ckpt/<phase>.safetensors`` when there is one.  The decoder phase freezes the
    encoder (and ``quant_conv``), so latents and the UNet trained on them stay valid.
    """
    if phase == "vae":
        vae = M.build_vae(cfg.seed)
        params = list(vae.parameters())
        steps, base_lr, warmup, kl_weight = cfg.vae_steps, cfg.vae_lr, cfg.vae_warmup, cfg.vae_kl_weight
    else:
        vae.requires_grad_(False)
        params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
        for p in params:
            p.requires_grad_(True)
        steps, base_lr, warmup, kl_weight = cfg.decoder_steps, cfg.decoder_lr, min(cfg.vae_warmup, cfg.decoder_steps), 0.0
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.0)
    meta_path = ckpt / f"{phase}.json"
    meta = _check_meta(meta_path, cfg, phase) or {"step": 0, "seconds": 0.0, "losses": {}}
    if meta["step"]:
        tensors = load_file(str(ckpt / f"{phase}.safetensors"))
        vae.load_state_dict(_strip("model.", tensors))
        _load_optimizer(opt, _strip("opt.", tensors))
        logger.info("%s: resuming at step %d/%d", phase, meta["step"], steps)
    if meta["step"] >= steps:
        vae.requires_grad_(False)
        return vae, meta

    uniform = {k: 1.0 for k in world.KINDS}
    pairs = world.dataset(_world_seed(cfg.seed, "vae-data"), cfg.vae_scenes, mix=uniform)
    images = _to_tensor([world.render(s, size=M.IMAGE_SIZE) for s, _ in pairs])
    n = len(images)
    log = _LossLog(ckpt / "loss-log.jsonl", phase, cfg.log_every)
    vae.train()
    t0 = time.perf_counter()
    bar = _progress(steps, meta["step"], "autoencoder" if phase == "vae" else "decoder", progress)
    for step in range(meta["step"], steps):
        g = _gen(cfg.seed, f"{phase}-step", step)
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=g)
        x = _to_float(images[idx])
        lr = _lr(step, steps, base_lr, warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        if phase == "vae":
            posterior = vae.encode(x).latent_dist
        else:
            with torch.no_grad():
                posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        l1 = F.l1_loss(recon, x)
        kl = posterior.kl().mean()
        loss = mse + l1 + kl_weight * kl
        tie = F.mse_loss(posterior.mean, F.avg_pool2d(x, 2)) if phase == "vae" else torch.zeros(())
        loss = loss + cfg.vae_pixel_tie * tie
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        means = log.add(step, lr, mse=mse.item(), l1=l1.item(), kl=kl.item(), tie=tie.item())
        bar.update(1)
        if means:
            bar.set_postfix(mse=f"{means['mse']:.4f}", l1=f"{means['l1']:.4f}")
            logger.info("%s step %d/%d: mse %.5f l1 %.5f kl %.1f tie %.5f", phase, step + 1, steps, means["mse"], means["l1"], means["kl"], means["tie"])
            meta["losses"] = means
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == steps:
            meta.update(step=done, seconds=meta["seconds"] + time.perf_counter() - t0, config=cfg.weights_fields(phase))
            t0 = time.perf_counter()
            _atomic_save({**_prefixed("model.", vae.state_dict()), **_prefixed("opt.", _optimizer_tensors(opt))}, ckpt / f"{phase}.safetensors")
            _atomic_json(meta, meta_path)
        if on_step is not None:
            on_step(phase, done)
    bar.close()
    vae.requires_grad_(False)
    return vae, meta


@torch.no_grad()
def _reconstruction_check(vae: Any, images: torch.Tensor, captions: Sequence[str]) -> float:
    """Share of autoencoder reconstructions (posterior means) of ground-truth renders the judge accepts."""
    from PIL import Image

    from selma_shapesworld import judge

    recon = vae.decode(vae.encode(_to_float(images)).latent_dist.mean).sample
    arr = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(np.mean([judge.verify(Image.fromarray(a), c, strict=True) for a, c in zip(arr, captions, strict=True)]))


def reconstruction_accuracy(cfg: PretrainConfig, vae: Any, n: int = 96) -> float:
    """Share of autoencoder reconstructions of fresh ground-truth renders (all kinds) the judge accepts (strict)."""
    pairs = world.dataset(_world_seed(cfg.seed, "reconstruction-check"), n, mix={k: 1.0 for k in world.KINDS})
    images = _to_tensor([world.render(s, size=M.IMAGE_SIZE) for s, _ in pairs])
    return _reconstruction_check(vae.eval(), images, [c for _, c in pairs])


@torch.no_grad()
def fold_latent_shift(vae: Any, shift: Sequence[float]) -> None:
    """Make the autoencoder's latents zero-mean: subtract ``shift`` (per channel) inside the encoder.

    The posterior mean comes out of ``quant_conv`` (its first ``latent_channels`` outputs), so
    the shift goes into that bias; ``post_quant_conv`` gets ``W @ shift`` added to its bias, so
    decoding a shifted latent gives exactly the image the unshifted one gave.  Needed because
    ``StableDiffusionPipeline`` only scales latents (no shift): an image-like latent has the
    light background's mean, sampling starts from zero-mean noise at a timestep that still
    carries a little signal, and a model trained on offset data then misses the background
    level everywhere (it drew grey-red noise; its one-step denoising was fine).
    """
    mu = torch.tensor(list(shift), dtype=vae.quant_conv.bias.dtype)
    c = len(mu)
    vae.quant_conv.bias[:c] -= mu
    w = vae.post_quant_conv.weight[:, :, 0, 0]
    vae.post_quant_conv.bias += w @ mu


POSTERIOR_LOGVAR = -30.0  # the folded posterior's log-variance: std e^-15 ≈ 3e-7, a point at the mean


@torch.no_grad()
def fold_posterior_to_mean(vae: Any) -> None:
    """Make the encoder's posterior a point at its mean: ``latent_dist.sample()`` then returns the mean.

    The UNet learns from posterior means (:func:`encode_training_set`), and with a KL weight of 1e-6
    the encoder's log-variance was never held to anything: its posterior std is as large as the
    latents themselves (0.41 against a latent std of 0.46 on renders).  Whoever trains on this
    model with the usual ``latent_dist.sample()`` (selma's LoRA training, the diffusers examples)
    would then learn latents drowned in noise the model never saw, and draw worse for it, even on
    ground-truth images.  The log-variance comes out of ``quant_conv``'s last ``latent_channels``
    outputs; zero weights and a bias of :data:`POSTERIOR_LOGVAR` make it a constant.  Means,
    decoding and every image the pipeline draws stay exactly as they were.
    """
    c = vae.quant_conv.out_channels // 2
    vae.quant_conv.weight[c:] = 0.0
    vae.quant_conv.bias[c:] = POSTERIOR_LOGVAR


@torch.no_grad()
def encode_training_set(cfg: PretrainConfig, vae: Any, tokenizer: Any, ckpt: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Latents (shifted to zero mean, scaled) and token ids of the UNet's training scenes, cached in ``ckpt/latents.safetensors``.

    Folds the latent shift into ``vae`` (:func:`fold_latent_shift`), also when the cache exists.
    """
    path = ckpt / "latents.safetensors"
    meta = _check_meta(ckpt / "latents.json", cfg, "latents")
    if meta is not None and path.is_file():
        fold_latent_shift(vae, meta["latent_shift"])
        return (*_load_cache(path), float(meta["scaling_factor"]))
    pairs = world.dataset(_world_seed(cfg.seed, "unet-data"), cfg.unet_scenes, mix=cfg.unet_mix(), size_words=cfg.size_words)
    images = _to_tensor([world.render(s, size=M.IMAGE_SIZE) for s, _ in pairs])
    vae.eval()
    chunks = [vae.encode(_to_float(images[i : i + 128])).latent_dist.mean for i in range(0, len(images), 128)]
    latents = torch.cat(chunks)
    shift = [float(v) for v in latents.mean(dim=(0, 2, 3))]
    fold_latent_shift(vae, shift)
    latents = latents - torch.tensor(shift)[None, :, None, None]
    scaling = float(cfg.latent_scaling) if cfg.latent_scaling else float(1.0 / latents.std())
    latents = latents * scaling
    ids = tokenizer([c for _, c in pairs], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    kinds: dict[str, int] = {}
    for s, _ in pairs:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
    recon_ok = _reconstruction_check(vae, images[:64], [c for _, c in pairs[:64]])
    _atomic_save({"latents": latents, "input_ids": ids}, path)
    _atomic_json(
        {"config": cfg.weights_fields("latents"), "scaling_factor": scaling, "latent_shift": shift, "kinds": kinds, "n": len(pairs),
         "reconstruction_judge_ok": recon_ok},
        ckpt / "latents.json",
    )
    logger.info("encoded %d training scenes (%s); latent shift %s, scaling factor %.4f; judge accepts %.0f%% of reconstructions",
                len(pairs), kinds, [round(v, 3) for v in shift], scaling, 100 * recon_ok)
    # Train from the file in a fresh run too, so that a fresh and a resumed run see the very same tensors.
    return (*_load_cache(path), scaling)


def _load_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(path))
    return t["latents"].clone(), t["input_ids"].clone()


def train_unet(
    cfg: PretrainConfig,
    tokenizer: Any,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    ckpt: Path,
    *,
    progress: bool,
    on_step: Callable[[str, int], None] | None,
    unet_config: dict[str, Any] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Phase 3: text encoder + UNet jointly; returns them carrying their EMA weights."""
    text_encoder = M.build_text_encoder(tokenizer, cfg.seed)
    unet = M.build_unet(cfg.seed, unet_config)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    decay_params = [p for p in params if p.ndim > 1]
    other_params = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay_params, "weight_decay": cfg.weight_decay}, {"params": other_params, "weight_decay": 0.0}], lr=cfg.unet_lr
    )
    meta_path = ckpt / "unet.json"
    meta = _check_meta(meta_path, cfg, "unet") or {"step": 0, "seconds": 0.0, "losses": {}}
    if meta["step"]:
        tensors = load_file(str(ckpt / "unet.safetensors"))
        text_encoder.load_state_dict(_strip("text_encoder.", tensors))
        unet.load_state_dict(_strip("unet.", tensors))
        ema_t = _strip("ema.", tensors)
        ema = [ema_t[str(i)] for i in range(len(params))]
        _load_optimizer(opt, _strip("opt.", tensors))
        logger.info("text encoder + UNet: resuming at step %d/%d", meta["step"], cfg.unet_steps)

    sched = M.noise_scheduler()
    alphas = sched.alphas_cumprod.float()
    empty_ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
    n = len(latents)
    log = _LossLog(ckpt / "loss-log.jsonl", "unet", cfg.log_every)
    text_encoder.train()
    unet.train()
    t0 = time.perf_counter()
    bar = _progress(cfg.unet_steps, meta["step"], "text encoder + UNet", progress)
    perm_epoch, perm = -1, torch.empty(0, dtype=torch.long)
    for step in range(meta["step"], cfg.unet_steps):
        # Fixed data order: epoch e visits the scenes in permutation e; batches may straddle epochs.
        pos = torch.arange(step * cfg.unet_batch, (step + 1) * cfg.unet_batch)
        idx = torch.empty(cfg.unet_batch, dtype=torch.long)
        for j, p in enumerate(pos.tolist()):
            e = p // n
            if e != perm_epoch:
                perm_epoch, perm = e, torch.randperm(n, generator=_gen(cfg.seed, "unet-epoch", e))
            idx[j] = perm[p % n]
        g = _gen(cfg.seed, "unet-step", step)
        lat = latents[idx]
        ids = input_ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.uncond_prob
        ids[drop] = empty_ids
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        noisy = sched.add_noise(lat, noise, t)
        lr = _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.unet_warmup, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = alphas[t] / (1 - alphas[t])
        weights = torch.clamp(snr, max=cfg.snr_gamma) / snr  # min-SNR-γ for epsilon prediction
        loss = (weights * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e_, p_ in zip(ema, params, strict=True):
                e_.lerp_(p_.detach(), 1 - decay)
        means = log.add(step, lr, loss=loss.item(), mse=per_sample.mean().item())
        bar.update(1)
        if means:
            bar.set_postfix(loss=f"{means['loss']:.4f}", mse=f"{means['mse']:.4f}")
            logger.info("text encoder + UNet step %d/%d: loss %.5f mse %.5f", step + 1, cfg.unet_steps, means["loss"], means["mse"])
            meta["losses"] = means
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
            meta.update(step=done, seconds=meta["seconds"] + time.perf_counter() - t0, config=cfg.weights_fields())
            t0 = time.perf_counter()
            tensors = {
                **_prefixed("text_encoder.", text_encoder.state_dict()),
                **_prefixed("unet.", unet.state_dict()),
                **_prefixed("ema.", _params_dict(ema)),
                **_prefixed("opt.", _optimizer_tensors(opt)),
            }
            _atomic_save(tensors, ckpt / "unet.safetensors")
            _atomic_json(meta, meta_path)
        if on_step is not None:
            on_step("unet", done)
    bar.close()
    with torch.no_grad():
        for e_, p_ in zip(ema, params, strict=True):
            p_.copy_(e_)
    return text_encoder, unet, meta


def pretrain(
    out_dir: str | os.PathLike[str],
    cfg: PretrainConfig,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_step: Callable[[str, int], None] | None = None,
    unet_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the base model and save it as a diffusers pipeline to ``out_dir``; returns the training record.

    ``checkpoint_dir`` (default ``<out_dir>.ckpt``) holds the resumable state; rerunning with
    the same config resumes there.  ``on_step(phase, steps_done)`` is called after every step
    (tests use it to interrupt a run).  ``unet_config`` overrides :data:`model.UNET` (tests only).
    """
    from selma.models.tiny import _staged_dir  # same atomic directory publish as the tiny models

    out = Path(out_dir)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".ckpt")
    ckpt.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            t0 = time.perf_counter()
            tokenizer = build_tokenizer(cfg)
            tok_s = time.perf_counter() - t0
            vae, vae_meta = train_vae(cfg, ckpt, progress=progress, on_step=on_step)
            t0 = time.perf_counter()
            latents, ids, scaling = encode_training_set(cfg, vae, tokenizer, ckpt)
            enc_s = time.perf_counter() - t0
            text_encoder, unet, unet_meta = train_unet(cfg, tokenizer, latents, ids, ckpt, progress=progress, on_step=on_step, unet_config=unet_config)
            vae, decoder_meta = train_vae(cfg, ckpt, progress=progress, on_step=on_step, phase="decoder", vae=vae)
            recon_ok = reconstruction_accuracy(cfg, vae)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    vae.register_to_config(scaling_factor=scaling)
    fold_posterior_to_mean(vae)  # the posterior the UNet learned from: its mean
    pipe = M.assemble_pipeline(vae.eval(), text_encoder.eval(), tokenizer, unet.eval())
    record = {
        "seed": cfg.seed,
        "config": cfg.weights_fields("all"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "scaling_factor": scaling,
        "vocab_size": len(tokenizer),
        "parameters": {
            "vae": M.n_params(vae),
            "text_encoder": M.n_params(text_encoder),
            "unet": M.n_params(unet),
        },
        "seconds": {
            "tokenizer": round(tok_s, 1),
            "vae": round(vae_meta["seconds"], 1),
            "decoder": round(decoder_meta["seconds"], 1),
            "encode": round(enc_s, 1),
            "unet": round(unet_meta["seconds"], 1),
            "this_run_total": round(time.perf_counter() - started, 1),
        },
        "final_losses": {"vae": vae_meta.get("losses", {}), "decoder": decoder_meta.get("losses", {}), "unet": unet_meta.get("losses", {})},
        "reconstruction_judge_strict": recon_ok,
    }
    from selma.models._hf import no_progress_bars

    with _staged_dir(out) as stage, no_progress_bars():
        pipe.save_pretrained(stage, safe_serialization=True)
        _atomic_json(record, stage / RECORD_FILE)
    logger.info("saved the ShapesWorld base pipeline to %s", out)
    return record


def clear_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> None:
    """Remove a checkpoint directory (after a finished run, if the caller does not want to keep it)."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)


# --- evaluation ---------------------------------------------------------------------------------


def evaluate(
    pipe: Any,
    kinds: Sequence[str],
    *,
    n: int = 96,
    steps: int = 25,
    guidance: float = 2.0,
    seed: int = 1234,
    batch: int = 32,
    image_dir: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Judge accuracy of ``pipe`` per scene kind: ``n`` fresh captions each, DDIM ``steps``, CFG ``guidance``.

    Returns ``{kind: {"n", "ok", "strict"}}`` (fractions) from ``judge.verify``.
    """
    from selma.pipelines import make_scheduler
    from selma_shapesworld import judge

    out: dict[str, dict[str, Any]] = {}
    pipe.scheduler = make_scheduler(pipe, "ddim")
    for kind in kinds:
        pairs = world.dataset(_world_seed(seed, f"eval:{kind}"), n, mix={kind: 1.0})
        captions = [c for _, c in pairs]
        ok = strict = 0
        for start in range(0, n, batch):
            chunk = captions[start : start + batch]
            gens = [torch.Generator().manual_seed(seed * 100003 + start + i) for i in range(len(chunk))]
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pil").images
            for i, (img, cap) in enumerate(zip(images, chunk, strict=True)):
                ok += judge.verify(img, cap)
                strict += judge.verify(img, cap, strict=True)
                if image_dir is not None:
                    d = Path(image_dir) / kind
                    d.mkdir(parents=True, exist_ok=True)
                    img.save(d / f"{start + i:04d}-{cap.replace(' ', '_').replace(',', '')}.png")
        out[kind] = {"n": n, "ok": ok / n, "strict": strict / n}
        logger.info("eval %s: ok %.3f strict %.3f (n=%d)", kind, ok / n, strict / n, n)
    return out
