"""PromptService over gRPC: a real server on 127.0.0.1:0 built with build_server, a scripted LLM server."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from selma.artifacts import ArtifactStore
from selma.server import wait_for_serving
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import prompt_service_pb2 as pb
from selma.v1 import prompt_service_pb2_grpc as pb_grpc
from selma_prompts.fake_llm import FakeLlmServer
from selma_prompts.server import SERVICE_NAME, build_server
from selma_prompts.settings import PromptSettings

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "skills"
TERMINAL = {common_pb2.JOB_PHASE_SUCCEEDED, common_pb2.JOB_PHASE_FAILED, common_pb2.JOB_PHASE_CANCELLED}


@pytest.fixture
def settings(tmp_path: Path, llm: FakeLlmServer) -> PromptSettings:
    return PromptSettings(
        data_dir=tmp_path / "data",
        storage_uri=(tmp_path / "storage").as_uri(),
        llm_default_backend="openai_compatible",
        llm_openai_base_url=llm.base_url,
        llm_openai_model="fake-model",
        llm_max_concurrency=1,
        llm_retry_backoff_seconds=0.001,
        llm_retry_max_backoff_seconds=0.01,
        prompts_checkpoint_seconds=0,
        prompts_max_count=500,
        prompts_preview_limit=8,
        prompts_skill_paths=[EXAMPLES],
    )


@pytest.fixture
def server(settings):
    srv = build_server(settings).start()
    srv.set_ready(True)
    wait_for_serving(srv.address, SERVICE_NAME, timeout=10)
    yield srv
    srv.stop(0)


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.PromptServiceStub(channel)


def start(stub, key: str, **spec) -> pb.StartPromptGenerationResponse:
    spec.setdefault("skill_name", "counting")
    spec.setdefault("prompts_per_request", 5)
    return stub.StartPromptGeneration(pb.StartPromptGenerationRequest(idempotency_key=key, spec=pb.PromptGenerationSpec(**spec)))


def wait_done(stub, job_id: str) -> pb.PromptGenerationJob:
    last = None
    for update in stub.WatchPromptGeneration(pb.WatchPromptGenerationRequest(job_id=job_id), timeout=60):
        last = update.job
    assert last is not None and last.status.phase in TERMINAL
    return last


def test_generation_job_end_to_end_with_lineage(stub, settings, server):
    resp = start(stub, "run-a/prompts/counting", count=12, run="run-a", seed=3, labels={"team": "x"})
    assert resp.created and resp.job.status.job_id
    assert resp.job.stats.requested == 12 and resp.job.stats.skill.name == "counting"
    job = wait_done(stub, resp.job.status.job_id)
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
    assert job.stats.accepted == 12 and job.stats.stop_reason == pb.PROMPT_GENERATION_STOP_REASON_TARGET_REACHED
    assert job.stats.llm_requests >= 3 and job.stats.llm_request_budget == 34
    assert job.stats.backend_model == "openai_compatible:fake-model"
    assert job.status.progress.done == 12 and job.status.progress.unit == "prompts"
    assert job.status.output.kind == common_pb2.ARTIFACT_KIND_PROMPT_SET
    store = ArtifactStore(open_storage(settings))
    manifest = store.get(job.status.output.id)
    assert manifest.labels == {"selma.dev/run": "run-a", "selma.dev/skill": "counting", "team": "x"}
    recs = [json.loads(x) for x in store.read_bytes(manifest, "prompts.jsonl").decode().splitlines()]
    assert [r["id"] for r in recs] == [f"p{i:06d}" for i in range(12)]
    for r in recs:
        msg = json_format.ParseDict(r, pb.PromptRecord(), ignore_unknown_fields=True)
        assert len(msg.in_context_example_ids) == 3 and msg.nearest_prompt_id and msg.llm_request_index >= 1
    # Same key, same spec: the same job, not a new one.
    again = start(stub, "run-a/prompts/counting", count=12, run="run-a", seed=3, labels={"team": "x"})
    assert not again.created and again.job.status.job_id == job.status.job_id
    assert again.job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED
    # Same key, other spec: refused.
    with pytest.raises(grpc.RpcError) as e:
        start(stub, "run-a/prompts/counting", count=13, run="run-a")
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "idempotency_key" in e.value.details()
    got = stub.GetPromptGeneration(pb.GetPromptGenerationRequest(job_id=job.status.job_id)).job
    assert got.spec.count == 12 and got.stats.accepted == 12
    listed = stub.ListPromptGenerations(pb.ListPromptGenerationsRequest(filter=common_pb2.JobFilter(run="run-a", skill="counting"))).jobs
    assert [j.status.job_id for j in listed] == [job.status.job_id]
    assert not stub.ListPromptGenerations(pb.ListPromptGenerationsRequest(filter=common_pb2.JobFilter(run="other"))).jobs
    with pytest.raises(grpc.RpcError) as e:
        stub.GetPromptGeneration(pb.GetPromptGenerationRequest(job_id="prompt-generation-0000"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert 'selma_prompts_accepted_total{skill="counting"}' in metrics
    assert 'selma_prompts_llm_request_seconds_count{backend="openai_compatible"}' in metrics
    assert 'selma_prompts_filter_seconds_count{filter="rouge_l"}' in metrics


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"skill": pb.Skill(name="mine", rules=["r"], seed_examples=["a", "b"]), "count": 5}, "spec.skill.seed_examples"),
        ({"skill": pb.Skill(name="mine", rules=[], seed_examples=["a", "b", "c"]), "count": 5}, "spec.skill.rules"),
        ({"skill_name": "counting", "count": 5, "rouge_l_threshold": 1.01}, "spec.rouge_l_threshold"),
        ({"skill_name": "counting", "count": 5, "rouge_l_threshold": -0.5}, "spec.rouge_l_threshold"),
        ({"skill_name": "counting", "count": 0}, "spec.count"),
        ({"skill_name": "counting", "count": 501}, "spec.count"),
        ({"skill_name": "juggling", "count": 5}, "spec.skill_name"),
        ({"count": 5}, "spec.skill_name"),
        (
            {"skill_name": "counting", "count": 5, "backend": common_pb2.LlmBackend(local_causal_lm=common_pb2.LocalCausalLmBackend())},
            "spec.backend.local_causal_lm.model.source",
        ),
        (
            {"skill_name": "counting", "count": 5, "backend": common_pb2.LlmBackend(openai_compatible=common_pb2.OpenAiCompatibleBackend(base_url="localhost:1"))},
            "spec.backend.openai_compatible.base_url",
        ),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(stub, spec, field):
    with pytest.raises(grpc.RpcError) as e:
        stub.StartPromptGeneration(pb.StartPromptGenerationRequest(idempotency_key="k", spec=pb.PromptGenerationSpec(**spec)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()


def test_missing_idempotency_key_and_validate_only(stub):
    with pytest.raises(grpc.RpcError) as e:
        start(stub, "", count=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "idempotency_key" in e.value.details()
    resp = stub.StartPromptGeneration(
        pb.StartPromptGenerationRequest(idempotency_key="v", validate_only=True, spec=pb.PromptGenerationSpec(skill_name="whoops", count=40))
    )
    assert resp.job.status.job_id == "" and not resp.created
    assert resp.job.stats.skill.name == "commonsense_defying" and resp.job.stats.llm_request_budget == 30
    assert not stub.ListPromptGenerations(pb.ListPromptGenerationsRequest()).jobs


def test_list_skills_has_the_builtins_and_yaml_skills(stub):
    skills = stub.ListSkills(pb.ListSkillsRequest()).skills
    names = [s.name for s in skills]
    assert names == sorted(names)
    assert {"general", "paragraph", "real_user", "counting", "commonsense_defying", "spatial", "text_rendering"} <= set(names)
    assert all(len(s.seed_examples) >= 3 and s.rules for s in skills)


def test_preview_returns_accepted_and_rejected_and_stores_nothing(stub, settings):
    resp = stub.PreviewPrompts(pb.PreviewPromptsRequest(spec=pb.PromptGenerationSpec(skill_name="general", count=1000, prompts_per_request=10)))
    assert len(resp.accepted) == 8  # capped by the preview limit
    assert resp.stats.accepted == 8 and resp.stats.requested == 8
    assert all(r.id.startswith("p") and len(r.in_context_example_ids) == 3 for r in resp.accepted)
    assert all(r.reason == pb.PROMPT_REJECTION_REASON_ROUGE_L and r.score > 0.8 for r in resp.rejected)
    assert ArtifactStore(open_storage(settings)).list() == []


def test_cancel_keeps_prompts_and_a_restart_resumes(stub, llm):
    llm.gate = threading.Event()
    llm.gate_after = 2
    job = start(stub, "cancel-me", count=30).job
    assert llm.gate_reached.wait(20)
    cancelled = stub.CancelPromptGeneration(pb.CancelPromptGenerationRequest(job_id=job.status.job_id, reason="testing")).job
    assert cancelled.status.phase in (common_pb2.JOB_PHASE_CANCELLING, common_pb2.JOB_PHASE_CANCELLED)
    llm.gate.set()
    done = wait_done(stub, job.status.job_id)
    assert done.status.phase == common_pb2.JOB_PHASE_CANCELLED
    assert done.stats.stop_reason == pb.PROMPT_GENERATION_STOP_REASON_CANCELLED and done.stats.accepted >= 5
    llm.gate = None
    again = start(stub, "cancel-me", count=30)
    assert again.created and again.job.status.attempt == 2
    final = wait_done(stub, job.status.job_id)
    assert final.status.phase == common_pb2.JOB_PHASE_SUCCEEDED and final.stats.accepted == 30


def test_llm_failure_fails_the_job_unavailable_and_restart_resumes(stub, llm):
    llm.fail_next = []
    original = llm.responder
    calls = [0]

    def down_after_two(path, body):
        from selma_prompts.fake_llm import openai_answer, synthetic_list

        calls[0] += 1
        if calls[0] > 2:
            return 500, {"error": "down"}
        return 200, openai_answer(path, synthetic_list(body))

    llm.responder = down_after_two
    job = start(stub, "flaky", count=20).job
    failed = wait_done(stub, job.status.job_id)
    assert failed.status.phase == common_pb2.JOB_PHASE_FAILED
    assert failed.status.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "same idempotency key" in failed.status.error.message
    assert failed.stats.stop_reason == pb.PROMPT_GENERATION_STOP_REASON_LLM_FAILED
    assert failed.stats.accepted > 0 and failed.stats.llm_errors == 1 and failed.stats.llm_retries == 3
    kept = failed.stats.accepted
    llm.responder = original
    assert start(stub, "flaky", count=20).created
    final = wait_done(stub, job.status.job_id)
    assert final.status.phase == common_pb2.JOB_PHASE_SUCCEEDED and final.stats.accepted == 20 >= kept


def test_endless_near_duplicates_stop_at_the_budget(stub, llm):
    from selma_prompts.fake_llm import openai_answer

    llm.responder = lambda path, body: (200, openai_answer(path, "4. Three red apples on a white plate.\n5. Two children flying one kite in a grassy park."))
    job = start(stub, "parrot", count=10, max_llm_requests=5).job
    done = wait_done(stub, job.status.job_id)
    assert done.stats.stop_reason == pb.PROMPT_GENERATION_STOP_REASON_REQUEST_BUDGET_EXHAUSTED
    assert done.stats.llm_requests == 5 and done.stats.accepted == 0
    assert [(r.reason, r.count) for r in done.stats.rejections] == [(pb.PROMPT_REJECTION_REASON_ROUGE_L, 10)]
    assert done.status.phase == common_pb2.JOB_PHASE_FAILED
    assert done.status.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "no prompt was accepted in 5 LLM requests" in done.status.error.message
