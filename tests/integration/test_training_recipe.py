"""The training recipe sized to the data: steps from epochs, per-SkillSet LoRA shape, early stopping
on a held-out validation split with the best adapter exported, exactly and resumably."""

from __future__ import annotations

import json
import textwrap
import uuid

import pytest
import torch
from safetensors.torch import load

from selma.api import message_to_dict
from selma.app.skillset import parse_skillset
from selma.artifacts import ArtifactStore
from selma.storage import open_storage
from selma_training.config import TrainingJob, from_proto_dict
from selma_training.samples import publish_shapes_dataset
from selma_training.settings import TrainingSettings
from selma_training.trainer import LORA_FILE, train

pytestmark = pytest.mark.slow

# early stopping that triggers on the tiny model: a large step, a validation every 2 steps, patience 2
STOPPING = dict(max_steps=40, checkpoint_every=2, resolution=32, learning_rate=0.05, lora={"rank": 8},
                early_stopping={"validation_fraction": 0.25, "validate_every": 2, "patience": 2})


@pytest.fixture
def env(tmp_path, tiny_models):
    settings = TrainingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(),
                                batch_progress_interval_seconds=0, device="cpu")
    store = ArtifactStore(open_storage(settings))
    return settings, store, publish_shapes_dataset(store, 8)


def make_job(dataset, config: dict) -> TrainingJob:
    cfg, _ = from_proto_dict({"base_model": {"source": "tiny://sd"}, **config})
    jid = uuid.uuid4().hex[:12]
    return TrainingJob(job_id=f"job-{jid}", idempotency_key=jid, run="test", skill="shapes", dataset_id=dataset.id,
                       config=cfg, expert_id=f"expert-{jid}", work_prefix=f"training/job-{jid}")


def adapter(store, expert_id) -> dict[str, torch.Tensor]:
    return load(store.read_bytes(expert_id, LORA_FILE))


def test_epochs_over_the_training_images_set_the_steps(env):
    settings, store, dataset = env
    # 8 images, a quarter held out: 6 training images × 2 epochs / batch 3 = 4 steps (the cap is 50)
    job = make_job(dataset, dict(max_steps=50, checkpoint_every=10, resolution=32, batch_size=3, epochs=2,
                                 early_stopping={"validation_fraction": 0.25, "patience": 100}))
    result = train(job, settings)
    assert result.trained_steps == 4 and not result.stopped_early
    p = store.get(result.expert_id).parameters
    assert (p["train_images"], p["validation_images"], p["trained_steps"]) == (6, 2, 4)
    progress = json.loads(store.storage.get_bytes(job.progress_key))
    assert progress["max_steps"] == 4 and progress["validation_history"][-1][0] == 4  # the last step is validated
    capped = train(make_job(dataset, dict(max_steps=3, checkpoint_every=10, resolution=32, batch_size=2, epochs=5)), settings)
    assert capped.trained_steps == 3  # 5 epochs of 8 images would be 20 steps: max_steps caps it


def test_skillset_rank_alpha_lr_and_targets_reach_the_adapter(env):
    settings, store, dataset = env
    ss = parse_skillset(textwrap.dedent("""\
        apiVersion: selma.dev/v1alpha1
        kind: SkillSet
        metadata: {name: recipe}
        spec:
          skills: [{name: counting, count: 2}, {name: spatial, count: 2}]
          training:
            config: {baseModel: {source: "tiny://sd"}, preset: tiny, maxSteps: 2, resolution: 32, lora: {rank: 4}}
            skills:
              counting: {lora: {rank: 6, alpha: 3, targetModules: [to_k, to_v]}, learningRate: 0.004}
        """))
    outcomes = {}
    for skill in ("counting", "spatial"):
        job = make_job(dataset, message_to_dict(ss.training_config_for(skill)))
        outcomes[skill] = (job, train(job, settings))
    job, result = outcomes["counting"]
    lora = adapter(store, result.expert_id)
    downs = {k: v for k, v in lora.items() if "lora_A" in k or "lora.down" in k}
    assert downs and all(v.shape[0] == 6 for v in downs.values())  # rank 6 in the shapes
    assert all(".to_k." in k or ".to_v." in k for k in lora)  # only the SkillSet's target modules
    expert = json.loads(store.read_bytes(result.expert_id, "expert.json"))
    assert (expert["rank"], expert["trained_alpha"], expert["target_modules"]) == (6, 3.0, ["to_k", "to_v"])
    assert store.get(result.expert_id).parameters["config"]["learning_rate"] == 0.004
    _, other = outcomes["spatial"]
    other_lora = adapter(store, other.expert_id)
    assert {v.shape[0] for k, v in other_lora.items() if "lora_A" in k or "lora.down" in k} == {4}
    assert any(".to_q." in k for k in other_lora)  # the shared config's default targets


def test_early_stopping_stops_when_validation_stops_improving_and_exports_the_best(env):
    settings, store, dataset = env
    job = make_job(dataset, STOPPING)
    stopped = train(job, settings)
    p = store.get(stopped.expert_id).parameters
    history = p["validation_history"]
    assert stopped.stopped_early and p["stopped_early"] and stopped.trained_steps < 40
    best_step, best = p["best_step"], p["best_validation_loss"]
    assert best == min(v for _, v in history) and [s for s, v in history if v == best] == [best_step]
    assert stopped.steps == best_step < stopped.trained_steps == history[-1][0]
    assert all(v >= best for s, v in history if s > best_step) and len([s for s, _ in history if s > best_step]) == 2  # patience 2
    # the exported adapter is the one at the best step: a run that ends there exports the same bytes
    # (validation draws from its own generator, so it does not move the training trajectory)
    upto = train(make_job(dataset, {**STOPPING, "max_steps": best_step,
                                    "early_stopping": {**STOPPING["early_stopping"], "patience": 100}}), settings)
    assert not upto.stopped_early and upto.trained_steps == best_step
    a, b = adapter(store, stopped.expert_id), adapter(store, upto.expert_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    progress = json.loads(store.storage.get_bytes(job.progress_key))
    assert progress["stopped_early"] and progress["best_step"] == best_step and progress["validation_loss"] == history[-1][1]


def test_resume_after_kill_reaches_the_same_best(env):
    settings, store, dataset = env
    straight = train(make_job(dataset, STOPPING), settings)
    assert straight.stopped_early and straight.trained_steps > 3

    class Killed(Exception):
        pass

    def crash(step):
        if step == straight.trained_steps - 1:
            raise Killed  # no graceful checkpoint: like SIGKILL after this step

    job = make_job(dataset, STOPPING)
    with pytest.raises(Killed):
        train(job, settings, on_step=crash)
    resumed = train(job, settings)
    assert resumed.resumed_from_step > 0
    assert (resumed.steps, resumed.trained_steps, resumed.best_validation_loss) == (straight.steps, straight.trained_steps, straight.best_validation_loss)
    a, b = adapter(store, straight.expert_id), adapter(store, resumed.expert_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # CPU, same threads: bit-identical
