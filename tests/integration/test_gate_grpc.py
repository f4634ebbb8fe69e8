"""The gate's five job RPCs on a real EvaluationService (127.0.0.1, port 0) with the ShapesWorld judge."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from selma.artifacts import ArtifactKind, ArtifactStore, new_artifact_id
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import evaluation_service_pb2 as pb
from selma.v1 import evaluation_service_pb2_grpc as pb_grpc
from selma_evaluation.server import build_server
from selma_evaluation.settings import EvaluationSettings
from selma_shapesworld import world as W

pytestmark = pytest.mark.integration


@pytest.fixture
def service(make_settings):
    settings = EvaluationSettings(**make_settings().model_dump())
    server = build_server(settings)
    channel = grpc.insecure_channel(server.address)
    try:
        yield {"stub": pb_grpc.EvaluationServiceStub(channel), "store": ArtifactStore(open_storage(settings))}
    finally:
        channel.close()
        server.stop(0)
        server.core.shutdown()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _candidates(store: ArtifactStore, n: int = 3) -> tuple[str, str]:
    """A prompt set of ``n`` ShapesWorld captions; a dataset with each caption's true render and a blank canvas."""
    rng = np.random.default_rng(7)
    scenes = [W.sample_scene(rng, "single") for _ in range(n)]
    ps = new_artifact_id(ArtifactKind.PROMPT_SET, "grpc/prompts")
    with store.writer(ArtifactKind.PROMPT_SET, id=ps, parameters={"skill": "objects"}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps({"id": f"p{i:06d}", "index": i, "text": W.caption(s)}) + "\n" for i, s in enumerate(scenes)).encode())
    ds = new_artifact_id(ArtifactKind.IMAGE_DATASET, "grpc/render")
    rows = []
    with store.writer(ArtifactKind.IMAGE_DATASET, id=ds, parents=[ps], parameters={"format": "imagefolder", "images": 2 * n}) as w:
        for i, s in enumerate(scenes):
            for k, image in enumerate((W.render(s), Image.new("RGB", (W.DEFAULT_SIZE, W.DEFAULT_SIZE), W.BACKGROUND))):
                name = f"images/{i:06d}-{k}.png"
                w.put_bytes(name, _png(image))
                rows.append({"file_name": name, "text": W.caption(s), "prompt_id": f"p{i:06d}", "prompt_index": i, "image_index": k})
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return ps, ds


def _spec(ps: str, ds: str, **gate) -> pb.GateSpec:  # noqa: ANN003
    settings = pb.GateSettings(vqa=pb.VqaBackend(shapesworld_judge=pb.ShapesWorldJudgeVqaBackend()),
                               question_source=pb.GATE_QUESTION_SOURCE_VQA_BACKEND, **gate)
    return pb.GateSpec(run="g", skill="objects", prompt_set=common_pb2.ArtifactRef(id=ps), datasets=[common_pb2.ArtifactRef(id=ds)], gate=settings)


def test_a_gate_job_through_grpc_keeps_the_true_renders_and_reports_per_skill_numbers(service):
    stub, store = service["stub"], service["store"]
    ps, ds = _candidates(store)
    checked = stub.StartGate(pb.StartGateRequest(idempotency_key="g/objects/gate", spec=_spec(ps, ds), validate_only=True), timeout=60)
    assert not checked.created and not checked.job.status.job_id
    resp = stub.StartGate(pb.StartGateRequest(idempotency_key="g/objects/gate", spec=_spec(ps, ds)), timeout=60)
    assert resp.created
    req = pb.WatchGateRequest(job_id=resp.job.status.job_id)
    req.min_interval.FromMilliseconds(100)
    job = None
    for update in stub.WatchGate(req, timeout=300):
        job = update.job
    assert job is not None and job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    st = job.stats
    assert (st.candidates_total, st.candidates_scored, st.kept, st.prompts_total, st.prompts_kept) == (6, 6, 3, 3, 3)
    assert st.pass_rate_percent == pytest.approx(50.0)
    assert "kept 3 of 6 candidates (50.0%)" in job.status.message
    kept = store.get(job.status.output.id)
    assert kept.kind == ArtifactKind.IMAGE_DATASET and kept.parents == (ds,)
    assert {json.loads(x)["file_name"] for x in store.read_bytes(kept, "metadata.jsonl").decode().splitlines()} == \
           {f"images/{i:06d}-0.png" for i in range(3)}
    listed = stub.ListGates(pb.ListGatesRequest(), timeout=60).jobs
    assert [j.status.job_id for j in listed] == [job.status.job_id]
    assert stub.GetGate(pb.GetGateRequest(job_id=job.status.job_id), timeout=60).job.spec.skill == "objects"


@pytest.mark.parametrize(("gate", "field"), [
    ({"threshold": 2.0}, "spec.gate.threshold"),
    ({"candidates_per_prompt": 99}, "spec.gate.candidates_per_prompt"),
    ({"target_kept": 50, "max_candidates": 10}, "spec.gate.max_candidates"),
])
def test_a_bad_gate_is_invalid_argument_naming_the_field(service, gate, field):
    ps, ds = _candidates(service["store"], n=1)
    with pytest.raises(grpc.RpcError) as e:
        service["stub"].StartGate(pb.StartGateRequest(idempotency_key="g/bad", spec=_spec(ps, ds, **gate)), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_an_unknown_candidate_dataset_is_not_found(service):
    ps, _ = _candidates(service["store"], n=1)
    with pytest.raises(grpc.RpcError) as e:
        service["stub"].StartGate(pb.StartGateRequest(idempotency_key="g/missing", spec=_spec(ps, "image-dataset-0000")), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "spec.datasets[0].id" in e.value.details()
