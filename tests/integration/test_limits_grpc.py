"""Bounded requests over real gRPC (issue #18): huge prompts and ids are refused at once with the
limit named and a short message, merge weights and adapter values are bounded, and a generation
whose client is gone stops within one denoising step and frees its slot for the next request."""

from __future__ import annotations

import threading

import grpc
import pytest

from selma.artifacts import ArtifactKind
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc
from selma_serving.server import build_server
from selma_serving.settings import ServingSettings
from selma_serving.testing import make_expert

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MB = 1024 * 1024
KiB = 1024


def _settings(root, tiny_models, **kw) -> ServingSettings:
    return ServingSettings(data_dir=root / "data", storage_uri=(root / "storage").as_uri(), serving_base_model=str(tiny_models.sd),
                           serving_max_steps=20, serving_max_concurrent=1, serving_max_queue=2,
                           grpc_workers=8, log_level="WARNING", **kw)


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """A serving process as `selma serve serving` runs it (one generation slot), with a normal expert,
    one whose values are 1e30, and one whose values are large but under the bound."""
    root = tmp_path_factory.mktemp("limits-grpc")
    # requests up to 32 MiB reach the service, so its own checks (not gRPC's size limit) answer the 4 MB and 10 MB requests
    server = build_server(_settings(root, tiny_models, max_receive_message_bytes=32 * MB)).start()
    core = server.core
    sd = str(tiny_models.sd)
    experts = {
        "ok": make_expert(core.store, sd, seed=1, skill="ok"),
        "huge": make_expert(core.store, sd, seed=2, skill="huge", scale=1e30),
        "loud": make_expert(core.store, sd, seed=3, skill="loud", scale=1e3),
    }
    core.engine.load_base()
    server.set_ready(True)
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * MB)])
    yield {"server": server, "core": core, "stub": pb_grpc.ServingServiceStub(channel), "experts": experts}
    channel.close()
    server.stop(0)
    core.shutdown()


def small_request(prompt: str = "two red apples", **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompts=[prompt], seed=1, diffusion=common_pb2.DiffusionSettings(steps=2), **kw)


def mix(*weights: tuple[str, float]) -> common_pb2.MergeSpec:
    return common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e, weight=w) for e, w in weights])


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert len(e.value.details().encode()) < KiB, "the answer itself must stay small"
    return e.value


def test_a_4mb_prompt_is_refused_naming_the_limit_and_the_server_keeps_serving(served):
    stub, engine = served["stub"], served["core"].engine
    err = refused(lambda: list(stub.Generate(pb.GenerateRequest(prompts=["a red apple " * 350_000]))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompts[0]" in err.details() and "SELMA_MAX_PROMPT_CHARS=4096" in err.details()
    assert engine.admission.running == 0 and engine.admission.waiting == 0, "the refused request never took a slot"
    # under the character limit but over the token limit: the tokenizer (bounded input) answers
    err = refused(lambda: list(stub.Generate(pb.GenerateRequest(prompts=["a b c d " * 300]))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "SELMA_SERVING_MAX_PROMPT_TOKENS=512" in err.details()
    (image,) = list(stub.Generate(small_request()))
    assert image.image.png.startswith(b"\x89PNG")


def test_sizes_over_the_models_own_maximum_are_refused_before_any_step(served):
    """The tiny model's native side is 64: 2x (SELMA_SERVING_MAX_SIZE_FACTOR) is its maximum, far under SELMA_SERVING_MAX_RESOLUTION."""
    stub = served["stub"]
    big = pb.GenerateRequest(prompts=["x"], diffusion=common_pb2.DiffusionSettings(steps=2, width=512, height=64))
    err = refused(lambda: list(stub.Generate(big)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "diffusion.width" in err.details()
    assert "SELMA_SERVING_MAX_SIZE_FACTOR=2" in err.details() and "maximum 128" in err.details()
    (image,) = list(stub.Generate(pb.GenerateRequest(prompts=["x"], seed=1, diffusion=common_pb2.DiffusionSettings(steps=2, width=128, height=64))))
    assert image.image.width == 128 and image.image.height == 64


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s, huge: s.LoadModel(pb.LoadModelRequest(model_name=huge)), "model_name"),
        (lambda s, huge: s.GetMerge(pb.GetMergeRequest(job_id=huge)), "job_id"),
        (lambda s, huge: list(s.Generate(small_request(experts=mix((huge, 1.0))))), "experts.experts[0].expert_id"),
    ],
)
def test_a_10mb_id_gets_a_short_invalid_argument(served, call, field):
    err = refused(lambda: call(served["stub"], "x" * (10 * MB)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details() and "SELMA_MAX_ID_CHARS=1024" in err.details()


def test_ids_echoed_by_the_service_itself_are_cut_and_oversized_requests_get_a_short_answer(tiny_models, tmp_path):
    """With the id cap raised out of the way, the service's own NOT_FOUND for a 10 MB id is still short;
    at the default receive limit, gRPC refuses a larger request before it is parsed."""
    servers = [build_server(_settings(tmp_path / "wide", tiny_models, max_id_chars=64 * MB, max_receive_message_bytes=32 * MB)).start(),
               build_server(_settings(tmp_path / "default", tiny_models)).start()]
    try:
        for server in servers:
            server.set_ready(True)
        with grpc.insecure_channel(servers[0].address) as ch:
            err = refused(lambda: pb_grpc.ServingServiceStub(ch).GetMerge(pb.GetMergeRequest(job_id="merge-" + "x" * (10 * MB))))
        assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        with grpc.insecure_channel(servers[1].address) as ch:
            err = refused(lambda: pb_grpc.ServingServiceStub(ch).GetMerge(pb.GetMergeRequest(job_id="x" * (10 * MB))))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for server in servers:
            server.stop(0)
            server.core.shutdown()


@pytest.mark.parametrize("weight", [1e30, 1e308, -1e30])
def test_huge_merge_weights_are_refused_naming_the_setting(served, weight):
    stub, ok = served["stub"], served["experts"]["ok"].id
    err = refused(lambda: list(stub.Generate(small_request(experts=mix((ok, weight))))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "SELMA_SERVING_MAX_MERGE_WEIGHT=100" in err.details()
    spec = pb.MergeJobSpec(model_name="loud-merge", merge=mix((ok, weight)))
    err = refused(lambda: stub.StartMerge(pb.StartMergeRequest(idempotency_key=f"w-{weight}", spec=spec, validate_only=True)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "SELMA_SERVING_MAX_MERGE_WEIGHT" in err.details()


def test_an_adapter_with_huge_values_is_refused_naming_the_expert_and_the_tensor(served):
    stub, huge = served["stub"], served["experts"]["huge"].id
    err = refused(lambda: list(stub.Generate(small_request(experts=mix((huge, 1.0))))))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert huge in err.details() and "lora" in err.details() and "SELMA_SERVING_MAX_ADAPTER_VALUE" in err.details()
    err = refused(lambda: stub.StartMerge(pb.StartMergeRequest(
        idempotency_key="huge", spec=pb.MergeJobSpec(model_name="huge", merge=mix((huge, 1.0))), validate_only=True)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and huge in err.details()


def test_a_mix_whose_merged_deltas_are_out_of_bounds_is_refused_before_it_is_served(served):
    """Each tensor of the loud expert is within the bound; at weight 100 its merged deltas are not (the probe)."""
    stub, loud = served["stub"], served["experts"]["loud"].id
    (image,) = list(stub.Generate(small_request(experts=mix((loud, 0.001)))))
    assert image.model.fused
    err = refused(lambda: list(stub.Generate(small_request(experts=mix((loud, 100.0))))))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "merged weight deltas" in err.details()


@pytest.mark.parametrize("fuse", [False, True])
def test_a_merge_whose_result_is_out_of_bounds_fails_and_publishes_nothing(served, fuse):
    stub, core, loud = served["stub"], served["core"], served["experts"]["loud"].id
    merge = mix((loud, 100.0))
    merge.fuse = fuse
    spec = pb.MergeJobSpec(model_name=f"loud-{int(fuse)}", merge=merge)
    started = stub.StartMerge(pb.StartMergeRequest(idempotency_key=f"loud/{fuse}", spec=spec))
    job = list(stub.WatchMerge(pb.WatchMergeRequest(job_id=started.job.status.job_id), timeout=300))[-1].job
    assert job.status.phase == common_pb2.JOB_PHASE_FAILED
    assert job.status.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "SELMA_SERVING_MAX_ADAPTER_VALUE" in job.status.error.message
    assert not [m for m in core.store.list(ArtifactKind.MERGED_MODEL) if loud in m.parents], "a garbage merge was published"
    assert f"loud-{int(fuse)}" not in [m.model_name for m in stub.ListModels(pb.ListModelsRequest()).models]


class _StepProbe:
    """Records the denoising steps of the request whose prompt is ``big``, holding it at step 2 until
    the server has seen that RPC end: the cancel event the servicer hands the engine for it is set
    (by the RPC's done callback: client cancel, deadline or disconnect)."""

    def __init__(self, engine, monkeypatch) -> None:
        self.steps: list[tuple[int, bool]] = []  # (step, whether the server had already seen the RPC end)
        self.at_step_2 = threading.Event()
        self.rpc_ended = threading.Event()  # replaced by the big request's own cancel event
        view, generate = engine.pipeline_view, engine.generate

        def engine_generate(req, *, cancel=None, **kw):
            if req.prompts == ["big"] and cancel is not None:
                self.rpc_ended = cancel
            return generate(req, cancel=cancel, **kw)

        def pipeline_view(unet, scheduler, *rest):
            pipe = view(unet, scheduler, *rest)

            def run(**kw):
                inner = kw["callback_on_step_end"]
                if kw["prompt"] == "big":
                    def on_step(p, step, t, kwargs):
                        self.steps.append((step, self.rpc_ended.is_set()))
                        if step == 2:
                            self.at_step_2.set()
                            self.rpc_ended.wait(120)
                        return inner(p, step, t, kwargs)

                    kw["callback_on_step_end"] = on_step
                return pipe(**kw)

            return run

        monkeypatch.setattr(engine, "generate", engine_generate)
        monkeypatch.setattr(engine, "pipeline_view", pipeline_view)


def _consume(call, out: dict) -> None:
    try:
        out["images"] = list(call)
    except grpc.RpcError as e:
        out["code"] = e.code()


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_work_whose_client_is_gone_stops_within_one_step_and_frees_the_slot(served, monkeypatch, how):
    stub, engine = served["stub"], served["core"].engine
    probe = _StepProbe(engine, monkeypatch)
    big = pb.GenerateRequest(prompts=["big"], images_per_prompt=4, seed=1, diffusion=common_pb2.DiffusionSettings(steps=20))
    call = stub.Generate(big, timeout=5) if how == "deadline" else stub.Generate(big)
    first: dict = {}
    t_big = threading.Thread(target=_consume, args=(call, first))
    t_big.start()
    assert probe.at_step_2.wait(120) or how == "deadline", "the big request never reached step 2"
    # a normal request queued behind it
    second: dict = {}
    t_small = threading.Thread(target=_consume, args=(stub.Generate(small_request("small"), timeout=300), second))
    t_small.start()
    with engine.admission._cond:
        engine.admission._cond.wait_for(lambda: engine.admission.waiting == 1 or not t_big.is_alive(), timeout=120)
    if how == "cancel":
        call.cancel()
    t_big.join(300)
    t_small.join(300)
    assert not t_big.is_alive() and not t_small.is_alive()
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert first.get("code") == expected and "images" not in first
    after_end = [step for step, ended in probe.steps if ended]
    assert len(after_end) <= 1, f"denoising went on after the client was gone: steps {probe.steps}"
    assert max(step for step, _ in probe.steps) < 19, "the big request ran to the end"
    if how == "cancel":
        assert [step for step, _ in probe.steps] == [0, 1, 2] and after_end == []
    assert len(second.get("images", [])) == 1 and second["images"][0].image.png.startswith(b"\x89PNG")
    assert engine.admission.running == 0 and engine.admission.waiting == 0
