"""A job whose store is lost under it (the bucket emptied and deleted) fails naming what vanished; it never hangs.

Real parts only: the moto S3 server of tests/conftest.py, the bucket removed with an ordinary S3
client (boto3) while the job runs, as an operator (or a lifecycle rule) would.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from rich.console import Console

from selma.api import job_status, message_to_dict
from selma.app.runner import Reporter, RunDriver, RunState
from selma.app.skillset import load_skillset
from selma.client import SERVICE_NAMES, Endpoints, SelmaClient
from selma.config import SelmaSettings
from selma.errors import RunFailed, SelmaError
from selma.job_kinds import JOB_KINDS
from selma.job_rpcs import JobRpcs
from selma.jobs import EXPERT_TRAINING_KIND, JobContext, JobManager, JobPhase, JobRecord, JobResult
from selma.server import SelmaServer, ServiceRegistration
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import training_service_pb2 as training_pb
from selma.v1 import training_service_pb2_grpc as training_grpc

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _remove_bucket(endpoint: str, bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=f"http://{endpoint}", aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def _terminal(mgr: JobManager, job_id: str, timeout: float = 60) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = mgr.get(job_id)
        if rec.phase.terminal:
            return rec
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} is still {mgr.get(job_id).phase} after {timeout} s: it hangs")


def test_a_bucket_deleted_under_a_running_job_fails_it_naming_the_store_and_a_restart_never_hangs_pending(
    s3_server: str, make_settings: Callable[..., SelmaSettings]
) -> None:
    bucket = f"selma-test-{uuid.uuid4().hex[:16]}"
    storage = open_storage(make_settings(storage_uri=f"s3://{bucket}/root", s3_endpoint=f"http://{s3_server}"))
    storage.put_bytes("datasets/d1/data.bin", b"training data")
    reading = threading.Event()
    go_on = threading.Event()

    def train(ctx: JobContext) -> JobResult:
        ctx.progress(0, 4, unit="steps")
        reading.set()
        go_on.wait(30)
        data = storage.get_bytes("datasets/d1/data.bin")  # the input the job was given
        ctx.progress(4, 4)
        return JobResult(stats={"bytes": len(data)})

    mgr = JobManager(storage, "expert_training", train, watchdog_seconds=5)
    mgr.recover()
    rec, _ = mgr.start("run/skill/training", {"dataset": "d1"})
    watched: list[JobRecord] = []
    watcher = threading.Thread(target=lambda: watched.extend(mgr.watch(rec.job_id, heartbeat=0.5)), daemon=True)
    watcher.start()
    assert reading.wait(30)

    _remove_bucket(s3_server, bucket)
    go_on.set()

    failed = _terminal(mgr, rec.job_id)
    assert failed.phase == JobPhase.FAILED
    assert failed.error.code == "FAILED_PRECONDITION"
    assert "lost its contents" in failed.message and bucket in failed.message and "store.marker" in failed.message
    watcher.join(30)
    assert not watcher.is_alive() and watched[-1].phase == JobPhase.FAILED  # the watcher was told, not left waiting

    # Starting it again (what a re-run `selma run` does) either fails at once naming the store, or
    # restarts a job that fails again naming it: never a job left PENDING with no worker.
    try:
        mgr.start("run/skill/training", {"dataset": "d1"})
    except SelmaError as e:
        assert bucket in str(e)
    again = _terminal(mgr, rec.job_id)
    assert again.phase == JobPhase.FAILED and (bucket in again.message or "lost its contents" in again.message)
    mgr.shutdown()


class TrainingOverJobs(training_grpc.TrainingServiceServicer):
    """The TrainingService's five job RPCs over a real JobManager (the generic JobRpcs, as the service binds them)."""

    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs
        JobRpcs(JOB_KINDS["training"], lambda rec: training_pb.ExpertTrainingJob(status=job_status(rec)), jobs, start=self._start).bind(self)

    def _start(self, request):
        return self.jobs.start(request.idempotency_key, message_to_dict(request.spec), run=request.spec.run, skill=request.spec.skill)


def test_selma_run_fails_clearly_when_the_store_vanishes_under_a_stage_and_again_on_a_rerun_instead_of_hanging(
    s3_server: str, make_settings: Callable[..., SelmaSettings], tmp_path
) -> None:
    bucket = f"selma-test-{uuid.uuid4().hex[:16]}"
    settings = make_settings(storage_uri=f"s3://{bucket}/root", s3_endpoint=f"http://{s3_server}")
    storage = open_storage(settings)
    storage.put_bytes("datasets/d1/data.bin", b"training data")
    reading, go_on = threading.Event(), threading.Event()

    def train(ctx: JobContext) -> JobResult:
        reading.set()
        go_on.wait(30)
        storage.get_bytes("datasets/d1/data.bin")
        return JobResult()

    jobs = JobManager(storage, EXPERT_TRAINING_KIND, train, watchdog_seconds=5)
    jobs.recover()
    server = SelmaServer(settings, [ServiceRegistration(name=SERVICE_NAMES["training"], servicer=TrainingOverJobs(jobs),
                                                        add_fn=training_grpc.add_TrainingServiceServicer_to_server)], name="training").start()
    server.set_ready(True)
    skillset = load_skillset(str(REPO / "examples" / "quickstart.yaml"))
    spec = training_pb.ExpertTrainingSpec(run=skillset.name, skill="counting", dataset=common_pb2.ArtifactRef(id="d1"))
    try:
        with SelmaClient(Endpoints(training=server.address), timeout=30) as client:
            state = RunState.open(tmp_path / "runs", skillset)
            reporter = Reporter(Console(file=io.StringIO()), live=False)
            failures: list[BaseException] = []

            def drive() -> None:
                try:
                    RunDriver(client, skillset, state, reporter, retry_seconds=0.1, max_outage=30).drive("training", "counting", spec)
                except BaseException as e:  # noqa: BLE001 - handed to the test
                    failures.append(e)

            first = threading.Thread(target=drive, daemon=True)
            first.start()
            assert reading.wait(30)
            _remove_bucket(s3_server, bucket)
            go_on.set()
            first.join(60)
            assert not first.is_alive(), "selma run hangs after the store vanished"
            assert isinstance(failures[0], RunFailed)
            assert "lost its contents" in str(failures[0]) and bucket in str(failures[0])

            again = threading.Thread(target=drive, daemon=True)  # the user runs `selma run` again: it must not sit on `pending`
            again.start()
            again.join(60)
            assert not again.is_alive(), "a re-run hangs on a job that can never start"
            assert isinstance(failures[1], RunFailed) and bucket in str(failures[1])
    finally:
        server.stop(0)
        jobs.shutdown()
