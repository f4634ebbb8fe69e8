"""A prompt-generation job survives its server being SIGKILLed mid-job: the restarted service resumes it
from storage, and the published prompt set equals an uninterrupted run's (nothing lost, nothing twice)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import _processes
import grpc
import pytest

from selma.artifacts import ArtifactStore
from selma.llm.local import ModelRegistry
from selma.server import wait_for_serving
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import prompt_service_pb2 as pb
from selma.v1 import prompt_service_pb2_grpc as pb_grpc
from selma_prompts.fake_llm import FakeLlmServer
from selma_prompts.job import PROMPTS_FILE, PromptJobRunner
from selma_prompts.server import SERVICE_NAME
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import SkillLibrary
from selma_prompts.state import StateStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SPEC = {"skill_name": "real_user", "count": 30, "prompts_per_request": 5, "seed": 11}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        _processes.stop_tree(proc, first=signal.SIGKILL)


def start_service(tmp_path: Path, llm_url: str, port: int, processes: list, name: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SELMA_HOST": "127.0.0.1",
        "SELMA_GRPC_PORT": str(port),
        "SELMA_METRICS_PORT": "0",
        "SELMA_DATA_DIR": str(tmp_path / "data"),
        "SELMA_STORAGE_URI": (tmp_path / "storage").as_uri(),
        "SELMA_LLM_DEFAULT_BACKEND": "openai_compatible",
        "SELMA_LLM_OPENAI_BASE_URL": llm_url,
        "SELMA_LLM_OPENAI_MODEL": "fake-model",
        "SELMA_LLM_MAX_CONCURRENCY": "1",
        "SELMA_PROMPTS_CHECKPOINT_SECONDS": "0",
        "SELMA_LLM_RETRY_BACKOFF_SECONDS": "0.01",
    }
    log = (tmp_path / f"{name}.log").open("wb")
    proc = _processes.popen([sys.executable, "-m", "selma.app.cli", "serve", "prompts"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    processes.append(proc)
    try:
        wait_for_serving(f"127.0.0.1:{port}", SERVICE_NAME, timeout=60)
    except TimeoutError:
        proc.kill()
        pytest.fail(f"{name} did not come up: {(tmp_path / f'{name}.log').read_text()[-3000:]}")
    return proc


def reference_records(tmp_path: Path) -> list[dict]:
    """The prompt set an uninterrupted job makes (the fake LLM answers as a function of the request)."""
    settings = PromptSettings(data_dir=tmp_path / "ref", llm_max_concurrency=1, llm_allow_any_base_url=True)
    runner = PromptJobRunner(settings, open_storage(settings), ModelRegistry(settings), SkillLibrary())
    with FakeLlmServer() as llm:
        spec = {**SPEC, "backend": {"openai_compatible": {"base_url": llm.base_url, "model": "fake-model"}}}
        out = runner.run("reference", spec, state_id="reference")
    return [json.loads(x) for x in runner.store.read_bytes(out.manifest, PROMPTS_FILE).decode().splitlines()]


def test_sigkilled_service_resumes_the_job_without_loss_or_duplicates(tmp_path, processes):
    want = reference_records(tmp_path)
    port = free_port()
    with FakeLlmServer() as llm:
        llm.gate, llm.gate_after = threading.Event(), 4
        proc = start_service(tmp_path, llm.base_url, port, processes, "first")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PromptServiceStub(channel)
            job = stub.StartPromptGeneration(
                pb.StartPromptGenerationRequest(idempotency_key="resume-me", spec=pb.PromptGenerationSpec(**SPEC))
            ).job
        assert llm.gate_reached.wait(60), "the job never reached its fifth LLM request"
        os.kill(proc.pid, signal.SIGKILL)  # mid-job, with request 5 in flight
        proc.wait(timeout=30)

        storage = open_storage(PromptSettings(storage_uri=(tmp_path / "storage").as_uri()))
        meta, saved = StateStore(storage, job.status.job_id).load()
        assert saved.next_request == 5 and 0 < len(saved.records) < SPEC["count"]

        llm.gate = None
        llm.gate_reached.clear()
        proc = start_service(tmp_path, llm.base_url, port, processes, "second")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.PromptServiceStub(channel)
            again = stub.StartPromptGeneration(
                pb.StartPromptGenerationRequest(idempotency_key="resume-me", spec=pb.PromptGenerationSpec(**SPEC))
            )
            assert not again.created and again.job.status.job_id == job.status.job_id
            last = None
            for update in stub.WatchPromptGeneration(pb.WatchPromptGenerationRequest(job_id=job.status.job_id), timeout=120):
                last = update.job
        assert last.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, last.status.message
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)

    store = ArtifactStore(storage)
    got = [json.loads(x) for x in store.read_bytes(last.status.output.id, PROMPTS_FILE).decode().splitlines()]
    assert got[: len(saved.records)] == saved.records  # nothing saved was lost or changed
    assert len({r["text"] for r in got}) == len(got) == SPEC["count"]  # nothing twice
    assert got == want  # exactly the uninterrupted result
    assert StateStore(storage, job.status.job_id).load() is None  # state dropped once published
