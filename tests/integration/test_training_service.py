"""TrainingService end to end over gRPC with the local launcher (a real trainer subprocess)."""

from __future__ import annotations

import urllib.request

import grpc
import pytest

from selma.artifacts import ArtifactStore
from selma.batch.progress import read_progress
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import training_service_pb2 as pb
from selma.v1 import training_service_pb2_grpc as pb_grpc
from selma_training.samples import publish_shapes_dataset
from selma_training.server import build_server
from selma_training.settings import TrainingSettings

pytestmark = pytest.mark.slow
TERMINAL = {common_pb2.JOB_PHASE_SUCCEEDED, common_pb2.JOB_PHASE_FAILED, common_pb2.JOB_PHASE_CANCELLED}


@pytest.fixture
def settings(tmp_path, tiny_models):
    return TrainingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), device="cpu",
                            training_default_model=str(tiny_models.sd), batch_progress_interval_seconds=0,
                            batch_poll_seconds=0.2, batch_max_local_jobs=1, log_level="WARNING")


@pytest.fixture
def service(settings):
    servers = []

    def start():
        server = build_server(settings)
        servers.append(server)
        channel = grpc.insecure_channel(server.address)
        return server, channel, pb_grpc.TrainingServiceStub(channel)

    yield start
    for server in servers:
        server.stop(0)
        server.core.shutdown()


@pytest.fixture
def dataset(settings):
    return publish_shapes_dataset(ArtifactStore(open_storage(settings)), 6)


def spec(dataset_id: str, **config) -> pb.ExpertTrainingSpec:
    cfg = {"resolution": 32, "max_steps": 4, "checkpoint_every": 2, **config}
    return pb.ExpertTrainingSpec(run="run-1", skill="shapes", dataset=common_pb2.ArtifactRef(id=dataset_id),
                                 config=pb.ExpertTrainingConfig(**cfg), labels={"team": "a"})


def watch_until(stub, job_id, predicate, timeout=180):
    req = pb.WatchExpertTrainingRequest(job_id=job_id)
    req.min_interval.FromMilliseconds(100)
    for update in stub.WatchExpertTraining(req, timeout=timeout):
        if predicate(update.job):
            return update.job
    raise AssertionError("watch ended before the condition held")


def test_train_expert_end_to_end_with_the_local_launcher(service, dataset):
    server, channel, stub = service()
    req = pb.StartExpertTrainingRequest(idempotency_key="run-1/train/shapes", spec=spec(dataset.id))
    first = stub.StartExpertTraining(req)
    assert first.created
    again = stub.StartExpertTraining(req)
    assert not again.created and again.job.status.job_id == first.job.status.job_id
    job = watch_until(stub, first.job.status.job_id, lambda j: j.status.phase in TERMINAL)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    assert job.status.output.kind == common_pb2.ARTIFACT_KIND_EXPERT and job.status.output.id
    assert job.stats.step == 4 and job.stats.max_steps == 4 and job.stats.loss > 0
    assert [p.step for p in job.stats.loss_history] == [2, 4]
    assert [c.step for c in job.stats.checkpoints] == [2]
    assert job.stats.latent_cache.id.startswith("latent-cache-") and not job.stats.latent_cache_hit
    assert job.stats.resolved_config.lora.rank == 4 and job.stats.resolved_config.preset == pb.TRAINING_PRESET_TINY
    assert job.stats.launcher == common_pb2.LAUNCHER_KIND_LOCAL and job.stats.config_artifact.id
    assert "local.pid" in job.status.details and job.status.progress.unit == "steps"
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'selma_training_step{skill="shapes"} 4.0' in metrics and 'selma_training_loss{skill="shapes"}' in metrics
    store = ArtifactStore(open_storage(server.settings))
    expert = store.get(job.status.output.id)
    assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "expert.json", "training_config.json"} <= {f.path for f in expert.files}
    listed = stub.ListExpertTrainings(pb.ListExpertTrainingsRequest(filter=common_pb2.JobFilter(run="run-1")))
    assert [j.status.job_id for j in listed.jobs] == [job.status.job_id]
    assert not stub.ListExpertTrainings(pb.ListExpertTrainingsRequest(filter=common_pb2.JobFilter(run="other"))).jobs
    assert {p.preset for p in stub.ListTrainingPresets(pb.ListTrainingPresetsRequest()).presets} == {1, 2, 3, 4}
    with pytest.raises(grpc.RpcError) as e:
        stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="run-1/train/shapes", spec=spec(dataset.id, max_steps=5)))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # evaluations have their own service (selma.v1.EvaluationService), hosted beside training by `selma serve training`
    assert not hasattr(stub, "GetEvaluation") and not hasattr(pb, "GetEvaluationRequest")


@pytest.mark.slow
def test_an_expert_trains_on_two_processes_through_the_service(service, settings, dataset):
    server, channel, stub = service()
    s = spec(dataset.id, gradient_accumulation_steps=2)
    s.distributed.processes_per_node = 2
    started = stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="run-1/train/ddp", spec=s))
    job = watch_until(stub, started.job.status.job_id, lambda j: j.status.phase in TERMINAL, timeout=600)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    assert job.status.details["distributed"] == "1 node(s) x 2 process(es)"
    assert job.stats.step == 4 and job.status.output.kind == common_pb2.ARTIFACT_KIND_EXPERT
    assert read_progress(open_storage(settings), f"training/{job.status.job_id}/progress.json")["world_size"] == 2  # rank 0's view of the group


@pytest.mark.parametrize(
    ("mutate", "code", "field"),
    [
        (lambda s: s.dataset.CopyFrom(common_pb2.ArtifactRef(id="image-dataset-00000000000000000000")), grpc.StatusCode.NOT_FOUND, "spec.dataset"),
        (lambda s: s.config.lora.CopyFrom(pb.LoraSettings(rank=-4)), grpc.StatusCode.INVALID_ARGUMENT, "config.lora.rank"),
        (lambda s: setattr(s.config, "learning_rate", -1.0), grpc.StatusCode.INVALID_ARGUMENT, "config.learning_rate"),
        (lambda s: setattr(s.config, "preset", 42), grpc.StatusCode.INVALID_ARGUMENT, "config.preset"),
        (lambda s: setattr(s.config, "resolution", 36), grpc.StatusCode.INVALID_ARGUMENT, "config.resolution"),
        (lambda s: setattr(s, "run", "Bad_Run"), grpc.StatusCode.INVALID_ARGUMENT, "spec.run"),
        (lambda s: setattr(s.placement, "gpus", 12), grpc.StatusCode.INVALID_ARGUMENT, "spec.placement"),
        (lambda s: setattr(s.distributed, "nodes", -1), grpc.StatusCode.INVALID_ARGUMENT, "spec.distributed.nodes"),
        # the tiny preset accumulates 1 micro-batch per step: it cannot be split over 3 processes
        (lambda s: setattr(s.distributed, "processes_per_node", 3), grpc.StatusCode.INVALID_ARGUMENT, "config.gradient_accumulation_steps"),
        (lambda s: setattr(s.distributed, "processes_per_node", 1000), grpc.StatusCode.INVALID_ARGUMENT, "spec.distributed"),
        (lambda s: setattr(s.config, "epochs", -2.0), grpc.StatusCode.INVALID_ARGUMENT, "config.epochs"),
        (lambda s: s.config.early_stopping.CopyFrom(pb.EarlyStopping(validation_fraction=0.9)), grpc.StatusCode.INVALID_ARGUMENT,
         "config.early_stopping.validation_fraction"),
        (lambda s: s.config.early_stopping.CopyFrom(pb.EarlyStopping(validation_fraction=0.2, patience=-1)), grpc.StatusCode.INVALID_ARGUMENT,
         "config.early_stopping.patience"),
    ],
)
def test_bad_requests_fail_before_anything_is_launched(service, dataset, mutate, code, field):
    server, channel, stub = service()
    s = spec(dataset.id)
    mutate(s)
    with pytest.raises(grpc.RpcError) as e:
        stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="k", spec=s))
    assert e.value.code() == code and field in e.value.details()
    assert not stub.ListExpertTrainings(pb.ListExpertTrainingsRequest()).jobs


def test_dataset_without_captions_is_invalid_and_validate_only_launches_nothing(service, settings, dataset):
    server, channel, stub = service()
    bare = publish_shapes_dataset(ArtifactStore(open_storage(settings)), 2, captions=False, seed=9)
    with pytest.raises(grpc.RpcError) as e:
        stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="k", spec=spec(bare.id)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "caption" in e.value.details()
    dry = stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="k2", spec=spec(dataset.id), validate_only=True))
    assert not dry.created and not dry.job.status.job_id and dry.job.stats.resolved_config.batch_size == 2
    assert not stub.ListExpertTrainings(pb.ListExpertTrainingsRequest()).jobs


def test_service_restart_resumes_the_trainer_and_cancel_stops_it(service, dataset):
    server, channel, stub = service()
    started = stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="restart", spec=spec(dataset.id, max_steps=30, checkpoint_every=2)))
    job_id = started.job.status.job_id
    watch_until(stub, job_id, lambda j: j.stats.step >= 3 or j.status.phase in TERMINAL)
    server.stop(0)
    server.core.shutdown()  # SIGTERM to the trainer: it checkpoints and exits; the job stays resumable
    channel.close()
    server2, channel2, stub2 = service()
    job = watch_until(stub2, job_id, lambda j: j.status.phase in TERMINAL)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    assert job.stats.resumed_from_step >= 3 and job.stats.step == 30
    assert job.status.attempt == 1 and job.stats.checkpoints
    # cancel: a long job stops and is reported CANCELLED
    long = stub2.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="long", spec=spec(dataset.id, max_steps=5000, checkpoint_every=1000)))
    long_id = long.job.status.job_id
    watch_until(stub2, long_id, lambda j: j.stats.step >= 1)
    stub2.CancelExpertTraining(pb.CancelExpertTrainingRequest(job_id=long_id, reason="test"))
    done = watch_until(stub2, long_id, lambda j: j.status.phase in TERMINAL)
    assert done.status.phase == common_pb2.JOB_PHASE_CANCELLED


def test_killed_trainer_is_retried_and_resumes_from_its_last_checkpoint(service, dataset):
    server, channel, stub = service()
    started = stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="crash", spec=spec(dataset.id, max_steps=30, checkpoint_every=2)))
    job_id = started.job.status.job_id
    watch_until(stub, job_id, lambda j: j.stats.step >= 3 or j.status.phase in TERMINAL)
    assert server.core.launchers["local"].kill(job_id) is not None  # SIGKILL: no chance to checkpoint
    job = watch_until(stub, job_id, lambda j: j.status.phase in TERMINAL)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    assert job.status.details["local.attempt"] == "2" and job.stats.resumed_from_step >= 2 and job.stats.step == 30
    # the relaunch is a new execution: JobStatus.attempt counts it, and a warning says why
    assert job.status.attempt == 2, job.status
    assert [w for w in job.status.warnings if w.startswith("worker relaunched (attempt 2): trainer exited with -9")], job.status.warnings


def test_epochs_and_early_stopping_report_train_and_validation_loss_in_the_job_status(service, settings, dataset):
    server, channel, stub = service()
    # 6 images, a fifth held out (1): 5 training images × 4 epochs / batch 2 = 10 steps, validated every 2
    s = spec(dataset.id, max_steps=100, batch_size=2, epochs=4.0,
             early_stopping=pb.EarlyStopping(validation_fraction=0.2, validate_every=2, patience=100))
    first = stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="run-1/recipe", spec=s))
    job = watch_until(stub, first.job.status.job_id, lambda j: j.status.phase in TERMINAL)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    st = job.stats
    assert (st.train_images, st.validation_images, st.max_steps, st.step) == (5, 1, 10, 10)
    assert [p.step for p in st.validation_history] == [2, 4, 6, 8, 10] and all(p.loss > 0 for p in st.validation_history)
    assert st.best_validation_loss == min(p.loss for p in st.validation_history) and not st.stopped_early
    assert st.best_step in {p.step for p in st.validation_history}
    assert st.resolved_config.epochs == 4.0 and st.resolved_config.early_stopping.validation_fraction == pytest.approx(0.2)
    metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'selma_training_validation_loss{skill="shapes"}' in metrics


def test_a_dataset_too_small_to_hold_out_a_validation_split_is_refused_at_start(service, settings):
    server, channel, stub = service()
    one = publish_shapes_dataset(ArtifactStore(open_storage(settings)), 1)
    s = spec(one.id, early_stopping=pb.EarlyStopping(validation_fraction=0.5))
    with pytest.raises(grpc.RpcError) as e:
        stub.StartExpertTraining(pb.StartExpertTrainingRequest(idempotency_key="k-small", spec=s))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "config.early_stopping.validation_fraction" in e.value.details()
    assert not stub.ListExpertTrainings(pb.ListExpertTrainingsRequest()).jobs
