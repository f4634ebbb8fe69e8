"""A running `selma run` goes on across a restart of a service on the same port (what `selma up`'s
supervisor does): its driver retries UNAVAILABLE, re-attaches to the job the restarted service
resumed from storage, and finishes the stage.

Real gRPC servers on 127.0.0.1 (the TrainingService's job RPCs over real JobManagers sharing one
file store); the first server goes away mid-stage, a second one takes its port.
"""

from __future__ import annotations

import io
import socket
import threading
from pathlib import Path

import pytest
from rich.console import Console

from selma.api import job_status, message_to_dict
from selma.app.runner import Reporter, RunDriver, RunState
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


class TrainingOverJobs(training_grpc.TrainingServiceServicer):
    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs
        JobRpcs(JOB_KINDS["training"], lambda rec: training_pb.ExpertTrainingJob(status=job_status(rec)), jobs, start=self._start).bind(self)

    def _start(self, request):
        return self.jobs.start(request.idempotency_key, message_to_dict(request.spec), run=request.spec.run, skill=request.spec.skill)


def _serve(jobs: JobManager, port: int, tmp_path: Path) -> SelmaServer:
    settings = SelmaSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "store").as_uri(), grpc_port=port)
    registration = ServiceRegistration(name=SERVICE_NAMES["training"], servicer=TrainingOverJobs(jobs),
                                       add_fn=training_grpc.add_TrainingServiceServicer_to_server)
    server = SelmaServer(settings, [registration], name="training").start()
    server.set_ready(True)
    return server


def test_a_running_stage_finishes_across_a_restart_of_its_service_on_the_same_port(tmp_path):
    storage = FileStorage(tmp_path / "store")
    running = threading.Event()

    def first_life(ctx: JobContext) -> JobResult:
        running.set()
        while True:  # until the service goes away (shutdown interrupts the job; it stays resumable)
            ctx.check_cancelled()
            threading.Event().wait(0.05)

    def second_life(ctx: JobContext) -> JobResult:
        return JobResult(output=OutputRef(id="expert-resumed", kind="expert"), message=f"resumed in attempt {ctx.attempt}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs1 = JobManager(storage, EXPERT_TRAINING_KIND, first_life)
    server1 = _serve(jobs1, port, tmp_path)
    skillset = load_skillset(str(REPO / "examples" / "quickstart.yaml"))
    spec = training_pb.ExpertTrainingSpec(run=skillset.name, skill="counting", dataset=common_pb2.ArtifactRef(id="d1"))
    out = io.StringIO()
    results: list[object] = []
    server2 = jobs2 = None
    try:
        with SelmaClient(Endpoints(training=f"127.0.0.1:{port}"), timeout=10) as client:
            driver = RunDriver(client, skillset, RunState.open(tmp_path / "runs", skillset), Reporter(Console(file=out, width=200), live=False),
                               retry_seconds=0.2, max_outage=120)

            def drive() -> None:
                try:
                    results.append(driver.drive("training", "counting", spec))
                except BaseException as e:  # noqa: BLE001 - handed to the test
                    results.append(e)

            t = threading.Thread(target=drive, daemon=True)
            t.start()
            assert running.wait(30)
            server1.stop(0)  # the service goes away mid-stage ...
            jobs1.shutdown(wait=True)
            jobs2 = JobManager(storage, EXPERT_TRAINING_KIND, second_life)
            jobs2.recover()  # ... and comes back on the same port, resuming its jobs from storage
            server2 = _serve(jobs2, port, tmp_path)
            t.join(120)
            assert not t.is_alive(), "selma run did not go on after the service came back"
    finally:
        driver.stop()
        for server in (server1, server2):
            if server is not None:
                server.stop(0)
        for jobs in (jobs1, jobs2):
            if jobs is not None:
                jobs.shutdown()
    job = results[0]
    assert not isinstance(job, BaseException), job
    assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED and job.status.output.id == "expert-resumed"
    assert "[paused]" in out.getvalue()  # it said it was waiting, and went on
