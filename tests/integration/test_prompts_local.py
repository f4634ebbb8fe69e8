"""Local transformers backends, on the offline tiny LM (its text is gibberish: this checks plumbing),
and the `selma prompts` CLI against the scripted HTTP LLM."""

from __future__ import annotations

import json

import grpc
import pytest

from selma.app.cli import main as selma_main
from selma.llm.local import ModelRegistry
from selma.llm.specs import resolve_backend
from selma.server import wait_for_serving
from selma.v1 import common_pb2
from selma.v1 import prompt_service_pb2 as pb
from selma.v1 import prompt_service_pb2_grpc as pb_grpc
from selma_prompts.fake_llm import FakeLlmServer
from selma_prompts.server import SERVICE_NAME, build_server
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import BUILTIN_SKILLS
from selma_prompts.templates import build_request

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_local_backend_renders_chat_template_prefilled_and_fits_a_short_context(tiny_models, tmp_path):
    settings = PromptSettings(data_dir=tmp_path, llm_local_batch_size=3)
    spec = resolve_backend({"local_causal_lm": {"model": {"source": str(tiny_models.lm)}, "sampling": {"max_tokens": 24}}}, settings)
    backend = ModelRegistry(settings).backend(spec)
    skill = BUILTIN_SKILLS["paragraph"]
    reqs = [build_request(i, 100 + i, skill, ["seed-0", "seed-1", "seed-2"], list(skill.seed_examples), 20) for i in (1, 2, 3)]
    rendered = backend.render(reqs[0])
    assert backend.use_chat_template and rendered.endswith("<|im_start|>assistant\n4.")
    out = backend.generate(reqs)
    again = backend.generate(reqs)
    assert [o.text for o in out] == [o.text for o in again]  # seeded
    assert len(out) == 3 and all(o.starts_mid_item and 0 < o.completion_tokens <= 24 for o in out)
    # A prompt longer than the model's context (1024 positions) is cut on the left, keeping the list's end.
    long_examples = [" ".join(["a lighthouse on a rocky cliff at sunset"] * 60)] * 3
    (cut,) = backend.generate([build_request(9, 9, skill, ["a", "b", "c"], long_examples, 20)])
    assert cut.prompt_tokens == 1024 - 24 and cut.completion_tokens > 0


def test_preview_on_the_tiny_lm_over_grpc(tiny_models, tmp_path):
    settings = PromptSettings(data_dir=tmp_path / "d", storage_uri=(tmp_path / "s").as_uri(), llm_default_backend="tiny_test",
                              model_allowed_dirs=str(tiny_models.lm.parent))  # the request names the tiny LM by path
    server = build_server(settings).start()
    server.set_ready(True)
    try:
        wait_for_serving(server.address, SERVICE_NAME, timeout=10)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.PromptServiceStub(channel)
            spec = pb.PromptGenerationSpec(
                skill_name="general",
                count=5,
                max_llm_requests=3,
                backend=common_pb2.LlmBackend(local_causal_lm=common_pb2.LocalCausalLmBackend(
                        model=common_pb2.ModelRef(source=str(tiny_models.lm)), sampling=common_pb2.SamplingParams(max_tokens=32)
                    )),
            )
            resp = stub.PreviewPrompts(pb.PreviewPromptsRequest(spec=spec))
    finally:
        server.stop(0)
    assert resp.stats.llm_requests == 3 and resp.stats.stop_reason == pb.PROMPT_GENERATION_STOP_REASON_REQUEST_BUDGET_EXHAUSTED
    assert resp.stats.backend_model == f"local_causal_lm:{tiny_models.lm}"
    assert resp.stats.accepted + resp.stats.rejected >= 1 and resp.stats.completion_tokens > 0


def test_cli_generates_in_memory_and_as_a_resumable_published_job(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELMA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SELMA_STORAGE_URI", (tmp_path / "storage").as_uri())
    with FakeLlmServer() as llm:
        common = ["prompts", "generate", "--skill", "whoops", "--count", "7", "--backend", "openai", "--base-url", llm.base_url,
                  "--model", "fake", "--api", "completions", "--prompts-per-request", "4", "--seed", "3"]
        assert selma_main([*common, "--out", str(tmp_path / "a.jsonl")]) == 0
        in_memory = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
        assert len(in_memory) == 7 and in_memory[0]["skill"] == "commonsense_defying"
        capsys.readouterr()
        assert selma_main([*common, "--key", "cli/whoops", "--run", "cli", "--out", str(tmp_path / "b.jsonl")]) == 0
        artifact_id = capsys.readouterr().out.strip().splitlines()[-1]
        assert artifact_id.startswith("prompt-set-")
        assert [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()] == in_memory
        # Running the same job again finds it published.
        assert selma_main([*common, "--key", "cli/whoops", "--run", "cli"]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == artifact_id
    assert selma_main(["prompts", "generate", "--skill", "nope", "--count", "1", "--backend", "tiny"]) == 2
    assert "spec.skill_name" in capsys.readouterr().err
