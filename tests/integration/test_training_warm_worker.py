"""``selma train`` forked by the local launcher's warm worker publishes the same adapter bytes as a fresh subprocess."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from selma.artifacts import ArtifactStore
from selma.batch.launchers import LaunchRequest, LocalLauncher, Monitor
from selma.storage import open_storage
from selma_training.config import TrainingJob, from_proto_dict
from selma_training.samples import publish_shapes_dataset
from selma_training.settings import TrainingSettings
from selma_training.trainer import KOHYA_FILE, LORA_FILE

pytestmark = pytest.mark.slow


class Quiet(Monitor):
    def __init__(self) -> None:
        self.details: dict[str, str] = {}

    def poll(self, details, message=None, attempt=None) -> None:
        self.details = dict(details)

    def state(self) -> str | None:
        return None


def side(tmp_path, tiny_models, name: str, *, warm: bool):
    """A launcher, its store and a train request over a dataset of its own (cold latent cache on both sides)."""
    settings = TrainingSettings(data_dir=tmp_path / name / "data", storage_uri=(tmp_path / name / "storage").as_uri(), device="cpu",
                                batch_progress_interval_seconds=0, batch_poll_seconds=0.2, batch_warm_worker=warm,
                                batch_warm_preload=["torch", "diffusers", "peft", "selma.app.cli"], log_level="WARNING", hf_offline=True)
    store = ArtifactStore(open_storage(settings))
    dataset = publish_shapes_dataset(store, 6)
    cfg, _ = from_proto_dict({"base_model": {"source": str(tiny_models.sd)}, "max_steps": 4, "checkpoint_every": 2, "resolution": 32,
                              "lora": {"rank": 4, "dropout": 0.1}})
    jid = uuid.uuid4().hex[:12]
    job = TrainingJob(job_id=f"job-{jid}", idempotency_key=jid, run="warm", skill="shapes", dataset_id=dataset.id, config=cfg,
                      expert_id=f"expert-{jid}", work_prefix=f"training/job-{jid}")
    doc = tmp_path / name / "job.json"
    doc.write_text(job.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads on both sides: bit-identical CPU training
    launcher = LocalLauncher(settings, env=env)
    req = LaunchRequest(job_id=job.job_id, idempotency_key=jid, run="warm", skill="shapes", config_uri=str(doc), expert_id=job.expert_id)
    return launcher, store, job, req


def test_a_training_job_forked_by_the_warm_worker_publishes_the_same_bytes(tmp_path, tiny_models):
    warm_launcher, warm_store, warm_job, warm_req = side(tmp_path, tiny_models, "warm", warm=True)
    plain_launcher, plain_store, plain_job, plain_req = side(tmp_path, tiny_models, "plain", warm=False)
    try:
        deadline = time.monotonic() + 600
        while warm_launcher.warm_worker() is None:  # asking starts it; wait until its imports are done
            assert time.monotonic() < deadline, "the warm worker did not become ready"
            time.sleep(0.1)
        warm_monitor, plain_monitor = Quiet(), Quiet()
        outcome = warm_launcher.run(warm_req, warm_monitor)
        assert outcome.state == "succeeded", outcome
        assert warm_monitor.details["local.warm"] == "true"
        outcome = plain_launcher.run(plain_req, plain_monitor)
        assert outcome.state == "succeeded", outcome
        assert plain_monitor.details["local.warm"] == "false"
        for name in (LORA_FILE, KOHYA_FILE):
            assert warm_store.read_bytes(warm_job.expert_id, name) == plain_store.read_bytes(plain_job.expert_id, name), name
    finally:
        warm_launcher.close()
        plain_launcher.close()
