"""Render request validation, seed derivation and prompt-set handling: plain inputs, no models."""

from __future__ import annotations

import hashlib
import json

import pytest

from selma.api import enum_name
from selma.artifacts import ArtifactStore
from selma.errors import FailedPrecondition, InvalidArgument, NotFound
from selma.pipelines import ModelSpec
from selma.seeds import SEED_MODULUS, SeedPolicy, derive_seed
from selma.storage import open_storage
from selma.v1 import common_pb2, render_service_pb2
from selma_render.core import check_idempotency_key, check_model_reference
from selma_render.dataset import Prompt, image_path, load_prompts, plan_items, resolve_prompt_set
from selma_render.settings import RenderSettings
from selma_render.spec import (
    PromptSetRef,
    normalized_settings,
    parse_dataset_spec,
    parse_render_settings,
    scheduler_enum,
)


@pytest.fixture
def settings(make_settings) -> RenderSettings:
    return RenderSettings(**make_settings().model_dump(), render_max_resolution=1024, render_default_batch_size=4)


def _settings_msg(**diffusion) -> render_service_pb2.RenderSettings:
    return render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source="org/model"), diffusion=common_pb2.DiffusionSettings(**diffusion))


def test_derived_seed_is_the_documented_sha256_function():
    digest = hashlib.sha256(b"selma-render-seed/v1:7:3:1").digest()
    assert derive_seed(SeedPolicy.DERIVED, 7, 3, 1, 2) == int.from_bytes(digest[:8], "big") >> 1
    seeds = {derive_seed(SeedPolicy.DERIVED, 0, p, i, 4) for p in range(200) for i in range(4)}
    assert len(seeds) == 800 and all(0 <= s < SEED_MODULUS for s in seeds)
    assert derive_seed(SeedPolicy.DERIVED, 1, 0, 0, 1) != derive_seed(SeedPolicy.DERIVED, 0, 0, 0, 1)


def test_sequential_and_fixed_policies_follow_the_proto():
    assert derive_seed(SeedPolicy.SEQUENTIAL, 100, 3, 1, 2) == 100 + 3 * 2 + 1
    assert derive_seed(SeedPolicy.SEQUENTIAL, SEED_MODULUS - 1, 0, 1, 1) == 0  # wraps inside int64
    assert derive_seed(SeedPolicy.FIXED, 42, 9, 3, 4) == 42


def test_defaults_are_resolved_and_written_back(settings):
    cfg = parse_render_settings(_settings_msg(), settings)
    assert (cfg.steps, cfg.images_per_prompt, cfg.batch_size, cfg.base_seed) == (50, 1, 4, 0)
    assert cfg.seed_policy is SeedPolicy.DERIVED and cfg.guidance_scale is None and cfg.scheduler == ""
    msg = normalized_settings(cfg)
    assert msg.diffusion.steps == 50 and msg.batch_size == 4 and msg.seed_policy == common_pb2.SEED_POLICY_DERIVED
    assert not msg.diffusion.HasField("guidance_scale")
    assert parse_render_settings(msg, settings) == cfg  # normalising is idempotent


def test_explicit_values_survive_normalisation(settings):
    msg = render_service_pb2.RenderSettings(
        model=common_pb2.ModelRef(source="org/model", revision="v1"),
        diffusion=common_pb2.DiffusionSettings(scheduler=common_pb2.SCHEDULER_DPM_SOLVER_MULTISTEP, steps=20, guidance_scale=0.0, width=512, height=256),
        images_per_prompt=3,
        base_seed=9,
        seed_policy=common_pb2.SEED_POLICY_FIXED,
        batch_size=16,
        device=common_pb2.DeviceOptions(device="cuda:1", precision=common_pb2.PRECISION_BF16),
    )
    cfg = parse_render_settings(msg, settings)
    assert cfg.scheduler == "dpm_solver_multistep" and cfg.guidance_scale == 0.0 and cfg.precision == "bf16"
    assert parse_render_settings(normalized_settings(cfg), settings) == cfg


@pytest.mark.parametrize(
    ("diffusion", "top", "field"),
    [
        ({"width": 63}, {}, "settings.diffusion.width"),
        ({"height": 1032}, {}, "settings.diffusion.height"),  # multiple of 8 but above the maximum
        ({"width": -8}, {}, "settings.diffusion.width"),
        ({"steps": 151}, {}, "settings.diffusion.steps"),
        ({"steps": -1}, {}, "settings.diffusion.steps"),
        ({"guidance_scale": 30.5}, {}, "settings.diffusion.guidance_scale"),
        ({"guidance_scale": -1.0}, {}, "settings.diffusion.guidance_scale"),
        ({"guidance_scale": float("nan")}, {}, "settings.diffusion.guidance_scale"),
        ({}, {"batch_size": -1}, "settings.batch_size"),
        ({}, {"batch_size": 0}, "settings.batch_size"),
        ({}, {"batch_size": 257}, "settings.batch_size"),
        ({}, {"images_per_prompt": 17}, "settings.images_per_prompt"),
        ({}, {"base_seed": -5}, "settings.base_seed"),
        ({}, {"device": common_pb2.DeviceOptions(device="tpu")}, "settings.device.device"),
    ],
)
def test_bad_settings_name_the_field(settings, diffusion, top, field):
    msg = render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source="org/model"), diffusion=common_pb2.DiffusionSettings(**diffusion), **top)
    with pytest.raises(InvalidArgument) as e:
        parse_render_settings(msg, settings)
    assert e.value.field == field
    assert field in str(e.value)


def test_missing_model_without_default_is_invalid_but_default_fills_in(settings):
    with pytest.raises(InvalidArgument, match="model.source"):
        parse_render_settings(render_service_pb2.RenderSettings(), settings)
    with_default = settings.model_copy(update={"render_default_model": "stabilityai/stable-diffusion-2-base"})
    assert parse_render_settings(render_service_pb2.RenderSettings(), with_default).model.source == "stabilityai/stable-diffusion-2-base"


def test_unknown_enum_values_name_their_field(settings):
    cases = {
        "settings.diffusion.scheduler": _settings_msg(scheduler=99),
        "settings.seed_policy": render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source="org/model"), seed_policy=42),
        "settings.device.precision": render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source="org/model"), device=common_pb2.DeviceOptions(precision=9)),
    }
    for field, msg in cases.items():
        with pytest.raises(InvalidArgument) as e:
            parse_render_settings(msg, settings)
        assert e.value.field == field


def test_scheduler_names_round_trip():
    for value in common_pb2.Scheduler.values():
        assert scheduler_enum(enum_name(common_pb2.Scheduler, value)) == value
    assert scheduler_enum("FlowMatchEulerDiscreteScheduler") == common_pb2.SCHEDULER_UNSPECIFIED


def test_dataset_spec_needs_a_prompt_set_of_the_right_kind(settings):
    base = {"settings": _settings_msg()}
    with pytest.raises(InvalidArgument, match="spec.prompt_set"):
        parse_dataset_spec(render_service_pb2.DatasetRenderSpec(**base), settings)
    with pytest.raises(InvalidArgument) as e:
        parse_dataset_spec(
            render_service_pb2.DatasetRenderSpec(prompt_set=common_pb2.ArtifactRef(id="x", kind=common_pb2.ARTIFACT_KIND_EXPERT), **base), settings
        )
    assert e.value.field == "spec.prompt_set.kind"
    with pytest.raises(InvalidArgument, match="max_prompts"):
        parse_dataset_spec(render_service_pb2.DatasetRenderSpec(prompt_set=common_pb2.ArtifactRef(id="x"), max_prompts=-1, **base), settings)


@pytest.mark.parametrize("key", ["", "x" * 257, "tab\there", "ünï"])
def test_idempotency_key_rules(key):
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        check_idempotency_key(key)


def _prompt_set(store: ArtifactStore, lines: list[object], key: str = "ps") -> str:
    with store.writer("prompt_set", key=key, labels={"selma.dev/skill": "count"}) as w:
        w.put_bytes("prompts.jsonl", "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines).encode())
    return w.manifest.id


def test_prompt_set_resolution_by_id_and_uri(make_settings):
    store = ArtifactStore(open_storage(make_settings()))
    ps = _prompt_set(store, [{"id": "p000000", "index": 0, "text": "a cat"}])
    m = resolve_prompt_set(store, PromptSetRef(id=ps))
    assert resolve_prompt_set(store, PromptSetRef(uri=m.uri)).id == ps
    with pytest.raises(NotFound) as e:
        resolve_prompt_set(store, PromptSetRef(id="prompt-set-0000000000000000dead"))
    assert e.value.field == "spec.prompt_set.id"
    with pytest.raises(InvalidArgument, match="different artifacts"):
        resolve_prompt_set(store, PromptSetRef(id="prompt-set-0000000000000000dead", uri=m.uri))
    with pytest.raises(InvalidArgument, match="not in this service's artifact store"):
        resolve_prompt_set(store, PromptSetRef(uri=f"s3://elsewhere/root/artifacts/{ps}"))
    with pytest.raises(FailedPrecondition, match="sha256"):
        resolve_prompt_set(store, PromptSetRef(id=ps, sha256="0" * 64))
    with store.writer("expert", key="e") as w:
        w.put_bytes("x", b"1")
    with pytest.raises(InvalidArgument, match="not a prompt set"):
        resolve_prompt_set(store, PromptSetRef(id=w.manifest.id))


def test_prompts_are_read_in_order_truncated_and_validated(make_settings):
    store = ArtifactStore(open_storage(make_settings()))
    ps = _prompt_set(store, [{"id": f"p{i:06d}", "index": i, "text": f"prompt {i}"} for i in range(5)] + [""])
    prompts = load_prompts(store, store.get(ps), max_prompts=3)
    assert [p.text for p in prompts] == ["prompt 0", "prompt 1", "prompt 2"]
    bad = _prompt_set(store, [{"index": 0, "text": "ok"}, {"index": 1, "text": "  "}], key="bad")
    with pytest.raises(FailedPrecondition, match="line 2"):
        load_prompts(store, store.get(bad))
    dup = _prompt_set(store, [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}], key="dup")
    with pytest.raises(FailedPrecondition, match="index"):
        load_prompts(store, store.get(dup))


def test_plan_covers_every_image_once_with_its_seed(settings):
    cfg = parse_render_settings(render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source="m/x"), images_per_prompt=3, base_seed=5), settings)
    items = plan_items([Prompt("p000000", 0, "a"), Prompt("p000007", 7, "b")], cfg)
    assert [it.path for it in items] == [image_path(p, i) for p in (0, 7) for i in range(3)]
    assert items[4].seed == derive_seed(SeedPolicy.DERIVED, 5, 7, 1, 3)
    assert image_path(12, 1) == "images/000012-1.png"


def test_model_reference_checks(settings, tmp_path):
    with pytest.raises(NotFound):
        check_model_reference(ModelSpec(str(tmp_path / "nope")), settings, field="f")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match="model_index.json"):
        check_model_reference(ModelSpec(str(tmp_path / "empty")), settings, field="f")
    with pytest.raises(InvalidArgument):
        check_model_reference(ModelSpec("not a model id!"), settings, field="f")
    offline = settings.model_copy(update={"hf_offline": True})
    with pytest.raises(FailedPrecondition, match="offline"):
        check_model_reference(ModelSpec("no-such-org/no-such-model"), offline, field="f")
    check_model_reference(ModelSpec("no-such-org/no-such-model"), settings, field="f")  # online: left to the loader
    check_model_reference(ModelSpec("tiny://sdxl?seed=3"), offline, field="f")
    for bad in ("tiny://lm", "tiny://flux", "tiny://sd?steps=3"):
        with pytest.raises(InvalidArgument, match="tiny://sd"):
            check_model_reference(ModelSpec(bad), settings, field="f")
