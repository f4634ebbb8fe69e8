"""The prompt loop against a scripted OpenAI-compatible HTTP server on 127.0.0.1.

Checks what goes over the wire (bodies, credentials), retries and backoff, failure as
UNAVAILABLE with accepted prompts kept, resume after such a failure, and the concurrency limit.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import pytest

from selma.errors import InvalidArgument, PermissionDenied
from selma.llm.backend import LlmUnavailable
from selma.llm.local import ModelRegistry
from selma.storage import open_storage
from selma_prompts.fake_llm import FakeLlmServer, openai_answer, synthetic_list
from selma_prompts.job import PROMPTS_FILE, PromptJobRunner
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import SkillLibrary

pytestmark = pytest.mark.integration
API_KEY = "sk-test-should-never-be-logged"


@pytest.fixture
def settings(tmp_path: Path, llm: FakeLlmServer) -> PromptSettings:
    return PromptSettings(
        data_dir=tmp_path / "data",
        storage_uri=(tmp_path / "storage").as_uri(),
        llm_retry_backoff_seconds=0.001,
        llm_retry_max_backoff_seconds=0.01,
        prompts_checkpoint_seconds=0,
        llm_api_keys={"llm": API_KEY},
        llm_allowed_base_urls=[llm.base_url],
    )


def runner(settings: PromptSettings) -> PromptJobRunner:
    return PromptJobRunner(settings, open_storage(settings), ModelRegistry(settings), SkillLibrary())


def spec(llm: FakeLlmServer, api: str = "chat", **fields) -> dict:
    backend = {
        "base_url": llm.base_url,
        "model": "fake-model",
        "api": {"chat": "OPEN_AI_API_CHAT_COMPLETIONS", "completions": "OPEN_AI_API_COMPLETIONS"}[api],
        "api_key": {"name": "llm"},
        "max_concurrency": 1,
        "sampling": {"temperature": 0.7, "max_tokens": 300},
    }
    backend.update(fields.pop("backend", {}))
    return {"skill_name": "counting", "count": 20, "prompts_per_request": 5, "seed": 7, "backend": {"openai_compatible": backend}, **fields}


def records(r: PromptJobRunner, manifest) -> list[dict]:
    return [json.loads(line) for line in r.store.read_bytes(manifest, PROMPTS_FILE).decode().splitlines()]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_loop_sends_rules_and_three_pool_examples_and_publishes_lineage(llm, settings, api, caplog):
    caplog.set_level(logging.DEBUG)
    r = runner(settings)
    out = r.run("key-" + api, spec(llm, api, run="run-1"), state_id="job-" + api)
    recs = records(r, out.manifest)
    assert len(recs) == 20 and out.stats["stop_reason"] == "target_reached"
    rules = r.library.get("counting").rules
    pool = {f"seed-{i}": t for i, t in enumerate(r.library.get("counting").seed_examples)}
    accepted_at = {}
    for rec in recs:
        accepted_at.setdefault(rec["llm_request_index"], []).append(rec)
    assert len(llm.requests) == out.stats["llm_requests"]
    for i, body in enumerate(llm.requests, 1):
        assert body["model"] == "fake-model" and body["temperature"] == 0.7 and body["max_tokens"] == 300 and body["n"] == 1
        text = body["prompt"] if api == "completions" else body["messages"][1]["content"]
        if api == "completions":
            assert "messages" not in body and text.endswith("\n4.")
        else:
            assert "prompt" not in body and body["messages"][0]["role"] == "system"
        assert all(rule in text for rule in rules)
        examples = re.findall(r"^(\d)\. (.+)$", text.split("written this way:")[1], flags=re.M)
        assert [n for n, _ in examples] == ["1", "2", "3"]
        assert {t for _, t in examples} <= set(pool.values())  # drawn from the pool as it stood
        for rec in accepted_at.get(i, []):
            assert {pool[x] for x in rec["in_context_example_ids"]} == {t for _, t in examples}
            pool[rec["id"]] = rec["text"]
    assert any(not x.startswith("seed-") for rec in recs for x in rec["in_context_example_ids"])
    for rec in recs:
        assert set(rec) >= {"id", "index", "text", "skill", "in_context_example_ids", "nearest_prompt_id", "nearest_rouge_l", "llm_request_index", "backend_model"}
        assert rec["backend_model"] == "openai_compatible:fake-model"
    assert out.manifest.labels == {"selma.dev/run": "run-1", "selma.dev/skill": "counting"}
    assert {k: out.manifest.parameters[k] for k in ("skill", "count", "threshold", "backend", "model", "seed")} == {
        "skill": "counting", "count": 20, "threshold": 0.8, "backend": "openai_compatible", "model": "fake-model", "seed": 7
    }
    # The credential went in the header only, and never into a log line.
    assert all(h.get("Authorization") == f"Bearer {API_KEY}" for h in llm.headers)
    assert API_KEY not in json.dumps(llm.requests)
    assert API_KEY not in caplog.text


def test_transient_errors_are_retried_with_backoff(llm, settings):
    llm.fail_next = [(500, {"error": "boom"}), (429, {"error": "slow down"}), (200, b"not json at all")]
    r = runner(settings)
    out = r.run("k", spec(llm, count=5), state_id="j")
    assert out.stats["llm_retries"] == 3 and out.stats["llm_errors"] == 0
    assert len(records(r, out.manifest)) == 5


def test_llm_down_fails_unavailable_keeps_prompts_and_resumes(llm, settings):
    reference = runner(settings).run("reference", spec(llm, count=25), state_id="ref")
    ref_records = records(runner(settings), reference.manifest)
    llm.requests.clear()

    # Three good answers, then the endpoint breaks for good.
    r = runner(settings)
    original = llm.responder

    def flaky(path, body):
        if len(llm.requests) > 3:
            return 503, {"error": "down"}
        return 200, openai_answer(path, synthetic_list(body))

    llm.responder = flaky
    with pytest.raises(LlmUnavailable) as e:
        r.run("key", spec(llm, count=25), state_id="job")
    assert e.value.code.value == "UNAVAILABLE"
    assert "failed request 4 4 time(s)" in str(e.value) and "same idempotency key" in str(e.value)
    loaded = r_state(settings, "job")
    assert loaded.stop_reason == "llm_failed" and len(loaded.records) > 0 and loaded.llm_errors == 1
    kept = [rec["text"] for rec in loaded.records]

    llm.responder = original
    out = runner(settings).run("key", spec(llm, count=25), state_id="job")
    final = records(runner(settings), out.manifest)
    assert [x["text"] for x in final[: len(kept)]] == kept
    assert final == ref_records  # same as never having failed: nothing lost, nothing twice
    assert len({x["text"] for x in final}) == 25


def r_state(settings, job_id):
    from selma_prompts.state import StateStore

    return StateStore(open_storage(settings), job_id).load()[1]


def test_garbage_forever_is_unavailable(llm, settings):
    llm.responder = lambda path, body: (200, {"choices": []})
    with pytest.raises(LlmUnavailable) as e:
        runner(settings).run("k", spec(llm, backend={"max_retries": 2}), state_id="j")
    assert "3 time(s)" in str(e.value) and "unusable response body" in str(e.value)
    assert len(llm.requests) == 3


def test_refused_credentials_and_bad_requests_are_not_retried(llm, settings):
    llm.responder = lambda path, body: (401, {"error": "bad key"})
    with pytest.raises(PermissionDenied) as e:
        runner(settings).run("k1", spec(llm), state_id="j1")
    assert API_KEY not in str(e.value) and len(llm.requests) == 1
    llm.responder = lambda path, body: (404, {"error": {"message": "model fake-model does not exist"}})
    with pytest.raises(InvalidArgument) as e:
        runner(settings).run("k2", spec(llm), state_id="j2")
    assert "does not exist" in str(e.value) and len(llm.requests) == 2


def test_unreachable_endpoint_is_unavailable(settings):
    with FakeLlmServer() as gone:
        url = gone.base_url
    settings = settings.model_copy(update={"llm_allowed_base_urls": [*settings.llm_allowed_base_urls, url]})
    s = {"skill_name": "general", "count": 3, "backend": {"openai_compatible": {"base_url": url, "model": "m", "max_retries": 1}}}
    with pytest.raises(LlmUnavailable, match="cannot reach the endpoint"):
        runner(settings).run("k", s, state_id="j")


def test_requests_run_concurrently_up_to_the_limit(llm, settings):
    barrier = threading.Barrier(3, timeout=10)
    in_flight = [0, 0]
    lock = threading.Lock()

    def meet(path, body):
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            barrier.wait()  # only passes when 3 requests are in flight together
        finally:
            with lock:
                in_flight[0] -= 1
        return 200, openai_answer(path, synthetic_list(body))

    llm.responder = meet
    out = runner(settings).run("k", spec(llm, count=30, backend={"max_concurrency": 3}), state_id="j")
    assert out.stats["accepted"] == 30
    assert in_flight[1] == 3 and len(llm.requests) % 3 == 0


def test_configured_key_is_never_sent_to_an_endpoint_the_caller_picks(llm, settings):
    from selma.errors import PermissionDenied
    from selma.llm.specs import resolve_backend

    other = {"openai_compatible": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": {"name": "llm"}}}
    with pytest.raises(PermissionDenied, match="SELMA_LLM_ALLOWED_BASE_URLS"):
        resolve_backend(other, settings)
    keyless = {"openai_compatible": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}
    # By default a caller cannot make the service call an address of its choosing at all (SSRF), key or not.
    with pytest.raises(PermissionDenied, match="only calls configured LLM endpoints") as e:
        resolve_backend(keyless, settings)
    assert e.value.field == "spec.backend.openai_compatible.base_url"
    # A single-user install may open it up; a configured key still never goes to the caller's endpoint.
    open_settings = settings.model_copy(update={"llm_allow_any_base_url": True})
    assert resolve_backend(keyless, open_settings).base_url == "http://127.0.0.1:9/v1"
    with pytest.raises(PermissionDenied, match="SELMA_LLM_ALLOWED_BASE_URLS"):
        resolve_backend(other, open_settings)
    allowed = {"openai_compatible": {"base_url": llm.base_url, "model": "m", "api_key": {"name": "llm"}}}
    assert resolve_backend(allowed, settings).api_key_name == "llm"
