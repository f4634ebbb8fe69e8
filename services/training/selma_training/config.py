"""Expert-training configuration: presets, overrides, validation, and the stored job document.

A :class:`TrainingConfig` holds every hyper-parameter of one LoRA expert, fully resolved (no
"preset default" left).  It is built from a preset plus overrides — from the gRPC
``ExpertTrainingConfig`` (proto-JSON dict), or from a JSON/YAML file — and validated with
errors that name the field to fix.  A :class:`TrainingJob` adds what the trainer needs to
run it (dataset, run, skill, where to put checkpoints, progress and the expert); it is stored
as a ``training_config`` artifact and handed to the trainer (a Kubernetes Job or a local
subprocess) by URI: ``selma train --config URI``.

Presets follow the SELMA paper (``ft_sd_lora*.sh``): LoRA rank/alpha 128 gaussian on the UNet
attention projections, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), clip 1.0, lr 3e-4 constant,
seed 42, fp16 autocast.  Choices the paper leaves open, and ours:

* **SD 2.x resolution**: the model's native resolution — UNet ``sample_size`` × VAE scale
  factor, i.e. 768 for the v-prediction ``stable-diffusion-2(-1)`` and 512 for ``-base`` —
  because training a 768-v model at 512 degrades it.  When the model config cannot be read
  (a hub id on an offline service) 768 is assumed unless the name contains "base".
* **tiny** (offline tiny models on CPU): 64 px, batch 2, rank 4, 20 steps, checkpoint every 10,
  fp32, lr 1e-3 (a random-weight tiny UNet moves visibly only with a larger step).

**A recipe sized to the data.**  ``epochs`` turns the step count into passes over the training
images (:func:`planned_steps`: ``ceil(epochs × images / effective batch)``, capped by
``max_steps``), so a gated dataset of 40 images is not trained for the 5000 steps a dataset of
thousands wants.  ``validation_fraction`` > 0 holds out a split (chosen from the seed) and turns
on early stopping: the validation loss at fixed noise and timesteps every ``validate_every``
steps, stop after ``patience`` evaluations without an improvement of more than ``min_delta``,
and export the best adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selma.api import enum_name, enum_proto_name
from selma.errors import InvalidArgument
from selma.limits import check_at_most
from selma.specs import parse_bool, parse_float, parse_int, parse_mapping, parse_str
from selma.v1 import common_pb2
from selma.v1 import training_service_pb2 as pb

PRESETS_NAMES = ("sd1", "sd2", "sdxl", "tiny")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# proto enum names <-> config values (the preset names are not the enum's)
_PRESET_ENUM = {
    "TRAINING_PRESET_SELMA_SD1": "sd1",
    "TRAINING_PRESET_SELMA_SD2": "sd2",
    "TRAINING_PRESET_SELMA_SDXL": "sdxl",
    "TRAINING_PRESET_TINY": "tiny",
}


class BaseModelRef(BaseModel):
    """The base text-to-image model (mirrors ``selma.v1.ModelRef``)."""

    model_config = ConfigDict(extra="forbid")

    source: str = ""
    revision: str = ""
    variant: str = ""
    vae_source: str = ""


class TrainingConfig(BaseModel):
    """Every hyper-parameter of one expert, resolved (see the module docstring for presets)."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["sd1", "sd2", "sdxl", "tiny"]
    base_model: BaseModelRef = Field(default_factory=BaseModelRef)
    rank: int
    alpha: float
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_init: Literal["gaussian", "kaiming_uniform"] = "gaussian"
    lora_dropout: float = 0.0
    resolution: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float = 3e-4
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    max_steps: int
    checkpoint_every: int
    checkpoints_to_keep: int = 0
    seed: int = 42
    mixed_precision: Literal["fp32", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    snr_gamma: float = 0.0
    random_flip: bool = False
    center_crop: bool = False
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_latent_cache: bool = True
    prediction_type: Literal["", "epsilon", "v_prediction"] = ""
    epochs: float = 0.0
    validation_fraction: float = 0.0
    validate_every: int = 0
    patience: int = 3
    min_delta: float = 0.0
    validation_timesteps: int = 4

    @property
    def early_stopping(self) -> bool:
        return self.validation_fraction > 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


_COMMON: dict[str, Any] = dict(
    rank=128,
    alpha=128.0,
    target_modules=list(DEFAULT_TARGETS),
    lora_init="gaussian",
    lora_dropout=0.0,
    learning_rate=3e-4,
    lr_schedule="constant",
    lr_warmup_steps=0,
    seed=42,
    mixed_precision="fp16",
    gradient_checkpointing=False,
    noise_offset=0.0,
    snr_gamma=0.0,
    # Off, unlike the paper's scripts: a mirrored image contradicts its caption's "left of" / "right of"
    # and mirrors any text in it, and those are skills SELMA trains.
    random_flip=False,
    center_crop=False,
    optimizer="adamw",
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_weight_decay=1e-2,
    adam_epsilon=1e-8,
    max_grad_norm=1.0,
    use_latent_cache=True,
    prediction_type="",
    checkpoints_to_keep=0,
    epochs=0.0,
    validation_fraction=0.0,
    validate_every=0,
    patience=3,
    min_delta=0.0,
    validation_timesteps=4,
)

PRESETS: dict[str, dict[str, Any]] = {
    "sd1": {**_COMMON, "preset": "sd1", "resolution": 512, "batch_size": 16, "gradient_accumulation_steps": 4,
            "max_steps": 5000, "checkpoint_every": 500},
    "sd2": {**_COMMON, "preset": "sd2", "resolution": 768, "batch_size": 16, "gradient_accumulation_steps": 4,
            "max_steps": 5000, "checkpoint_every": 500},
    "sdxl": {**_COMMON, "preset": "sdxl", "resolution": 1024, "batch_size": 4, "gradient_accumulation_steps": 8,
             "max_steps": 10000, "checkpoint_every": 2000, "gradient_checkpointing": True,
             "base_model": {"source": "", "vae_source": "madebyollin/sdxl-vae-fp16-fix"}},
    "tiny": {**_COMMON, "preset": "tiny", "resolution": 64, "batch_size": 2, "gradient_accumulation_steps": 1,
             "max_steps": 20, "checkpoint_every": 10, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3,
             "mixed_precision": "fp32"},
}

PRESET_DESCRIPTIONS = {
    "sd1": "SELMA paper settings for SD 1.x (512 px, 16x4 batch, 5000 steps), without its random flips",
    "sd2": "SELMA paper settings for SD 2.x at the model's native resolution (768 for 768-v, 512 for base), without random flips",
    "sdxl": "SELMA paper settings for SDXL (1024 px, 4x8 batch, 10000 steps, fp16-fix VAE), without its random flips",
    "tiny": "the offline tiny models on CPU (64 px, batch 2, rank 4, 20 steps) for tests and demos",
}


# --- model inspection ------------------------------------------------------------------------


class ModelInfo(BaseModel):
    """What we could learn about a base model without loading weights."""

    family: Literal["sd1", "sd2", "sdxl", "tiny"]
    native_resolution: int | None = None
    resolution_multiple: int = 8
    prediction_type: str | None = None


def inspect_model(source: str) -> ModelInfo:
    """Family, native resolution and resolution step of ``source`` from its configs when it is a
    local directory; from its name otherwise (hub ids, storage prefixes)."""
    if source.startswith("tiny://"):
        name = source[len("tiny://"):].partition("?")[0]
        if name not in ("sd", "sdxl"):
            raise InvalidArgument(f"unknown tiny model {source!r}; use tiny://sd or tiny://sdxl", field="config.base_model.source")
        # the offline tiny pipelines: 64 px, VAE factor 2, two UNet levels (see selma.models.tiny)
        return ModelInfo(family="tiny", native_resolution=64, resolution_multiple=4, prediction_type="epsilon")
    path = Path(source).expanduser() if source and not source.startswith(("s3://", "file://")) else None
    if source.startswith("file://"):
        path = Path(source.removeprefix("file://"))
    if path is not None and (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        unet = _read_json(path / "unet" / "config.json")
        vae = _read_json(path / "vae" / "config.json")
        sched = _read_json(path / "scheduler" / "scheduler_config.json")
        vae_factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        down = len(unet.get("down_block_types", [0, 0, 0, 0]))
        native = int(unet.get("sample_size", 64)) * vae_factor
        is_xl = "XL" in index.get("_class_name", "") or unet.get("addition_embed_type") == "text_time"
        if native <= 128:
            family = "tiny"
        elif is_xl:
            family = "sdxl"
        elif unet.get("cross_attention_dim") == 1024:
            family = "sd2"
        else:
            family = "sd1"
        return ModelInfo(
            family=family,
            native_resolution=native,
            resolution_multiple=vae_factor * 2 ** (down - 1),
            prediction_type=sched.get("prediction_type"),
        )
    name = source.lower()
    if "xl" in name:
        return ModelInfo(family="sdxl", native_resolution=1024, resolution_multiple=64)
    if "stable-diffusion-2" in name or "sd2" in name:
        native = 512 if "base" in name else 768
        return ModelInfo(family="sd2", native_resolution=native, resolution_multiple=64)
    return ModelInfo(family="sd1", native_resolution=512, resolution_multiple=64)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# --- building from presets + overrides -------------------------------------------------------


def preset_config(preset: str, base_model: BaseModelRef | None = None, info: ModelInfo | None = None) -> dict[str, Any]:
    """The full config dict a preset stands for (SD 2 resolution adapted to ``info``)."""
    if preset not in PRESETS:
        raise InvalidArgument(f"unknown preset {preset!r}; use one of {', '.join(PRESETS_NAMES)}", field="config.preset")
    cfg = json.loads(json.dumps(PRESETS[preset]))
    bm = dict(cfg.pop("base_model", {}) or {})
    if base_model is not None:
        bm.update({k: v for k, v in base_model.model_dump().items() if v})
    cfg["base_model"] = {k: bm.get(k, "") for k in ("source", "revision", "variant", "vae_source")}
    if preset == "sd2" and info is not None and info.native_resolution:
        cfg["resolution"] = info.native_resolution
    return cfg


def from_proto_dict(d: dict[str, Any], *, default_model: str = "") -> tuple[TrainingConfig, ModelInfo]:
    """Resolve an ``ExpertTrainingConfig`` proto-JSON dict (preset + set fields) into a TrainingConfig."""
    bm = BaseModelRef(**{k: str(v) for k, v in (d.get("base_model") or {}).items() if k in BaseModelRef.model_fields})
    if not bm.source:
        bm.source = default_model
    if not bm.source:
        raise InvalidArgument("base_model.source is empty and the service has no default model", field="config.base_model.source")
    info = inspect_model(bm.source)
    preset_name = d.get("preset") or "TRAINING_PRESET_UNSPECIFIED"
    if preset_name == "TRAINING_PRESET_UNSPECIFIED" or preset_name == 0:
        preset = info.family
    elif isinstance(preset_name, str) and preset_name in _PRESET_ENUM:
        preset = _PRESET_ENUM[preset_name]
    else:
        raise InvalidArgument(f"unknown preset {preset_name!r}; use one of {', '.join(_PRESET_ENUM)}", field="config.preset")
    cfg = preset_config(preset, bm, info)
    # every field through the API's one set of parsers (selma.specs); 0/unset = the preset's value
    lora = parse_mapping(d.get("lora"), "config.lora")
    if rank := parse_int(lora.get("rank"), "config.lora.rank"):
        cfg["rank"] = rank
        cfg["alpha"] = float(rank)  # alpha follows rank unless set
    if "alpha" in lora:
        cfg["alpha"] = parse_float(lora["alpha"], "config.lora.alpha")
    if lora.get("target_modules"):
        cfg["target_modules"] = [parse_str(m, "config.lora.target_modules") for m in lora["target_modules"]]
    if "dropout" in lora:
        cfg["lora_dropout"] = parse_float(lora["dropout"], "config.lora.dropout")
    for name in ("resolution", "batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "checkpoints_to_keep"):
        if value := parse_int(d.get(name), f"config.{name}"):
            cfg[name] = value
    if value := parse_float(d.get("learning_rate"), "config.learning_rate"):
        cfg["learning_rate"] = value
    for name in ("lr_warmup_steps", "seed"):
        if name in d:
            cfg[name] = parse_int(d[name], f"config.{name}")
    for name in ("gradient_checkpointing", "random_flip", "center_crop", "use_latent_cache"):
        if name in d:
            cfg[name] = parse_bool(d[name], f"config.{name}")
    for name in ("noise_offset", "snr_gamma", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm"):
        if name in d:
            cfg[name] = parse_float(d[name], f"config.{name}")
    # enum fields: the config value is the enum value's short name; UNSPECIFIED keeps the preset's
    for key, enum, value, path in (
        ("lora_init", pb.LoraInit, lora.get("init"), "lora.init"),
        ("lr_schedule", pb.LrSchedule, d.get("lr_schedule"), "lr_schedule"),
        ("mixed_precision", common_pb2.Precision, d.get("mixed_precision"), "mixed_precision"),
        ("optimizer", pb.Optimizer, d.get("optimizer"), "optimizer"),
        ("prediction_type", pb.PredictionType, d.get("prediction_type"), "prediction_type"),
    ):
        if name := enum_name(enum, value, field=f"config.{path}"):
            cfg[key] = name
    if "epochs" in d:
        cfg["epochs"] = parse_float(d["epochs"], "config.epochs")
    stop = parse_mapping(d.get("early_stopping"), "config.early_stopping")
    if "validation_fraction" in stop:
        cfg["validation_fraction"] = parse_float(stop["validation_fraction"], "config.early_stopping.validation_fraction")
    for key, name in (("validate_every", "validate_every"), ("patience", "patience"), ("validation_timesteps", "timesteps")):
        if value := parse_int(stop.get(name), f"config.early_stopping.{name}"):
            cfg[key] = value
    if "min_delta" in stop:
        cfg["min_delta"] = parse_float(stop["min_delta"], "config.early_stopping.min_delta")
    config = parse_config(cfg)
    validate_config(config, info)
    return config, info


def planned_steps(c: TrainingConfig, train_images: int) -> int:
    """Optimizer steps to run on ``train_images`` images: from ``epochs`` when set (at most
    ``max_steps``, at least 1), else ``max_steps``."""
    if c.epochs <= 0:
        return c.max_steps
    per_step = c.batch_size * c.gradient_accumulation_steps
    # round before ceil: 0.1 × 30 / 1 must be 3 steps, not 4
    return max(1, min(c.max_steps, math.ceil(round(c.epochs * train_images / per_step, 9))))


def validation_every(c: TrainingConfig) -> int:
    """Steps between validation evaluations (``validate_every``, or ``checkpoint_every`` when 0)."""
    return c.validate_every or c.checkpoint_every


def to_proto_dict(c: TrainingConfig) -> dict[str, Any]:
    """The resolved config as an ``ExpertTrainingConfig`` proto-JSON dict (every field set)."""
    rev = {v: k for k, v in _PRESET_ENUM.items()}
    return {
        "base_model": {k: v for k, v in c.base_model.model_dump().items() if v},
        "preset": rev[c.preset],
        "lora": {
            "rank": c.rank,
            "alpha": c.alpha,
            "target_modules": list(c.target_modules),
            "init": enum_proto_name(pb.LoraInit, c.lora_init),
            "dropout": c.lora_dropout,
        },
        "resolution": c.resolution,
        "batch_size": c.batch_size,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "learning_rate": c.learning_rate,
        "lr_schedule": enum_proto_name(pb.LrSchedule, c.lr_schedule),
        "lr_warmup_steps": c.lr_warmup_steps,
        "max_steps": c.max_steps,
        "checkpoint_every": c.checkpoint_every,
        "checkpoints_to_keep": c.checkpoints_to_keep,
        "seed": str(c.seed),
        "mixed_precision": enum_proto_name(common_pb2.Precision, c.mixed_precision),
        "gradient_checkpointing": c.gradient_checkpointing,
        "noise_offset": c.noise_offset,
        "snr_gamma": c.snr_gamma,
        "random_flip": c.random_flip,
        "center_crop": c.center_crop,
        "optimizer": enum_proto_name(pb.Optimizer, c.optimizer),
        "adam_beta1": c.adam_beta1,
        "adam_beta2": c.adam_beta2,
        "adam_weight_decay": c.adam_weight_decay,
        "adam_epsilon": c.adam_epsilon,
        "max_grad_norm": c.max_grad_norm,
        "use_latent_cache": c.use_latent_cache,
        "prediction_type": enum_proto_name(pb.PredictionType, c.prediction_type),
        "epochs": c.epochs,
        "early_stopping": {
            "validation_fraction": c.validation_fraction,
            "validate_every": c.validate_every,
            "patience": c.patience,
            "min_delta": c.min_delta,
            "timesteps": c.validation_timesteps,
        },
    }


def parse_config(data: dict[str, Any]) -> TrainingConfig:
    """A TrainingConfig from a plain dict; type errors become InvalidArgument naming the field."""
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InvalidArgument(f"{err['msg']} (got {err.get('input')!r})", field=f"config.{loc}") from None


def load_config_file(text: str, *, default_model: str = "") -> TrainingConfig:
    """A TrainingConfig from JSON or YAML text: ``preset`` (default: from the model) plus any fields."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"config is neither JSON nor YAML: {e}", field="config") from None
    if not isinstance(data, dict):
        raise InvalidArgument("config must be a mapping of field names to values", field="config")
    bm = BaseModelRef(**(data.get("base_model") or {})) if isinstance(data.get("base_model"), dict) else BaseModelRef()
    bm.source = bm.source or default_model
    info = inspect_model(bm.source) if bm.source else None
    preset = data.get("preset") or (info.family if info else "")
    if not preset:
        raise InvalidArgument("give a preset or a base_model.source to choose one from", field="config.preset")
    cfg = preset_config(str(preset), bm, info)
    cfg.update({k: v for k, v in data.items() if k not in ("base_model", "preset")})
    if "rank" in data and "alpha" not in data:
        cfg["alpha"] = float(data["rank"])
    config = parse_config(cfg)
    validate_config(config, info)
    return config


def validate_config(c: TrainingConfig, info: ModelInfo | None = None) -> None:
    """Range checks with messages that name the field; InvalidArgument on the first problem."""

    def bad(field: str, msg: str) -> None:
        raise InvalidArgument(msg, field=f"config.{field}")

    if not 1 <= c.rank <= 1024:
        bad("lora.rank", f"rank must be in 1..1024; got {c.rank}")
    if not c.alpha > 0 or not math.isfinite(c.alpha):
        bad("lora.alpha", f"alpha must be > 0; got {c.alpha}")
    if not c.target_modules or any(not m for m in c.target_modules):
        bad("lora.target_modules", "target_modules must name at least one UNet module, e.g. to_q")
    if not 0 <= c.lora_dropout < 1:
        bad("lora.dropout", f"dropout must be in [0, 1); got {c.lora_dropout}")
    if c.resolution < 8 or c.resolution % 8:
        bad("resolution", f"resolution must be a positive multiple of 8; got {c.resolution}")
    if info is not None and c.resolution % info.resolution_multiple:
        bad("resolution", f"resolution {c.resolution} does not fit this model: it must be a multiple of {info.resolution_multiple} "
            f"(VAE and UNet down-sampling; native {info.native_resolution})")
    if c.batch_size < 1:
        bad("batch_size", f"batch_size must be >= 1; got {c.batch_size}")
    if c.gradient_accumulation_steps < 1:
        bad("gradient_accumulation_steps", f"gradient_accumulation_steps must be >= 1; got {c.gradient_accumulation_steps}")
    if not c.learning_rate > 0 or not math.isfinite(c.learning_rate):
        bad("learning_rate", f"learning_rate must be > 0; got {c.learning_rate}")
    if c.lr_schedule not in LR_SCHEDULES:
        bad("lr_schedule", f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {c.lr_schedule!r}")
    if c.lr_warmup_steps < 0:
        bad("lr_warmup_steps", f"lr_warmup_steps must be >= 0; got {c.lr_warmup_steps}")
    if c.max_steps < 1:
        bad("max_steps", f"max_steps must be >= 1; got {c.max_steps}")
    if c.checkpoint_every < 1:
        bad("checkpoint_every", f"checkpoint_every must be >= 1; got {c.checkpoint_every}")
    if c.checkpoints_to_keep < 0:
        bad("checkpoints_to_keep", f"checkpoints_to_keep must be >= 0; got {c.checkpoints_to_keep}")
    if not 0 <= c.seed < 2**63:
        bad("seed", f"seed must be in [0, 2**63); got {c.seed}")
    if not 0 <= c.noise_offset <= 1:
        bad("noise_offset", f"noise_offset must be in [0, 1]; got {c.noise_offset}")
    if c.snr_gamma < 0:
        bad("snr_gamma", f"snr_gamma must be > 0, or 0 for off; got {c.snr_gamma}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(c, name) < 1:
            bad(name, f"{name} must be in [0, 1); got {getattr(c, name)}")
    if c.adam_weight_decay < 0:
        bad("adam_weight_decay", f"adam_weight_decay must be >= 0; got {c.adam_weight_decay}")
    if not c.adam_epsilon > 0:
        bad("adam_epsilon", f"adam_epsilon must be > 0; got {c.adam_epsilon}")
    if not c.max_grad_norm > 0:
        bad("max_grad_norm", f"max_grad_norm must be > 0; got {c.max_grad_norm}")
    if not math.isfinite(c.epochs) or c.epochs < 0:
        bad("epochs", f"epochs must be > 0, or 0 for max_steps steps; got {c.epochs}")
    if not 0 <= c.validation_fraction <= 0.5:
        bad("early_stopping.validation_fraction", f"validation_fraction must be in (0, 0.5], or 0 for off; got {c.validation_fraction}")
    if c.validate_every < 0:
        bad("early_stopping.validate_every", f"validate_every must be >= 1, or 0 for checkpoint_every; got {c.validate_every}")
    if c.patience < 1:
        bad("early_stopping.patience", f"patience must be >= 1; got {c.patience}")
    if not math.isfinite(c.min_delta) or c.min_delta < 0:
        bad("early_stopping.min_delta", f"min_delta must be >= 0; got {c.min_delta}")
    if not 1 <= c.validation_timesteps <= 64:
        bad("early_stopping.timesteps", f"timesteps must be in 1..64; got {c.validation_timesteps}")


def check_limits(c: TrainingConfig, settings: Any) -> None:
    """The service's maxima (``SELMA_TRAINING_MAX_*``): INVALID_ARGUMENT naming the limit, before any job is stored or launched."""
    for fld, value, setting in (
        ("resolution", c.resolution, "training_max_resolution"),
        ("batch_size", c.batch_size, "training_max_batch_size"),
        ("gradient_accumulation_steps", c.gradient_accumulation_steps, "training_max_gradient_accumulation_steps"),
        ("max_steps", c.max_steps, "training_max_steps"),
        ("lora.rank", c.rank, "training_max_rank"),
    ):
        check_at_most(value, f"config.{fld}", getattr(settings, setting), setting, fld.rsplit(".", 1)[-1])


# --- the stored job document -----------------------------------------------------------------


class TrainingJob(BaseModel):
    """Everything the trainer process needs; stored as ``training_config`` artifact file ``job.json``."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    idempotency_key: str
    run: str
    skill: str
    dataset_id: str
    config: TrainingConfig
    expert_id: str = Field(description="Id the expert artifact is published under (derived from the job key).")
    work_prefix: str = Field(description="Storage prefix for checkpoints and progress, e.g. training/<job_id>.")
    config_artifact_id: str = ""
    device: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    spec: dict[str, Any] = Field(default_factory=dict, description="The gRPC spec it came from (for re-adoption).")
    nodes: int = Field(1, ge=1, description="Nodes of a distributed run (selma_training.distributed); 1 = one node.")
    processes_per_node: int = Field(1, ge=1, description="Trainer processes per node (one per GPU).")

    @property
    def world_size(self) -> int:
        """Trainer processes sharing every optimizer step."""
        return self.nodes * self.processes_per_node

    @property
    def progress_key(self) -> str:
        return f"{self.work_prefix}/progress.json"

    @property
    def checkpoint_prefix(self) -> str:
        return f"{self.work_prefix}/checkpoints/"
