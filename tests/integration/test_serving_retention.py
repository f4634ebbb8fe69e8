"""Retention through the ServingService over gRPC (a real server on 127.0.0.1, tiny SD base):
DeleteModel, DeleteRun and CollectGarbage, and the CLI commands that call them
(`selma models delete`, `selma runs delete`, `selma artifacts gc`)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from selma.app.cli import main as selma_main
from selma.artifacts import ArtifactStore
from selma.client import Endpoints
from selma.jobs import JobContext, JobManager, JobResult
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc
from selma_serving.server import hosted
from selma_serving.settings import ServingSettings
from selma_serving.testing import make_expert

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-retention")
    settings = ServingSettings(
        data_dir=root / "data",
        storage_uri=(root / "storage").as_uri(),
        serving_base_model=str(tiny_models.sd),
        serving_max_steps=20,
        serving_max_resolution=128,
        serving_gc_grace_seconds=0,
        grpc_workers=4,
    )
    service = hosted(settings)
    server = service.start_server(settings, name="serving")  # base loaded, SERVING
    core = server.core
    channel = grpc.insecure_channel(server.address)
    endpoints = root / "endpoints.json"
    Endpoints(serving=server.address).save(endpoints)
    yield {"core": core, "store": core.store, "stub": pb_grpc.ServingServiceStub(channel), "endpoints": endpoints, "sd": str(tiny_models.sd)}
    channel.close()
    server.stop(0)
    service.on_stop()


def merge(stub, run: str, experts, name: str) -> str:
    spec = pb.MergeJobSpec(run=run, model_name=name, merge=common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e.id) for e in experts]), load=True)
    started = stub.StartMerge(pb.StartMergeRequest(idempotency_key=f"{run}/merge", spec=spec))
    job = list(stub.WatchMerge(pb.WatchMergeRequest(job_id=started.job.status.job_id)))[-1].job
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.error.message
    return job.status.output.id


def code_of(call) -> grpc.StatusCode:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_delete_model_unregisters_and_unloads_and_the_run_then_goes_with_gc(served) -> None:
    stub, store = served["stub"], served["store"]
    experts = [make_expert(store, served["sd"], seed=s, rank=4, skill=f"s{s}", run="r-model") for s in (1, 2)]
    merged = merge(stub, "r-model", experts, "doomed")
    assert [m.model_name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["base", "doomed"]

    resp = stub.DeleteModel(pb.DeleteModelRequest(model_name="doomed"))
    assert resp.model_name == "doomed" and resp.artifact.id == merged and resp.was_loaded
    assert [m.model_name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["base"]
    gen = pb.GenerateRequest(prompts=["x"], model_name="doomed", diffusion=common_pb2.DiffusionSettings(steps=2))
    assert code_of(lambda: list(stub.Generate(gen))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.DeleteModel(pb.DeleteModelRequest(model_name="doomed"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.DeleteModel(pb.DeleteModelRequest(model_name="base"))) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(lambda: stub.DeleteModel(pb.DeleteModelRequest(model_name="Not A Name"))) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteModel(pb.DeleteModelRequest(model_name="x" * 100_000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(e.value.details()) < 200
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteRun(pb.DeleteRunRequest(run="r" * 100_000))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(e.value.details()) < 200

    # the merge job's record still references the merged model: gc keeps it until the run goes
    assert store.exists(merged)
    gc = stub.CollectGarbage(pb.CollectGarbageRequest())
    assert merged not in {r.key for r in gc.removed} and store.exists(merged)
    deleted = stub.DeleteRun(pb.DeleteRunRequest(run="r-model"))
    assert {r.key for r in deleted.removed} == {merged, *(e.id for e in experts)} and not deleted.kept
    assert len(deleted.job_ids) == 1 and not store.exists(merged)
    assert list(stub.ListMerges(pb.ListMergesRequest(filter=common_pb2.JobFilter(run="r-model"))).jobs) == []


def test_delete_run_keeps_a_registered_model_and_reports_it(served) -> None:
    stub, store = served["stub"], served["store"]
    experts = [make_expert(store, served["sd"], seed=3, rank=4, skill="s3", run="r-kept")]
    merged = merge(stub, "r-kept", experts, "kept-model")
    dry = stub.DeleteRun(pb.DeleteRunRequest(run="r-kept", dry_run=True))
    assert dry.dry_run and not dry.removed and {k.artifact_id for k in dry.kept} == {merged, experts[0].id}
    assert all(k.dependant == "registered model kept-model" for k in dry.kept)
    done = stub.DeleteRun(pb.DeleteRunRequest(run="r-kept"))
    assert not done.removed and len(done.job_ids) == 1 and store.exists(merged)
    assert [m.model_name for m in stub.ListModels(pb.ListModelsRequest()).models] == ["base", "kept-model"]
    again = stub.DeleteRun(pb.DeleteRunRequest(run="r-kept"))  # the kept artifacts still carry the run: reported again
    assert not again.job_ids and not again.removed and {k.artifact_id for k in again.kept} == {merged, experts[0].id}
    stub.DeleteModel(pb.DeleteModelRequest(model_name="kept-model"))
    removed = {r.key for r in stub.CollectGarbage(pb.CollectGarbageRequest()).removed}
    assert {merged, experts[0].id} <= removed


def test_delete_run_refuses_while_a_job_of_another_service_runs(served) -> None:
    store: ArtifactStore = served["store"]
    release, started = threading.Event(), threading.Event()

    def train(ctx: JobContext) -> JobResult:
        started.set()
        release.wait(60)
        return JobResult()

    expert = make_expert(store, served["sd"], seed=4, rank=4, skill="s4", run="r-busy")
    training = JobManager(store.storage, "expert_training", train)  # the training service, sharing the store
    try:
        rec, _ = training.start("r-busy/s4/training", {"skill": "s4"}, run="r-busy")
        assert started.wait(30)
        with pytest.raises(grpc.RpcError) as e:
            served["stub"].DeleteRun(pb.DeleteRunRequest(run="r-busy"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and rec.job_id in e.value.details()
        assert store.exists(expert.id)
    finally:
        release.set()
        training.shutdown()
    assert served["stub"].DeleteRun(pb.DeleteRunRequest(run="r-busy")).job_ids == [rec.job_id]
    assert not store.exists(expert.id)
    assert code_of(lambda: served["stub"].DeleteRun(pb.DeleteRunRequest(run=""))) == grpc.StatusCode.INVALID_ARGUMENT


def test_collect_garbage_dry_run_reports_what_a_real_run_removes(served) -> None:
    stub, store = served["stub"], served["store"]
    with store.writer("latent_cache", key="orphan-cache") as w:
        w.put_bytes("cache.safetensors", b"0" * 1000)
    orphan = w.manifest
    dry = stub.CollectGarbage(pb.CollectGarbageRequest(dry_run=True))
    assert dry.dry_run and orphan.id in {r.key for r in dry.removed} and store.exists(orphan.id)
    item = next(r for r in dry.removed if r.key == orphan.id)
    assert item.type == pb.REMOVED_ITEM_TYPE_ARTIFACT and item.kind == common_pb2.ARTIFACT_KIND_LATENT_CACHE and item.size_bytes >= 1000  # files and manifest
    assert dry.removed_count == len(dry.removed) and dry.grace_period.seconds == 0
    real = stub.CollectGarbage(pb.CollectGarbageRequest())
    assert {r.key for r in real.removed} == {r.key for r in dry.removed} and not store.exists(orphan.id)
    assert stub.CollectGarbage(pb.CollectGarbageRequest()).removed_count == 0


def test_cli_deletes_a_model_and_a_run_and_collects_garbage(served, tmp_path: Path, capsys) -> None:
    stub, store = served["stub"], served["store"]
    endpoints = str(served["endpoints"])
    expert = make_expert(store, served["sd"], seed=5, rank=4, skill="s5", run="r-cli")
    merged = merge(stub, "r-cli", [expert], "cli-model")
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    (runs_dir / "r-cli.json").write_text('{"name": "r-cli", "stages": {}}')

    assert selma_main(["runs", "delete", "r-cli", "--dry-run", "--dir", str(tmp_path), "--endpoints", endpoints]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "registered model cli-model" in out and (runs_dir / "r-cli.json").exists()

    assert selma_main(["models", "delete", "cli-model", "--endpoints", endpoints]) == 0
    assert "deleted model cli-model" in capsys.readouterr().out

    assert selma_main(["runs", "delete", "r-cli", "--dir", str(tmp_path), "--endpoints", endpoints]) == 0
    out = capsys.readouterr().out
    assert merged in out and not store.exists(merged) and not (runs_dir / "r-cli.json").exists()

    with store.writer("latent_cache", key="cli-orphan") as w:
        w.put_bytes("cache.safetensors", b"1" * 10)
    assert selma_main(["artifacts", "gc", "--dry-run", "--endpoints", endpoints]) == 0
    out = capsys.readouterr().out
    assert w.id in out and "would remove" in out and store.exists(w.id)
    assert selma_main(["artifacts", "gc", "--endpoints", endpoints]) == 0
    assert "removed" in capsys.readouterr().out and not store.exists(w.id)
    assert selma_main(["runs", "delete", "r-cli", "--dir", str(tmp_path), "--endpoints", endpoints]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    (runs_dir / "stale.json").write_text('{"name": "stale", "stages": {}}')  # a run the services never saw
    assert selma_main(["runs", "delete", "stale", "--dir", str(tmp_path), "--endpoints", endpoints]) == 0
    assert "hold nothing of it" in capsys.readouterr().out and not (runs_dir / "stale.json").exists()


def test_delete_model_refuses_while_a_job_uses_it(served) -> None:
    stub, store = served["stub"], served["store"]
    expert = make_expert(store, served["sd"], seed=6, rank=4, skill="s6", run="r-eval")
    stub.RegisterModel(pb.RegisterModelRequest(model_name="busy-model", artifact=common_pb2.ArtifactRef(id=expert.id)))
    release, started = threading.Event(), threading.Event()

    def evaluate(ctx: JobContext) -> JobResult:
        started.set()
        release.wait(60)
        return JobResult()

    evaluation = JobManager(store.storage, "evaluation", evaluate)  # the evaluation service, sharing the store
    try:
        rec, _ = evaluation.start("r-eval/evaluation", {"targets": [{"label": "base"}, {"label": "m", "modelName": "busy-model"}]})
        assert started.wait(30)
        with pytest.raises(grpc.RpcError) as e:
            stub.DeleteModel(pb.DeleteModelRequest(model_name="busy-model"))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and rec.job_id in e.value.details()
    finally:
        release.set()
        evaluation.shutdown()
    assert stub.DeleteModel(pb.DeleteModelRequest(model_name="busy-model")).artifact.id == expert.id
