"""Helpers for the chart, manifest and alert tests: locate the real tools, render the chart.

Tools come from .ci/install-tools.sh (helm in .tools/bin, prometheus/promtool from apt) and the
test extra (kubernetes-validate). A missing tool skips with the reason on a developer machine
and fails when CI=true, so CI can never go green without having run them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "selma"
MANIFESTS = ROOT / "manifests"
SCENARIOS = sorted(CHART.glob("ci/*-values.yaml"))
RELEASE = "selma"
NAMESPACE = "selma"
# The four service Deployments of a default install; the training one also hosts the
# EvaluationService, which evaluation.separate=true moves into a fifth Deployment, "evaluation".
COMPONENTS = ("prompts", "render", "training", "serving")
GRPC_SERVICES = {
    "prompts": "selma.v1.PromptService",
    "render": "selma.v1.RenderService",
    "training": "selma.v1.TrainingService",
    "serving": "selma.v1.ServingService",
    "evaluation": "selma.v1.EvaluationService",
}
KUBERNETES_VERSION = "1.33.0"


def require_tool(name: str, *candidates: Path) -> str:
    """Path of a tool; skip (developer machine) or fail (CI=true) when it is missing."""
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    reason = f"{name} is not installed: run .ci/install-tools.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: missing tools are failures)")
    pytest.skip(reason)


def helm() -> str:
    return require_tool("helm", ROOT / ".tools" / "bin" / "helm")


def kubernetes_validate() -> str:
    return require_tool("kubernetes-validate", Path(sys.executable).parent / "kubernetes-validate")


def promtool() -> str:
    return require_tool("promtool")


def prometheus() -> str:
    return require_tool("prometheus")


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """helm with its cache/config/data in a throwaway directory (no user state, no network)."""
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ)
        for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
            env[var] = os.path.join(home, var.lower())
        proc = subprocess.run([helm(), *args], capture_output=True, text=True, env=env, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def template_args(values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = ()) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", str(f)]
    for s in sets:
        args += ["--set", s]
    return args


# Ad-hoc renders start from the default scenario: the chart's defaults plus the one value a default
# install must be given (tls.existingSecret: TLS is on and needs a certificate).
DEFAULT_SCENARIO = CHART / "ci" / "default-values.yaml"


def render(values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = (), values: dict[str, Any] | None = None, *, bare: bool = False) -> str:
    """The chart rendered by `helm template` as one YAML stream; without values files, on top of
    ci/default-values.yaml unless ``bare`` (the chart's own defaults only)."""
    files = list(values_files) or ([] if bare else [DEFAULT_SCENARIO])
    with tempfile.TemporaryDirectory() as tmp:
        if values is not None:
            extra = Path(tmp) / "values.yaml"
            extra.write_text(yaml.safe_dump(values))
            files.append(extra)
        return run_helm(*template_args(tuple(files), sets)).stdout


def objects(stream: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(stream) if d]


def pod_specs(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(kind/name, pod spec) of every workload: Deployments, StatefulSets, Jobs, bare Pods."""
    out = []
    for o in objs:
        kind, name = o["kind"], o["metadata"]["name"]
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            out.append((f"{kind}/{name}", o["spec"]["template"]["spec"]))
        elif kind == "Job":
            out.append((f"{kind}/{name}", o["spec"]["template"]["spec"]))
        elif kind == "CronJob":
            out.append((f"{kind}/{name}", o["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
        elif kind == "Pod":
            out.append((f"{kind}/{name}", o["spec"]))
    return out


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}
