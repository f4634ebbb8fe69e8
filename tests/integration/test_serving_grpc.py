"""The ServingService end to end over gRPC: a real server on 127.0.0.1, tiny SD base, tiny experts."""

from __future__ import annotations

import hashlib
import io
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from safetensors.torch import load as load_st

from selma.jobs import EXPERT_TRAINING_KIND, JobManager, JobPhase, JobResult, OutputRef, run_stage_key
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc
from selma_serving.engine import Admission
from selma_serving.server import SERVICE_NAME, build_server
from selma_serving.settings import ServingSettings
from selma_serving.testing import make_expert

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-grpc")
    settings = ServingSettings(
        data_dir=root / "data",
        storage_uri=(root / "storage").as_uri(),
        serving_base_model=str(tiny_models.sd),
        serving_max_steps=20,
        serving_max_resolution=128,
        serving_max_queue=0,
        grpc_workers=8,
    )
    server = build_server(settings).start()
    core = server.core
    experts = [make_expert(core.store, str(tiny_models.sd), seed=s, rank=4, skill=f"skill{s}", run="run1") for s in (1, 2)]
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    before = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
    core.engine.load_base()  # what main()'s on_start does
    server.set_ready(True)
    yield {"server": server, "core": core, "experts": experts, "stub": pb_grpc.ServingServiceStub(channel), "health": health, "before": before}
    channel.close()
    server.stop(0)
    core.shutdown()


def merge_spec(experts, **kw) -> common_pb2.MergeSpec:
    return common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e.id) for e in experts], **kw)


def test_health_is_serving_only_after_the_base_model_loads(served):
    assert served["before"] == health_pb2.HealthCheckResponse.NOT_SERVING
    status = served["health"].Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_list_experts_filters_by_run_and_skill(served):
    stub = served["stub"]
    all_ = stub.ListExperts(pb.ListExpertsRequest()).experts
    assert {e.expert_id for e in all_} == {e.id for e in served["experts"]}
    one = stub.ListExperts(pb.ListExpertsRequest(skill="skill2")).experts
    assert [e.expert_id for e in one] == [served["experts"][1].id]
    assert one[0].rank == 4 and one[0].run == "run1" and one[0].base_model.source
    page = stub.ListExperts(pb.ListExpertsRequest(page_size=1))
    assert len(page.experts) == 1 and page.next_page_token


@pytest.mark.parametrize("rpc", ["ListModels", "ListExperts", "ListMerges"])
def test_every_list_rpc_follows_the_one_page_size_rule(served, rpc):
    stub = served["stub"]
    call, request = getattr(stub, rpc), getattr(pb, f"{rpc}Request")
    call(request(page_size=1000))
    for fields, field in (({"page_size": -1}, "page_size"), ({"page_size": 1001}, "page_size"), ({"page_token": "x"}, "page_token")):
        with pytest.raises(grpc.RpcError) as e:
            call(request(**fields))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


def test_merge_register_generate_export_lineage(served):
    stub, experts = served["stub"], served["experts"]
    spec = pb.MergeJobSpec(run="run1", model_name="both", merge=merge_spec(experts), load=True)
    checked = stub.StartMerge(pb.StartMergeRequest(idempotency_key="run1/merge", spec=spec, validate_only=True))
    assert not checked.job.status.job_id and checked.job.stats.resolved_merge.experts[0].weight == pytest.approx(0.5)
    started = stub.StartMerge(pb.StartMergeRequest(idempotency_key="run1/merge", spec=spec))
    assert started.created
    updates = list(stub.WatchMerge(pb.WatchMergeRequest(job_id=started.job.status.job_id)))
    job = updates[-1].job
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.error.message
    assert job.stats.output_rank == 8 and job.stats.registered_model_name == "both" and job.stats.modules_merged == job.stats.modules_total > 0
    assert stub.GetMerge(pb.GetMergeRequest(job_id=job.status.job_id)).job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED
    assert [j.status.job_id for j in stub.ListMerges(pb.ListMergesRequest()).jobs] == [job.status.job_id]
    again = stub.StartMerge(pb.StartMergeRequest(idempotency_key="run1/merge", spec=spec))
    assert not again.created and again.job.status.job_id == job.status.job_id

    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.model_name for m in models] == ["base", "both"]
    assert models[1].state == pb.MODEL_STATE_LOADED and models[1].kind == pb.MODEL_KIND_MERGED and models[1].fused

    responses = list(
        stub.Generate(
            pb.GenerateRequest(
                prompts=["a red ball", "a blue cube"],
                images_per_prompt=2,
                seed=7,
                diffusion=common_pb2.DiffusionSettings(steps=3, scheduler=common_pb2.SCHEDULER_DDIM),
                model_name="both",
            )
        )
    )
    assert [r.index for r in responses] == [0, 1, 2, 3] and {r.total for r in responses} == {4}
    assert [(r.image.prompt_index, r.image.image_index) for r in responses] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r.image.seed for r in responses}) == 4
    assert responses[0].model.model_name == "both" and responses[0].model.fused
    img = Image.open(io.BytesIO(responses[0].image.png))
    assert img.size == (64, 64) and img.format == "PNG"

    # The same image from the per-request mix, reproduced with the reported seed and FIXED policy.
    again = list(
        stub.Generate(
            pb.GenerateRequest(
                prompts=["a red ball"],
                seed=responses[1].image.seed,
                seed_policy=common_pb2.SEED_POLICY_FIXED,
                diffusion=common_pb2.DiffusionSettings(steps=3, scheduler=common_pb2.SCHEDULER_DDIM),
                experts=merge_spec(experts),
            )
        )
    )
    assert again[0].model.merge.experts[0].expert_id == experts[0].id and again[0].model.fused
    a = Image.open(io.BytesIO(again[0].image.png)).tobytes()
    b = Image.open(io.BytesIO(responses[1].image.png)).tobytes()
    assert max(abs(x - y) for x, y in zip(a, b, strict=False)) <= 1

    for fmt, prefix in ((pb.ADAPTER_FORMAT_DIFFUSERS, "unet."), (pb.ADAPTER_FORMAT_KOHYA, "lora_unet_")):
        chunks = list(stub.ExportAdapter(pb.ExportAdapterRequest(model_name="both", format=fmt, chunk_size_bytes=4096)))
        info = chunks[0].info
        data = b"".join(c.data for c in chunks)
        assert len(chunks) > 1 and [c.offset for c in chunks] == list(range(0, len(data), 4096))
        assert len(data) == info.size_bytes and hashlib.sha256(data).hexdigest() == info.sha256 and info.rank == 8
        assert all(k.startswith(prefix) for k in load_st(data))

    lineage = stub.GetLineage(pb.GetLineageRequest(artifact=job.status.output)).artifacts
    assert lineage[0].id == job.status.output.id and {m.id for m in lineage[1:]} == {e.id for e in experts}
    assert len(stub.GetLineage(pb.GetLineageRequest(artifact=job.status.output, max_depth=1)).artifacts) == 3

    unloaded = stub.UnloadModel(pb.UnloadModelRequest(model_name="both")).model
    assert unloaded.state == pb.MODEL_STATE_REGISTERED
    loaded = stub.LoadModel(pb.LoadModelRequest(model_name="both"))
    assert loaded.model.state == pb.MODEL_STATE_LOADED and loaded.load_time.ToNanoseconds() > 0


def test_register_model_rules(served):
    stub, experts = served["stub"], served["experts"]
    ref = common_pb2.ArtifactRef(id=experts[0].id)
    first = stub.RegisterModel(pb.RegisterModelRequest(model_name="solo", artifact=ref))
    assert first.created and first.model.kind == pb.MODEL_KIND_EXPERT
    assert not stub.RegisterModel(pb.RegisterModelRequest(model_name="solo", artifact=ref)).created
    other = common_pb2.ArtifactRef(id=experts[1].id)
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterModel(pb.RegisterModelRequest(model_name="solo", artifact=other))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    replaced = stub.RegisterModel(pb.RegisterModelRequest(model_name="solo", artifact=other, replace=True, load=True))
    assert replaced.created and replaced.model.artifact.id == experts[1].id and replaced.model.state == pb.MODEL_STATE_LOADED


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda s: list(s.Generate(pb.GenerateRequest(prompts=["x"], diffusion=common_pb2.DiffusionSettings(steps=500)))), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda s: list(s.Generate(pb.GenerateRequest(prompts=["x"], diffusion=common_pb2.DiffusionSettings(steps=2, width=4096)))), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda s: list(s.Generate(pb.GenerateRequest(prompts=["x"], experts=common_pb2.MergeSpec()))), grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda s: list(s.Generate(pb.GenerateRequest(prompts=["x"], experts=common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id="expert-0000000000")])))),
            grpc.StatusCode.NOT_FOUND,
        ),
        (lambda s: list(s.Generate(pb.GenerateRequest(prompts=["x"], model_name="missing"))), grpc.StatusCode.NOT_FOUND),
        (lambda s: s.UnloadModel(pb.UnloadModelRequest(model_name="base")), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda s: s.LoadModel(pb.LoadModelRequest(model_name="Bad_Name")), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda s: s.GetMerge(pb.GetMergeRequest(job_id="merge-nope")), grpc.StatusCode.NOT_FOUND),
        (lambda s: s.StartMerge(pb.StartMergeRequest(idempotency_key="k", spec=pb.MergeJobSpec(model_name="x", merge=common_pb2.MergeSpec()))), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda s: list(s.ExportAdapter(pb.ExportAdapterRequest(expert_id="nope/none"))), grpc.StatusCode.NOT_FOUND),
        (lambda s: list(s.ExportAdapter(pb.ExportAdapterRequest())), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_bad_requests_get_clear_status_codes(served, call, code):
    with pytest.raises(grpc.RpcError) as e:
        call(served["stub"])
    assert e.value.code() == code and e.value.details()


def test_full_queue_is_resource_exhausted_and_the_server_keeps_serving(served):
    stub, engine = served["stub"], served["core"].engine
    assert engine.admission.max_queue == 0
    with engine.admission.slot():  # one request generating, none may wait
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(prompts=["x"], diffusion=common_pb2.DiffusionSettings(steps=2))))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = dict(e.value.trailing_metadata())["retry-after-ms"]  # what the SDK backs off by
        assert hint.isdigit() and int(hint) >= 100 and f"retry in about {hint} ms" in e.value.details()
    saved, engine.admission = engine.admission, Admission(max_concurrent=1, max_queue=1)
    try:
        with engine.admission.slot():  # queued behind it, the deadline passes
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(prompts=["x"], diffusion=common_pb2.DiffusionSettings(steps=2)), timeout=0.5))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        engine.admission = saved
    ok = list(stub.Generate(pb.GenerateRequest(prompts=["x"], seed=1, diffusion=common_pb2.DiffusionSettings(steps=2))))
    assert len(ok) == 1 and ok[0].model.model_name == "" and not ok[0].model.fused


def test_progress_streams_the_place_in_line_then_the_image(served):
    stub, engine = served["stub"], served["core"].engine
    saved, engine.admission = engine.admission, Admission(max_concurrent=1, max_queue=2)
    try:
        with engine.admission.slot():
            call = stub.Generate(pb.GenerateRequest(prompts=["x"], seed=1, stream_progress=True,
                                                    priority=pb.GENERATION_PRIORITY_HIGH, diffusion=common_pb2.DiffusionSettings(steps=2)))
            first = next(call)
            assert first.HasField("progress") and not first.HasField("image")
            assert (first.progress.queue_position, first.progress.queue_length) == (1, 1)
        rest = list(call)
    finally:
        engine.admission = saved
    assert rest[0].progress.queue_position == 0 and rest[0].progress.batch_size == 1
    assert len(rest) == 2 and rest[1].image.png.startswith(b"\x89PNG") and not rest[1].HasField("progress")


def test_metrics_are_exported(served):
    text = urllib.request.urlopen(served["server"].metrics_url, timeout=5).read().decode()
    for name in (
        "selma_serving_request_seconds",
        "selma_serving_queue_depth",
        "selma_serving_in_flight_requests",
        "selma_serving_images_generated_total",
        "selma_serving_merge_cache_hits_total",
        "selma_serving_merge_cache_misses_total",
        "selma_serving_merge_seconds",
        "selma_serving_model_load_seconds",
        "selma_serving_batch_size",
        "selma_serving_queue_wait_seconds",
        "selma_serving_time_to_first_step_seconds",
    ):
        assert name in text, name


# The two below run last: they publish another expert, which the listing tests above do not expect.


def test_register_model_refuses_an_artifact_uri_of_another_store_naming_it(served, tmp_path):
    stub, expert = served["stub"], served["experts"][0]
    for foreign in (f"s3://other-bucket/selma/artifacts/{expert.id}", (tmp_path / "elsewhere" / "artifacts" / expert.id).as_uri()):
        with pytest.raises(grpc.RpcError) as e:
            stub.RegisterModel(pb.RegisterModelRequest(model_name="foreign", artifact=common_pb2.ArtifactRef(uri=foreign)))
        # refused at the API boundary by the source rule (#17): a request may not name another store at all
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert foreign in e.value.details() and "not in this service's artifact store" in e.value.details()
    own = stub.RegisterModel(pb.RegisterModelRequest(model_name="own-uri", artifact=common_pb2.ArtifactRef(uri=expert.uri)))
    assert own.created and own.model.artifact.id == expert.id


def test_a_run_skill_reference_is_the_expert_the_run_recorded_not_a_newer_one_with_its_labels(served, tiny_models):
    core, stub, recorded = served["core"], served["stub"], served["experts"][0]  # run1 / skill1
    # The run's training job (key run1/skill1/training) recorded this expert, as `selma run` does.
    jobs = JobManager(core.store.storage, EXPERT_TRAINING_KIND, lambda ctx: JobResult(output=OutputRef(id=recorded.id, kind="expert")))
    rec, _ = jobs.start(run_stage_key("run1", "skill1", "training"), {"skill": "skill1"}, run="run1", skill="skill1")
    assert [r.phase for r in jobs.watch(rec.job_id)][-1] == JobPhase.SUCCEEDED
    jobs.shutdown()
    shadow = make_expert(core.store, str(tiny_models.sd), seed=7, rank=4, skill="skill1", run="run1")  # newer, same labels

    info = next(iter(stub.ExportAdapter(pb.ExportAdapterRequest(expert_id="run1/skill1")))).info
    assert info.file_name.startswith(recorded.id)
    mixed = list(stub.Generate(pb.GenerateRequest(prompts=["x"], seed=1, diffusion=common_pb2.DiffusionSettings(steps=2),
                                                  experts=common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id="run1/skill1")]))))
    assert [e.expert_id for e in mixed[0].model.merge.experts] == [recorded.id]  # the merge as resolved
    by_label = stub.ListExperts(pb.ListExpertsRequest(run="run1", skill="skill1")).experts  # labels: only when asked
    assert {e.expert_id for e in by_label} == {recorded.id, shadow.id}
    with pytest.raises(grpc.RpcError) as e:  # run1 recorded no expert for skill2, although one carries its labels
        next(iter(stub.ExportAdapter(pb.ExportAdapterRequest(expert_id="run1/skill2"))))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "recorded no expert" in e.value.details()
