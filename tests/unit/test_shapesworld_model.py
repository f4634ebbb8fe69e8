"""The ShapesWorld base model: builder, tokenizer, and the pretrain command at toy scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("selma_shapesworld.world")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from selma.errors import FailedPrecondition, InvalidArgument  # noqa: E402
from selma.models.tiny import weights_sha256  # noqa: E402
from selma_shapesworld import model as M  # noqa: E402
from selma_shapesworld import world  # noqa: E402
from selma_shapesworld.pretrain import PretrainConfig, build_tokenizer, pretrain  # noqa: E402

# A run small enough for a unit test: a few scenes, a few steps of each phase.
TOY = dict(
    tokenizer_scenes_per_kind=40,
    vae_steps=3,
    vae_batch=4,
    vae_scenes=16,
    unet_steps=4,
    unet_batch=4,
    unet_scenes=24,
    decoder_steps=4,
    checkpoint_every=2,
    log_every=2,
)
TOY_CLI = [
    "--tokenizer-scenes", "40", "--vae-steps", "3", "--vae-batch", "4", "--vae-scenes", "16",
    "--unet-steps", "4", "--unet-batch", "4", "--unet-scenes", "24", "--decoder-steps", "4", "--checkpoint-every", "2",
    "--log-every", "2", "--threads", "1", "--no-progress",
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _captions(n_per_kind: int = 60) -> list[str]:
    out = []
    for i, kind in enumerate(world.KINDS):
        out += [c for _, c in world.dataset(100 + i, n_per_kind, mix={kind: 1.0}, size_words=0.5)]
    return out


def test_builder_makes_a_64px_sd_pipeline_of_the_standard_classes():
    pipe = M.build_pipeline(_captions(10), seed=0)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.clip_sample is False
    assert pipe.vae_scale_factor == 2  # 64 px <-> 32x32 latents
    assert pipe.unet.config.sample_size == 32 and pipe.unet.config.in_channels == 3
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 24
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        z = pipe.vae.encode(x).latent_dist.mean
        assert z.shape == (2, 3, 32, 32)
        assert pipe.vae.decode(z).sample.shape == (2, 3, 64, 64)
        ids = pipe.tokenizer(["a red circle", ""], padding="max_length", max_length=24, return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
        assert pipe.unet(z, torch.tensor([10, 500]), hidden).sample.shape == (2, 3, 32, 32)
    image = pipe("a red circle", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (64, 64)


def test_builder_is_deterministic_per_component():
    texts = _captions(5)
    a, b = M.build_pipeline(texts, seed=3), M.build_pipeline(texts, seed=3)
    for name in ("vae", "unet", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = M.build_pipeline(texts, seed=4)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_tokenizer_covers_the_grammar_with_one_token_per_word():
    # The caption grammar: counts are 2-4 ("one" appears only in judge questions, never in captions).
    tok = build_tokenizer(PretrainConfig(tokenizer_scenes_per_kind=200))
    vocabulary = {*world.SHAPES, *(s + "s" for s in world.SHAPES), *world.COLOURS, *world.SIZES,
                  *(w for n, w in world.NUMBER_WORDS.items() if n > 1), "a", "and", ",", *" ".join(world.RELATIONS.values()).split()}
    for word in sorted(vocabulary):
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))
    captions = _captions(40)
    for cap in captions:
        assert len(tok.tokenize(cap)) == len(cap.replace(",", " ,").split()), cap
        assert len(tok(cap).input_ids) <= tok.model_max_length
    # deterministic: the same corpus gives the same vocabulary and merges
    assert tok.backend_tokenizer.to_str() == build_tokenizer(PretrainConfig(tokenizer_scenes_per_kind=200)).backend_tokenizer.to_str()


def test_pretrain_command_runs_end_to_end_and_is_deterministic(tmp_path: Path):
    from selma.app.cli import main

    for name in ("a", "b"):
        assert main(["shapesworld", "pretrain", "--out", str(tmp_path / name), "--seed", "7", *TOY_CLI]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert not (tmp_path / "a.ckpt").exists()  # checkpoints removed after a finished run
    files = sorted(p.relative_to(a).as_posix() for p in a.rglob("*.safetensors"))
    assert files == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
    assert not list(a.rglob("*.bin"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    record = json.loads((a / "shapesworld-base.json").read_text())
    assert record["seed"] == 7 and record["config"]["unet_steps"] == 4
    assert set(record["final_losses"]) == {"vae", "decoder", "unet"}
    assert 0.0 <= record["reconstruction_judge_strict"] <= 1.0
    pipe = StableDiffusionPipeline.from_pretrained(a, use_safetensors=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert pipe.vae.config.scaling_factor == record["config"]["latent_scaling"] == 1.0  # pixel-like latent magnitudes


@pytest.mark.parametrize("phase,stop_at", [("vae", 2), ("unet", 3), ("decoder", 3)])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, phase: str, stop_at: int):
    cfg = PretrainConfig(seed=1, **TOY)
    pretrain(tmp_path / "whole", cfg, checkpoint_dir=tmp_path / "whole.ckpt", progress=False)

    class Interrupted(Exception):
        pass

    def interrupt(p: str, done: int) -> None:
        if (p, done) == (phase, stop_at):
            raise Interrupted

    with pytest.raises(Interrupted):
        pretrain(tmp_path / "resumed", cfg, checkpoint_dir=tmp_path / "resumed.ckpt", progress=False, on_step=interrupt)
    assert not (tmp_path / "resumed").exists()
    progress = json.loads((tmp_path / "resumed.ckpt" / f"{phase}.json").read_text())
    assert progress["step"] == 2  # the last checkpoint before the interruption
    pretrain(tmp_path / "resumed", cfg, checkpoint_dir=tmp_path / "resumed.ckpt", progress=False)
    assert weights_sha256(tmp_path / "resumed") == weights_sha256(tmp_path / "whole")


def test_a_checkpoint_written_before_a_config_field_existed_resumes_at_its_default(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    cfg = PretrainConfig(seed=1, **TOY)
    pretrain(tmp_path / "a", cfg, checkpoint_dir=ckpt, progress=False)
    for meta_file in ckpt.glob("*.json"):  # as written before single_share existed
        meta = json.loads(meta_file.read_text())
        if isinstance(meta.get("config"), dict):
            meta["config"].pop("single_share", None)
            meta_file.write_text(json.dumps(meta))
    pretrain(tmp_path / "b", cfg, checkpoint_dir=ckpt, progress=False)  # resumes (nothing left to train), not refused
    assert weights_sha256(tmp_path / "b") == weights_sha256(tmp_path / "a")
    with pytest.raises(FailedPrecondition):
        pretrain(tmp_path / "c", PretrainConfig(seed=1, single_share=0.5, **TOY), checkpoint_dir=ckpt, progress=False)


def test_resuming_with_a_different_config_is_refused(tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    pretrain(tmp_path / "a", PretrainConfig(seed=1, **TOY), checkpoint_dir=ckpt, progress=False)
    with pytest.raises(FailedPrecondition) as e:
        pretrain(tmp_path / "b", PretrainConfig(seed=2, **TOY), checkpoint_dir=ckpt, progress=False)
    assert e.value.field == "checkpoint_dir"


def test_single_share_sets_the_unet_scene_mix_and_is_part_of_the_training_data_identity():
    assert PretrainConfig().unet_mix() == world.DEFAULT_MIX  # the default reproduces the published mix exactly
    mix = PretrainConfig(single_share=0.5).unet_mix()
    assert mix == {"single": 0.5, "count": 0.125, "relation": 0.125, "binding": 0.125, "multi": 0.125}
    # the latent cache (the UNet's training scenes) depends on it, the autoencoder does not
    assert PretrainConfig(single_share=0.5).weights_fields("latents") != PretrainConfig().weights_fields("latents")
    assert PretrainConfig(single_share=0.5).weights_fields("vae") == PretrainConfig().weights_fields("vae")
    pairs = world.dataset(7, 2000, PretrainConfig(single_share=0.5).unet_mix())
    share = sum(s.kind == "single" for s, _ in pairs) / len(pairs)
    assert 0.45 < share < 0.55
    for bad in (1.0, -0.1):
        with pytest.raises(InvalidArgument, match="single_share") as e:
            PretrainConfig(single_share=bad)
        assert e.value.field == "single-share"


def test_the_shipped_and_a_pretrained_vae_encode_to_a_point_at_the_mean(tmp_path: Path):
    """Training samples latents (latent_dist.sample()); the UNet learned from the means: they must be the same."""
    from selma_shapesworld.plugin import model_path

    scenes = [s for s, _ in world.dataset(3, 6, {"count": 1.0, "relation": 1.0})]
    x = torch.stack([torch.from_numpy(np.asarray(world.render(s))).permute(2, 0, 1).float() / 127.5 - 1 for s in scenes])
    pretrain(tmp_path / "toy", PretrainConfig(seed=1, **TOY), checkpoint_dir=tmp_path / "ckpt", progress=False)
    for where in (model_path("shapesworld://base"), tmp_path / "toy"):
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae")
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        assert dist.std.max().item() < 1e-5, where
        assert torch.allclose(dist.sample(), dist.mean, atol=1e-5)


def test_folding_the_posterior_keeps_means_and_decoding():
    from selma_shapesworld.pretrain import fold_posterior_to_mean

    vae = M.build_vae(0)
    with torch.no_grad():
        vae.quant_conv.bias[vae.quant_conv.out_channels // 2:] = 0.0  # a wide posterior (std 1), as an unfolded encoder has
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        before = vae.encode(x).latent_dist
        assert before.std.min().item() > 0.01
        fold_posterior_to_mean(vae)
        after = vae.encode(x).latent_dist
    assert torch.equal(before.mean, after.mean) and after.std.max().item() < 1e-5


def test_shapesworld_model_references_resolve_or_name_the_problem(make_settings):
    from selma.errors import InvalidArgument
    from selma.pipelines import materialize

    with pytest.raises(InvalidArgument) as e:
        materialize("shapesworld://huge", make_settings())
    assert e.value.field == "model.source"
    path = materialize("shapesworld://base", make_settings())
    assert path.endswith("weights/base")
