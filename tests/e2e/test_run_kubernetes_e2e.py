"""A SELMA run with s3:// storage (moto on 127.0.0.1) and the Kubernetes training launcher.

The Kubernetes API is the loopback fake; a test controller plays the Job controller and the
kubelet: for each Job the training service creates, it runs the Job's container command
locally with the Job's environment (Secret and downward-API references resolved the way
Kubernetes would) and reports the outcome back through the API.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from selma.app.local_stack import LocalStack
from selma.client import SelmaClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from fake_kube_api import FakeKubeApi, complete  # noqa: E402
from test_run_e2e import _drive, skillset_text  # noqa: E402

pytestmark = pytest.mark.slow

NS = "selma"
SECRETS = {"selma-s3": {"access-key": "testing", "secret-key": "testing"}}


class LocalJobController:
    """Runs every new Job's command as a local process and writes its status, like a cluster would."""

    def __init__(self, api: FakeKubeApi, log_dir: Path) -> None:
        self.api = api
        self.log_dir = log_dir
        self.started: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> LocalJobController:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with self.api.cond:
            self.api.cond.notify_all()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.api.cond:
                pending = [o for (ns, name), o in self.api.jobs.items() if ns == NS and name not in self.started and not o.get("status")]
                if not pending:
                    self.api.cond.wait(0.5)
                    continue
                job = pending[0]
                self.started.append(job["metadata"]["name"])
            threading.Thread(target=self._run, args=(job,), daemon=True).start()

    def _env(self, job: dict, pod_name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SELMA_")}
        for e in job["spec"]["template"]["spec"]["containers"][0].get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = SECRETS[ref["name"]][ref["key"]]
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = {"metadata.name": pod_name, "spec.nodeName": "test-node"}[e["valueFrom"]["fieldRef"]["fieldPath"]]
        # A pod binds its metrics port (SELMA_HOST=0.0.0.0) on its own IP; here every "pod" shares
        # this host, so each trainer serves /metrics on loopback, on a port of its own.
        if "SELMA_METRICS_PORT" in env:
            env["SELMA_HOST"] = "127.0.0.1"
            env["SELMA_METRICS_PORT"] = str(_free_port())
        return env

    def _run(self, job: dict) -> None:
        name = job["metadata"]["name"]
        pod = f"{name}-abcde"
        self.api.set_job_status(NS, name, {"active": 1, "ready": 1})
        command = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command[0] == "selma"
        argv = [str(Path(sys.executable).parent / "selma"), *command[1:]]
        with (self.log_dir / f"{pod}.log").open("wb") as log:
            rc = subprocess.run(argv, env=self._env(job, pod), stdout=log, stderr=subprocess.STDOUT, timeout=600).returncode
        self.api.set_job_status(NS, name, complete(rc == 0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_run_with_s3_storage_and_kubernetes_launcher(s3_server, llm, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    with FakeKubeApi() as api, LocalJobController(api, tmp_path) as controller:
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: fake, cluster: {{server: '{api.url}'}}}}]\n"
            "users: [{name: u, user: {token: test-token}}]\n"
            f"contexts: [{{name: test, context: {{cluster: fake, user: u, namespace: {NS}}}}}]\n"
        )
        extra = {
            "SELMA_S3_ENDPOINT": f"http://{s3_server}",
            "SELMA_S3_ACCESS_KEY": "testing",
            "SELMA_S3_SECRET_KEY": "testing",
            "SELMA_S3_SECURE": "false",
            "SELMA_S3_REGION": "us-east-1",
            "SELMA_BATCH_KUBECONFIG": str(kubeconfig),
            "SELMA_BATCH_NAMESPACE": NS,
            "SELMA_BATCH_STORAGE_SECRET": "selma-s3",
            "SELMA_BATCH_STORAGE_SECRET_ACCESS_KEY_KEY": "access-key",
            "SELMA_BATCH_STORAGE_SECRET_SECRET_KEY_KEY": "secret-key",
        }
        stack = LocalStack(tmp_path / "stack", storage_uri="s3://selma-e2e/root", launcher="kubernetes", extra_env=extra)
        try:
            endpoints = stack.start(timeout=300)
            result = _drive(endpoints, skillset_text("e2e-kube", llm.base_url, launcher="kubernetes", evaluation=True), tmp_path)
            with SelmaClient(endpoints) as client:
                trainings = client.jobs("training").list(run="e2e-kube")
                chain = client.lineage(result["merged_model"])
        finally:
            stack.stop()
    assert sorted(controller.started) == sorted({j["metadata"]["name"] for j in api.jobs.values()})
    tasks = sorted(j["metadata"]["labels"]["selma.dev/task"] for j in api.jobs.values())
    assert tasks == ["eval", "train", "train"]  # one Job per skill and one evaluation Job, none duplicated
    assert result["eval_report"] and set(result["scores"]) == {"base/dsg", "e2e-kube/dsg"}
    assert all(j.status.details.get("kubernetes.job") for j in trainings)
    assert all(m.uri.startswith("s3://selma-e2e/root/") for m in chain)
    assert {m.skill for m in chain if m.kind == 1} == {"counting", "general"}  # both prompt sets reached
