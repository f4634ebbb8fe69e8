"""Training config: presets, overrides, proto round trip and validation naming the field."""

from __future__ import annotations

import json

import pytest

from selma.errors import FailedPrecondition, InvalidArgument
from selma_training.config import (
    PRESETS_NAMES,
    from_proto_dict,
    load_config_file,
    parse_config,
    planned_steps,
    preset_config,
    to_proto_dict,
    validation_every,
)
from selma_training.data import split_validation


def test_presets_match_the_paper():
    sd1 = parse_config(preset_config("sd1"))
    assert (sd1.resolution, sd1.batch_size, sd1.gradient_accumulation_steps, sd1.max_steps, sd1.checkpoint_every) == (512, 16, 4, 5000, 500)
    assert (sd1.rank, sd1.alpha, sd1.lora_init, sd1.learning_rate, sd1.lr_schedule, sd1.seed) == (128, 128.0, "gaussian", 3e-4, "constant", 42)
    assert (sd1.adam_beta1, sd1.adam_beta2, sd1.adam_weight_decay, sd1.adam_epsilon, sd1.max_grad_norm) == (0.9, 0.999, 1e-2, 1e-8, 1.0)
    assert sd1.target_modules == ["to_q", "to_k", "to_v", "to_out.0"] and not sd1.center_crop
    xl = parse_config(preset_config("sdxl"))
    assert (xl.resolution, xl.batch_size, xl.gradient_accumulation_steps, xl.max_steps, xl.checkpoint_every) == (1024, 4, 8, 10000, 2000)
    assert xl.base_model.vae_source == "madebyollin/sdxl-vae-fp16-fix"


def test_no_preset_flips_images_and_a_skillset_can_turn_flips_on():
    # The paper's scripts flip at random; selma does not by default: a mirrored image contradicts its
    # caption's "left of" / "right of" and mirrors any text, and both are skills SELMA trains.
    for name in ("sd1", "sd2", "sdxl", "tiny"):
        assert parse_config(preset_config(name)).random_flip is False, name
    unset, _ = from_proto_dict({"base_model": {"source": "runwayml/stable-diffusion-v1-5"}})
    on, _ = from_proto_dict({"base_model": {"source": "runwayml/stable-diffusion-v1-5"}, "random_flip": True})
    assert (unset.random_flip, on.random_flip) == (False, True)


def test_sd2_preset_uses_the_native_resolution():
    base, _ = from_proto_dict({"base_model": {"source": "stabilityai/stable-diffusion-2-base"}})
    v, _ = from_proto_dict({"base_model": {"source": "stabilityai/stable-diffusion-2-1"}})
    assert (base.preset, base.resolution) == ("sd2", 512)
    assert (v.preset, v.resolution) == ("sd2", 768)


def test_overrides_replace_preset_fields_and_round_trip_through_proto_json():
    d = {"base_model": {"source": "runwayml/stable-diffusion-v1-5"}, "preset": "TRAINING_PRESET_SELMA_SD1",
         "lora": {"rank": 16}, "learning_rate": 1e-4, "max_steps": 10, "seed": "7", "random_flip": True,
         "snr_gamma": 5.0, "lr_schedule": "LR_SCHEDULE_COSINE", "mixed_precision": "PRECISION_BF16"}
    cfg, _ = from_proto_dict(d)
    assert (cfg.rank, cfg.alpha, cfg.learning_rate, cfg.max_steps, cfg.seed) == (16, 16.0, 1e-4, 10, 7)
    assert (cfg.random_flip, cfg.snr_gamma, cfg.lr_schedule, cfg.mixed_precision, cfg.batch_size) == (True, 5.0, "cosine", "bf16", 16)
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
        ({"epochs": -1.0}, "config.epochs"),
        ({"epochs": "many"}, "config.epochs"),
        ({"early_stopping": {"validation_fraction": 0.6}}, "config.early_stopping.validation_fraction"),
        ({"early_stopping": {"validation_fraction": -0.1}}, "config.early_stopping.validation_fraction"),
        ({"early_stopping": {"validation_fraction": 0.2, "patience": -2}}, "config.early_stopping.patience"),
        ({"early_stopping": {"validation_fraction": 0.2, "validate_every": -5}}, "config.early_stopping.validate_every"),
        ({"early_stopping": {"validation_fraction": 0.2, "min_delta": -1.0}}, "config.early_stopping.min_delta"),
        ({"early_stopping": {"validation_fraction": 0.2, "timesteps": 100}}, "config.early_stopping.timesteps"),
        ({"early_stopping": "on"}, "config.early_stopping"),
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


def test_epochs_set_the_steps_from_the_training_images_within_the_cap():
    base = {"base_model": {"source": "runwayml/stable-diffusion-v1-5"}, "batch_size": 4, "gradient_accumulation_steps": 2,
            "max_steps": 100}
    fixed, _ = from_proto_dict(base)
    assert fixed.epochs == 0 and planned_steps(fixed, 40) == 100 and planned_steps(fixed, 4000) == 100  # the fixed count
    cfg, _ = from_proto_dict({**base, "epochs": 3})
    assert planned_steps(cfg, 40) == 15  # 3 × 40 / (4 × 2)
    assert planned_steps(cfg, 41) == 16  # ceil(123 / 8)
    assert planned_steps(cfg, 1) == 1
    assert planned_steps(cfg, 4000) == 100  # capped by max_steps
    tenth, _ = from_proto_dict({**base, "batch_size": 1, "gradient_accumulation_steps": 1, "epochs": 0.1})
    assert planned_steps(tenth, 30) == 3  # 0.1 × 30 is 3, not 4 through float error
    again, _ = from_proto_dict(to_proto_dict(cfg))
    assert again == cfg


def test_early_stopping_fields_resolve_and_round_trip():
    d = {"base_model": {"source": "runwayml/stable-diffusion-v1-5"}, "checkpoint_every": 50,
         "early_stopping": {"validation_fraction": 0.25, "patience": 2, "min_delta": 1e-4}}
    cfg, _ = from_proto_dict(d)
    assert cfg.early_stopping and (cfg.validation_fraction, cfg.patience, cfg.min_delta, cfg.validation_timesteps) == (0.25, 2, 1e-4, 4)
    assert validation_every(cfg) == 50  # 0 = every checkpoint
    cfg2, _ = from_proto_dict({**d, "early_stopping": {**d["early_stopping"], "validate_every": 7, "timesteps": 8}})
    assert validation_every(cfg2) == 7 and cfg2.validation_timesteps == 8
    assert from_proto_dict(to_proto_dict(cfg2))[0] == cfg2
    off, _ = from_proto_dict({"base_model": {"source": "runwayml/stable-diffusion-v1-5"}})
    assert not off.early_stopping
    yaml_cfg = load_config_file("preset: tiny\nbase_model: {source: m}\nepochs: 4\nvalidation_fraction: 0.2\npatience: 1\n")
    assert (yaml_cfg.epochs, yaml_cfg.validation_fraction, yaml_cfg.patience) == (4.0, 0.2, 1)


def test_validation_split_is_a_pure_function_of_the_seed():
    train, val = split_validation(20, 0.2, seed=42)
    assert len(val) == 4 and len(train) == 16 and sorted(train + val) == list(range(20))
    assert split_validation(20, 0.2, seed=42) == (train, val)
    assert split_validation(20, 0.2, seed=43)[1] != val  # another seed, another split
    assert split_validation(20, 0.0, seed=42) == (list(range(20)), [])
    assert split_validation(5, 0.01, seed=0)[1].__len__() == 1  # at least one held out
    with pytest.raises(FailedPrecondition) as e:
        split_validation(1, 0.5, seed=0)
    assert e.value.field == "config.early_stopping.validation_fraction"
