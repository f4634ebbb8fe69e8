"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def llm():
    """A fresh scripted OpenAI-compatible server on 127.0.0.1 per test (tests script faults on it)."""
    from selma_prompts.fake_llm import FakeLlmServer

    with FakeLlmServer() as server:
        yield server


@pytest.fixture(scope="module")
def eval_stack(tiny_models, tmp_path_factory):
    """Per test module: a real ServingService on the tiny SD model with two seeded experts, and a training
    process hosting the EvaluationService, whose jobs run `selma eval execute` subprocesses rendering through it."""
    import grpc

    from selma.artifacts import ArtifactStore
    from selma.client import Endpoints
    from selma.server import start_hosted
    from selma.storage import open_storage
    from selma.v1 import evaluation_service_pb2_grpc as pb_grpc
    from selma.v1 import serving_service_pb2_grpc as spb_grpc
    from selma_evaluation import server as evaluation
    from selma_evaluation.settings import EvaluationSettings
    from selma_serving.server import build_server as build_serving
    from selma_serving.settings import ServingSettings
    from selma_serving.testing import make_expert
    from selma_training import server as training_server
    from selma_training.settings import TrainingSettings

    root = tmp_path_factory.mktemp("eval-stack")
    storage_uri = (root / "storage").as_uri()
    serving_settings = ServingSettings(data_dir=root / "serving", storage_uri=storage_uri, serving_base_model=str(tiny_models.sd),
                                       serving_max_steps=20, serving_max_resolution=128, grpc_workers=8, log_level="WARNING")
    serving = build_serving(serving_settings).start()
    serving.core.engine.load_base()
    serving.set_ready(True)
    store = ArtifactStore(open_storage(serving_settings))
    experts = [make_expert(store, str(tiny_models.sd), seed=s, rank=4, skill=f"skill{s}", run="evalrun") for s in (1, 2)]
    common = dict(data_dir=root / "training", storage_uri=storage_uri, device="cpu", batch_progress_interval_seconds=0,
                  batch_poll_seconds=0.2, batch_max_local_jobs=2, log_level="WARNING", hf_offline=True)
    # llm_allow_any_base_url: the fake LLM's port is picked per test (the default allow-list is tested in test_eval_service)
    settings = EvaluationSettings(**common, eval_serving_endpoint=serving.address, eval_vqa_batch_size=4, llm_allow_any_base_url=True)
    # as `selma serve training` hosts them: training and evaluation in one server, sharing the batch launchers
    hosted_training = training_server.hosted(TrainingSettings(**common))
    hosted_evaluation = evaluation.hosted(settings, launchers=hosted_training.core.launchers)
    training = start_hosted(settings, [hosted_training, hosted_evaluation], name="training")
    training.core, training.evaluation = hosted_training.core, hosted_evaluation.core
    endpoints = root / "endpoints.json"
    Endpoints(training=training.address, serving=serving.address).save(endpoints)
    channel = grpc.insecure_channel(training.address)
    serving_channel = grpc.insecure_channel(serving.address)
    yield {"stub": pb_grpc.EvaluationServiceStub(channel), "serving": spb_grpc.ServingServiceStub(serving_channel), "store": store,
           "experts": experts, "training": training, "settings": settings, "endpoints": str(endpoints), "storage_uri": storage_uri,
           "root": root}
    channel.close()
    serving_channel.close()
    training.stop(0)
    hosted_evaluation.on_stop()
    hosted_training.on_stop()
    serving.stop(0)
    serving.core.shutdown()
