"""The LoRA expert trainer: ``train(job, settings)``, the same function in a Kubernetes Job and locally.

One run: load the dataset and base model, build or reuse the latent/text cache
(:mod:`selma_training.data`), add a PEFT LoRA adapter to the UNet attention projections (text
encoders and the rest of the UNet frozen), resume from the newest usable checkpoint, train
with AdamW / constant LR / grad clipping (optional noise offset and min-SNR-γ, ε or v target
from the scheduler, fp16/bf16 autocast with fp32 LoRA weights and gradient checkpointing on
GPU), checkpoint every N steps, and publish the expert artifact: diffusers-format
``pytorch_lora_weights.safetensors``, a kohya export, ``expert.json`` and ``training_config.json``.

**Determinism.**  Every random draw goes through state that is checkpointed: the data order
is a pure function of (seed, epoch) and a sample cursor; flips of (seed, epoch, sample);
latent sampling, noise, noise offset and timesteps come from one CPU ``torch.Generator`` whose
state is saved; torch/numpy/python global states are saved too (LoRA dropout uses torch's).
So on CPU a run killed after checkpoint k and resumed ends bit-identical to an uninterrupted
run (same threads, same machine).

**Data parallel.**  With a :class:`~selma_training.distributed.World` of several ranks (torchrun
processes, :mod:`selma_training.distributed`) the UNet is wrapped in DistributedDataParallel and
each rank trains its share of every step's micro-batches; rank 0 builds the latent cache (the
others wait for it), writes progress, checkpoints and the expert, and every rank resumes from
the same checkpoint.  LoRA dropout masks are drawn per rank, seeded from (seed, rank, resumed
step): with dropout > 0 a distributed run is reproducible but not equal to a one-process run.

**Early stopping** (``validation_fraction`` > 0).  The validation split
(:func:`selma_training.data.split_validation`) never enters the data order.  Its loss is taken
at fixed noise, latent samples and evenly spread timesteps drawn once from a generator of its own
(:class:`Validator`), with the UNet in eval mode (LoRA dropout off) and no global RNG touched, so
validating does not change the training trajectory and every evaluation is comparable.  The
best adapter so far, its loss and step, and the evaluations without improvement are part of each
checkpoint: a resumed run stops at the same step and exports the same best adapter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selma.artifacts import ArtifactKind, ArtifactStore
from selma.batch.progress import ProgressWriter
from selma.errors import FailedPrecondition, InvalidArgument, SelmaError
from selma.lora_format import expert_scale_fields, fold_scale
from selma.pipelines import ModelSpec, load_pipeline, resolve_device
from selma.seeds import stable_hash64
from selma.storage import open_storage
from selma_training import data as data_mod
from selma_training import distributed
from selma_training import metrics as trainer_metrics
from selma_training.checkpoint import CheckpointStore, TrainState
from selma_training.config import TrainingConfig, TrainingJob, planned_steps, validation_every
from selma_training.distributed import World
from selma_training.settings import TrainingSettings

log = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
MAX_HISTORY = 500


class TrainingInterrupted(Exception):
    """The trainer was asked to stop (SIGTERM, pre-emption); a checkpoint was written first."""


@dataclass
class TrainResult:
    expert_id: str
    steps: int
    final_loss: float
    loss_history: list[list[float]]
    cache_id: str
    cache_hit: bool
    resumed_from_step: int
    trained_steps: int = 0  # optimizer steps run (> steps when early stopping exported an earlier best)
    stopped_early: bool = False
    best_validation_loss: float | None = None


class DataOrder:
    """Which (example, orientation) each position of the sample stream is: a pure function of the seed."""

    def __init__(self, n: int, seed: int, flip: bool, indices: list[int] | None = None) -> None:
        self.n, self.seed, self.flip = n, seed, flip
        self.indices = indices  # the training examples' dataset indices (a validation split left out); None = all
        self._epoch = -1
        self._perm = np.arange(n)
        self._flips = np.zeros(n, dtype=np.int64)

    def _load(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            flips = np.random.default_rng([self.seed, epoch, 1]).random(self.n) < 0.5
            self._flips = flips.astype(np.int64) if self.flip else np.zeros(self.n, dtype=np.int64)
            self._epoch = epoch

    def take(self, cursor: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, orient = [], []
        for p in range(cursor, cursor + count):
            self._load(p // self.n)
            j = int(self._perm[p % self.n])
            idx.append(self.indices[j] if self.indices is not None else j)
            orient.append(int(self._flips[p % self.n]))
        return torch.tensor(idx), torch.tensor(orient)


class _Quiet(ProgressWriter):
    """Progress of a rank other than 0: kept in memory, never written (rank 0 reports the run)."""

    def flush(self) -> None:
        pass


class Validator:
    """The validation loss: the held-out images at fixed latent samples, noise and timesteps.

    Each image is scored at ``validation_timesteps`` timesteps spread evenly over the schedule
    (``(j + ½)·T/K``); latent samples and noise come from a generator seeded from the config's
    seed alone, drawn once here.  Plain (unweighted) MSE against the training target.
    """

    SALT = 0x7A11DA7E

    def __init__(self, source: data_mod.SampleSource, indices: list[int], cfg: TrainingConfig, noise_sched: Any,
                 prediction: str, scaling: float, shift: float, is_xl: bool) -> None:
        gen = torch.Generator().manual_seed((cfg.seed ^ self.SALT) % 2**63)
        k = cfg.validation_timesteps
        total_t = int(noise_sched.config.num_train_timesteps)
        steps = [min(total_t - 1, int((j + 0.5) * total_t / k)) for j in range(k)]
        idx = torch.tensor(indices)
        orient = torch.zeros(len(indices), dtype=torch.long)
        mean, std = source.latent_dist(idx, orient)
        cond = source.conditioning(idx, orient)
        # one row per (image, timestep): image-major
        rep = torch.arange(len(indices)).repeat_interleave(k)
        self.t = torch.tensor(steps).repeat(len(indices))
        latents = ((mean[rep] + std[rep] * torch.randn(mean[rep].shape, generator=gen)) - shift) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        self.noisy = noise_sched.add_noise(latents, noise, self.t)
        self.target = noise if prediction == "epsilon" else noise_sched.get_velocity(latents, noise, self.t)
        self.cond = {name: v[rep] for name, v in cond.items()}
        self.is_xl, self.batch = is_xl, max(1, cfg.batch_size)

    @torch.no_grad()
    def loss(self, unet: Any, device: torch.device, dtype: torch.dtype, autocast: Any) -> float:
        was_training = unet.training
        unet.eval()
        total, n = 0.0, self.t.shape[0]
        try:
            for s in range(0, n, self.batch):
                sl = slice(s, s + self.batch)
                kwargs: dict[str, Any] = {}
                if self.is_xl:
                    kwargs["added_cond_kwargs"] = {"text_embeds": self.cond["pooled"][sl].to(device, dtype),
                                                   "time_ids": self.cond["time_ids"][sl].to(device, dtype)}
                with autocast:
                    pred = unet(self.noisy[sl].to(device, dtype), self.t[sl].to(device),
                                self.cond["prompt_embeds"][sl].to(device, dtype), **kwargs).sample
                per = F.mse_loss(pred.float(), self.target[sl].to(device).float(), reduction="none").mean(dim=(1, 2, 3))
                total += float(per.sum())
        finally:
            unet.train(was_training)
        return total / n


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _precision(job: TrainingJob, device: torch.device, progress: ProgressWriter) -> str:
    p = job.config.mixed_precision
    if device.type == "cpu" and p != "fp32":
        progress.warn(f"mixed_precision {p} is for GPUs; training in fp32 on CPU")
        return "fp32"
    return p


def train(
    job: TrainingJob,
    settings: TrainingSettings,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_components: Callable[[Any], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train (or resume, or return the already published) expert for ``job``.

    ``should_stop`` is polled after every optimizer step: when true (on any rank), a checkpoint is
    saved and TrainingInterrupted raised.  ``on_components(pipe)`` sees the loaded pipeline (tests
    count encoder calls with hooks); ``on_step(step)`` runs after each optimizer step (tests crash
    there).  ``world``: this process's rank when it is one of several (torchrun); None = alone.
    """
    world = world or World()
    if world.size != job.world_size:
        raise FailedPrecondition(f"the job asks for {job.world_size} trainer processes; this one is rank {world.rank} of {world.size}")
    device = resolve_device(job.device, settings)
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one process per GPU
    with distributed.process_group(world, device, settings.training_distributed_timeout_seconds):
        return _train(job, settings, device, world, should_stop, on_components, on_step)


def _train(
    job: TrainingJob,
    settings: TrainingSettings,
    device: torch.device,
    world: World,
    should_stop: Callable[[], bool] | None,
    on_components: Callable[[Any], None] | None,
    on_step: Callable[[int], None] | None,
) -> TrainResult:
    cfg = job.config
    storage = open_storage(settings)
    store = ArtifactStore(storage)
    progress = (ProgressWriter if world.main else _Quiet)(storage, job.progress_key, settings.batch_progress_interval_seconds)
    progress.update(phase="loading", max_steps=cfg.max_steps, expert_id=job.expert_id, world_size=world.size,
                    pod=settings.batch_pod_name, node=settings.batch_node_name, force=True)
    # this process's /metrics (served by `selma train` when a metrics port is set): the skill is
    # the only label; the pod comes from the scrape
    m_step = trainer_metrics.TRAINER_STEP.labels(job.skill)
    m_loss = trainer_metrics.TRAINER_LOSS.labels(job.skill)
    m_rate = trainer_metrics.TRAINER_STEPS_PER_SECOND.labels(job.skill)
    m_ckpts = trainer_metrics.TRAINER_CHECKPOINTS.labels(job.skill)
    m_last_ckpt = trainer_metrics.TRAINER_LAST_CHECKPOINT_STEP.labels(job.skill)
    trainer_metrics.TRAINER_MAX_STEPS.labels(job.skill).set(cfg.max_steps)
    m_last_ckpt.set(0)  # no checkpoint of this process yet; a resume sets the step it resumed from
    if store.exists(job.expert_id):
        m = store.get(job.expert_id)
        p = m.parameters
        m_step.set(int(p.get("steps", cfg.max_steps)))
        progress.update(phase="done", step=p.get("steps", cfg.max_steps), final_loss=p.get("final_loss"), force=True)
        return TrainResult(job.expert_id, int(p.get("steps", cfg.max_steps)), float(p.get("final_loss") or 0.0),
                           p.get("loss_history", []), p.get("latent_cache_id", ""), True, 0)

    dataset, examples = data_mod.load_dataset(store, job.dataset_id)
    train_idx, val_idx = data_mod.split_validation(len(examples), cfg.validation_fraction, cfg.seed)
    total = planned_steps(cfg, len(train_idx))
    trainer_metrics.TRAINER_MAX_STEPS.labels(job.skill).set(total)
    progress.update(max_steps=total, train_images=len(train_idx), validation_images=len(val_idx), force=True)
    precision = _precision(job, device, progress)
    weight_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if cfg.optimizer == "adamw_8bit" and device.type != "cuda":
        raise FailedPrecondition("optimizer adamw_8bit needs a CUDA GPU; use adamw on CPU", field="config.optimizer")

    spec = ModelSpec(cfg.base_model.source, cfg.base_model.revision, cfg.base_model.variant, cfg.base_model.vae_source)
    pipe = load_pipeline(spec, settings, device=str(device), precision=precision)
    if on_components is not None:
        on_components(pipe)
    is_xl = hasattr(pipe, "text_encoder_2")
    unet = pipe.unet
    unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        if enc is not None:
            enc.requires_grad_(False)

    # -- data: cache or live encoding
    labels = {"selma.dev/run": job.run, "selma.dev/skill": job.skill}
    encoder = data_mod.Encoder(pipe, store, dataset, examples, cfg, device, weight_dtype)
    cache_id, cache_hit, cache_digest = "", False, ""
    if cfg.use_latent_cache:
        key = data_mod.cache_key(dataset, cfg, data_mod.model_fingerprint(pipe))
        cache_id = data_mod.cache_id_for(key)
        if not world.main:
            distributed.barrier(world)  # rank 0 builds (or finds) the cache first
        if store.exists(cache_id):
            cache_manifest = store.get(cache_id)
            tensors = data_mod.load_cache(store, cache_manifest, len(examples))
            cache_hit = True
        elif not world.main:
            raise FailedPrecondition(f"rank 0 did not publish the latent cache {cache_id}; see its log")
        else:
            progress.update(phase="caching", force=True)
            tensors = encoder.build_all(cfg.batch_size, lambda d, t: progress.update(message=f"encoding {d}/{t}"))
            meta = {"dataset_id": dataset.id, "dataset_digest": dataset.digest, "base_model": cfg.base_model.model_dump(),
                    "resolution": cfg.resolution, "center_crop": cfg.center_crop, "random_flip": cfg.random_flip,
                    "seed": cfg.seed, "count": len(examples), "orientations": 2 if cfg.random_flip else 1, "key": key,
                    "format": data_mod.CACHE_FORMAT}
            cache_manifest = data_mod.save_cache(store, cache_id, tensors, meta, parents=[dataset.id], labels=labels)
        if world.main:
            distributed.barrier(world)
        cache_digest = cache_manifest.digest
        source: data_mod.SampleSource = data_mod.SampleSource(tensors)
        # the frozen encoders are not needed any more: free their memory for the UNet
        if device.type == "cuda":
            pipe.vae.to("cpu")
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, name, None) is not None:
                    getattr(pipe, name).to("cpu")
            torch.cuda.empty_cache()
        progress.update(latent_cache={"id": cache_id, "uri": cache_manifest.uri, "sha256": cache_digest}, latent_cache_hit=cache_hit, force=True)
    else:
        source = data_mod.LiveSource(encoder)

    # -- LoRA
    from peft import LoraConfig

    init = "gaussian" if cfg.lora_init == "gaussian" else True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # same seed → same A init for every skill, as SELMA (merging relies on it)
        try:
            unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights=init,
                                        target_modules=list(cfg.target_modules), lora_dropout=cfg.lora_dropout))
        except ValueError as e:
            raise InvalidArgument(f"cannot add LoRA to this UNet: {e}", field="config.lora.target_modules") from None
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # LoRA weights train in fp32 under autocast
    named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    if cfg.gradient_checkpointing and device.type == "cuda":
        unet.enable_gradient_checkpointing()
    unet.train()
    model: Any = unet
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # only the LoRA parameters train, all of them in every forward; no buffers change
        model = DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)

    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # noqa: PLC0415 - optional, CUDA only

        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
    optimizer = opt_cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    from diffusers.optimization import get_scheduler

    lr_sched = get_scheduler(cfg.lr_schedule, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=total)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None

    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = cfg.prediction_type or noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise FailedPrecondition(f"the model's prediction type {prediction!r} is not supported; set prediction_type", field="config.prediction_type")
    alphas_cumprod = noise_sched.alphas_cumprod.float()
    scaling = float(pipe.vae.config.scaling_factor)
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    validator = (Validator(source, val_idx, cfg, noise_sched, prediction, scaling, shift, is_xl) if val_idx else None)
    every = validation_every(cfg)
    m_val = trainer_metrics.TRAINER_VALIDATION_LOSS.labels(job.skill)
    # early-stopping state (checkpointed): best loss, its step and adapter, evaluations since, history
    val: dict[str, Any] = {"best": None, "best_step": 0, "bad": 0, "history": [], "stopped": False}
    best_lora: dict[str, torch.Tensor] | None = None

    # -- resume
    # global generators are seeded too (LoRA dropout draws from torch's); a resume restores them
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpts = CheckpointStore(storage, job.checkpoint_prefix)
    state, warnings = ckpts.load_latest(gen)  # every rank loads the same (newest usable) checkpoint
    for w in warnings:
        progress.warn(w)
    start_step, cursor, history = 0, 0, []
    if state is not None:
        missing = set(named) ^ set(state.lora)
        if missing:
            raise FailedPrecondition(f"checkpoint at step {state.step} does not match this adapter ({len(missing)} tensors differ); delete {job.checkpoint_prefix} to restart")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state.lora[n])
        optimizer.load_state_dict(state.optimizer)
        lr_sched.load_state_dict(state.lr_scheduler)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        start_step, cursor, history = state.step, state.cursor, state.loss_history
        if validator is not None and state.validation:
            val = {**val, **state.validation}
            best_lora = state.best_lora
        log.info("resumed from checkpoint at step %d", start_step)
        m_last_ckpt.set(start_step)
    resumed_from = start_step
    distributed.same_on_all(world, start_step, device, "the checkpoint step to resume from")
    if world.distributed:  # per-rank LoRA dropout masks (see the module docstring)
        torch.manual_seed(stable_hash64(f"{cfg.seed}:{world.rank}:{start_step}") % 2**63)
    m_step.set(start_step)
    order = DataOrder(len(train_idx), cfg.seed, cfg.random_flip, train_idx if val_idx else None)
    progress.update(phase="training", step=start_step, resumed_from_step=resumed_from,
                    checkpoints=[c.__dict__ for c in ckpts.info()], loss_history=history, **_validation_progress(val), force=True)

    autocast = (torch.autocast(device_type=device.type, dtype=weight_dtype) if precision != "fp32"
                else torch.autocast(device_type=device.type, enabled=False))

    # every rank draws the random numbers of every micro-batch (its own or not), so the generator
    # advances the same everywhere; the shapes come from one sample, not from the micro-batch's data
    probe, _ = source.latent_dist(torch.tensor([0]), torch.tensor([0]))
    shape = (cfg.batch_size, *probe.shape[1:])

    def draw() -> tuple[torch.Tensor, ...]:
        nonlocal cursor
        idx, orient = order.take(cursor, cfg.batch_size)
        cursor += cfg.batch_size
        eps_lat = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (shape[0],), generator=gen)
        return idx, orient, eps_lat, noise, t

    def micro_step(idx: torch.Tensor, orient: torch.Tensor, eps_lat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean, std = source.latent_dist(idx, orient)
        cond = source.conditioning(idx, orient)
        latents = ((mean + std * eps_lat) - shift) * scaling
        noisy = noise_sched.add_noise(latents, noise, t)
        target = noise if prediction == "epsilon" else noise_sched.get_velocity(latents, noise, t)
        kwargs: dict[str, Any] = {}
        if is_xl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(device, weight_dtype), "time_ids": cond["time_ids"].to(device, weight_dtype)}
        with autocast:
            pred = model(noisy.to(device, weight_dtype), t.to(device), cond["prompt_embeds"].to(device, weight_dtype), **kwargs).sample
        per = F.mse_loss(pred.float(), target.to(device).float(), reduction="none").mean(dim=(1, 2, 3))
        if cfg.snr_gamma:
            snr = (alphas_cumprod[t] / (1 - alphas_cumprod[t])).to(device)
            w = torch.clamp(snr, max=cfg.snr_gamma) / (snr + 1 if prediction == "v_prediction" else snr)
            per = per * w
        return per.mean()

    t0, steps_timed = time.monotonic(), 0
    interval_losses: list[float] = []
    ema: float | None = None
    loss_value = float("nan")
    ckpt_infos = [c.__dict__ for c in ckpts.info()] if world.main else []
    own = world.micro_batches(cfg.gradient_accumulation_steps)
    for step in range(start_step, total):
        micro_losses = []
        for m in range(cfg.gradient_accumulation_steps):
            drawn = draw()
            if m not in own:
                continue
            # gradients are all-reduced (averaged over ranks) in the backward of a rank's last micro-batch
            sync = not world.distributed or m == own[-1]
            with (contextlib.nullcontext() if sync else model.no_sync()):
                loss = micro_step(*drawn)
                scaled = loss / len(own)  # averaged over ranks: the one-process mean over all micro-batches
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            micro_losses.append(float(loss.detach()))
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        # one all-reduce: the step's loss over every micro-batch, and whether any rank was asked to stop
        loss_sum, stops = distributed.sum_across(world, [sum(micro_losses), float(should_stop is not None and should_stop())], device)
        loss_value = loss_sum / cfg.gradient_accumulation_steps
        interrupt = stops > 0  # a SIGTERM on any rank: every rank stops at this step
        if not math.isfinite(loss_value):
            raise FailedPrecondition(f"loss became {loss_value} at step {step + 1}; lower learning_rate or use fp32/bf16", field="config.learning_rate")
        interval_losses.append(loss_value)
        ema = loss_value if ema is None else 0.98 * ema + 0.02 * loss_value
        done = step + 1
        steps_timed += 1
        rate = steps_timed / max(time.monotonic() - t0, 1e-9)
        if validator is not None and (done % every == 0 or done == total):
            # before the checkpoint of this step, so the checkpoint holds this evaluation's outcome
            vloss = validator.loss(unet, device, weight_dtype, autocast)
            # every rank takes the same loss (same weights, same held-out rows); one all-reduce makes the
            # value, and so the early-stopping decision and the best step, the same on every rank even where
            # kernels differ (mixed GPUs), or one rank would stop while the others wait in the next step
            vloss = distributed.sum_across(world, [vloss], device)[0] / world.size
            val["history"] = (val["history"] + [[done, vloss]])[-MAX_HISTORY:]
            m_val.set(vloss)
            if val["best"] is None or vloss < val["best"] - cfg.min_delta:
                val.update(best=vloss, best_step=done, bad=0)
                best_lora = {n: p.detach().clone() for n, p in named.items()}
            else:
                val["bad"] += 1
                if val["bad"] >= cfg.patience and done < total:
                    val["stopped"] = True
                    log.info("early stop at step %d: no improvement on %.5f (step %d) for %d evaluations",
                             done, val["best"], val["best_step"], val["bad"])
        early = bool(val["stopped"])  # the same on every rank: decided from the all-reduced loss
        at_ckpt = done % cfg.checkpoint_every == 0 and done < total and not early
        if at_ckpt or done == total or early:
            history = (history + [[done, sum(interval_losses) / len(interval_losses)]])[-MAX_HISTORY:]
            interval_loss = history[-1][1]
            interval_losses = []
        if at_ckpt and world.main:
            info = ckpts.save(TrainState(step=done, cursor=cursor, lora={n: p for n, p in named.items()},
                                         optimizer=optimizer.state_dict(), lr_scheduler=lr_sched.state_dict(),
                                         scaler=scaler.state_dict() if scaler is not None else None, rng={},
                                         loss_history=history, interval_loss=interval_loss,
                                         validation=val if validator is not None else {}, best_lora=best_lora), gen)
            ckpts.prune(cfg.checkpoints_to_keep)
            ckpt_infos = [c.__dict__ for c in ckpts.info()] or [info.__dict__]
            m_ckpts.inc()
        if at_ckpt:
            m_last_ckpt.set(done)
        m_step.set(done)
        m_loss.set(loss_value)
        m_rate.set(rate)
        progress.update(step=done, loss=loss_value, loss_ema=ema, learning_rate=lr_sched.get_last_lr()[0],
                        steps_per_second=rate, eta_seconds=(total - done) / rate if rate else None,
                        epoch=cursor // len(train_idx), checkpoints=ckpt_infos, loss_history=history,
                        peak_memory_bytes=_peak_memory(device), **_validation_progress(val), force=at_ckpt or early)
        if on_step is not None:
            on_step(done)
        if early:
            break
        if interrupt and done < total:
            if not at_ckpt and world.main:
                ckpts.save(TrainState(step=done, cursor=cursor, lora={n: p for n, p in named.items()},
                                      optimizer=optimizer.state_dict(), lr_scheduler=lr_sched.state_dict(),
                                      scaler=scaler.state_dict() if scaler is not None else None, rng={},
                                      loss_history=history, interval_loss=sum(interval_losses) / max(len(interval_losses), 1),
                                      validation=val if validator is not None else {}, best_lora=best_lora), gen)
                m_ckpts.inc()
                m_last_ckpt.set(done)
            progress.update(phase="interrupted", force=True)
            raise TrainingInterrupted(f"stopped at step {done}; checkpoint saved")

    # -- export: the best adapter when early stopping, else the last (rank 0 only)
    final_loss = history[-1][1] if history else loss_value
    trained = history[-1][0] if history else total
    exported = trained
    if validator is not None and best_lora is not None:
        exported = int(val["best_step"])
    if not world.main:
        return TrainResult(job.expert_id, exported, final_loss, history, cache_id, cache_hit, resumed_from, trained_steps=int(trained),
                           stopped_early=bool(val["stopped"]), best_validation_loss=val["best"])
    progress.update(phase="exporting", force=True)
    outcome: dict[str, Any] = {"trained_steps": trained, "train_images": len(train_idx), "validation_images": len(val_idx)}
    if validator is not None and best_lora is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(best_lora[n])
        outcome.update(best_validation_loss=val["best"], best_step=exported, stopped_early=bool(val["stopped"]),
                       validation_history=val["history"])
    _publish_expert(store, pipe, unet, job, dataset, cache_id, cache_digest, final_loss, history, exported, outcome)
    progress.update(phase="done", step=trained, final_loss=final_loss, peak_memory_bytes=_peak_memory(device), force=True)
    return TrainResult(job.expert_id, exported, final_loss, history, cache_id, cache_hit, resumed_from, trained_steps=int(trained),
                       stopped_early=bool(val["stopped"]), best_validation_loss=val["best"])


def _validation_progress(val: dict[str, Any]) -> dict[str, Any]:
    """The early-stopping fields of the progress document (none before the first evaluation)."""
    if not val["history"]:
        return {}
    return {"validation_loss": val["history"][-1][1], "best_validation_loss": val["best"], "best_step": val["best_step"],
            "validation_history": val["history"], "stopped_early": bool(val["stopped"])}


def lora_state_dicts(unet: Any, rank: int, alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(diffusers-format, kohya-format) state dicts of the UNet's adapter.

    Both carry the scale (:mod:`selma.lora_format`): alpha/rank is folded into the up (B)
    matrices, so B·A is exactly what the trained adapter adds to each weight and both files are
    exact at scale 1 (diffusers assumes alpha = rank; the kohya converter writes alpha = rank).
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    peft_sd = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    peft_sd = {k: (fold_scale(v, alpha, rank) if ".lora_B." in k else v) for k, v in peft_sd.items()}
    diffusers_sd = convert_state_dict_to_diffusers(peft_sd)
    # kohya keys are derived from "unet."-prefixed names; without the prefix no lora_unet_ key appears
    kohya_sd = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    return diffusers_sd, {k: v.contiguous() for k, v in kohya_sd.items()}


def _publish_expert(store: ArtifactStore, pipe: Any, unet: Any, job: TrainingJob, dataset: Any, cache_id: str,
                    cache_digest: str, final_loss: float, history: list[list[float]], steps: int,
                    outcome: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    cfg = job.config
    diffusers_sd, kohya_sd = lora_state_dicts(unet, cfg.rank, cfg.alpha)
    expert = {
        "base_model": {"source": cfg.base_model.source, "revision": cfg.base_model.revision, "variant": cfg.base_model.variant},
        **expert_scale_fields(cfg.rank, cfg.alpha),
        "target_modules": list(cfg.target_modules),
        "steps": steps,
        "skill": job.skill,
        "run": job.run,
        "final_loss": final_loss,
    }
    parameters = {
        **expert,
        "dataset_id": dataset.id,
        "dataset_digest": dataset.digest,
        "latent_cache_id": cache_id,
        "latent_cache_digest": cache_digest,
        "config": cfg.model_dump(mode="json"),
        "config_artifact_id": job.config_artifact_id,
        "loss_history": history,
        **outcome,
    }
    parents = [dataset.id] + [p for p in (cache_id, job.config_artifact_id) if p]
    with tempfile.TemporaryDirectory(prefix="selma-expert-") as tmp:
        type(pipe).save_lora_weights(tmp, unet_lora_layers=diffusers_sd, safe_serialization=True)
        save_file(kohya_sd, str(Path(tmp) / KOHYA_FILE))
        with store.writer(ArtifactKind.EXPERT, id=job.expert_id, parents=parents, parameters=parameters,
                          labels={"selma.dev/run": job.run, "selma.dev/skill": job.skill}, name=f"{job.skill} expert") as w:
            w.put_file(LORA_FILE, Path(tmp) / LORA_FILE)
            w.put_file(KOHYA_FILE, Path(tmp) / KOHYA_FILE)
            w.put_bytes("expert.json", json.dumps(expert, indent=2).encode())
            w.put_bytes("training_config.json", json.dumps(cfg.model_dump(mode="json"), indent=2).encode())
    log.info("published expert %s (final loss %.4f)", job.expert_id, final_loss)


def run_job_document(uri_or_path: str, settings: TrainingSettings, *, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Load a TrainingJob from a storage URI, a local file, or a training_config artifact id, and train it."""
    return run_job(load_job_document(uri_or_path, settings), settings, should_stop=should_stop)


def run_job(job: TrainingJob, settings: TrainingSettings, *, should_stop: Callable[[], bool] | None = None,
            world: World | None = None) -> TrainResult:
    """:func:`train`, recording a failure's code and message in the progress object."""
    try:
        return train(job, settings, should_stop=should_stop, world=world)
    except TrainingInterrupted:
        raise
    except SelmaError as e:
        _record_failure(job, settings, e.code.value, type(e).__name__, str(e))
        raise
    except Exception as e:
        _record_failure(job, settings, "INTERNAL", "TRAINER_CRASHED", f"{type(e).__name__}: {e}")
        raise


def _record_failure(job: TrainingJob, settings: TrainingSettings, code: str, reason: str, message: str) -> None:
    """Put the failure into the progress object, so the service can say why (not just 'exit 1')."""
    try:
        storage = open_storage(settings)
        from selma.batch.progress import read_progress

        doc = read_progress(storage, job.progress_key) or {}
        writer = ProgressWriter(storage, job.progress_key, 0)
        writer.doc = {**doc, "phase": "failed", "error": {"code": code, "reason": reason, "message": message}}
        writer.flush()
    except SelmaError as e:  # the original error matters more
        log.warning("could not record the failure: %s", e)


def load_job_document(ref: str, settings: TrainingSettings) -> TrainingJob:
    from selma.storage import resolve_uri

    try:
        if ref.startswith(("s3://", "file://")):
            st, key = resolve_uri(settings, ref)
            raw = st.get_bytes(key)
        elif Path(ref).is_file():
            raw = Path(ref).read_bytes()
        else:
            store = ArtifactStore(open_storage(settings))
            raw = store.read_bytes(ref, JOB_FILE)
        import yaml

        return TrainingJob.model_validate(yaml.safe_load(raw))
    except SelmaError:
        raise
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"training job document {ref} is invalid: {e}", field="config") from None


JOB_FILE = "job.json"


def standalone_job(config_path: str, dataset_id: str, run: str, skill: str, settings: TrainingSettings) -> TrainingJob:
    """A TrainingJob for ``selma train --config cfg.yaml --dataset ID`` without the service.

    Ids and the work prefix derive from (config, dataset, run, skill), so running the same
    command again resumes from its checkpoints and then returns the published expert.
    """
    import hashlib

    from selma.artifacts import new_artifact_id
    from selma_training.config import load_config_file

    config = load_config_file(Path(config_path).read_text(), default_model=settings.training_default_model)
    key = hashlib.sha256(f"{config.digest()}:{dataset_id}:{run}:{skill}".encode()).hexdigest()[:24]
    return TrainingJob(job_id=f"local-{key[:16]}", idempotency_key=f"local/{key}", run=run, skill=skill, dataset_id=dataset_id,
                       config=config, expert_id=new_artifact_id(ArtifactKind.EXPERT, f"local/{key}"), work_prefix=f"training/local-{key[:16]}")
