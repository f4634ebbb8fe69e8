"""The LoRA trainer on the tiny SD/SDXL pipelines: learning, exact resume, cache reuse, export."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
from safetensors.torch import load_file

from selma.artifacts import ArtifactStore
from selma.pipelines import ModelSpec, load_pipeline
from selma.storage import open_storage
from selma_training.checkpoint import CheckpointStore
from selma_training.config import TrainingJob, from_proto_dict
from selma_training.data import CACHE_FILE
from selma_training.samples import publish_shapes_dataset
from selma_training.settings import TrainingSettings
from selma_training.trainer import KOHYA_FILE, LORA_FILE, train

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path, tiny_models):
    settings = TrainingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(),
                                batch_progress_interval_seconds=0, device="cpu")
    store = ArtifactStore(open_storage(settings))
    dataset = publish_shapes_dataset(store, 8)
    return settings, store, dataset, tiny_models


def make_job(dataset, model, **overrides) -> TrainingJob:
    cfg, _ = from_proto_dict({"base_model": {"source": str(model)}, **overrides})
    jid = uuid.uuid4().hex[:12]
    return TrainingJob(job_id=f"job-{jid}", idempotency_key=jid, run="test", skill="shapes", dataset_id=dataset.id,
                       config=cfg, expert_id=f"expert-{jid}", work_prefix=f"training/job-{jid}")


def adapter(store, expert_id) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(store.read_bytes(expert_id, LORA_FILE))


def fixed_loss(pipe, cache: dict[str, torch.Tensor]) -> float:
    """Denoising loss on the cached training latents with fixed noise and timesteps."""
    g = torch.Generator().manual_seed(123)
    lat = cache["latent_mean"][:, 0] * pipe.vae.config.scaling_factor
    sched = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    total = 0.0
    with torch.no_grad():
        for _ in range(4):
            noise = torch.randn(lat.shape, generator=g)
            t = torch.randint(100, 900, (lat.shape[0],), generator=g)
            pred = pipe.unet(sched.add_noise(lat, noise, t), t, cache["prompt_embeds"]).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 4


def test_loss_decreases_on_a_fixed_small_dataset(env, tmp_path):
    settings, store, dataset, tiny = env
    job = make_job(dataset, tiny.sd, max_steps=30, batch_size=4, learning_rate=5e-3, lora={"rank": 8}, checkpoint_every=15, resolution=32)
    result = train(job, settings)
    cache = __import__("safetensors.torch", fromlist=["load"]).load(store.read_bytes(result.cache_id, CACHE_FILE))
    pipe = load_pipeline(ModelSpec(str(tiny.sd)), settings, device="cpu", precision="fp32")
    before = fixed_loss(pipe, cache)
    store.download(result.expert_id, tmp_path / "expert")
    pipe.load_lora_weights(str(tmp_path / "expert"), weight_name=LORA_FILE, adapter_name="skill")
    after = fixed_loss(pipe, cache)
    assert after < before, (before, after)
    manifest = store.get(result.expert_id)
    assert manifest.parameters["steps"] == 30 and len(manifest.parameters["loss_history"]) == 2
    assert manifest.parameters["dataset_digest"] == dataset.digest and manifest.parameters["latent_cache_digest"]
    assert set(manifest.parents) == {dataset.id, result.cache_id}


def test_resume_after_kill_gives_same_adapter_and_corrupt_checkpoint_falls_back(env):
    settings, store, dataset, tiny = env
    # flips on (off by default): the resume must also restore the per-epoch flip draws and pick the cached orientation
    common = dict(max_steps=6, checkpoint_every=2, resolution=32, lora={"rank": 4, "dropout": 0.1}, noise_offset=0.05, snr_gamma=5.0,
                  random_flip=True)
    straight = train(make_job(dataset, tiny.sd, **common), settings)

    class Killed(Exception):
        pass

    def crash_at(n):
        def hook(step):
            if step == n:
                raise Killed  # no graceful checkpoint: like SIGKILL right after step n
        return hook

    job = make_job(dataset, tiny.sd, **common)
    with pytest.raises(Killed):
        train(job, settings, on_step=crash_at(5))
    resumed = train(job, settings)
    assert resumed.resumed_from_step == 4
    a, b = adapter(store, straight.expert_id), adapter(store, resumed.expert_id)
    assert a.keys() == b.keys()
    for k in a:  # CPU, same threads and seed: bit-identical, no tolerance needed
        assert torch.equal(a[k], b[k]), k

    job2 = make_job(dataset, tiny.sd, **common)
    with pytest.raises(Killed):
        train(job2, settings, on_step=crash_at(5))
    storage = store.storage
    key = f"{job2.checkpoint_prefix}step-00000004/lora.safetensors"
    storage.put_bytes(key, b"garbage")
    assert CheckpointStore(storage, job2.checkpoint_prefix).steps() == [2, 4]
    fallback = train(job2, settings)
    assert fallback.resumed_from_step == 2
    progress = json.loads(storage.get_bytes(job2.progress_key))
    assert "checkpoint 4 corrupt; resumed from 2" in progress["warnings"]
    c = adapter(store, fallback.expert_id)
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_second_run_uses_the_cache_without_calling_vae_or_text_encoder(env):
    settings, store, dataset, tiny = env
    calls = {"vae": 0, "text": 0}

    def count(pipe):
        pipe.vae.encoder.register_forward_hook(lambda *a: calls.__setitem__("vae", calls["vae"] + 1))
        pipe.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))

    first = train(make_job(dataset, tiny.sd, max_steps=2, resolution=32), settings, on_components=count)
    assert not first.cache_hit and calls["vae"] > 0 and calls["text"] > 0
    calls.update(vae=0, text=0)
    second = train(make_job(dataset, tiny.sd, max_steps=3, learning_rate=2e-3, resolution=32), settings, on_components=count)
    assert second.cache_hit and second.cache_id == first.cache_id
    assert calls == {"vae": 0, "text": 0}
    # the cache is keyed by what changes latents: another resolution is another cache
    third = train(make_job(dataset, tiny.sd, max_steps=1, resolution=48), settings)
    assert not third.cache_hit and third.cache_id != first.cache_id


def test_saved_adapter_loads_and_changes_the_output_in_both_formats(env, tmp_path):
    settings, store, dataset, tiny = env
    result = train(make_job(dataset, tiny.sd, max_steps=4, learning_rate=1e-2, resolution=32), settings)
    out = store.download(result.expert_id, tmp_path / "expert")
    expert = json.loads((out / "expert.json").read_text())
    assert expert["rank"] == 4 and expert["skill"] == "shapes" and expert["steps"] == 4
    assert expert["base_model"]["source"] == str(tiny.sd)
    kohya = load_file(str(out / KOHYA_FILE))
    assert kohya and all(k.startswith("lora_unet_") for k in kohya)
    pipe = load_pipeline(ModelSpec(str(tiny.sd)), settings, device="cpu", precision="fp32")

    def render():
        return pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    base = render()
    pipe.load_lora_weights(str(out), weight_name=LORA_FILE, adapter_name="diffusers")
    with_lora = render()
    assert abs(with_lora - base).max() > 0
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out / KOHYA_FILE), adapter_name="kohya")
    assert abs(render() - with_lora).max() < 1e-5


def test_sdxl_architecture_training_runs(env, tmp_path):
    settings, store, dataset, tiny = env
    # random_flip on (off by default) so the cache holds both orientations' SDXL time ids
    job = make_job(dataset, tiny.sdxl, max_steps=3, checkpoint_every=2, noise_offset=0.1, resolution=32, random_flip=True)
    result = train(job, settings)
    assert result.steps == 3 and result.final_loss == result.final_loss
    out = store.download(result.expert_id, tmp_path / "xl")
    pipe = load_pipeline(ModelSpec(str(tiny.sdxl)), settings, device="cpu", precision="fp32")
    pipe.load_lora_weights(str(out), weight_name=LORA_FILE)
    cache = __import__("safetensors.torch", fromlist=["load"]).load(store.read_bytes(result.cache_id, CACHE_FILE))
    assert cache["time_ids"].shape == (8, 2, 6) and "pooled" in cache
    assert cache["time_ids"][0, 0, 4].item() == 32


def test_export_folds_alpha_over_rank_so_the_loaded_adapter_matches_training(env, tmp_path):
    settings, store, dataset, tiny = env
    from peft import LoraConfig

    from selma_training.trainer import lora_state_dicts

    trained = load_pipeline(ModelSpec(str(tiny.sd)), settings, device="cpu", precision="fp32")
    torch.manual_seed(0)
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for n, p in trained.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    diffusers_sd, kohya_sd = lora_state_dicts(trained.unet, 4, 8.0)
    type(trained).save_lora_weights(str(tmp_path), unet_lora_layers=diffusers_sd, safe_serialization=True)
    x, t, emb = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        want = trained.unet(x, t, emb).sample
        fresh = load_pipeline(ModelSpec(str(tiny.sd)), settings, device="cpu", precision="fp32")
        base = fresh.unet(x, t, emb).sample
        fresh.load_lora_weights(str(tmp_path), weight_name=LORA_FILE)
        got = fresh.unet(x, t, emb).sample
    assert (want - base).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
