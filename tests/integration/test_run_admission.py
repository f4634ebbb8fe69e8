"""`selma run` against a TrainingService that admits two jobs at a time: five experts' training stages
show "queued (position n)" and train two at a time, in the order they were started.

A real gRPC server on 127.0.0.1 serves the TrainingService's job RPCs over a JobManager whose job
function holds each expert until the test releases it; `selma run`'s RunDriver drives one training
stage per skill, as it does after each skill's render.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from selma.api import job_status, message_to_dict
from selma.app.runner import Reporter, RunDriver, RunState, stage_progress
from selma.app.skillset import load_skillset
from selma.client import SERVICE_NAMES, Endpoints, SelmaClient
from selma.config import SelmaSettings
from selma.job_kinds import JOB_KINDS
from selma.job_rpcs import JobRpcs
from selma.jobs import EXPERT_TRAINING_KIND, JobContext, JobManager, JobResult, OutputRef
from selma.server import SelmaServer, ServiceRegistration
from selma.storage import FileStorage
from selma.v1 import common_pb2
from selma.v1 import training_service_pb2 as training_pb
from selma.v1 import training_service_pb2_grpc as training_grpc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SKILLS = ["color", "count", "shape", "spatial", "texture"]
DEADLINE = 60.0


class TrainingOverJobs(training_grpc.TrainingServiceServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs
        JobRpcs(JOB_KINDS["training"], lambda rec: training_pb.ExpertTrainingJob(status=job_status(rec)), jobs, start=self._start,
                watch_interval=0.05).bind(self)

    def _start(self, request):
        return self.jobs.start(request.idempotency_key, message_to_dict(request.spec), run=request.spec.run, skill=request.spec.skill)


def until(what, message: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def test_selma_run_shows_queue_positions_and_trains_two_experts_at_a_time(tmp_path):
    gates = {s: threading.Event() for s in SKILLS}
    started: list[str] = []
    running: list[int] = [0, 0]  # now, most
    lock = threading.Lock()

    def train(ctx: JobContext) -> JobResult:
        with lock:
            started.append(ctx.skill)
            running[0] += 1
            running[1] = max(running)
        try:
            while not gates[ctx.skill].wait(0.01):
                ctx.check_cancelled()
            return JobResult(output=OutputRef(id=f"expert-{ctx.skill}", kind="expert"))
        finally:
            with lock:
                running[0] -= 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = JobManager(FileStorage(tmp_path / "store"), EXPERT_TRAINING_KIND, train, max_concurrent=8, max_admitted=2, persist_interval=0)
    settings = SelmaSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "store").as_uri(), grpc_port=port)
    server = SelmaServer(settings, [ServiceRegistration(name=SERVICE_NAMES["training"], servicer=TrainingOverJobs(jobs),
                                                        add_fn=training_grpc.add_TrainingServiceServicer_to_server)], name="training").start()
    server.set_ready(True)
    skillset = load_skillset(str(REPO / "examples" / "quickstart.yaml"))
    state = RunState.open(tmp_path / "runs", skillset)
    out = io.StringIO()
    results: dict[str, object] = {}
    threads: list[threading.Thread] = []
    try:
        with SelmaClient(Endpoints(training=f"127.0.0.1:{port}"), timeout=10) as client:
            driver = RunDriver(client, skillset, state, Reporter(Console(file=out, width=200), live=False), retry_seconds=0.2)

            def drive(skill: str) -> None:
                spec = training_pb.ExpertTrainingSpec(run=skillset.name, skill=skill, dataset=common_pb2.ArtifactRef(id=f"dataset-{skill}"))
                try:
                    results[skill] = driver.drive("training", skill, spec)
                except BaseException as e:  # noqa: BLE001 - handed to the test
                    results[skill] = e

            for n, skill in enumerate(SKILLS):  # one after the other, as their renders finish
                threads.append(threading.Thread(target=drive, args=(skill,), daemon=True))
                threads[-1].start()
                until(lambda n=n: len(jobs.list(page_size=10)[0]) == n + 1, f"{skill}'s training job was not started")
            for skill in SKILLS:
                until(lambda skill=skill: f"{skill} · training:" in out.getvalue(), f"no progress line for {skill}:\n{out.getvalue()}")
            lines = out.getvalue().splitlines()
            assert f"{SKILLS[2]} · training: queued (position 1)" in lines
            assert f"{SKILLS[4]} · training: queued (position 3)" in lines
            # `selma status` shows the same place
            until(lambda: stage_progress(state.stage(SKILLS[4], "training")) == "queued (position 3)", str(state.data))
            for n, skill in enumerate(SKILLS):
                gates[skill].set()
                until(lambda n=n: len(started) == min(n + 3, 5), f"no expert started after {skill} ended; started {started}")
            for t in threads:
                t.join(DEADLINE)
    finally:
        for gate in gates.values():
            gate.set()
        server.stop(0)
        jobs.shutdown()
    assert sorted(started[:2]) == SKILLS[:2] and started[2:] == SKILLS[2:] and running[1] == 2  # the first two: admitted together
    assert {s: results[s].status.phase for s in SKILLS} == dict.fromkeys(SKILLS, common_pb2.JOB_PHASE_SUCCEEDED)
    assert f"{SKILLS[4]} · training: succeeded" in out.getvalue().splitlines()
