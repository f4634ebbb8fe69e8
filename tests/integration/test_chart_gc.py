"""The chart's garbage-collection CronJob (values block `gc:`): what it runs, against which
service, with which settings; off when disabled; refused without the ServingService."""

from __future__ import annotations

import pytest
from _chart_tools import RELEASE, by_kind, objects, pod_specs, render

pytestmark = pytest.mark.integration

FULLNAME = f"{RELEASE}-selma" if "selma" not in RELEASE else RELEASE


def test_gc_cronjob_calls_collect_garbage_on_the_serving_service() -> None:
    objs = objects(render())
    cron = by_kind(objs, "CronJob")[f"{FULLNAME}-gc"]
    assert cron["spec"]["schedule"] == "17 3 * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][:2] == ["artifacts", "gc"] and "--dry-run" not in container["args"]
    timeout = float(container["args"][container["args"].index("--timeout") + 1])
    assert timeout < job["activeDeadlineSeconds"], "the client gives up before Kubernetes kills it"
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    service = by_kind(objs, "Service")[f"{FULLNAME}-serving"]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert env["SELMA_ENDPOINTS"] == f"serving={FULLNAME}-serving:{port}"
    assert not any("S3" in name for name in env), "it talks gRPC only: no storage credentials"
    assert pod["automountServiceAccountToken"] is False
    config = by_kind(objs, "ConfigMap")
    serving_settings = [c["data"] for name, c in config.items() if c.get("data", {}).get("SELMA_SERVING_BASE_MODEL") is not None]
    assert serving_settings and serving_settings[0]["SELMA_SERVING_GC_GRACE_SECONDS"] == "3600"
    assert (f"CronJob/{FULLNAME}-gc", pod) in pod_specs(objs)


def test_gc_values_switch_dry_run_schedule_and_grace() -> None:
    objs = objects(render(values={"gc": {"dryRun": True, "schedule": "0 * * * *", "gracePeriodSeconds": 60, "timeZone": "Etc/UTC"}}))
    cron = by_kind(objs, "CronJob")[f"{FULLNAME}-gc"]
    assert cron["spec"]["schedule"] == "0 * * * *" and cron["spec"]["timeZone"] == "Etc/UTC"
    assert "--dry-run" in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
    grace = [c["data"]["SELMA_SERVING_GC_GRACE_SECONDS"] for c in by_kind(objs, "ConfigMap").values() if "SELMA_SERVING_GC_GRACE_SECONDS" in c.get("data", {})]
    assert grace == ["60"]
    assert f"{FULLNAME}-gc" not in by_kind(objects(render(values={"gc": {"enabled": False}})), "CronJob")


def test_gc_without_the_serving_service_is_refused() -> None:
    with pytest.raises(AssertionError) as e:  # render() raises with helm's output when helm fails
        render(values={"serving": {"enabled": False}})
    assert "gc.enabled needs serving.enabled" in str(e.value)
    assert "CronJob" not in render(values={"serving": {"enabled": False}, "gc": {"enabled": False}})
