"""A whole SELMA run through the four gRPC services (`selma up` processes) on the tiny models.

The LLM is the scripted OpenAI-compatible server (deterministic numbered lists), so the
prompt stage exercises the real HTTP backend without SmolLM2's load time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _processes
import pytest
from PIL import Image

from selma.app.local_stack import LocalStack
from selma.app.runner import Reporter, RunDriver, RunState
from selma.app.skillset import parse_skillset
from selma.client import Endpoints, SelmaClient
from selma.v1 import common_pb2, serving_service_pb2

pytestmark = pytest.mark.slow

SELMA = str(Path(sys.executable).parent / "selma")


def skillset_text(name: str, llm_url: str, *, steps: int = 6, launcher: str = "local", evaluation: bool = False) -> str:
    # The run ends with an evaluation stage: base vs the merged model on two DSG-1k prompts.
    eval_section = (
        "  evaluation: {benchmark: EVALUATION_BENCHMARK_DSG_1K, categories: [countbench], maxPrompts: 2,"
        " diffusion: {steps: 2, width: 64, height: 64}, vqa: {tinyTest: {seed: 1}}}\n"
    ) if evaluation else ""
    text = textwrap.dedent(
        f"""\
        apiVersion: selma.dev/v1alpha1
        kind: SkillSet
        metadata: {{name: {name}}}
        spec:
          skills:
            - {{name: counting, count: 4}}
            - {{name: general, count: 4}}
          prompts:
            backend: {{openaiCompatible: {{baseUrl: "{llm_url}", model: scripted, api: completions}}}}
            promptsPerRequest: 5
          render:
            diffusion: {{scheduler: ddim, steps: 2, width: 64, height: 64}}
            batchSize: 3
          training:
            config: {{baseModel: {{source: "tiny://sd"}}, preset: tiny, maxSteps: {steps}, checkpointEvery: 2, lora: {{rank: 4, alpha: 4}}}}
            placement: {{launcher: {launcher}}}
          merge: {{method: mean_delta, modelName: {name}}}
        """
    )
    return text + eval_section


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    stack = LocalStack(root)
    try:
        endpoints = stack.start(timeout=300)
        for sp in stack.processes.values():  # checked at the end of the run (LocalStack.stop stops them)
            _processes.track(sp.proc.pid, f"local stack service {sp.name}")
        yield stack, endpoints
    finally:
        stack.stop()


def _drive(endpoints: Endpoints, text: str, state_dir: Path) -> dict:
    ss = parse_skillset(text, source="e2e.yaml")
    from rich.console import Console

    with SelmaClient(endpoints) as client, Reporter(Console(), live=False) as reporter:
        state = RunState.open(state_dir / "runs", ss)
        return RunDriver(client, ss, state, reporter).run()


def test_skillset_produces_registered_merged_model_with_full_lineage(stack, llm, tmp_path):
    _, endpoints = stack
    result = _drive(endpoints, skillset_text("e2e-basic", llm.base_url, evaluation=True), tmp_path)
    assert set(result["experts"]) == {"counting", "general"}
    # the evaluation stage rendered through serving (base and the registered merged model) and published a report
    assert result["eval_report"].startswith("eval-report-")
    assert set(result["scores"]) == {"base/dsg", "e2e-basic/dsg"}
    with SelmaClient(endpoints) as client:
        models = client.stub("serving").ListModels(serving_service_pb2.ListModelsRequest(), timeout=30).models
        assert "e2e-basic" in {m.model_name for m in models}
        chain = client.lineage(result["merged_model"])
    kinds = [m.kind for m in chain]
    assert kinds[0] == common_pb2.ARTIFACT_KIND_MERGED_MODEL
    assert kinds.count(common_pb2.ARTIFACT_KIND_EXPERT) == 2
    assert kinds.count(common_pb2.ARTIFACT_KIND_IMAGE_DATASET) == 2
    prompt_sets = [m for m in chain if m.kind == common_pb2.ARTIFACT_KIND_PROMPT_SET]
    assert {m.skill for m in prompt_sets} == {"counting", "general"}

    out = tmp_path / "out.png"
    env = {**os.environ, "SELMA_ENDPOINTS": ",".join(f"{n}={getattr(endpoints, n)}" for n in ("prompts", "render", "training", "serving"))}
    proc = _processes.run([SELMA, "generate", "two red apples", "--model", "e2e-basic", "--steps", "2", "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)

    # Re-running the finished run redoes nothing: every stage attaches to its finished job.
    again = _drive(endpoints, skillset_text("e2e-basic", llm.base_url, evaluation=True), tmp_path)
    assert again == result


def test_a_gated_skillset_trains_on_the_kept_images_with_the_candidates_in_lineage(stack, llm, tmp_path):
    # threshold 0: every candidate passes whatever the tiny VQA model answers, so round 1 keeps every prompt and the rounds stop
    gate = ("  gate: {vqa: {tinyTest: {seed: 3}}, questionSource: generated, threshold: 0.0, candidatesPerPrompt: 2,\n"
            f"         questionBackend: {{openaiCompatible: {{baseUrl: \"{llm.base_url}\", model: scripted, api: completions}}}}}}\n")
    _, endpoints = stack
    result = _drive(endpoints, skillset_text("e2e-gated", llm.base_url) + gate, tmp_path)
    assert set(result["gate"]) == {"counting", "general"}
    for g in result["gate"].values():
        assert (g["round"], g["candidates"], g["kept"], g["prompts_kept"], g["pass_rate_percent"]) == (0, g["prompts_total"], g["prompts_total"],
                                                                                                      g["prompts_total"], 100.0)
    with SelmaClient(endpoints) as client:
        chain = client.lineage(result["merged_model"])
    datasets = [m for m in chain if m.kind == common_pb2.ARTIFACT_KIND_IMAGE_DATASET]
    kept = {m.id for m in datasets if m.id in {g["dataset"] for g in result["gate"].values()}}
    assert len(kept) == 2 and len(datasets) == 4  # per skill: the kept dataset and its one candidate round
    experts = [m for m in chain if m.kind == common_pb2.ARTIFACT_KIND_EXPERT]
    assert {p for e in experts for p in e.parent_ids} & kept == kept  # each expert trained on its skill's kept images
    for m in datasets:
        if m.id in kept:
            assert len(m.parent_ids) == 1 and m.parent_ids[0] in {d.id for d in datasets} - kept


@pytest.mark.timeout(900)  # up to 300 s to the kill, then a rerun limited to 500 s
def test_killed_run_resumes_without_duplicate_work(stack, llm, tmp_path):
    _, endpoints = stack
    skillset = tmp_path / "resume.yaml"
    skillset.write_text(skillset_text("e2e-resume", llm.base_url, steps=30))
    env = {**os.environ, "SELMA_ENDPOINTS": ",".join(f"{n}={getattr(endpoints, n)}" for n in ("prompts", "render", "training", "serving"))}
    cmd = [SELMA, "run", str(skillset), "--dir", str(tmp_path), "--plain"]
    proc = _processes.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    state_file = tmp_path / "runs" / "e2e-resume.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if state_file.exists():
                stages = json.loads(state_file.read_text())["stages"]
                if any(s["stage"] == "training" and s.get("phase") == "running" for s in stages.values()):
                    break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        else:
            pytest.fail("training never started")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _processes.stop_tree(proc, first=signal.SIGKILL)
    # The lock of the killed run is stale (its pid is gone): the second run takes it over.
    second = _processes.run(cmd, capture_output=True, text=True, env=env, timeout=500)
    assert second.returncode == 0, second.stdout + second.stderr

    with SelmaClient(endpoints) as client:
        for kind in ("prompts", "render", "training"):
            jobs = client.jobs(kind).list(run="e2e-resume")
            skills = [j.spec.skill_name if kind == "prompts" else j.spec.skill for j in jobs]
            assert sorted(skills) == ["counting", "general"], kind
            assert all(j.status.attempt == 1 for j in jobs), kind
        renders = client.jobs("render").list(run="e2e-resume")
        assert all(j.stats.images_done == j.stats.images_total == 4 for j in renders)
        assert len(client.jobs("merge").list(run="e2e-resume")) == 1


def test_second_concurrent_run_of_the_same_name_is_refused(tmp_path):
    from selma.app.runner import RunLock
    from selma.errors import Aborted

    with RunLock(tmp_path / "runs" / "x.lock"):
        with pytest.raises(Aborted, match="already being driven"):
            with RunLock(tmp_path / "runs" / "x.lock"):
                pass


def test_service_down_mid_run_pauses_and_resumes_when_it_is_back(stack, llm, tmp_path):
    import threading

    local, endpoints = stack
    render = local.processes["render"]
    render.proc.send_signal(signal.SIGTERM)  # the render service goes away before the run needs it
    assert render.proc.wait(timeout=60) == 0
    result: dict = {}
    errors: list = []

    def drive() -> None:
        try:
            result.update(_drive(endpoints, skillset_text("e2e-pause", llm.base_url), tmp_path))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=drive, daemon=True)
    t.start()
    state_file = tmp_path / "runs" / "e2e-pause.json"
    deadline = time.monotonic() + 180
    paused = None
    while time.monotonic() < deadline and paused is None:
        if state_file.exists():
            data = json.loads(state_file.read_text())
            if data.get("phase") == "paused":
                paused = data["message"]
        time.sleep(0.05)
    assert paused and "render" in paused and "unavailable" in paused
    assert t.is_alive() and not errors
    local.restart("render")
    t.join(timeout=300)
    assert not errors, errors
    assert result["model_name"] == "e2e-pause"
    with SelmaClient(endpoints) as client:
        renders = client.jobs("render").list(run="e2e-pause")
    assert len(renders) == 2 and all(j.status.attempt == 1 for j in renders)


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory):
    """The same stack as `selma up --tls` starts it: TLS with a local CA, bearer tokens, services with their own token."""
    root = tmp_path_factory.mktemp("tls-stack")
    stack = LocalStack(root, tls=True)
    try:
        endpoints = stack.start(timeout=300)
        for sp in stack.processes.values():
            _processes.track(sp.proc.pid, f"local TLS stack service {sp.name}")
        yield stack, endpoints
    finally:
        stack.stop()


def test_a_skillset_runs_end_to_end_on_the_tls_stack_with_tokens(tls_stack, llm, tmp_path):
    from dataclasses import replace

    import grpc

    stack, endpoints = tls_stack
    assert endpoints.ca_cert and endpoints.token_file  # what the run driver's client finds in the endpoints file
    result = _drive(endpoints, skillset_text("e2e-tls", llm.base_url, evaluation=True), tmp_path)
    assert set(result["experts"]) == {"counting", "general"}
    assert result["eval_report"].startswith("eval-report-")  # the evaluation worker rendered through serving with its token
    # anonymous (the CA but no token) and plaintext clients are refused
    with SelmaClient(replace(endpoints, token_file="")) as anonymous:
        with pytest.raises(grpc.RpcError) as e:
            anonymous.stub("serving").ListModels(serving_service_pb2.ListModelsRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with SelmaClient(replace(endpoints, ca_cert="")) as plaintext:  # the admin token, but no TLS
        with pytest.raises(grpc.RpcError) as e:
            plaintext.stub("serving").ListModels(serving_service_pb2.ListModelsRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # the CLI in a clean environment: the CA and admin token through the stack's directory
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
    out = tmp_path / "out.png"
    proc = _processes.run([SELMA, "generate", "two red apples", "--model", "e2e-tls", "--dir", str(stack.data_dir), "--steps", "2",
                           "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
