"""A job whose store is lost under it (the bucket emptied and deleted) fails naming what vanished; it never hangs.

Real parts only: the moto S3 server of tests/conftest.py, the bucket removed with an ordinary S3
client (boto3) while the job runs, as an operator (or a lifecycle rule) would.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import boto3
import pytest

from selma.config import SelmaSettings
from selma.errors import SelmaError
from selma.jobs import JobContext, JobManager, JobPhase, JobRecord, JobResult
from selma.storage import open_storage

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
