"""Validated render requests: protobuf ``RenderSettings`` / ``DatasetRenderSpec`` → plain domain objects.

The proto messages are the schema of what a client sends and of the job spec stored with each
job; as in every service, a message is read as proto JSON and every field goes through the API's
parsers and rules (:mod:`selma.specs`).  This module checks every field against the service limits (errors name the field by its
request path, e.g. ``spec.settings.diffusion.width``) and resolves the "0 = default" values, so
the rest of the service works with explicit numbers.  :func:`normalized_settings` writes those
defaults back into the message, so the stored job spec does not change meaning if the service
defaults change while a job waits or resumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selma import specs
from selma.api import enum_name, enum_value, message_to_dict
from selma.errors import InvalidArgument
from selma.limits import check_chars
from selma.pipelines import SCHEDULERS, ModelSpec
from selma.seeds import SEED_MODULUS, SeedPolicy
from selma.specs import check_known_fields, device_options, parse_float, parse_int, parse_mapping, parse_str
from selma.v1 import common_pb2, render_service_pb2
from selma_render.settings import RenderSettings

DEFAULT_STEPS = 50
MAX_GUIDANCE = 30.0

def scheduler_enum(name: str) -> int:
    """A :data:`selma.pipelines.SCHEDULERS` key as a ``Scheduler`` value; other names (a custom model scheduler) → UNSPECIFIED."""
    return enum_value(common_pb2.Scheduler, name) if name in SCHEDULERS else common_pb2.SCHEDULER_UNSPECIFIED


@dataclass(frozen=True)
class RenderConfig:
    """How to render: everything in ``selma.v1.RenderSettings``, validated, defaults resolved
    (except the model-dependent ones: guidance ``None`` and size 0 mean the model's own)."""

    model: ModelSpec
    scheduler: str = ""
    steps: int = DEFAULT_STEPS
    guidance_scale: float | None = None
    width: int = 0
    height: int = 0
    negative_prompt: str = ""
    images_per_prompt: int = 1
    base_seed: int = 0
    seed_policy: SeedPolicy = SeedPolicy.DERIVED
    batch_size: int = 4
    device: str = ""
    precision: str = ""


@dataclass(frozen=True)
class PromptSetRef:
    """Which prompt set to render (``selma.v1.ArtifactRef``)."""

    id: str = ""
    uri: str = ""
    kind: int = common_pb2.ARTIFACT_KIND_UNSPECIFIED
    sha256: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A validated ``DatasetRenderSpec``."""

    prompt_set: PromptSetRef
    config: RenderConfig
    run: str = ""
    skill: str = ""
    max_prompts: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    # shard workers (0 = render in the service's own process); the request's value, or the service default
    shards: int = 0
    # one best-of-K candidate round (the gate stage); None = every image of every prompt
    candidates: CandidateSpec | None = None


@dataclass(frozen=True)
class CandidateSpec:
    """A validated ``CandidateRound``: candidate ``index`` of ``per_prompt``, for prompts without a kept image in ``skip_kept_in``."""

    index: int
    per_prompt: int
    skip_kept_in: str = ""  # artifact id of a gated image dataset; "" = skip none
    max_images: int = 0  # 0 = no limit


def parse_render_settings(
    msg: render_service_pb2.RenderSettings,
    settings: RenderSettings,
    *,
    prefix: str = "settings",
    batch_size_used: bool = True,
) -> RenderConfig:
    """Validate ``msg`` against the service limits; errors name ``<prefix>.<field>``."""
    f = lambda name: f"{prefix}.{name}"  # noqa: E731 - field paths for error messages
    # the API's one idiom: the message as proto JSON, every field through selma.specs
    body = message_to_dict(msg)
    check_known_fields(body, {"model", "diffusion", "images_per_prompt", "base_seed", "seed_policy", "batch_size", "device"}, prefix)
    ref = parse_mapping(body.get("model"), f("model"))
    d = parse_mapping(body.get("diffusion"), f("diffusion"))

    source = parse_str(ref.get("source"), f("model.source")) or settings.render_default_model.strip()
    if not source:
        raise InvalidArgument(
            "no model given and the service has no default model; set model.source to a hub id, a local path or an s3:// prefix",
            field=f("model.source"),
        )
    model = ModelSpec(
        source=source,
        revision=parse_str(ref.get("revision"), f("model.revision")),
        variant=parse_str(ref.get("variant"), f("model.variant")),
        vae_source=parse_str(ref.get("vae_source"), f("model.vae_source")),
    )

    scheduler = enum_name(common_pb2.Scheduler, d.get("scheduler"), field=f("diffusion.scheduler"))  # "" = the model's own

    requested_steps = parse_int(d.get("steps"), f("diffusion.steps"))
    steps = requested_steps or DEFAULT_STEPS
    if not 1 <= steps <= settings.render_max_steps:
        raise InvalidArgument(f"steps must be 1..SELMA_RENDER_MAX_STEPS={settings.render_max_steps} (0 = {DEFAULT_STEPS}); got {requested_steps}", field=f("diffusion.steps"))

    guidance = parse_float(d.get("guidance_scale"), f("diffusion.guidance_scale"))  # None = the model's own
    if guidance is not None and not 0.0 <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument(f"guidance_scale must be in [0, {MAX_GUIDANCE:g}]; got {guidance}", field=f("diffusion.guidance_scale"))

    size = {}
    for name in ("width", "height"):
        value = size[name] = parse_int(d.get(name), f(f"diffusion.{name}"))
        if value < 0 or value % 8:
            raise InvalidArgument(f"{name} must be a positive multiple of 8 (0 = the model's native size); got {value}", field=f(f"diffusion.{name}"))
        if value > settings.render_max_resolution:
            raise InvalidArgument(
                f"{name} {value} is above this service's maximum SELMA_RENDER_MAX_RESOLUTION={settings.render_max_resolution} pixels",
                field=f(f"diffusion.{name}"),
            )
    negative_prompt = check_chars(parse_str(d.get("negative_prompt"), f("diffusion.negative_prompt")), f("diffusion.negative_prompt"),
                                  settings.max_prompt_chars, "max_prompt_chars")

    requested_ipp = parse_int(body.get("images_per_prompt"), f("images_per_prompt"))
    ipp = requested_ipp or 1
    if not 1 <= ipp <= settings.render_max_images_per_prompt:
        raise InvalidArgument(f"images_per_prompt must be 1..SELMA_RENDER_MAX_IMAGES_PER_PROMPT={settings.render_max_images_per_prompt} (0 = 1); "
                              f"got {requested_ipp}", field=f("images_per_prompt"))

    base_seed = parse_int(body.get("base_seed"), f("base_seed"))
    if not 0 <= base_seed < SEED_MODULUS:
        raise InvalidArgument(f"base_seed must be in [0, 2^63); got {base_seed}", field=f("base_seed"))
    seed_policy = SeedPolicy(enum_name(common_pb2.SeedPolicy, body.get("seed_policy"), field=f("seed_policy")) or SeedPolicy.DERIVED)

    batch_size = settings.render_default_batch_size
    if batch_size_used and "batch_size" in body:
        requested_batch = parse_int(body["batch_size"], f("batch_size"))
        if not 1 <= requested_batch <= settings.render_max_batch_size:
            raise InvalidArgument(f"batch_size must be 1..SELMA_RENDER_MAX_BATCH_SIZE={settings.render_max_batch_size} (leave it unset for the service default {settings.render_default_batch_size}); got {requested_batch}", field=f("batch_size"))
        batch_size = requested_batch

    device, precision = device_options(body.get("device"), f("device"))

    return RenderConfig(
        model=model,
        scheduler=scheduler,
        steps=steps,
        guidance_scale=guidance,
        width=size["width"],
        height=size["height"],
        negative_prompt=negative_prompt,
        images_per_prompt=ipp,
        base_seed=base_seed,
        seed_policy=seed_policy,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )


def normalized_settings(cfg: RenderConfig) -> render_service_pb2.RenderSettings:
    """``RenderSettings`` with every service default written in (what a job spec stores)."""
    msg = render_service_pb2.RenderSettings(
        model=common_pb2.ModelRef(
            source=cfg.model.source, revision=cfg.model.revision, variant=cfg.model.variant, vae_source=cfg.model.vae_source
        ),
        diffusion=common_pb2.DiffusionSettings(
            scheduler=scheduler_enum(cfg.scheduler),
            steps=cfg.steps,
            width=cfg.width,
            height=cfg.height,
            negative_prompt=cfg.negative_prompt,
        ),
        images_per_prompt=cfg.images_per_prompt,
        base_seed=cfg.base_seed,
        seed_policy=enum_value(common_pb2.SeedPolicy, cfg.seed_policy.value),
        batch_size=cfg.batch_size,
        device=common_pb2.DeviceOptions(
            device=cfg.device,
            precision=enum_value(common_pb2.Precision, cfg.precision),
        ),
    )
    if cfg.guidance_scale is not None:
        msg.diffusion.guidance_scale = cfg.guidance_scale
    return msg


def parse_dataset_spec(msg: render_service_pb2.DatasetRenderSpec, settings: RenderSettings, *, prefix: str = "spec") -> DatasetSpec:
    """Validate a ``DatasetRenderSpec`` (the prompt set's existence is checked by the caller)."""
    ref = msg.prompt_set
    if not ref.id and not ref.uri:
        raise InvalidArgument("prompt_set is required: give the prompt set's artifact id or uri", field=f"{prefix}.prompt_set")
    if ref.kind not in (common_pb2.ARTIFACT_KIND_UNSPECIFIED, common_pb2.ARTIFACT_KIND_PROMPT_SET):
        raise InvalidArgument(
            f"prompt_set must be a prompt set; got kind {common_pb2.ArtifactKind.Name(ref.kind)}", field=f"{prefix}.prompt_set.kind"
        )
    if msg.max_prompts < 0:
        raise InvalidArgument(f"max_prompts must be >= 0 (0 = all); got {msg.max_prompts}", field=f"{prefix}.max_prompts")
    for k, v in msg.labels.items():
        if not k or len(k) > 253 or len(v) > 253:
            raise InvalidArgument(f"label {k!r} is empty or too long (keys and values up to 253 characters)", field=f"{prefix}.labels")
    shards = msg.shards or settings.render_shards
    if not 0 <= shards <= settings.render_max_shards:
        raise InvalidArgument(
            f"shards must be in 0..SELMA_RENDER_MAX_SHARDS={settings.render_max_shards} (0 = the service default); got {shards}",
            field=f"{prefix}.shards",
        )
    candidates = None
    if msg.HasField("candidates"):
        c = msg.candidates
        f = f"{prefix}.candidates"
        per_prompt = specs.candidates_per_prompt(c.per_prompt, f"{f}.per_prompt")
        if not 0 <= c.index < per_prompt:
            raise InvalidArgument(f"must be in 0..{per_prompt - 1} (a candidate of per_prompt={per_prompt}); got {c.index}", field=f"{f}.index")
        if c.max_images < 0:
            raise InvalidArgument(f"must be >= 0 (0 = no limit); got {c.max_images}", field=f"{f}.max_images")
        if c.skip_kept_in.kind not in (common_pb2.ARTIFACT_KIND_UNSPECIFIED, common_pb2.ARTIFACT_KIND_IMAGE_DATASET):
            raise InvalidArgument("skip_kept_in must be an image dataset", field=f"{f}.skip_kept_in.kind")
        if c.HasField("skip_kept_in") and not c.skip_kept_in.id.strip():
            raise InvalidArgument("skip_kept_in needs the gated dataset's artifact id", field=f"{f}.skip_kept_in.id")
        candidates = CandidateSpec(index=c.index, per_prompt=per_prompt, skip_kept_in=c.skip_kept_in.id.strip(), max_images=c.max_images)
    return DatasetSpec(
        candidates=candidates,
        prompt_set=PromptSetRef(id=ref.id.strip(), uri=ref.uri.strip(), kind=ref.kind, sha256=ref.sha256.strip().lower()),
        config=parse_render_settings(msg.settings, settings, prefix=f"{prefix}.settings"),
        run=msg.run.strip(),
        skill=msg.skill.strip(),
        max_prompts=msg.max_prompts,
        labels=dict(msg.labels),
        shards=shards,
    )
