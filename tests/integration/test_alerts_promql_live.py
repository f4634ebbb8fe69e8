"""Alerts and dashboards against real Prometheus: promtool checks and unit-tests the rules, and a
Prometheus on 127.0.0.1 scrapes four live selma gRPC servers (built with SelmaServer, with each
service's real server module imported, so their metrics are registered exactly as in the pods).
Every dashboard and rule expression must parse, use only metric names the servers export, and the
core panels must return data.
"""

from __future__ import annotations

import importlib
import json
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _processes
import grpc
import pytest
import yaml
from _chart_tools import CHART, COMPONENTS, GRPC_SERVICES, MANIFESTS, NAMESPACE, prometheus, promtool
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration

RULES = MANIFESTS / "prometheus" / "selma-alerts.yaml"
RULE_TESTS = MANIFESTS / "prometheus" / "selma-alerts.test.yaml"
DASHBOARDS = sorted((CHART / "files" / "dashboards").glob("*.json"))
# Grafana variables, replaced the way Grafana would before the query reaches Prometheus.
GRAFANA_VARS = {"$namespace": NAMESPACE, "$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
PROMETHEUS_METRICS = {"up"}


def _rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(f"rule {r['alert']}", r["expr"]) for g in groups for r in g["rules"]]


def _dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                expr = t["expr"]
                for var, value in GRAFANA_VARS.items():
                    expr = expr.replace(var, value)
                assert "$" not in expr, f"{path.name} / {p['title']}: unknown variable in {t['expr']}"
                out.append((f"{d['uid']} / {p['title']} / {t['refId']}", expr))
    return out


# --- promtool --------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    alerts = {name.removeprefix("rule ") for name, _ in _rule_exprs()}
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
    assert alerts - fires == set(), f"alerts never tested firing: {sorted(alerts - fires)}"
    assert alerts - silent == set(), f"alerts never tested not firing: {sorted(alerts - silent)}"
    required = {"SelmaServiceDown", "SelmaTrainingJobFailed", "SelmaTrainingStalled", "SelmaRenderSlow", "SelmaServingLatencyHigh",
                "SelmaStorageErrors", "SelmaStoragePermissionDenied"}
    assert required <= alerts


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check is real: a PromQL typo fails it."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(RULES.read_text().replace("sum by (namespace, job)", "sum by (namespace, job", 1))
    proc = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


# --- a live stack scraped by a real Prometheus ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loopback only: never through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any] | str]:
    """(HTTP status, JSON body or text); status 0 while nothing listens yet."""
    try:
        with _OPENER.open(url, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(), e.code
    except urllib.error.URLError as e:
        return 0, str(e.reason)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def _wait(predicate, timeout: float, what: str, step: float = 0.2):  # noqa: ANN001
    """Poll a condition that another process makes true (Prometheus scrapes on its own clock)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


@pytest.fixture(scope="module")
def selma_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Four selma gRPC servers on 127.0.0.1 with their metrics endpoints, one finished job and one
    failed storage call (so selma_storage_errors_total has a series, as after any outage)."""
    from selma.config import SelmaSettings
    from selma.errors import Unavailable
    from selma.jobs import JobManager, JobResult
    from selma.server import SelmaServer, ServiceRegistration
    from selma.storage import open_storage

    for component in COMPONENTS:
        # The real server module: it imports the service's metrics exactly as `selma serve` does.
        importlib.import_module(f"selma_{component}.server")
    importlib.import_module("selma_evaluation.server")  # hosted in the training process (`selma serve training`)
    tmp = tmp_path_factory.mktemp("stack")
    settings = SelmaSettings(host="127.0.0.1", grpc_port=0, metrics_port=0, data_dir=tmp / "data", storage_uri=(tmp / "storage").as_uri(), drain_seconds=0)
    servers = {c: SelmaServer(settings, [ServiceRegistration(name=GRPC_SERVICES[c])], name=c).start() for c in COMPONENTS}
    jobs = JobManager(open_storage(settings), "metrics_check", lambda ctx: JobResult(message="done"), max_concurrent=1)
    try:
        for s in servers.values():
            s.set_ready(True)
        # Real RPCs through the metrics interceptor, and one real job through the JobManager.
        for s in servers.values():
            with grpc.insecure_channel(s.address) as ch:
                for _ in range(3):
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        record, _ = jobs.start("metrics-check", {"n": 1})
        for rec in jobs.watch(record.job_id):
            if rec.phase.terminal:
                break
        # A real storage failure: S3 on a loopback port nothing listens on, no retries. The
        # counter is process-wide, so every server's /metrics shows it (in a pod: that pod's).
        down = settings.model_copy(update={"storage_uri": "s3://selma-down/x", "s3_endpoint": f"http://127.0.0.1:{_free_port()}",
                                           "s3_create_buckets": False, "storage_retries": 0, "storage_backoff_seconds": 0.0})
        with pytest.raises(Unavailable):
            open_storage(down).get_bytes("probe")
        yield {"servers": servers, "metrics_urls": {c: s.metrics_url for c, s in servers.items()}}
    finally:
        jobs.shutdown()
        for s in servers.values():
            s.stop(0)


@pytest.fixture(scope="module")
def prometheus_url(selma_stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus on 127.0.0.1 scraping the stack every second and evaluating selma's rules."""
    binary = prometheus()
    tmp = tmp_path_factory.mktemp("prometheus")
    scrape_configs = []
    for component, url in selma_stack["metrics_urls"].items():
        target = urllib.parse.urlsplit(url).netloc
        scrape_configs.append(
            {
                # The labels a ServiceMonitor gives these targets in namespace selma, release selma.
                "job_name": f"selma-{component}",
                "scrape_interval": "1s",
                "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
            }
        )
    config = {"global": {"evaluation_interval": "1s"}, "rule_files": [str(RULES)], "scrape_configs": scrape_configs}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = _processes.popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: proc.poll() is not None or _get(f"{url}/-/ready")[0] == 200, 30, "Prometheus ready")
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()
        yield url
    finally:
        _processes.stop_tree(proc, first=signal.SIGTERM)
        log.close()


def _query(url: str, expr: str) -> tuple[int, dict[str, Any] | str]:
    return _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))


def _exported_names(metrics_url: str) -> set[str]:
    """Sample names a selma process exposes: every family's TYPE line, histogram series included."""
    with _OPENER.open(metrics_url, timeout=5) as r:
        text = r.read().decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M):
        names.add(name)
        if kind in ("histogram", "summary"):
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_every_expression_uses_only_exported_metrics(selma_stack: dict[str, Any]) -> None:
    exported = set().union(*(_exported_names(u) for u in selma_stack["metrics_urls"].values())) | PROMETHEUS_METRICS
    missing = {}
    for where, expr in _rule_exprs() + _dashboard_exprs():
        used = set(re.findall(r"\b(selma_[a-z0-9_]+)\b", expr))
        if used - exported:
            missing[where] = sorted(used - exported)
    assert not missing, f"metrics no selma service exports: {missing}"


def test_every_expression_is_accepted_by_prometheus(prometheus_url: str) -> None:
    status, body = _query(prometheus_url, "sum by (job (up)")
    assert status == 400 and body["errorType"] == "bad_data", "Prometheus must reject broken PromQL"
    rejected = {}
    for where, expr in _rule_exprs() + _dashboard_exprs():
        status, body = _query(prometheus_url, expr)
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            rejected[where] = body if isinstance(body, str) else body.get("error")
    assert not rejected, rejected


def test_prometheus_loads_and_evaluates_the_rules(prometheus_url: str) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        status, body = _get(f"{prometheus_url}/api/v1/rules")
        if status != 200:
            return None
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") and r["health"] != "unknown" for r in rules) else None

    rules = _wait(evaluated, 30, "every rule evaluated once")
    assert {r["name"] for r in rules} == {name.removeprefix("rule ") for name, _ in _rule_exprs()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]


def test_core_panels_return_data_from_the_live_stack(prometheus_url: str) -> None:
    exprs = dict(_dashboard_exprs())

    def has_data(title_prefix: str, min_series: int = 1):  # noqa: ANN202
        key = next(k for k in exprs if k.startswith(title_prefix))

        def check() -> bool:
            status, body = _query(prometheus_url, exprs[key])
            return status == 200 and len(body["data"]["result"]) >= min_series

        return check

    _wait(has_data("selma-overview / Services SERVING / A", 4), 30, "selma_service_ready of four services")
    status, body = _query(prometheus_url, exprs["selma-overview / Services SERVING / A"])
    assert {r["metric"]["service"]: r["value"][1] for r in body["data"]["result"]} == {c: "1" for c in COMPONENTS}
    _wait(has_data("selma-overview / Scrape targets up / A", 4), 30, "four scrape targets up")
    # rate() needs two scrapes of the counters the health RPCs and the job incremented.
    _wait(has_data("selma-overview / RPCs/s by service / A"), 30, "RPC rate by service")
    _wait(has_data("selma-overview / Jobs finished by kind and state (1h) / A"), 30, "finished jobs by kind and phase")
    _wait(has_data("selma-overview / Job duration by kind / A"), 30, "job duration quantiles")
    storage = "selma-overview / Storage errors/s by service, backend and code / A"
    # Every (backend, code) series exists from the start (pre-created at 0, so the first error counts
    # for rate()); the one failed call, made before Prometheus started, is the only non-zero count.
    _wait(has_data(storage, 4), 30, "storage errors by service, backend and code")
    status, body = _query(prometheus_url, "sum by (backend, code) (selma_storage_errors_total) > 0")
    assert status == 200
    assert {(r["metric"]["backend"], r["metric"]["code"]) for r in body["data"]["result"]} == {("s3", "UNAVAILABLE")}
