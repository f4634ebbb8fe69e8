"""Training config: presets, overrides, proto round trip and validation naming the field."""

from __future__ import annotations

import json

import pytest

from selma.errors import InvalidArgument
from selma_training.config import (
    PRESETS_NAMES,
    from_proto_dict,
    load_config_file,
    parse_config,
    preset_config,
    to_proto_dict,
)


def test_presets_match_the_paper():
    sd1 = parse_config(preset_config("sd1"))
    assert (sd1.resolution, sd1.batch_size, sd1.gradient_accumulation_steps, sd1.max_steps, sd1.checkpoint_every) == (512, 16, 4, 5000, 500)
    assert (sd1.rank, sd1.alpha, sd1.lora_init, sd1.learning_rate, sd1.lr_schedule, sd1.seed) == (128, 128.0, "gaussian", 3e-4, "constant", 42)
    assert (sd1.adam_beta1, sd1.adam_beta2, sd1.adam_weight_decay, sd1.adam_epsilon, sd1.max_grad_norm) == (0.9, 0.999, 1e-2, 1e-8, 1.0)
    assert sd1.target_modules == ["to_q", "to_k", "to_v", "to_out.0"] and sd1.random_flip and not sd1.center_crop
    xl = parse_config(preset_config("sdxl"))
    assert (xl.resolution, xl.batch_size, xl.gradient_accumulation_steps, xl.max_steps, xl.checkpoint_every) == (1024, 4, 8, 10000, 2000)
    assert xl.base_model.vae_source == "madebyollin/sdxl-vae-fp16-fix"


def test_sd2_preset_uses_the_native_resolution():
    base, _ = from_proto_dict({"base_model": {"source": "stabilityai/stable-diffusion-2-base"}})
    v, _ = from_proto_dict({"base_model": {"source": "stabilityai/stable-diffusion-2-1"}})
    assert (base.preset, base.resolution) == ("sd2", 512)
    assert (v.preset, v.resolution) == ("sd2", 768)


def test_overrides_replace_preset_fields_and_round_trip_through_proto_json():
    d = {"base_model": {"source": "runwayml/stable-diffusion-v1-5"}, "preset": "TRAINING_PRESET_SELMA_SD1",
         "lora": {"rank": 16}, "learning_rate": 1e-4, "max_steps": 10, "seed": "7", "random_flip": False,
         "snr_gamma": 5.0, "lr_schedule": "LR_SCHEDULE_COSINE", "mixed_precision": "PRECISION_BF16"}
    cfg, _ = from_proto_dict(d)
    assert (cfg.rank, cfg.alpha, cfg.learning_rate, cfg.max_steps, cfg.seed) == (16, 16.0, 1e-4, 10, 7)
    assert (cfg.random_flip, cfg.snr_gamma, cfg.lr_schedule, cfg.mixed_precision, cfg.batch_size) == (False, 5.0, "cosine", "bf16", 16)
    again, _ = from_proto_dict(to_proto_dict(cfg))
    assert again == cfg


def test_preset_chosen_from_the_model_family(tiny_models):
    cfg, info = from_proto_dict({"base_model": {"source": str(tiny_models.sd)}})
    assert info.family == "tiny" and cfg.preset == "tiny" and cfg.resolution == 64 and cfg.rank == 4
    tiny_ref, _ = from_proto_dict({"base_model": {"source": "tiny://sdxl"}})
    assert tiny_ref.preset == "tiny" and tiny_ref.resolution == 64
    with pytest.raises(InvalidArgument):
        from_proto_dict({"base_model": {"source": "tiny://flux"}})
    xl, _ = from_proto_dict({"base_model": {"source": "stabilityai/stable-diffusion-xl-base-1.0"}})
    assert xl.preset == "sdxl"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"preset": "TRAINING_PRESET_BOGUS"}, "config.preset"),
        ({"lora": {"rank": -1}}, "config.lora.rank"),
        ({"lora": {"rank": 2000}}, "config.lora.rank"),
        ({"learning_rate": -0.1}, "config.learning_rate"),
        ({"resolution": 66}, "config.resolution"),
        ({"resolution": 520}, "config.resolution"),
        ({"noise_offset": 2.0}, "config.noise_offset"),
        ({"adam_beta1": 1.0}, "config.adam_beta1"),
        ({"max_grad_norm": 0.0}, "config.max_grad_norm"),
        ({"lora": {"dropout": 1.0}}, "config.lora.dropout"),
    ],
)
def test_bad_values_raise_invalid_argument_naming_the_field(override, field):
    d = {"base_model": {"source": "runwayml/stable-diffusion-v1-5"}, **override}
    with pytest.raises(InvalidArgument) as e:
        from_proto_dict(d)
    assert e.value.field == field, str(e.value)


def test_config_file_yaml_and_json():
    yaml_text = "preset: tiny\nbase_model: {source: some/model}\nrank: 8\nlearning_rate: 0.002\n"
    cfg = load_config_file(yaml_text)
    assert (cfg.rank, cfg.alpha, cfg.learning_rate, cfg.max_steps) == (8, 8.0, 0.002, 20)
    assert load_config_file(json.dumps({"preset": "tiny", "base_model": {"source": "some/model"}, "rank": 8, "learning_rate": 0.002})) == cfg
    with pytest.raises(InvalidArgument) as e:
        load_config_file("preset: tiny\nbase_model: {source: m}\nranks: 8\n")
    assert e.value.field == "config.ranks"
    with pytest.raises(InvalidArgument) as e:
        load_config_file("preset: huge\n")
    assert e.value.field == "config.preset"


def test_every_preset_is_valid():
    for name in PRESETS_NAMES:
        parse_config(preset_config(name))
