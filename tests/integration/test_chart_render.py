"""The Helm chart, checked with the real tools: helm lint/template (Helm 4 from .ci/install-tools.sh)
and kubernetes-validate --strict (any WARN, e.g. an unknown kind, is a failure), plus the rules a
schema cannot express: least-privilege RBAC, hardened containers, GPUs where they belong, gRPC
health probes (native, or the health script over TLS), settings that the services really read, no
credentials in values, current manifests. TLS and tokens: test_chart_security.py.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart_tools import (
    CHART,
    COMPONENTS,
    GRPC_SERVICES,
    KUBERNETES_VERSION,
    MANIFESTS,
    NAMESPACE,
    ROOT,
    SCENARIOS,
    by_kind,
    kubernetes_validate,
    objects,
    pod_specs,
    promtool,
    render,
    run_helm,
)

pytestmark = pytest.mark.integration

SCENARIO_IDS = [p.name.removesuffix("-values.yaml") for p in SCENARIOS]
CRD_GROUP = "monitoring.coreos.com/"
# Custom resources the chart may render: prometheus-operator's and cert-manager's Certificate.
CRD_GROUPS = (CRD_GROUP, "cert-manager.io/")


@functools.cache
def rendered(scenario: str) -> str:
    return render((CHART / "ci" / f"{scenario}-values.yaml",))


def scenario_objects(scenario: str) -> list[dict[str, Any]]:
    return objects(rendered(scenario))


def test_ci_scenarios_cover_the_issue() -> None:
    assert {"default", "cpu-minimal", "gpu", "external-s3", "monitoring", "evaluation-separate", "cert-manager"} <= set(SCENARIO_IDS)


# --- helm lint and the Kubernetes schema ---------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_helm_lint_strict_passes(scenario: str) -> None:
    proc = run_helm("lint", "--strict", str(CHART), "-f", str(CHART / "ci" / f"{scenario}-values.yaml"), "--namespace", NAMESPACE)
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def _validate_strict(tmp_path: Path, docs: list[dict[str, Any]], name: str) -> None:
    """kubernetes-validate --strict over the core objects; WARN (unknown kind/apiVersion) fails too."""
    path = tmp_path / f"{name}.yaml"
    path.write_text("---\n".join(yaml.safe_dump(d) for d in docs))
    proc = subprocess.run(
        [kubernetes_validate(), "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "WARN" not in out and "ERROR" not in out, out


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_rendered_objects_pass_kubernetes_validate_strict(scenario: str, tmp_path: Path) -> None:
    docs = scenario_objects(scenario)
    core = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    assert core, "nothing rendered"
    _validate_strict(tmp_path, core, scenario)
    # The only non-core kinds are the prometheus-operator ones and cert-manager's Certificate,
    # validated structurally below and in test_chart_security.py.
    assert {d["kind"] for d in docs if d not in core} <= {"ServiceMonitor", "PodMonitor", "PrometheusRule", "Certificate"}


@pytest.mark.parametrize("kubernetes", ["1.29.0", "1.37.0"])
def test_default_install_is_valid_on_the_oldest_and_newest_kubernetes(kubernetes: str, tmp_path: Path) -> None:
    """Chart.yaml says kubeVersion >= 1.29; the schemas of 1.29 and 1.37 both accept the defaults."""
    docs = scenario_objects("default")
    path = tmp_path / "default.yaml"
    path.write_text("---\n".join(yaml.safe_dump(d) for d in docs))
    proc = subprocess.run([kubernetes_validate(), "--strict", "--quiet", "-k", kubernetes, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "WARN" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_the_validator_catches_typos_and_unknown_kinds(tmp_path: Path) -> None:
    """kubernetes-validate is wired strictly: a misspelled field fails, and so does an unknown kind (WARN)."""
    deployment = next(d for d in scenario_objects("default") if d["kind"] == "Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(AssertionError):
        _validate_strict(tmp_path, [typo], "typo")
    with pytest.raises(AssertionError, match="WARN"):
        _validate_strict(tmp_path, [{"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}], "unknown")


def _install_notes(*args: str) -> str:
    """NOTES.txt of a `helm install --dry-run=client` of the default scenario plus ``args``."""
    proc = run_helm("install", "selma", str(CHART), "--namespace", NAMESPACE, "--dry-run=client", "-f", str(CHART / "ci" / "default-values.yaml"), *args)
    return proc.stdout.split("NOTES:", 1)[1]


def test_helm_install_dry_run_prints_how_to_reach_the_api() -> None:
    notes = _install_notes()
    for component in COMPONENTS:
        assert f"svc/selma-{component}" in notes
    assert "helm test selma -n selma" in notes and "SELMA_ENDPOINTS=" in notes
    # TLS and tokens are on: the CA comes from the Secret, every call carries a token, and how to mint one
    assert "grpcurl -plaintext" not in notes and "grpcurl -cacert selma-ca.crt -servername selma-serving" in notes
    assert "get secret selma-tls -o jsonpath='{.data.ca\\.crt}'" in notes
    assert '-H "authorization: Bearer $SELMA_TOKEN"' in notes and "selma auth token --name" in notes
    assert "--set auth.existingSecret=" in notes
    plaintext = _install_notes("--set", "tls.enabled=false")
    assert "grpcurl -plaintext localhost:50054" in plaintext and "TLS is OFF" in plaintext


def test_monitoring_objects_only_render_when_enabled() -> None:
    for scenario in SCENARIO_IDS:
        crds = [d["kind"] for d in scenario_objects(scenario) if d["apiVersion"].startswith(CRD_GROUP)]
        if scenario == "monitoring":
            assert sorted(crds) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
        else:  # clusters without the prometheus-operator CRDs install cleanly
            assert crds == [], scenario


# Fields of the monitoring.coreos.com/v1 specs the chart may use (a subset of the CRDs' schemas).
SERVICE_MONITOR_SPEC = {"endpoints", "selector", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"}
ENDPOINT_FIELDS = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings", "metricRelabelings", "honorLabels"}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
    return True


def test_monitoring_crd_objects_are_structurally_valid(tmp_path: Path) -> None:
    docs = scenario_objects("monitoring")
    services = by_kind(docs, "Service")
    (sm,) = by_kind(docs, "ServiceMonitor").values()
    (rule,) = by_kind(docs, "PrometheusRule").values()
    (pm,) = by_kind(docs, "PodMonitor").values()
    for o in (sm, rule, pm):
        assert o["apiVersion"] == "monitoring.coreos.com/v1"
        assert o["metadata"]["labels"]["release"] == "kube-prometheus-stack", "monitoring.labels must reach the Prometheus selector"
    assert set(sm["spec"]) <= SERVICE_MONITOR_SPEC
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = {n: s for n, s in services.items() if _matches(sm["spec"]["selector"], s["metadata"]["labels"])}
    assert sorted(selected) == sorted(f"selma-{c}" for c in COMPONENTS), "ServiceMonitor must select exactly the four services"
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= ENDPOINT_FIELDS
        for svc in selected.values():
            assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert set(rule["spec"]) == {"groups"}
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    proc = subprocess.run([promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(r["labels"]["team"] == "ml-platform" for g in rule["spec"]["groups"] for r in g["rules"])
    dashboards = [c for c in by_kind(docs, "ConfigMap").values() if c["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(dashboards) == len(list((CHART / "files" / "dashboards").glob("*.json"))) >= 2
    for cm in dashboards:
        for text in cm["data"].values():
            assert json.loads(text)["panels"]


# --- values.schema.json and validateValues -----------------------------------------------------

BAD_VALUES = {
    "replicas as a string": ({"render": {"replicaCount": "two"}}, "/render/replicaCount"),
    "negative GPU count": ({"serving": {"gpu": -1}}, "/serving/gpu"),
    "negative trainer retries": ({"training": {"jobs": {"backoffLimit": -2}}}, "/training/jobs/backoffLimit"),
    "misspelled key": ({"render": {"replicas": 2}}, "replicas"),
    "plain S3 secret key": ({"storage": {"credentials": {"secretKey": "hunter2"}}}, "secretKey"),
    "credential as a setting": ({"config": {"extra": {"SELMA_S3_SECRET_KEY": "hunter2"}}}, "SELMA_S3_SECRET_KEY"),
    "API key as a service setting": ({"prompts": {"settings": {"SELMA_LLM_OPENAI_API_KEY": "sk-1"}}}, "SELMA_LLM_OPENAI_API_KEY"),
    "non-SELMA setting": ({"render": {"settings": {"PATH": "/bin"}}}, "'PATH' does not match"),
    "unknown log level": ({"config": {"logLevel": "VERBOSE"}}, "/config/logLevel"),
    "storage not on S3": ({"storage": {"uri": "http://bucket"}}, "/storage/uri"),
    "bad pull policy": ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    "port out of range": ({"ports": {"grpc": 70000}}, "/ports/grpc"),
    "privileged containers": ({"containerSecurityContext": {"allowPrivilegeEscalation": True, "capabilities": {"drop": ["ALL"]}}}, "allowPrivilegeEscalation"),
    "root pods": ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    "bad quantity": ({"modelCache": {"size": "lots"}}, "/modelCache/size"),
    "bad launcher": ({"training": {"jobs": {"launcher": "slurm"}}}, "/training/jobs/launcher"),
    "bad storage alert duration": ({"monitoring": {"prometheusRule": {"storageErrorsFor": "ten minutes"}}}, "/monitoring/prometheusRule/storageErrorsFor"),
    "PodMonitor switch not a boolean": ({"monitoring": {"podMonitor": {"enabled": "yes"}}}, "/monitoring/podMonitor/enabled"),
    "unknown PodMonitor field": ({"monitoring": {"podMonitor": {"port": 9400}}}, "port"),
    "evaluation switch not a boolean": ({"evaluation": {"separate": "yes"}}, "/evaluation/separate"),
    "API key as an evaluation setting": ({"evaluation": {"settings": {"SELMA_EVAL_OPENAI_API_KEY": "sk-1"}}}, "SELMA_EVAL_OPENAI_API_KEY"),
    "negative evaluation replicas": ({"evaluation": {"replicaCount": -1}}, "/evaluation/replicaCount"),
}


@pytest.mark.parametrize("values,where", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_invalid_values(values: dict[str, Any], where: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run_helm("template", "selma", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0, f"accepted: {values}"
    assert where in proc.stderr, proc.stderr


def test_helm_set_string_for_replicas_is_rejected() -> None:
    # The infra note: `helm lint --set replicaCount=two` passes without a schema.
    proc = run_helm("lint", "--strict", str(CHART), "--set", "serving.autoscaling.enabled=false,serving.replicaCount=two", check=False)
    assert proc.returncode != 0 and "/serving/replicaCount" in proc.stdout + proc.stderr


INVALID_COMBINATIONS = {
    "external S3 without endpoint": ({"minio": {"enabled": False}, "storage": {"credentials": {"existingSecret": "s"}}}, "storage.s3.endpoint is required"),
    "external S3 without Secret": ({"minio": {"enabled": False}, "storage": {"s3": {"endpoint": "s3.example.com"}}}, "storage.credentials.existingSecret is required"),
    "HPA max below min": ({"serving": {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}}, "maxReplicas must be >= "),
    "same port twice": ({"ports": {"grpc": 9400, "metrics": 9400}}, "must differ"),
    "render workers default over max": ({"render": {"workers": {"default": 4, "max": 2}}}, "render.workers.default must be <= render.workers.max"),
    "render workers without Jobs": ({"render": {"workers": {"max": 2}}, "training": {"jobs": {"launcher": "local"}}},
                                    "set training.jobs.launcher=kubernetes"),
}


@pytest.mark.parametrize("values,message", INVALID_COMBINATIONS.values(), ids=INVALID_COMBINATIONS.keys())
def test_invalid_combinations_fail_with_a_message(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run_helm("template", "selma", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def _leaf_paths(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict) and node:
        out: set[str] = set()
        for k, v in node.items():
            out |= _leaf_paths(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix}


def test_every_value_is_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+) \S", text, flags=re.M))
    values = yaml.safe_load(text)
    undocumented = sorted(p for p in _leaf_paths(values) if not any(p == d or p.startswith(d + ".") for d in documented))
    assert not undocumented, f"values without a `## @param` line: {undocumented}"
    stale = sorted(d for d in documented if not any(p == d or p.startswith(d + ".") for p in _leaf_paths(values)))
    assert not stale, f"`## @param` lines for values that do not exist: {stale}"


# --- credentials --------------------------------------------------------------------------------

SECRETISH = re.compile(r"password|secret|token|apikey|api_key|accesskey|access_key|credential", re.I)


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.mark.parametrize("values_file", [CHART / "values.yaml", *SCENARIOS], ids=lambda p: p.name)
def test_values_hold_only_references_to_secrets(values_file: Path) -> None:
    for path, value in _walk(yaml.safe_load(values_file.read_text()) or {}):
        leaf = re.sub(r"\[\d+\]$", "", path.rsplit(".", 1)[-1])
        if SECRETISH.search(leaf) and value not in ("", None, False, True):
            # Allowed: names of existing Secrets and the key names inside them.
            assert leaf in ("existingSecret", "secrets") or leaf.endswith("KeyKey"), f"{values_file.name}: {path} holds a credential"


def _secret_reference(value: str, spec: dict[str, Any], container: dict[str, Any], secret_names: set[str]) -> bool:
    """A setting that names a credential without holding it: a path inside a mounted Secret volume
    (SELMA_TLS_KEY_FILE, SELMA_AUTH_TOKENS_FILE, ...) or the name of a Secret (SELMA_BATCH_TOKEN_SECRET)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    secret_dirs = [m["mountPath"] for m in container.get("volumeMounts", []) if "secret" in volumes.get(m["name"], {})]
    paths = value.split(",")
    if all(any(path.startswith(d.rstrip("/") + "/") for d in secret_dirs) for path in paths):
        return True
    return value in secret_names


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_rendered_credentials_come_only_from_secrets(scenario: str) -> None:
    docs = scenario_objects(scenario)
    for cm in by_kind(docs, "ConfigMap").values():
        for key in cm.get("data") or {}:
            assert not re.search(r"SECRET_KEY$|ACCESS_KEY$|API_KEY$|PASSWORD|TOKEN", key), f"{cm['metadata']['name']}: {key}"
    specs = pod_specs(docs)
    secret_names = set(by_kind(docs, "Secret")) | {v["secret"]["secretName"] for _, s in specs for v in s.get("volumes", []) if "secret" in v}
    for name, spec in specs:
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"].replace("_", "")) or env["name"].endswith("_KEY"):
                    if "value" in env and _secret_reference(env["value"], spec, c, secret_names):
                        continue
                    assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{name}: {env['name']} must come from a Secret"
    secrets = by_kind(docs, "Secret")
    if scenario == "external-s3":
        # the storage and LLM credentials are the user's Secrets; the chart generates only the services' own token
        assert set(secrets) == {"selma-auth"}, "with existingSecret the chart must not create credentials"


# --- RBAC ----------------------------------------------------------------------------------------

# The Kubernetes calls the training launcher makes, as (apiGroup, resource, verb).
EXPECTED_TRAINING_RULES = {
    ("batch", "jobs", "create"),
    ("batch", "jobs", "get"),
    ("batch", "jobs", "list"),
    ("batch", "jobs", "watch"),
    ("batch", "jobs", "delete"),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "pods/log", "get"),
    ("", "services", "create"),  # the headless rendezvous Service of a multi-node training Job
    ("", "services", "delete"),
}
_CLIENT_CALLS = {
    "create_namespaced_job": ("batch", "jobs", "create"),
    "read_namespaced_job": ("batch", "jobs", "get"),
    "read_namespaced_job_status": ("batch", "jobs", "get"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),
    "patch_namespaced_job": ("batch", "jobs", "patch"),
    "replace_namespaced_job": ("batch", "jobs", "update"),
    "read_namespaced_pod": ("", "pods", "get"),
    "list_namespaced_pod": ("", "pods", "list"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "delete_namespaced_pod": ("", "pods", "delete"),
    "create_namespaced_pod": ("", "pods", "create"),
    "create_namespaced_service": ("", "services", "create"),
    "delete_namespaced_service": ("", "services", "delete"),
}


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    out = set()
    for r in role["rules"]:
        assert "resourceNames" not in r or r["resourceNames"], "empty resourceNames"
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    out.add((g, res, v))
    return out


def test_training_rbac_is_namespaced_and_least_privilege() -> None:
    for scenario in SCENARIO_IDS:
        kinds = {d["kind"] for d in scenario_objects(scenario)}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, f"{scenario}: cluster-wide RBAC"
    docs = scenario_objects("default")
    (role,) = by_kind(docs, "Role").values()
    (binding,) = by_kind(docs, "RoleBinding").values()
    granted = _rules(role)
    assert not any("*" in part for rule in granted for part in rule), "wildcards in the Role"
    assert granted == EXPECTED_TRAINING_RULES
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "selma-training", "namespace": NAMESPACE}]
    # Only the training service's pod carries that account's token; every other pod has none.
    for name, spec in pod_specs(docs):
        if name == "Deployment/selma-training":
            assert spec["serviceAccountName"] == "selma-training" and spec["automountServiceAccountToken"] is True
        else:
            assert spec["serviceAccountName"] != "selma-training" and spec["automountServiceAccountToken"] is False, name
    config = by_kind(docs, "ConfigMap")["selma-training"]["data"]
    assert config["SELMA_BATCH_NAMESPACE"] == NAMESPACE, "trainer Jobs must go to the namespace the Role covers"
    assert config["SELMA_BATCH_SERVICE_ACCOUNT"] == "selma-trainer"
    trainer_sa = by_kind(docs, "ServiceAccount")["selma-trainer"]
    assert trainer_sa["automountServiceAccountToken"] is False


# Where the Job launchers of the training and evaluation services live (selma.batch) and the services themselves.
LAUNCHER_SOURCES = (ROOT / "shared" / "selma" / "batch", ROOT / "services" / "training", ROOT / "services" / "evaluation",
                    ROOT / "services" / "render")


def test_rbac_grants_exactly_the_calls_the_training_service_makes() -> None:
    sources = "\n".join(p.read_text() for d in LAUNCHER_SOURCES for p in sorted(d.rglob("*.py")))
    used = {rule for call, rule in _CLIENT_CALLS.items() if re.search(rf"\b{call}\b", sources)}
    assert used, f"no Kubernetes launcher calls found under {[str(d.relative_to(ROOT)) for d in LAUNCHER_SOURCES]}"
    if re.search(r"\bwatch\.Watch\b|\bWatch\(\)", sources):
        used |= {("batch", "jobs", "watch")} if "list_namespaced_job" in sources else set()
        used |= {("", "pods", "watch")} if "list_namespaced_pod" in sources else set()
    (role,) = by_kind(scenario_objects("default"), "Role").values()
    granted = _rules(role)
    assert used <= granted, f"the launcher calls APIs the Role does not grant: {sorted(used - granted)}"
    assert granted - used <= {("", "pods", "watch"), ("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get")}, (
        f"granted but never used: {sorted(granted - used)}"
    )


def test_sharded_renders_give_the_render_service_the_launcher_account_only_when_enabled() -> None:
    gpu = scenario_objects("gpu")  # render.workers: {default: 4, max: 8}
    specs = dict(pod_specs(gpu))
    render = specs["Deployment/selma-render"]
    assert render["serviceAccountName"] == "selma-training" and render["automountServiceAccountToken"] is True
    config = by_kind(gpu, "ConfigMap")["selma-render"]["data"]
    assert (config["SELMA_RENDER_SHARDS"], config["SELMA_RENDER_MAX_SHARDS"]) == ("4", "8")
    assert config["SELMA_BATCH_NAMESPACE"] == NAMESPACE and config["SELMA_BATCH_SERVICE_ACCOUNT"] == "selma-trainer"
    assert config["SELMA_BATCH_POLICY_MAX_GPUS"] == by_kind(gpu, "ConfigMap")["selma-training"]["data"]["SELMA_BATCH_POLICY_MAX_GPUS"]
    default = scenario_objects("default")  # render.workers.max: 0: renders in its own pod, no Kubernetes access
    render = dict(pod_specs(default))["Deployment/selma-render"]
    assert render["automountServiceAccountToken"] is False and render["serviceAccountName"] != "selma-training"
    config = by_kind(default, "ConfigMap")["selma-render"]["data"]
    assert config["SELMA_RENDER_MAX_SHARDS"] == "0" and not any(k.startswith("SELMA_BATCH_") for k in config)


def test_local_launcher_gets_no_kubernetes_access() -> None:
    docs = scenario_objects("cpu-minimal")
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    assert all(spec["automountServiceAccountToken"] is False for _, spec in pod_specs(docs))


# --- pods: security, GPUs, probes, settings ------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_every_container_is_non_root_read_only_without_capabilities(scenario: str) -> None:
    specs = pod_specs(scenario_objects(scenario))
    assert specs
    for name, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["enableServiceLinks"] is False, f"{name}: Kubernetes would inject SELMA_*_PORT variables"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["runAsNonRoot"] is True and sc.get("privileged") is False, f"{name}/{c['name']}"
            assert "ALL" in sc["capabilities"]["drop"] and not sc["capabilities"].get("add"), f"{name}/{c['name']}"
            assert c["resources"].get("requests") and c["resources"].get("limits", {}).get("memory"), f"{name}/{c['name']} needs requests and a memory limit"
            # A read-only root needs a writable /tmp.
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if "tmp" in volumes:
                assert mounts.get("/tmp") == "tmp" and "emptyDir" in volumes["tmp"], f"{name}/{c['name']}"


def _containers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name.split("/", 1)[1]: spec["containers"][0] for name, spec in pod_specs(docs) if name.startswith("Deployment/")}


def _gpus(container: dict[str, Any]) -> tuple[str | None, str | None]:
    r = container["resources"]
    return str(r.get("requests", {}).get("nvidia.com/gpu")) if "nvidia.com/gpu" in r.get("requests", {}) else None, (
        str(r["limits"]["nvidia.com/gpu"]) if "nvidia.com/gpu" in r.get("limits", {}) else None
    )


def test_gpus_are_requested_where_expected() -> None:
    default = scenario_objects("default")
    c = _containers(default)
    assert _gpus(c["selma-render"]) == ("1", "1")
    assert _gpus(c["selma-serving"]) == ("1", "1")
    assert _gpus(c["selma-prompts"]) == (None, None) and _gpus(c["selma-training"]) == (None, None)

    gpu = scenario_objects("gpu")
    c = _containers(gpu)
    assert _gpus(c["selma-serving"]) == ("2", "2")
    for name in ("selma-render", "selma-serving"):
        spec = by_kind(gpu, "Deployment")[name]["spec"]["template"]["spec"]
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert by_kind(gpu, "Deployment")[name]["spec"]["strategy"]["type"] == "Recreate"
    assert by_kind(gpu, "Deployment")["selma-serving"]["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]

    cpu = rendered("cpu-minimal")
    assert "nvidia.com/gpu" not in cpu
    assert by_kind(objects(cpu), "ConfigMap")["selma-training"]["data"]["SELMA_BATCH_LAUNCHER"] == "local"


def _probe_target(probe: dict[str, Any]) -> dict[str, Any]:
    """{port, service} a health probe asks: a native `grpc` probe, or files/grpc-health.py once
    against the pod's own port (TLS; see test_chart_security.py)."""
    if "grpc" in probe:
        return probe["grpc"]
    command = probe["exec"]["command"]
    assert command[:3] == ["python", "/etc/selma/scripts/grpc-health.py", "--wait=0"], command
    target, service = command[-1].split("=", 1)
    host, port = target.rsplit(":", 1)
    assert host == "127.0.0.1", "a probe checks its own pod"
    return {"port": int(port), "service": service}


def _test_container(pod: dict[str, Any], name: str = "grpc-health") -> dict[str, Any]:
    """A container of the `helm test` pod by name (the health check is an init container when Generate follows)."""
    (container,) = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"] if c["name"] == name]
    return container


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_services_run_their_entrypoint_with_grpc_health_probes(tls: bool) -> None:
    from selma.app.serve_cli import SERVICES

    docs = scenario_objects("default") if tls else objects(render(values={"tls": {"enabled": False}}))
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    assert sorted(deployments) == sorted(f"selma-{c}" for c in COMPONENTS)
    for component in COMPONENTS:
        c = _containers(docs)[f"selma-{component}"]
        assert c["args"] == ["serve", component] and component in SERVICES
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": 50051, "metrics": 9400}
        # native gRPC probes speak no TLS: with it the probes run the health script
        assert ("grpc" in c["readinessProbe"]) is (not tls) and ("exec" in c["readinessProbe"]) is tls
        assert _probe_target(c["readinessProbe"]) == {"port": 50051, "service": GRPC_SERVICES[component]}
        assert _probe_target(c["livenessProbe"]) == {"port": 50051, "service": ""}
        assert _probe_target(c["startupProbe"])["port"] == 50051
        svc = services[f"selma-{component}"]
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "metrics": 9400}
        assert svc["spec"]["selector"] == deployments[f"selma-{component}"]["spec"]["selector"]["matchLabels"]
    # The helm test pod checks every service's health by its gRPC name, the EvaluationService that
    # the training Deployment hosts included.
    (test_pod,) = by_kind(docs, "Pod").values()
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    expected = [f"selma-{c}:50051={GRPC_SERVICES[c]}" for c in COMPONENTS] + ["selma-training:50051=selma.v1.EvaluationService"]
    assert sorted(_test_container(test_pod)["args"]) == sorted(expected)


def _settings_fields(*components: str) -> set[str] | None:
    """SELMA_* names the settings classes of these services read (one process may host several)."""
    from selma.config import SelmaSettings

    fields = {f"SELMA_{name.upper()}" for name in SelmaSettings.model_fields}
    for component in components:
        try:
            module = importlib.import_module(f"selma_{component}.settings")
        except ModuleNotFoundError:
            return None
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, SelmaSettings) and cls is not SelmaSettings:
                fields |= {f"SELMA_{name.upper()}" for name in cls.model_fields}
    return fields


def _hosted_by(args: list[str]) -> tuple[str, ...]:
    """The services a container's `selma serve ...` args run (shared/selma/app/serve_cli.py)."""
    assert args[0] == "serve", args
    component = args[1]
    if component == "training" and "--only" not in args:
        return ("training", "evaluation")  # the EvaluationService beside it, in one process
    return (component,)


@pytest.mark.parametrize("scenario", ["default", "external-s3", "cpu-minimal", "evaluation-separate"])
def test_configmap_settings_are_fields_the_services_read(scenario: str) -> None:
    from selma.config import SelmaSettings

    docs = scenario_objects(scenario)
    common = by_kind(docs, "ConfigMap")["selma-config"]["data"]
    shared = {f"SELMA_{name.upper()}" for name in SelmaSettings.model_fields}
    assert set(common) <= shared, f"unknown shared settings: {sorted(set(common) - shared)}"
    assert common["SELMA_HOST"] == "0.0.0.0" and common["SELMA_LOG_FORMAT"] == "json"
    SelmaSettings.model_validate({k.removeprefix("SELMA_").lower(): v for k, v in common.items()})
    containers = _containers(docs)
    assert set(containers) == {f"selma-{c}" for c in _deployed(docs)}
    for component in _deployed(docs):
        own = by_kind(docs, "ConfigMap")[f"selma-{component}"].get("data") or {}
        fields = _settings_fields(*_hosted_by(containers[f"selma-{component}"]["args"]))
        if fields is None:
            assert not own, f"{component} has no settings module yet, but the chart sets {sorted(own)}"
            continue
        assert set(own) <= fields, f"{component}: settings the service does not read: {sorted(set(own) - fields)}"


def _deployed(docs: list[dict[str, Any]]) -> list[str]:
    """Components of the service Deployments rendered."""
    return sorted(d["metadata"]["labels"]["app.kubernetes.io/component"] for d in docs if d["kind"] == "Deployment")


# --- evaluation: hosted by the training Deployment, or its own (evaluation.separate) -------------


def test_evaluation_is_hosted_by_the_training_deployment_by_default() -> None:
    docs = scenario_objects("default")
    assert "selma-evaluation" not in {o["metadata"]["name"] for o in docs}, "no evaluation objects unless evaluation.separate"
    assert "evaluation" not in _deployed(docs)
    training = _containers(docs)["selma-training"]
    assert training["args"] == ["serve", "training"] and "--only" not in training["args"]
    data = by_kind(docs, "ConfigMap")["selma-training"]["data"]
    assert data["SELMA_EVAL_SERVING_ENDPOINT"] == "dns:///selma-serving-replicas:50051"
    assert data["SELMA_EVAL_VQA_MODEL"] == "Salesforce/blip-vqa-base" and data["SELMA_EVAL_VQA_BATCH_SIZE"] == "16"
    svc = by_kind(docs, "Service")["selma-training"]
    assert svc["metadata"]["annotations"]["selma.dev/grpc-service"] == "selma.v1.TrainingService,selma.v1.EvaluationService"
    (sm,) = by_kind(scenario_objects("monitoring"), "ServiceMonitor").values()
    assert sm["spec"]["selector"]["matchExpressions"][0]["values"] == ["prompts", "render", "training", "serving"]


def test_evaluation_separate_runs_its_own_deployment_and_service() -> None:
    from selma.app.serve_cli import SERVICES

    docs = scenario_objects("evaluation-separate")
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    assert _deployed(docs) == sorted((*COMPONENTS, "evaluation"))
    containers = _containers(docs)
    assert containers["selma-training"]["args"] == ["serve", "training", "--only"]
    ev, tr = containers["selma-evaluation"], containers["selma-training"]
    assert ev["args"] == ["serve", "evaluation"] and "evaluation" in SERVICES
    assert ev["image"] == tr["image"] and ev["name"] == "evaluation"
    assert {p["name"]: p["containerPort"] for p in ev["ports"]} == {"grpc": 50051, "metrics": 9400}
    assert _probe_target(ev["readinessProbe"]) == {"port": 50051, "service": GRPC_SERVICES["evaluation"]} == {"port": 50051, "service": "selma.v1.EvaluationService"}
    assert _probe_target(ev["livenessProbe"]) == {"port": 50051, "service": ""}
    assert _probe_target(ev["startupProbe"])["port"] == 50051 and ev["startupProbe"]["failureThreshold"] == 30
    assert _probe_target(tr["readinessProbe"]) == {"port": 50051, "service": "selma.v1.TrainingService"}
    assert ev["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "3Gi"}}
    # Hardened exactly as the training Deployment, under the same launcher account (it creates Jobs).
    pod = deployments["selma-evaluation"]["spec"]["template"]
    training_pod = deployments["selma-training"]["spec"]["template"]
    for key in ("securityContext", "enableServiceLinks", "terminationGracePeriodSeconds", "serviceAccountName", "automountServiceAccountToken", "volumes"):
        assert pod["spec"][key] == training_pod["spec"][key], key
    assert pod["spec"]["serviceAccountName"] == "selma-training" and pod["spec"]["automountServiceAccountToken"] is True
    for key in ("securityContext", "volumeMounts"):
        assert ev[key] == tr[key], key
    assert [e["name"] for e in ev["env"]] == [e["name"] for e in tr["env"]]
    assert [r["configMapRef"]["name"] for r in ev["envFrom"]] == ["selma-config", "selma-evaluation"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation" and pod["metadata"]["labels"]["team"] == "evaluation"
    assert deployments["selma-evaluation"]["spec"]["replicas"] == 1
    # Its Service, on the same ports, selecting exactly its pods; its PodDisruptionBudget.
    svc = services["selma-evaluation"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {"grpc": (50051, "grpc"), "metrics": (9400, "metrics")}
    assert svc["spec"]["selector"] == deployments["selma-evaluation"]["spec"]["selector"]["matchLabels"]
    assert svc["metadata"]["annotations"]["selma.dev/grpc-service"] == "selma.v1.EvaluationService"
    assert services["selma-training"]["metadata"]["annotations"]["selma.dev/grpc-service"] == "selma.v1.TrainingService"
    assert _matches({"matchLabels": svc["spec"]["selector"]}, pod["metadata"]["labels"])
    assert not _matches({"matchLabels": svc["spec"]["selector"]}, training_pod["metadata"]["labels"])
    pdb = by_kind(docs, "PodDisruptionBudget")["selma-evaluation"]
    assert pdb["spec"]["selector"] == deployments["selma-evaluation"]["spec"]["selector"]
    # `helm test` checks each Deployment for the services it hosts.
    (test_pod,) = by_kind(docs, "Pod").values()
    assert sorted(_test_container(test_pod)["args"]) == sorted(f"selma-{c}:50051={GRPC_SERVICES[c]}" for c in (*COMPONENTS, "evaluation"))


def test_evaluation_separate_settings_split_between_the_two_deployments() -> None:
    from selma_evaluation.settings import EvaluationSettings
    from selma_training.settings import TrainingSettings

    docs = scenario_objects("evaluation-separate")
    config_maps = by_kind(docs, "ConfigMap")
    common = config_maps["selma-config"]["data"]
    training, evaluation = config_maps["selma-training"]["data"], config_maps["selma-evaluation"]["data"]
    assert not [k for k in training if k.startswith("SELMA_EVAL_")], "`serve training --only` reads no SELMA_EVAL_*"
    assert evaluation["SELMA_EVAL_SERVING_ENDPOINT"] == "dns:///selma-serving-replicas:50051"
    assert evaluation["SELMA_EVAL_VQA_MODEL"] == "Salesforce/blip-vqa-base" and evaluation["SELMA_EVAL_VQA_BATCH_SIZE"] == "32"
    assert evaluation["SELMA_EVAL_MAX_JOBS"] == "16", "evaluation.settings reach the evaluation service"
    # The same batch launcher settings as training (it launches Jobs the same way), but for its own override.
    batch = {k: v for k, v in training.items() if k.startswith("SELMA_BATCH_")}
    assert batch["SELMA_BATCH_LAUNCHER"] == "kubernetes" and batch["SELMA_BATCH_SERVICE_ACCOUNT"] == "selma-trainer"
    assert {k: v for k, v in evaluation.items() if k.startswith("SELMA_BATCH_")} == {**batch, "SELMA_BATCH_MEMORY_REQUEST": "12Gi"}
    assert not [k for k in evaluation if k.startswith("SELMA_TRAINING_")]

    def settings(cls: type, data: dict[str, str]) -> Any:
        return cls.model_validate({k.removeprefix("SELMA_").lower(): v for k, v in {**common, **data}.items()})

    ev = settings(EvaluationSettings, evaluation)
    assert ev.batch_launcher == "kubernetes" and ev.batch_namespace == NAMESPACE and ev.eval_max_jobs == 16 and ev.eval_vqa_batch_size == 32
    assert settings(TrainingSettings, training).batch_memory_request == "24Gi"


def _eval_job_from(docs: list[dict[str, Any]], gpus: int = 1) -> dict[str, Any]:
    """The worker Job the separate evaluation service would create with the settings of these ConfigMaps."""
    from selma.batch.kube import build_job
    from selma.batch.launchers import LaunchRequest
    from selma_evaluation.settings import EvaluationSettings

    config_maps = by_kind(docs, "ConfigMap")
    env = {**config_maps["selma-config"]["data"], **(config_maps["selma-evaluation"].get("data") or {})}
    settings = EvaluationSettings.model_validate({k.removeprefix("SELMA_").lower(): v for k, v in env.items()})
    req = LaunchRequest(job_id="e0123456789", idempotency_key="k", run="quickstart", skill="evaluation",
                        config_uri="s3://selma/jobs/evaluation/e0123456789/config.json", expert_id="r1", placement={"gpus": gpus},
                        task="eval", service_settings=settings)
    return build_job(req, settings)


def test_evaluation_separate_rbac_network_and_workers(tmp_path: Path) -> None:
    """Both launching Deployments (and only they) carry the launcher token; one Role serves both;
    the NetworkPolicy covers the evaluation pod like the other services (gRPC from clients, metrics
    from monitoring), and its worker Jobs are valid, run as trainers do, and may reach serving."""
    docs = scenario_objects("evaluation-separate")
    (role,) = by_kind(docs, "Role").values()
    assert _rules(role) == EXPECTED_TRAINING_RULES
    (binding,) = by_kind(docs, "RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "selma-training", "namespace": NAMESPACE}]
    for name, spec in pod_specs(docs):
        launches = name in ("Deployment/selma-training", "Deployment/selma-evaluation")
        assert (spec["serviceAccountName"] == "selma-training") is launches and spec["automountServiceAccountToken"] is launches, name
    policies = by_kind(docs, "NetworkPolicy")
    labels = by_kind(docs, "Deployment")["selma-evaluation"]["spec"]["template"]["metadata"]["labels"]
    assert [n for n, p in policies.items() if _matches(p["spec"]["podSelector"], labels)] == ["selma"]
    assert policies["selma"] == by_kind(scenario_objects("default"), "NetworkPolicy")["selma"], "the same admission as in a default install"
    ingress_ports = sorted(p["port"] for rule in policies["selma"]["spec"]["ingress"] for p in rule["ports"])
    assert ingress_ports == [9400, 50051]
    # the worker Job it launches
    job = _eval_job_from(docs)
    _validate_strict(tmp_path, [job], "eval-job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"][:3] == ["selma", "eval", "execute"]
    assert spec["serviceAccountName"] == "selma-trainer" and spec["automountServiceAccountToken"] is False
    assert container["image"] == _containers(docs)["selma-evaluation"]["image"]
    assert container["resources"]["requests"]["memory"] == "12Gi", "evaluation.settings override the workers' SELMA_BATCH_*"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SELMA_EVAL_SERVING_ENDPOINT"] == "dns:///selma-serving-replicas:50051" and env["SELMA_EVAL_VQA_BATCH_SIZE"] == "32"
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["selma.dev/task"] == "eval" and pod_labels["app.kubernetes.io/instance"] == "selma"
    assert [n for n, p in policies.items() if _matches(p["spec"]["podSelector"], pod_labels)] == ["selma-trainer"]
    grpc_peers = next(r for r in policies["selma"]["spec"]["ingress"] if r["ports"][0]["port"] == 50051)["from"]
    assert any(_matches(peer["podSelector"], pod_labels) for peer in grpc_peers if "podSelector" in peer), "evaluation workers must reach serving"


def test_evaluation_separate_without_training_keeps_the_launcher_account() -> None:
    docs = objects(render(values={"training": {"enabled": False}, "evaluation": {"separate": True}}))
    assert _deployed(docs) == ["evaluation", "prompts", "render", "serving"]
    assert "selma-training" in by_kind(docs, "ServiceAccount") and "selma-training" in by_kind(docs, "Role")
    pod = by_kind(docs, "Deployment")["selma-evaluation"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "selma-training" and pod["automountServiceAccountToken"] is True
    local = objects(render(values={"training": {"jobs": {"launcher": "local"}}, "evaluation": {"separate": True}}))
    assert not by_kind(local, "Role") and all(spec["automountServiceAccountToken"] is False for _, spec in pod_specs(local))


def test_evaluation_separate_is_monitored_and_listed() -> None:
    docs = objects(render((CHART / "ci" / "monitoring-values.yaml", CHART / "ci" / "evaluation-separate-values.yaml")))
    services = by_kind(docs, "Service")
    (sm,) = by_kind(docs, "ServiceMonitor").values()
    selected = sorted(n for n, s in services.items() if _matches(sm["spec"]["selector"], s["metadata"]["labels"]))
    assert selected == sorted(f"selma-{c}" for c in (*COMPONENTS, "evaluation"))
    (rule,) = by_kind(docs, "PrometheusRule").values()
    absent = [r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "SelmaServiceAbsent"]
    assert "selma-evaluation" in {r["labels"]["job"] for r in absent}
    notes = _install_notes("--set", "evaluation.separate=true")
    assert "selma-evaluation.selma.svc:50051  (selma.v1.EvaluationService)" in notes
    assert "svc/selma-evaluation 50055:50051" in notes and ",evaluation=localhost:50055" in notes
    default_notes = _install_notes()
    assert "(selma.v1.TrainingService, selma.v1.EvaluationService)" in default_notes and "selma-evaluation" not in default_notes


# --- storage, networking, scaling -----------------------------------------------------------------


def test_minio_or_external_s3() -> None:
    default = scenario_objects("default")
    assert set(by_kind(default, "StatefulSet")) == {"selma-minio"}
    sts = by_kind(default, "StatefulSet")["selma-minio"]
    assert sts["spec"]["replicas"] == 1 and sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert "selma-minio" in by_kind(default, "Service")
    assert by_kind(default, "ConfigMap")["selma-config"]["data"]["SELMA_S3_ENDPOINT"] == "http://selma-minio:9000"
    (job,) = by_kind(default, "Job").values()
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    assert {"name": "SELMA_BUCKETS", "value": "selma"} in job["spec"]["template"]["spec"]["containers"][0]["env"]

    external = scenario_objects("external-s3")
    assert not by_kind(external, "StatefulSet")
    data = by_kind(external, "ConfigMap")["selma-config"]["data"]
    assert data["SELMA_S3_ENDPOINT"].startswith("https://") and data["SELMA_STORAGE_URI"] == "s3://selma-prod/runs"
    (job,) = by_kind(external, "Job").values()
    assert {"name": "SELMA_BUCKETS", "value": "selma-prod,selma-prod-eval"} in job["spec"]["template"]["spec"]["containers"][0]["env"]
    env = {e["name"]: e for e in _containers(external)["selma-prompts"]["env"]}
    assert env["SELMA_LLM_OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "selma-llm", "key": "api-key"}
    assert env["SELMA_S3_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "selma-s3", "key": "AWS_SECRET_ACCESS_KEY"}


def test_network_policy_admits_only_grpc_metrics_and_s3() -> None:
    docs = scenario_objects("default")
    policies = by_kind(docs, "NetworkPolicy")
    main, minio = policies["selma"], policies["selma-minio"]
    ingress_ports = sorted(p["port"] for rule in main["spec"]["ingress"] for p in rule["ports"])
    assert ingress_ports == [9400, 50051]
    assert set(main["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    grpc_rule = next(r for r in main["spec"]["ingress"] if r["ports"][0]["port"] == 50051)
    not_trainers = [{"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["trainer"]}]
    evaluators = {"app.kubernetes.io/component": "trainer", "app.kubernetes.io/part-of": "selma", "app.kubernetes.io/instance": "selma",
                  "selma.dev/task": "eval"}
    assert grpc_rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "selma"}, "matchExpressions": not_trainers}},
                                 {"podSelector": {"matchLabels": evaluators}}]
    metrics_rule = next(r for r in main["spec"]["ingress"] if r["ports"][0]["port"] == 9400)
    assert all("namespaceSelector" in peer for peer in metrics_rule["from"])
    assert sorted(p["port"] for p in minio["spec"]["ingress"][0]["ports"]) == [9000, 9001]
    # This release's pods, its trainers included (they carry app.kubernetes.io/instance).
    assert minio["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "selma"}}}]
    trainer = policies["selma-trainer"]
    assert trainer["spec"]["podSelector"] == {"matchLabels": {
        "app.kubernetes.io/component": "trainer", "app.kubernetes.io/part-of": "selma", "app.kubernetes.io/instance": "selma"}}
    # Trainers serve no gRPC: only their /metrics, to the same peers that scrape the services.
    assert "Ingress" in trainer["spec"]["policyTypes"]
    assert trainer["spec"]["ingress"] == [{"from": metrics_rule["from"], "ports": [{"port": 9400, "protocol": "TCP"}]}]
    # Every pod but MinIO is covered by the main policy, MinIO by its own.
    for o in docs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            pod_labels = o["spec"]["template"]["metadata"]["labels"]
            covering = [p for p in policies.values() if _matches(p["spec"]["podSelector"], pod_labels)]
            assert len(covering) == 1, f"{o['kind']}/{o['metadata']['name']}"


def test_serving_autoscales_and_disruptions_are_bounded() -> None:
    docs = scenario_objects("default")
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "selma-serving"}
    assert "replicas" not in by_kind(docs, "Deployment")["selma-serving"]["spec"], "the HPA owns serving's replica count"
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for component in COMPONENTS:
        selector = pdbs[f"selma-{component}"]["spec"]["selector"]
        assert selector == by_kind(docs, "Deployment")[f"selma-{component}"]["spec"]["selector"]
    gpu_hpa = by_kind(scenario_objects("gpu"), "HorizontalPodAutoscaler")["selma-serving"]
    assert any(m["type"] == "Pods" and m["pods"]["metric"]["name"] == "selma_serving_queue_depth" for m in gpu_hpa["spec"]["metrics"])
    assert not by_kind(scenario_objects("cpu-minimal"), "HorizontalPodAutoscaler")


def _trainer_job(scenario: str, gpus: int = 1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The Job the training service would create, from its real builder and the chart's settings."""
    docs = scenario_objects(scenario)
    return _job_from(docs, gpus), docs


def _job_from(docs: list[dict[str, Any]], gpus: int = 1) -> dict[str, Any]:
    """The Job the training service would create with the settings of these rendered ConfigMaps."""
    from selma.batch.kube import build_job
    from selma_training.settings import TrainingSettings

    config_maps = by_kind(docs, "ConfigMap")
    env = {**config_maps["selma-config"]["data"], **(config_maps["selma-training"].get("data") or {})}
    settings = TrainingSettings.model_validate({k.removeprefix("SELMA_").lower(): v for k, v in env.items()})
    return build_job(_launch_request(gpus), settings)


def _launch_request(gpus: int = 1) -> Any:
    from selma.batch.launchers import LaunchRequest

    return LaunchRequest(
        job_id="j0123456789",
        idempotency_key="k",
        run="quickstart",
        skill="counting",
        config_uri="s3://selma/jobs/expert_training/j0123456789/config.json",
        expert_id="e1",
        placement={"gpus": gpus},
    )


def test_trainer_jobs_fit_the_chart(tmp_path: Path) -> None:
    """Trainer Jobs built from the chart's settings are valid, use the trainer account, the chart's
    Secret and model cache, run hardened as the chart's pods do, carry the release's instance
    label, may reach MinIO and only the scrapers may reach them (on their metrics port)."""
    job, docs = _trainer_job("monitoring")
    _validate_strict(tmp_path, [job], "trainer-job")
    spec = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == NAMESPACE
    assert spec["serviceAccountName"] == "selma-trainer" and by_kind(docs, "ServiceAccount")["selma-trainer"]["automountServiceAccountToken"] is False
    container = spec["containers"][0]
    assert container["image"] == _containers(docs)["selma-render"]["image"], "one image for services and trainers"
    assert container["command"][:2] == ["selma", "train"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}
    assert refs["SELMA_S3_ACCESS_KEY"] == {"name": "selma-storage", "key": "access-key"}
    assert {v["name"]: v for v in spec["volumes"]}["model-cache"]["persistentVolumeClaim"]["claimName"] == "selma-model-cache"
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert by_kind(docs, "ConfigMap")["selma-training"]["data"]["SELMA_BATCH_INSTANCE"] == "selma"
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == pod_labels["app.kubernetes.io/instance"] == "selma"
    # Hardened like the chart's own pods: the same user, group and seccomp profile.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    psc = spec["securityContext"]
    for key in ("runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"):
        assert psc[key] == values["podSecurityContext"][key], key
    assert spec["enableServiceLinks"] is False and spec["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}], "only the trainer's /metrics"
    policies = by_kind(scenario_objects("default"), "NetworkPolicy")
    assert [n for n, p in policies.items() if _matches(p["spec"]["podSelector"], pod_labels)] == ["selma-trainer"]
    minio_peers = policies["selma-minio"]["spec"]["ingress"][0]["from"]
    assert any(_matches(peer["podSelector"], pod_labels) for peer in minio_peers), "trainers cannot reach MinIO"
    grpc_peers = next(r for r in policies["selma"]["spec"]["ingress"] if r["ports"][0]["port"] == 50051)["from"]
    assert not any(_matches(peer["podSelector"], pod_labels) for peer in grpc_peers if "podSelector" in peer), "trainers call no service"
    # Another release's trainers are not this release's.
    other = {**pod_labels, "app.kubernetes.io/instance": "other"}
    assert not any(_matches(p["spec"]["podSelector"], other) for p in policies.values())


def test_multi_node_training_fits_the_gpu_chart_and_only_its_ranks_reach_each_other(tmp_path: Path) -> None:
    """With placementPolicy.maxNodes 2 (the gpu scenario) a 2-node x 4-GPU training Job built from the chart's
    settings passes the policy, and the trainer NetworkPolicy lets this release's training pods reach each
    other (rendezvous, all-reduce); without it (default) trainer pods admit only the scrapers."""
    import dataclasses

    from selma.batch.kube import build_job, build_rendezvous_service, check_policy
    from selma_training.settings import TrainingSettings

    docs = scenario_objects("gpu")
    config_maps = by_kind(docs, "ConfigMap")
    env = {**config_maps["selma-config"]["data"], **(config_maps["selma-training"].get("data") or {})}
    settings = TrainingSettings.model_validate({k.removeprefix("SELMA_").lower(): v for k, v in env.items()})
    assert settings.batch_policy_max_nodes == 2 and settings.batch_policy_max_gpus == 8
    req = dataclasses.replace(_launch_request(4), nodes=2, processes_per_node=4)
    check_policy(req.placement, settings)
    job, svc = build_job(req, settings), build_rendezvous_service(req, settings, "5b1e2c4a-0000-4000-8000-000000000001")
    _validate_strict(tmp_path, [job, svc], "distributed-training")
    rank = job["spec"]["template"]["metadata"]["labels"]
    assert rank["selma.dev/task"] == "train"
    (policy,) = [p for p in by_kind(docs, "NetworkPolicy").values() if _matches(p["spec"]["podSelector"], rank)]
    peers = [rule for rule in policy["spec"]["ingress"] if "ports" not in rule]
    assert len(peers) == 1 and any(_matches(peer["podSelector"], rank) for peer in peers[0]["from"]), "ranks reach each other on any port"
    for other in ({**rank, "app.kubernetes.io/instance": "other"}, {**rank, "selma.dev/task": "eval"}):
        assert not any(_matches(peer["podSelector"], other) for peer in peers[0]["from"]), other
    (default_policy,) = [p for p in by_kind(scenario_objects("default"), "NetworkPolicy").values() if _matches(p["spec"]["podSelector"], rank)]
    assert all("ports" in rule for rule in default_policy["spec"]["ingress"]), "one node: no rank-to-rank traffic admitted"


@pytest.mark.parametrize("port", [9400, 9500])
def test_podmonitor_scrapes_exactly_the_trainer_pods_on_the_port_the_job_builder_sets(port: int) -> None:
    """The PodMonitor selects this release's trainer pods only (not the services, MinIO, hooks or
    another release's trainers), by the port name and number the real Job builder gives them, and
    the NetworkPolicy lets the monitoring namespace reach exactly that port."""
    from selma.batch.kube import METRICS_PORT_NAME

    if port == 9400:
        job, docs = _trainer_job("monitoring")
    else:  # a non-default ports.metrics reaches the trainer Job through the chart's settings
        docs = objects(render((CHART / "ci" / "monitoring-values.yaml",), values={"ports": {"metrics": port}}))
        job = _job_from(docs)
    assert by_kind(docs, "ConfigMap")["selma-training"]["data"]["SELMA_BATCH_METRICS_PORT"] == str(port)
    (pm,) = by_kind(docs, "PodMonitor").values()
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["metadata"]["name"] == "selma-trainer"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert set(pm["spec"]) <= {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel", "podTargetLabels", "sampleLimit"}
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["ports"] == [{"name": METRICS_PORT_NAME, "containerPort": port, "protocol": "TCP"}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SELMA_HOST"] == "0.0.0.0" and env["SELMA_METRICS_PORT"] == str(port), "the trainer serves where the port points"
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert set(ep) <= ENDPOINT_FIELDS and ep["port"] == METRICS_PORT_NAME and ep["path"] == "/metrics"
    # exactly the trainer pods: not a Deployment's, StatefulSet's or hook Job's pods, not another release's trainers
    assert _matches(pm["spec"]["selector"], pod["metadata"]["labels"])
    assert not _matches(pm["spec"]["selector"], {**pod["metadata"]["labels"], "app.kubernetes.io/instance": "other"})
    for o in docs:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            assert not _matches(pm["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"]), o["metadata"]["name"]
    # the NetworkPolicy covering trainer pods admits the scrapers on that port and nothing else
    policies = [p for p in by_kind(docs, "NetworkPolicy").values() if _matches(p["spec"]["podSelector"], pod["metadata"]["labels"])]
    (policy,) = policies
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == [port]
    # the alerts and dashboards keep to the service-side selma_training_* series (they exist for local trainers too)
    (rule,) = by_kind(docs, "PrometheusRule").values()
    training_rules = next(g for g in rule["spec"]["groups"] if g["name"] == "selma.training")["rules"]
    stalled = next(r for r in training_rules if r["alert"] == "SelmaTrainingStalled")
    assert "selma_training_step" in stalled["expr"]
    pipeline = json.loads((CHART / "files" / "dashboards" / "selma-pipeline.json").read_text())
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in pipeline["panels"]}
    for title in ("Training progress per skill", "Training loss per skill", "Steps/s per skill", "Time to completion per skill"):
        assert re.search(r"selma_training_\w+\{", exprs[title]) and "by (skill)" in exprs[title], title


def test_podmonitor_has_its_own_switch() -> None:
    docs = objects(render(values={"monitoring": {"enabled": True, "podMonitor": {"enabled": False}}}))
    assert not by_kind(docs, "PodMonitor") and by_kind(docs, "ServiceMonitor")


def test_model_cache_is_a_pvc_mounted_where_settings_point() -> None:
    docs = scenario_objects("default")
    pvc = by_kind(docs, "PersistentVolumeClaim")["selma-model-cache"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert by_kind(docs, "ConfigMap")["selma-config"]["data"]["SELMA_MODEL_CACHE_DIR"] == "/models"
    assert by_kind(docs, "ConfigMap")["selma-training"]["data"]["SELMA_BATCH_MODEL_CACHE_PVC"] == "selma-model-cache"
    for name in ("selma-render", "selma-serving"):
        mounts = {m["mountPath"]: m["name"] for m in _containers(docs)[name]["volumeMounts"]}
        assert mounts["/models"] == "model-cache" and mounts["/dev/shm"] == "dshm"


# --- manifests/ and the image -------------------------------------------------------------------


def test_manifests_are_current() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "helm" / "scripts" / "generate.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "manifests/ or dashboards are stale: run .venv/bin/python helm/scripts/generate.py\n" + proc.stderr


def test_plain_manifests_are_valid_and_namespaced(tmp_path: Path) -> None:
    docs = objects((MANIFESTS / "selma.yaml").read_text())
    _validate_strict(tmp_path, docs, "plain")
    assert docs[0] == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "selma"}}}
    assert all(d["metadata"].get("namespace") == NAMESPACE for d in docs[1:])
    assert not by_kind(docs, "Secret"), "plain manifests must not ship credentials"
    monitoring = objects((MANIFESTS / "monitoring.yaml").read_text())
    _validate_strict(tmp_path, [d for d in monitoring if not d["apiVersion"].startswith(CRD_GROUP)], "plain-monitoring")


def test_dockerfile_matches_the_chart() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert entrypoint[-1] == "selma", "the chart passes `serve <component>` as args to the selma entrypoint"
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)[-1]
    uid = re.search(r"^ARG SELMA_UID=(\d+)$", dockerfile, re.M).group(1)
    assert user.startswith("${SELMA_UID}") and int(uid) == values["podSecurityContext"]["runAsUser"] != 0
    assert re.search(rf"^EXPOSE {values['ports']['grpc']} {values['ports']['metrics']}$", dockerfile, re.M)
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-\S*runtime", dockerfile, re.M), "CUDA runtime base"
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in dockerfile
    for line in re.findall(r"^(?:ENV|ARG) .*$", dockerfile, re.M):
        assert not re.search(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|API_KEY)\w*=\S", line), line
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**") if "**" in ignore else 0] == "**", ".dockerignore must start from excluding everything"
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M)
    for line in copied:
        for src in line.split():
            assert (ROOT / src.rstrip("/")).exists(), f"COPY {src}: missing"
            assert f"!{src}" in ignore, f"COPY {src} is excluded by .dockerignore"


def _not_in_image(directory: str, names: list[str]) -> set[str]:
    """What .dockerignore keeps out of the build context: caches and the generated stubs."""
    skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".egg-info"))}
    if Path(directory).name == "selma" and Path(directory).parent.name == "shared":
        skip.add("v1")
    return skip


def test_image_sources_build_a_wheel_with_every_service(tmp_path: Path) -> None:
    """The files the Dockerfile copies build the package (stubs generated) with every service."""
    import shutil
    import zipfile

    dockerfile = (ROOT / "Dockerfile").read_text()
    src = tmp_path / "src"
    src.mkdir()
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for item in line.split():
            path = ROOT / item.rstrip("/")
            if path.is_dir():
                shutil.copytree(path, src / item.rstrip("/"), ignore=_not_in_image)
            else:
                shutil.copy2(path, src / item)
    proc = subprocess.run(
        # not -q: setuptools' warnings are part of what is checked
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # data folders are declared packages: no "Package would be ignored" warning (hundreds of lines per install)
    ignored = re.findall(r"'([\w.]+)' as an importable package", proc.stdout + proc.stderr)
    assert "would be ignored" not in proc.stdout + proc.stderr, f"setuptools warns about undeclared data folders {ignored}"
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # `selma serve <component>` (selma.app), the Job launchers (selma.batch) and every service's package
    wanted = ("selma/v1/render_service_pb2_grpc.py", "selma/app/cli.py", "selma/app/serve_cli.py", "selma/batch/kube.py", "selma/llm/settings.py",
              *(f"selma_{c}/__init__.py" for c in (*COMPONENTS, "evaluation")))
    missing = [package for package in wanted if package not in names]
    assert not missing, f"the image would lack {missing} (a package folder without __init__.py is skipped by find_packages)"
    # every data file ships: the library's, evaluation's DSG-1k annotations, the shapesworld testbed's skillset and base weights
    data_dirs = {"selma": ["data"], "selma_evaluation": ["data"], "selma_shapesworld": ["data", "weights"]}
    package_roots = {p.name: p for p in [src / "shared" / "selma", *src.glob("services/*/selma_*"), *src.glob("testbeds/*/selma_*")]}
    data_files = sorted(
        f"{name}/{f.relative_to(package_roots[name]).as_posix()}"
        for name, dirs in data_dirs.items() for d in dirs for f in (package_roots[name] / d).rglob("*")
        if f.is_file() and "__pycache__" not in f.parts
    )
    assert len(data_files) >= 16 and any(f.endswith("unet/diffusion_pytorch_model.safetensors") for f in data_files), data_files
    assert [f for f in data_files if f not in names] == []


def test_example_skillset_is_valid_for_the_cluster() -> None:
    from selma.app.skillset import load_skillset

    path = MANIFESTS / "examples" / "skillset.yaml"
    load_skillset(path)  # raises with the field and line on any error
    doc = yaml.safe_load(path.read_text())
    assert doc["spec"]["training"]["placement"]["launcher"] == "kubernetes"
    # The Secret it names is one the chart can mount for the prompt service.
    secret = doc["spec"]["prompts"]["backend"]["openaiCompatible"]["apiKey"]["name"]
    deployment = by_kind(scenario_objects("external-s3"), "Deployment")["selma-prompts"]["spec"]["template"]["spec"]
    assert {"name": f"secret-{secret}", "secret": {"secretName": secret}} in deployment["volumes"]
    mounts = {m["mountPath"]: m for m in deployment["containers"][0]["volumeMounts"]}
    assert mounts[f"/var/run/secrets/selma/{secret}"]["readOnly"] is True
    assert by_kind(scenario_objects("external-s3"), "ConfigMap")["selma-prompts"]["data"]["SELMA_LLM_SECRETS_DIR"] == "/var/run/secrets/selma"


# --- the placement policy of worker Jobs (issue #18) ----------------------------------------------


def test_placement_policy_values_become_the_launchers_policy(tmp_path: Path) -> None:
    """placementPolicy reaches the training (and a separate evaluation) service as SELMA_BATCH_POLICY_*
    settings that parse into the policy the Kubernetes launcher enforces; the schema refuses malformed values."""
    from selma.batch.kube import check_policy
    from selma.errors import InvalidArgument, PermissionDenied
    from selma_training.settings import TrainingSettings

    policy = {"priorityClasses": ["batch-low"], "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
              "nodeSelectors": {"nvidia.com/gpu.product": ["NVIDIA-L40S"]}, "maxGpus": 4, "maxMemory": "256Gi", "defaultQueue": "gpu-queue"}
    docs = objects(render(values={"placementPolicy": policy, "evaluation": {"separate": True}}))
    for name in ("selma-training", "selma-evaluation"):
        data = by_kind(docs, "ConfigMap")[name]["data"]
        settings = TrainingSettings.model_validate({k.removeprefix("SELMA_").lower(): v for k, v in data.items() if k.startswith("SELMA_BATCH_")})
        assert settings.batch_policy_priority_classes == ["batch-low"] and settings.batch_policy_max_gpus == 4
        assert settings.batch_policy_node_selectors == {"nvidia.com/gpu.product": ["NVIDIA-L40S"]}
        assert settings.batch_policy_default_queue == "gpu-queue" and settings.batch_policy_max_memory == "256Gi"
        check_policy({"gpus": 4, "priority_class_name": "batch-low", "node_selector": {"nvidia.com/gpu.product": "NVIDIA-L40S"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "TOLERATION_OPERATOR_EXISTS", "effect": "TAINT_EFFECT_NO_SCHEDULE"}]},
                     settings)
        with pytest.raises(PermissionDenied):
            check_policy({"priority_class_name": "system-cluster-critical"}, settings)
        with pytest.raises(InvalidArgument):
            check_policy({"gpus": 8}, settings)
    # the defaults: nothing beyond the cluster defaults, one GPU
    default = by_kind(scenario_objects("default"), "ConfigMap")["selma-training"]["data"]
    assert default["SELMA_BATCH_POLICY_PRIORITY_CLASSES"] == "[]" and default["SELMA_BATCH_POLICY_TOLERATIONS"] == "[]"
    assert default["SELMA_BATCH_POLICY_MAX_GPUS"] == "1"
    for bad, where in (({"maxGpus": -1}, "/placementPolicy/maxGpus"), ({"maxMemory": "lots"}, "/placementPolicy/maxMemory"),
                       ({"tolerations": [{"key": "a", "operator": "Sometimes"}]}, "/placementPolicy/tolerations/0/operator"),
                       ({"allowEverything": True}, "allowEverything")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"placementPolicy": bad}))
        proc = run_helm("template", "selma", str(CHART), "-f", str(path), check=False)
        assert proc.returncode != 0 and where in proc.stderr, (bad, proc.stderr)
