"""``selma train`` with a metrics port: the trainer serves ``selma_trainer_*{skill}`` while it runs, and stops at exit."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import types
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from selma.artifacts import ArtifactStore
from selma.storage import open_storage
from selma_training import cli, trainer
from selma_training.config import TrainingJob, from_proto_dict
from selma_training.samples import publish_shapes_dataset
from selma_training.settings import TrainingSettings

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}} of one /metrics scrape."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def restore_process_state():
    """`selma train` sets the SIGTERM handler and configures logging: put both back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    signal.signal(signal.SIGTERM, handler)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_selma_train_serves_trainer_metrics_with_the_skill_label(tmp_path, tiny_models, monkeypatch, restore_process_state):
    port = free_port()
    env = {"SELMA_DATA_DIR": str(tmp_path / "data"), "SELMA_STORAGE_URI": (tmp_path / "storage").as_uri(), "SELMA_DEVICE": "cpu",
           "SELMA_BATCH_PROGRESS_INTERVAL_SECONDS": "0", "SELMA_HOST": "127.0.0.1", "SELMA_METRICS_PORT": str(port),
           "SELMA_BATCH_PARENT_PID": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = TrainingSettings()
    dataset = publish_shapes_dataset(ArtifactStore(open_storage(settings)), 4)
    cfg, _ = from_proto_dict({"base_model": {"source": str(tiny_models.sd)}, "max_steps": 3, "checkpoint_every": 2, "resolution": 32})
    jid = uuid.uuid4().hex[:12]
    skill = f"metrics_{jid[:6]}"  # the default registry is process-wide: a skill of our own
    job = TrainingJob(job_id=f"job-{jid}", idempotency_key=jid, run="test", skill=skill, dataset_id=dataset.id,
                      config=cfg, expert_id=f"expert-{jid}", work_prefix=f"training/job-{jid}")
    doc = tmp_path / "job.json"
    doc.write_text(json.dumps(job.model_dump(mode="json")))

    url = f"http://127.0.0.1:{port}/metrics"
    seen: dict[str, dict] = {}
    real_run_job, real_train = trainer.run_job, trainer.train

    def train_and_scrape_mid_run(*args, **kwargs):
        # after the first optimizer step, while the trainer is still running
        return real_train(*args, on_step=lambda step: step == 1 and seen.setdefault("during", scrape(url)), **kwargs)

    def run_and_scrape_at_the_end(*args, **kwargs):
        result = real_run_job(*args, **kwargs)
        seen["after"] = scrape(url)  # training done, `selma train` not exited yet
        return result

    monkeypatch.setattr(trainer, "train", train_and_scrape_mid_run)
    monkeypatch.setattr(trainer, "run_job", run_and_scrape_at_the_end)
    args = argparse.Namespace(config=str(doc), device="", dataset="", run="local", skill="skill")
    assert cli._train(args) == 0

    label = (("skill", skill),)
    during, after = seen["during"], seen["after"]
    assert during["selma_trainer_step"][label] == 1 and during["selma_trainer_max_steps"][label] == 3
    assert during["selma_trainer_loss"][label] > 0
    assert after["selma_trainer_step"][label] == 3
    assert after["selma_trainer_max_steps"][label] == 3
    assert after["selma_trainer_loss"][label] > 0
    assert after["selma_trainer_steps_per_second"][label] > 0
    assert after["selma_trainer_checkpoints_total"][label] == 1
    assert after["selma_trainer_last_checkpoint_step"][label] == 2
    for name in ("selma_trainer_step", "selma_trainer_loss", "selma_trainer_checkpoints_total"):
        assert all(dict(labels).keys() == {"skill"} for labels in after[name]), "skill is the only label"
    # the server stopped with the trainer
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=5)


def test_a_taken_metrics_port_does_not_stop_training(tmp_path, monkeypatch, restore_process_state):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setenv("SELMA_HOST", "127.0.0.1")
        monkeypatch.setenv("SELMA_METRICS_PORT", str(taken.getsockname()[1]))
        monkeypatch.setenv("SELMA_DATA_DIR", str(tmp_path))
        monkeypatch.setenv("SELMA_BATCH_PARENT_PID", "0")
        ran = []
        job = types.SimpleNamespace(world_size=1)  # one process: this process trains (no torchrun agent)
        monkeypatch.setattr(trainer, "load_job_document", lambda ref, settings: job)
        monkeypatch.setattr(trainer, "run_job", lambda job, settings, should_stop, world: ran.append(job))
        args = argparse.Namespace(config="job.json", device="", dataset="", run="local", skill="skill")
        assert cli._train(args) == 0 and ran == [job]
