"""The chart's transport security and authentication (issue 17): TLS on by default from a Secret or
a cert-manager Certificate, the SELMA_TLS_*/SELMA_AUTH_* settings every Deployment gets, probes
and `helm test` over TLS with a token, the generated internal token (only ever inside a Secret,
its tokens file holding its sha256), and the values that fail rendering. Rendered with the real
helm; the scripts the pods run are exercised against real TLS servers in test_chart_scripts.py.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from _chart_tools import CHART, COMPONENTS, NAMESPACE, by_kind, objects, pod_specs, render, run_helm

pytestmark = pytest.mark.integration

TLS_DIR = "/etc/selma/tls"
HEALTH_SCRIPT = "/etc/selma/scripts/grpc-health.py"
CERT_MANAGER = CHART / "ci" / "cert-manager-values.yaml"
SERVER_TLS = ("SELMA_TLS_CERT_FILE", "SELMA_TLS_KEY_FILE", "SELMA_TLS_CLIENT_CA_FILE")
CLIENT_TLS = ("SELMA_TLS_CA", "SELMA_TLS_CLIENT_CERT", "SELMA_TLS_CLIENT_KEY", "SELMA_TLS_SERVER_NAME")


@functools.cache
def _rendered(scenario: str, *sets: str) -> str:
    return render((CHART / "ci" / f"{scenario}-values.yaml",), sets=sets)


def docs_of(scenario: str, *sets: str) -> list[dict[str, Any]]:
    return objects(_rendered(scenario, *sets))


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod spec of every service Deployment by name."""
    return {name: d["spec"]["template"]["spec"] for name, d in by_kind(docs, "Deployment").items()}


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _value(container: dict[str, Any], name: str) -> str:
    return _env(container)[name]["value"]


def _mounted_file(spec: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) a file path inside a container resolves to through its Secret volume mounts."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in container["volumeMounts"]:
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix) and "secret" in volumes[m["name"]]:
            secret = volumes[m["name"]]["secret"]
            file = path[len(prefix):]
            items = {i["path"]: i["key"] for i in secret.get("items", [])}
            assert not secret.get("items") or file in items, f"{path}: not among the projected keys {sorted(items)}"
            assert m.get("readOnly") is True and "subPath" not in m, "a Secret mount must be read-only and whole (renewals reach it)"
            return secret["secretName"], items.get(file, file)
    raise AssertionError(f"{path} is in no Secret volume of {container['name']}")


def _secret_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in by_kind(docs, "Secret")[name]["data"].items()}


def _services(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(by_kind(docs, "Service").keys() - {"selma-minio"})


# --- a certificate is required ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "cert-manager", "evaluation-separate"])
def test_no_two_objects_share_a_name(scenario: str) -> None:
    """The probe script's ConfigMap, the token Secret and the Certificate collide with nothing."""
    docs = docs_of(scenario)
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


def test_default_values_without_a_certificate_fail_naming_the_values_to_set() -> None:
    proc = run_helm("template", "selma", str(CHART), "--namespace", NAMESPACE, check=False)
    assert proc.returncode != 0
    assert "tls.existingSecret" in proc.stderr and "certManager.enabled" in proc.stderr, proc.stderr
    # and `helm install` of the bare chart stops before creating anything
    install = run_helm("install", "selma", str(CHART), "--namespace", NAMESPACE, "--dry-run=client", check=False)
    assert install.returncode != 0 and "tls.existingSecret" in install.stderr


INVALID = {
    "Secret and cert-manager both": ({"tls": {"existingSecret": "s"}, "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}, "exclusive"),
    "cert-manager without an issuer": ({"certManager": {"enabled": True}}, "certManager.issuerRef.name is required"),
    "cert-manager with TLS off": ({"tls": {"enabled": False}, "certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}, "certManager.enabled needs tls.enabled"),
    "mutual TLS with TLS off": ({"tls": {"enabled": False, "mutual": True}}, "tls.mutual needs tls.enabled"),
    "JWKS without issuer and audience": ({"tls": {"existingSecret": "s"}, "auth": {"jwt": {"existingSecret": "jwks"}}}, "auth.jwt.issuer and auth.jwt.audience"),
}


@pytest.mark.parametrize("values,message", INVALID.values(), ids=INVALID.keys())
def test_invalid_security_combinations_fail_with_a_message(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run_helm("template", "selma", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


BAD_VALUES = {
    "TLS switch not a boolean": ({"tls": {"enabled": "yes"}}, "/tls/enabled"),
    "unknown issuer kind": ({"certManager": {"issuerRef": {"kind": "Vault"}}}, "/certManager/issuerRef/kind"),
    "bad duration": ({"certManager": {"duration": "90 days"}}, "/certManager/duration"),
    "relative allowed dir": ({"models": {"allowedDirs": ["models"]}}, "/models/allowedDirs/0"),
    "bad bucket name": ({"models": {"allowedBuckets": ["Not_A_Bucket"]}}, "/models/allowedBuckets/0"),
    "unknown auth field": ({"auth": {"tokens": "abc"}}, "tokens"),
    "zero test steps": ({"tests": {"generate": {"steps": 0}}}, "/tests/generate/steps"),
}


@pytest.mark.parametrize("values,where", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_invalid_security_values(values: dict[str, Any], where: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    proc = run_helm("template", "selma", str(CHART), "-f", str(path), check=False)
    assert proc.returncode != 0 and where in proc.stderr, proc.stderr


# --- every Deployment serves TLS and checks tokens -----------------------------------------------


@pytest.mark.parametrize("scenario", ["default", "evaluation-separate"])
def test_every_deployment_serves_tls_from_the_secret_and_checks_tokens(scenario: str) -> None:
    docs = docs_of(scenario)
    deployments = _deployments(docs)
    assert len(deployments) == len(COMPONENTS) + (scenario == "evaluation-separate")
    internal = _secret_data(docs, "selma-auth")
    for name, spec in deployments.items():
        (c,) = spec["containers"]
        env = _env(c)
        assert _mounted_file(spec, c, _value(c, "SELMA_TLS_CERT_FILE")) == ("selma-tls", "tls.crt"), name
        assert _mounted_file(spec, c, _value(c, "SELMA_TLS_KEY_FILE")) == ("selma-tls", "tls.key"), name
        assert _mounted_file(spec, c, _value(c, "SELMA_TLS_CA")) == ("selma-tls", "ca.crt"), name
        assert "SELMA_TLS_CLIENT_CA_FILE" not in env and "SELMA_TLS_CLIENT_CERT" not in env, f"{name}: mutual TLS is off by default"
        assert env.get("SELMA_ALLOW_PLAINTEXT", {}).get("value", "false") == "false", name
        # tokens: the internal tokens file only (no users' Secret configured), health left open for the probes
        (tokens_file,) = _value(c, "SELMA_AUTH_TOKENS_FILE").split(",")
        secret, key = _mounted_file(spec, c, tokens_file)
        assert (secret, key) == ("selma-auth", "tokens.yaml") and key in internal
        tls_volume = next(v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "selma-auth")
        assert [i["key"] for i in tls_volume["secret"]["items"]] == ["tokens.yaml"], "servers mount the digest, not the token"
        assert _value(c, "SELMA_AUTH_OPEN_HEALTH") == "true"
        assert env["SELMA_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "selma-auth", "key": "token"}
        assert _value(c, "SELMA_MODEL_ALLOWED_DIRS") == "" and _value(c, "SELMA_MODEL_ALLOWED_BUCKETS") == ""
        # probes: the health script, once, against the pod's own port, verified as the Service's name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = c[probe]["exec"]["command"]
            assert command[:3] == ["python", HEALTH_SCRIPT, "--wait=0"], command
            assert f"--server-name={name}" in command and name in _services(docs)
            assert command[-1].startswith("127.0.0.1:50051=")
            assert c[probe]["timeoutSeconds"] >= 5
        scripts_mount = next(m for m in c["volumeMounts"] if HEALTH_SCRIPT.startswith(m["mountPath"] + "/"))
        volume = next(v for v in spec["volumes"] if v["name"] == scripts_mount["name"])
        script = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]["data"]["grpc-health.py"]
        assert script == (CHART / "files" / "grpc-health.py").read_text()
        # the Job launchers tell their workers which Secrets to mount
        launches = name in ("selma-training", "selma-evaluation")
        assert (env.get("SELMA_BATCH_TLS_SECRET", {}).get("value") == "selma-tls") is launches, name
        assert (env.get("SELMA_BATCH_TOKEN_SECRET", {}).get("value") == "selma-auth") is launches, name


def test_tls_disabled_serves_plaintext_explicitly_with_native_probes() -> None:
    docs = docs_of("default", "tls.enabled=false")
    assert "selma-probes" not in by_kind(docs, "ConfigMap")
    for name, spec in _deployments(docs).items():
        (c,) = spec["containers"]
        env = _env(c)
        assert _value(c, "SELMA_ALLOW_PLAINTEXT") == "true", name
        assert not [n for n in env if n in SERVER_TLS + CLIENT_TLS or n == "SELMA_BATCH_TLS_SECRET"], name
        assert not [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "selma-tls"], name
        assert "grpc" in c["readinessProbe"] and "grpc" in c["livenessProbe"] and "grpc" in c["startupProbe"], name
        assert "SELMA_AUTH_TOKENS_FILE" in env, "tokens stay on without TLS"
    (pod,) = by_kind(docs, "Pod").values()
    for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert "SELMA_TLS_CA" not in _env(c)


def test_tokens_on_health_checks_make_probes_send_the_internal_token() -> None:
    """auth.openHealth=false: native gRPC probes cannot send a token, so the health script runs (with SELMA_TOKEN)."""
    docs = docs_of("default", "tls.enabled=false", "auth.openHealth=false")
    for name, spec in _deployments(docs).items():
        (c,) = spec["containers"]
        assert _value(c, "SELMA_AUTH_OPEN_HEALTH") == "false"
        assert c["readinessProbe"]["exec"]["command"][:2] == ["python", HEALTH_SCRIPT], name
        assert not [a for a in c["readinessProbe"]["exec"]["command"] if a.startswith("--server-name")], "no TLS, no name to verify"
        assert _env(c)["SELMA_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "selma-auth"


def test_auth_disabled_leaves_no_tokens() -> None:
    docs = docs_of("default", "auth.enabled=false")
    assert "selma-auth" not in by_kind(docs, "Secret")
    for name, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert not [n for n in _env(c) if n.startswith("SELMA_AUTH_") or n in ("SELMA_TOKEN", "SELMA_BATCH_TOKEN_SECRET")], name


def test_mutual_tls_jwt_users_tokens_and_model_allowlists() -> None:
    """The cert-manager scenario: mutual TLS (every service presents its certificate as a client),
    the users' tokens file beside the internal one, JWKS verification, model-source allowlists."""
    docs = docs_of("cert-manager")
    for name, spec in _deployments(docs).items():
        (c,) = spec["containers"]
        assert _mounted_file(spec, c, _value(c, "SELMA_TLS_CLIENT_CA_FILE")) == ("selma-tls", "ca.crt")
        assert _mounted_file(spec, c, _value(c, "SELMA_TLS_CLIENT_CERT")) == ("selma-tls", "tls.crt")
        assert _mounted_file(spec, c, _value(c, "SELMA_TLS_CLIENT_KEY")) == ("selma-tls", "tls.key")
        files = [_mounted_file(spec, c, f) for f in _value(c, "SELMA_AUTH_TOKENS_FILE").split(",")]
        assert files == [("selma-auth", "tokens.yaml"), ("selma-tokens", "tokens.yaml")], name
        assert _mounted_file(spec, c, _value(c, "SELMA_AUTH_JWKS_FILE")) == ("selma-oidc-jwks", "jwks.json")
        assert _value(c, "SELMA_AUTH_JWT_ISSUER") == "https://login.example.com" and _value(c, "SELMA_AUTH_JWT_AUDIENCE") == "selma"
        assert _value(c, "SELMA_MODEL_ALLOWED_DIRS") == "/models/local" and _value(c, "SELMA_MODEL_ALLOWED_BUCKETS") == "selma-shared-models"
    (pod,) = by_kind(docs, "Pod").values()
    for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        assert _mounted_file(pod["spec"], c, _value(c, "SELMA_TLS_CLIENT_CERT")) == ("selma-tls", "tls.crt"), c["name"]
        assert _mounted_file(pod["spec"], c, _value(c, "SELMA_TLS_CLIENT_KEY")) == ("selma-tls", "tls.key"), c["name"]


# --- cert-manager --------------------------------------------------------------------------------

CERTIFICATE_SPEC = {"secretName", "secretTemplate", "commonName", "dnsNames", "duration", "renewBefore", "privateKey", "usages", "issuerRef"}


@pytest.mark.parametrize("extra", [(), ("evaluation.separate=true",)], ids=["four-services", "evaluation-separate"])
def test_cert_manager_certificate_covers_every_service_name(extra: tuple[str, ...]) -> None:
    docs = docs_of("cert-manager", *extra)
    (cert,) = by_kind(docs, "Certificate").values()
    assert cert["apiVersion"] == "cert-manager.io/v1" and set(cert["spec"]) <= CERTIFICATE_SPEC
    spec = cert["spec"]
    assert spec["issuerRef"] == {"name": "selma-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert {"server auth", "client auth"} <= set(spec["usages"]), "one certificate serves and (mutual TLS) identifies the services"
    services = _services(docs)
    assert ("selma-evaluation" in services) is bool(extra)
    for svc in services:
        for dns in (svc, f"{svc}.{NAMESPACE}", f"{svc}.{NAMESPACE}.svc", f"{svc}.{NAMESPACE}.svc.cluster.local"):
            assert dns in spec["dnsNames"], dns
    assert "selma.example.com" in spec["dnsNames"] and len(spec["dnsNames"]) == len(set(spec["dnsNames"]))
    # the Secret cert-manager writes is the one every pod mounts; the chart itself creates no TLS Secret
    assert spec["secretName"] not in by_kind(docs, "Secret")
    for name, pod in _deployments(docs).items():
        (c,) = pod["containers"]
        assert _mounted_file(pod, c, _value(c, "SELMA_TLS_CERT_FILE"))[0] == spec["secretName"], name
        assert f"--server-name={name}" in c["readinessProbe"]["exec"]["command"] and name in spec["dnsNames"]


def test_certificate_only_with_cert_manager() -> None:
    assert not by_kind(docs_of("default"), "Certificate")
    assert not by_kind(docs_of("default", "tls.enabled=false"), "Certificate")


def test_network_policies_are_the_same_with_or_without_tls() -> None:
    policies = by_kind(docs_of("default"), "NetworkPolicy")
    assert policies and by_kind(docs_of("default", "tls.enabled=false"), "NetworkPolicy") == policies
    assert by_kind(docs_of("cert-manager"), "NetworkPolicy") == policies


# --- the internal token ---------------------------------------------------------------------------


def test_internal_token_lives_only_in_its_secret_and_its_tokens_file_holds_its_sha256() -> None:
    proc = run_helm("install", "selma", str(CHART), "--namespace", NAMESPACE, "--dry-run=client", "-f", str(CHART / "ci" / "default-values.yaml"))
    manifest, notes = proc.stdout.split("NOTES:", 1)
    docs = objects(manifest.split("MANIFEST:", 1)[1])
    data = _secret_data(docs, "selma-auth")
    token = data["token"]
    assert len(token) >= 32 and token.isalnum()
    gc_token = data["gc-token"]
    assert len(gc_token) >= 32 and gc_token.isalnum() and gc_token != token
    entries = yaml.safe_load(data["tokens.yaml"])["tokens"]
    assert entries == [
        {"name": "selma-internal", "sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": ["generate", "read", "run"]},
        {"name": "selma-gc", "sha256": hashlib.sha256(gc_token.encode()).hexdigest(), "scopes": ["admin"]},
    ]
    hooks = objects(proc.stdout.split("HOOKS:", 1)[1].split("MANIFEST:", 1)[0])  # helm test pod and its ConfigMap
    assert hooks
    for secret in (token, gc_token):
        encoded = base64.b64encode(secret.encode()).decode()
        for d in docs + hooks:
            if d["kind"] != "Secret":
                text = json.dumps(d)
                assert secret not in text and encoded not in text, f"{d['kind']}/{d['metadata']['name']} holds a token"
        assert secret not in notes and encoded not in notes
    # the gc CronJob (CollectGarbage needs admin) sends its own token over TLS; nothing else gets that token
    (cron,) = by_kind(docs, "CronJob").values()
    (gc,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert _env(gc)["SELMA_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "selma-auth", "key": "gc-token"}
    assert _value(gc, "SELMA_TLS_CA") == "/etc/selma/tls/ca.crt"
    for d in docs:
        if d["kind"] in ("Deployment", "Pod", "Job") and "gc-token" in json.dumps(d):
            raise AssertionError(f"{d['kind']}/{d['metadata']['name']} can read the gc token")


def test_internal_token_from_an_existing_secret_is_not_generated() -> None:
    docs = docs_of("default", "auth.internal.existingSecret=selma-own-token")
    assert "selma-auth" not in by_kind(docs, "Secret")
    for spec in _deployments(docs).values():
        (c,) = spec["containers"]
        assert _env(c)["SELMA_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "selma-own-token", "key": "token"}
        assert _mounted_file(spec, c, _value(c, "SELMA_AUTH_TOKENS_FILE")) == ("selma-own-token", "tokens.yaml")
    assert _value(_deployments(docs)["selma-training"]["containers"][0], "SELMA_BATCH_TOKEN_SECRET") == "selma-own-token"


# --- helm test ------------------------------------------------------------------------------------


def test_helm_test_pod_checks_health_then_calls_generate_with_the_token_over_tls() -> None:
    docs = docs_of("default")
    (pod,) = by_kind(docs, "Pod").values()
    spec = pod["spec"]
    (health,) = spec["initContainers"]
    (generate,) = spec["containers"]
    assert health["command"] == ["python", "/scripts/grpc-health.py"]
    assert generate["command"] == ["python", "/scripts/grpc-generate.py"] and generate["args"][-1] == "selma-serving:50051"
    assert "--steps=4" in generate["args"] and "--prompt=a red apple on a wooden table" in generate["args"]
    for c in (health, generate):
        assert _env(c)["SELMA_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "selma-auth", "key": "token"}
        assert _mounted_file(spec, c, _value(c, "SELMA_TLS_CA")) == ("selma-tls", "ca.crt")
        assert "SELMA_TLS_CLIENT_KEY" not in _env(c)
    tls = next(v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == "selma-tls")
    assert [i["key"] for i in tls["secret"]["items"]] == ["ca.crt"], "without mutual TLS a client needs only the CA"
    scripts = by_kind(docs, "ConfigMap")["selma-test-scripts"]["data"]
    for file in ("grpc-health.py", "grpc-generate.py"):
        assert scripts[file] == (CHART / "files" / file).read_text()
    # without serving (or with tests.generate.enabled=false) the health check is the test
    for sets in (("serving.enabled=false", "gc.enabled=false"), ("tests.generate.enabled=false",)):
        (pod,) = by_kind(docs_of("default", *sets), "Pod").values()
        assert [c["name"] for c in pod["spec"]["containers"]] == ["grpc-health"] and not pod["spec"].get("initContainers")


def test_llm_and_vqa_endpoints_are_an_allowlist_the_chart_never_opens() -> None:
    """A caller cannot make the services call an address of its choosing (SSRF): the chart passes the
    endpoints the operator lists and never sets SELMA_LLM_ALLOW_ANY_BASE_URL / SELMA_EVAL_ALLOW_ANY_BASE_URL."""
    docs = docs_of("default", "llm.baseUrl=http://vllm.llm:8000/v1", "llm.allowedBaseUrls={http://tgi.llm:8080/v1}",
                   "evaluation.vqaAllowedBaseUrls={http://qwen-vl.llm:8000/v1}")
    opened = ("SELMA_LLM_ALLOW_ANY_BASE_URL", "SELMA_EVAL_ALLOW_ANY_BASE_URL")
    for name, spec in _deployments(docs).items():
        for c in spec["containers"]:
            assert not set(_env(c)) & set(opened), name
    maps = {name: cm.get("data", {}) for name, cm in by_kind(docs, "ConfigMap").items()}
    assert not [name for name, data in maps.items() if set(data) & set(opened)]
    prompts = next(data for data in maps.values() if "SELMA_LLM_OPENAI_BASE_URL" in data and "SELMA_EVAL_VQA_MODEL" not in data)
    assert json.loads(prompts["SELMA_LLM_ALLOWED_BASE_URLS"]) == ["http://tgi.llm:8080/v1"]
    evaluation = next(data for data in maps.values() if "SELMA_EVAL_VQA_MODEL" in data)
    assert json.loads(evaluation["SELMA_EVAL_ALLOWED_BASE_URLS"]) == ["http://qwen-vl.llm:8000/v1"]
    assert json.loads(evaluation["SELMA_LLM_ALLOWED_BASE_URLS"]) == ["http://tgi.llm:8080/v1"]  # its question writer
