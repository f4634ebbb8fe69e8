"""Every RPC of every selma.v1 service, enumerated from the descriptors, behind the auth interceptor.

All five services run in one real server on 127.0.0.1 with a tokens file (sha256 digests only)
and a JWKS file.  For each RPC: no token is UNAUTHENTICATED, a token without the RPC's scope is
PERMISSION_DENIED naming that scope, the right scope gets past auth (whatever the service then says
to an empty request).  An RPC missing from ``selma.auth.METHOD_SCOPES`` fails this test.
"""

from __future__ import annotations

import json
import logging
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from selma import auth
from selma.config import SelmaSettings
from selma.security import ClientSecurity, make_channel
from selma.server import SelmaServer, ServiceRegistration
from selma.v1 import (
    evaluation_service_pb2,
    prompt_service_pb2,
    render_service_pb2,
    serving_service_pb2,
    training_service_pb2,
)

pytestmark = pytest.mark.integration

MODULES = (prompt_service_pb2, render_service_pb2, training_service_pb2, serving_service_pb2, evaluation_service_pb2)
# (full method name, server streaming) of every RPC the API declares
RPCS = sorted(
    (f"/{svc.full_name}/{m.name}", m.server_streaming)
    for mod in MODULES
    for svc in mod.DESCRIPTOR.services_by_name.values()
    for m in svc.methods
)
ISSUER, AUDIENCE = "https://idp.selma.test", "selma-api"
EXTRA_METHOD = "/selma.testing.Unlisted/Do"  # served, but in no scope table


def test_the_descriptors_list_every_service_and_the_scope_table_covers_exactly_their_rpcs():
    services = {m.split("/")[1] for m, _ in RPCS}
    assert services == {f"selma.v1.{n}" for n in ("PromptService", "RenderService", "TrainingService", "ServingService", "EvaluationService")}
    missing = [m for m, _ in RPCS if m not in auth.METHOD_SCOPES]
    assert not missing, f"RPCs without an entry in selma.auth.METHOD_SCOPES: {missing}"
    stale = set(auth.METHOD_SCOPES) - {m for m, _ in RPCS}
    assert not stale, f"METHOD_SCOPES names RPCs the API does not have: {stale}"
    assert set(auth.METHOD_SCOPES.values()) <= set(auth.SCOPES)
    # the issue's mapping, spot-checked
    assert auth.METHOD_SCOPES["/selma.v1.ServingService/Generate"] == "generate"
    assert auth.METHOD_SCOPES["/selma.v1.ServingService/GetLineage"] == "read"
    assert auth.METHOD_SCOPES["/selma.v1.TrainingService/StartExpertTraining"] == "run"
    assert auth.METHOD_SCOPES["/selma.v1.ServingService/UnloadModel"] == "admin"
    # the gate's job RPCs: starting and cancelling spend compute (run), looking is read
    assert auth.METHOD_SCOPES["/selma.v1.EvaluationService/StartGate"] == "run"
    assert auth.METHOD_SCOPES["/selma.v1.EvaluationService/CancelGate"] == "run"
    assert auth.METHOD_SCOPES["/selma.v1.EvaluationService/WatchGate"] == "read"


@pytest.fixture(scope="module")
def signing_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, signing_key):
    """All five services on one server with auth on; tokens: one per scope plus `stranger` (all names)."""
    from selma_evaluation import server as evaluation
    from selma_evaluation.settings import EvaluationSettings
    from selma_prompts.server import build_core
    from selma_prompts.settings import PromptSettings
    from selma_render.server import RenderCore
    from selma_render.server import registration as render_registration
    from selma_render.settings import RenderSettings
    from selma_serving.core import ServingCore
    from selma_serving.server import registration as serving_registration
    from selma_serving.settings import ServingSettings
    from selma_training import server as training
    from selma_training.settings import TrainingSettings

    root = tmp_path_factory.mktemp("auth")
    tokens = {scope: auth.mint_token() for scope in auth.SCOPES}
    entries = [auth.token_entry(f"{scope}-client", token, [scope]) for scope, token in tokens.items()]
    (root / "tokens.yaml").write_text(json.dumps({"tokens": entries}))  # JSON is YAML too
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key()))
    (root / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    common = dict(data_dir=root / "data", storage_uri=(root / "storage").as_uri(), grpc_workers=16, log_level="WARNING",
                  hf_offline=True, auth_tokens_file=str(root / "tokens.yaml"), auth_jwks_file=root / "jwks.json",
                  auth_jwt_issuer=ISSUER, auth_jwt_audience=AUDIENCE)
    prompts = build_core(PromptSettings(**common))
    render = RenderCore(RenderSettings(**common))
    serving = ServingCore(ServingSettings(**common, serving_base_model="tiny://sd"))
    hosted_training = training.hosted(TrainingSettings(**common))
    hosted_evaluation = evaluation.hosted(EvaluationSettings(**common), launchers=hosted_training.core.launchers)

    def unlisted(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"should never run"

    extra = grpc.method_handlers_generic_handler("selma.testing.Unlisted", {"Do": grpc.unary_unary_rpc_method_handler(unlisted)})
    registrations = [prompts.registration(), render_registration(render), hosted_training.registration, serving_registration(serving),
                     hosted_evaluation.registration, ServiceRegistration(name="selma.testing.Unlisted", handlers=[extra])]
    server = SelmaServer(SelmaSettings(**common), registrations, name="auth-test").start()
    server.set_ready(True)
    channel = grpc.insecure_channel(server.address)
    try:
        yield {"server": server, "channel": channel, "tokens": tokens, "root": root, "serving": serving}
    finally:
        channel.close()
        server.stop(0)
        hosted_evaluation.on_stop()
        hosted_training.on_stop()
        serving.shutdown()
        render.shutdown()
        prompts.jobs.shutdown()


def call(channel: grpc.Channel, method: str, streaming: bool, token: str | None) -> grpc.StatusCode:
    """One call with an empty request; the status code it ends with."""
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    try:
        if streaming:
            for _ in channel.unary_stream(method)(b"", metadata=metadata, timeout=60):
                break
        else:
            channel.unary_unary(method)(b"", metadata=metadata, timeout=60)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def details(channel: grpc.Channel, method: str, token: str) -> str:
    try:
        channel.unary_unary(method)(b"", metadata=[("authorization", f"Bearer {token}")], timeout=60)
    except grpc.RpcError as e:
        return e.details() or ""
    return ""


# A token that has some scope, but not the one needed (admin would have it).
OTHER_SCOPE = {"generate": "read", "read": "generate", "run": "read", "admin": "run"}
AUTH_ERRORS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.parametrize(("method", "streaming"), RPCS, ids=[m for m, _ in RPCS])
def test_every_rpc_needs_a_token_with_its_scope(secured, method, streaming):
    channel, tokens = secured["channel"], secured["tokens"]
    scope = auth.METHOD_SCOPES.get(method)
    assert scope is not None, f"{method} has no entry in selma.auth.METHOD_SCOPES"
    assert call(channel, method, streaming, None) == grpc.StatusCode.UNAUTHENTICATED
    assert call(channel, method, streaming, "selma_not-a-real-token") == grpc.StatusCode.UNAUTHENTICATED
    wrong = tokens[OTHER_SCOPE[scope]]
    assert call(channel, method, streaming, wrong) == grpc.StatusCode.PERMISSION_DENIED
    if not streaming:
        assert f"scope {scope!r}" in details(channel, method, wrong)
    assert call(channel, method, streaming, tokens[scope]) not in AUTH_ERRORS
    assert call(channel, method, streaming, tokens["admin"]) not in AUTH_ERRORS  # admin implies every scope


def test_a_served_method_missing_from_the_scope_table_is_refused_even_to_admin(secured):
    code = call(secured["channel"], EXTRA_METHOD, False, secured["tokens"]["admin"])
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "scope table" in details(secured["channel"], EXTRA_METHOD, secured["tokens"]["admin"])
    assert call(secured["channel"], EXTRA_METHOD, False, None) == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_answer_without_a_token(secured):
    stub = health_pb2_grpc.HealthStub(secured["channel"])
    assert stub.Check(health_pb2.HealthCheckRequest(service="selma.v1.ServingService"), timeout=10).status == \
        health_pb2.HealthCheckResponse.SERVING


def test_denials_are_counted_and_logged_by_token_name_never_the_token(secured, caplog):
    channel, tokens = secured["channel"], secured["tokens"]
    method = "/selma.v1.ServingService/UnloadModel"
    labels = {"grpc_service": "selma.v1.ServingService", "grpc_method": "UnloadModel"}

    def count(name: str, code: str, metric: str = "selma_grpc_server_auth_total") -> float:
        extra = {"token": name} if "auth" in metric else {"grpc_type": "unary"}
        return REGISTRY.get_sample_value(metric, {**labels, **extra, "grpc_code": code}) or 0.0

    before = (count("generate-client", "PERMISSION_DENIED"), count("anonymous", "UNAUTHENTICATED"),
              count("", "PERMISSION_DENIED", "selma_grpc_server_handled_total"))
    with caplog.at_level(logging.INFO, logger="selma"):
        assert call(channel, method, False, tokens["generate"]) == grpc.StatusCode.PERMISSION_DENIED
        assert call(channel, method, False, None) == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, "/selma.v1.ServingService/ListModels", False, tokens["generate"]) not in AUTH_ERRORS
    assert count("generate-client", "PERMISSION_DENIED") == before[0] + 1
    assert count("anonymous", "UNAUTHENTICATED") == before[1] + 1
    assert count("", "PERMISSION_DENIED", "selma_grpc_server_handled_total") == before[2] + 1  # the RPC metrics see it too
    assert "generate-client" in caplog.text and "UnloadModel" in caplog.text and "PERMISSION_DENIED" in caplog.text
    assert "auth: generate-client called /selma.v1.ServingService/ListModels" in caplog.text
    for token in tokens.values():
        assert token not in caplog.text


def test_a_tokens_file_rewritten_on_disk_is_used_without_a_restart(secured):
    channel, root = secured["channel"], secured["root"]
    path = root / "tokens.yaml"
    original = path.read_text()
    newcomer = auth.mint_token()
    try:
        assert call(channel, "/selma.v1.ServingService/ListModels", False, newcomer) == grpc.StatusCode.UNAUTHENTICATED
        auth.add_token_entry(path, auth.token_entry("newcomer", newcomer, ["generate"]))
        assert newcomer not in path.read_text()  # only its digest is at rest
        assert call(channel, "/selma.v1.ServingService/ListModels", False, newcomer) not in AUTH_ERRORS
    finally:
        tmp = path.with_suffix(".restore")
        tmp.write_text(original)
        tmp.replace(path)
    assert call(channel, "/selma.v1.ServingService/ListModels", False, newcomer) == grpc.StatusCode.UNAUTHENTICATED  # revoked


def test_generate_is_queued_as_its_token_and_high_priority_needs_admin(secured, monkeypatch):
    """Fair admission rotates over token names, and a non-admin's HIGH priority is served at NORMAL."""
    from selma.v1 import serving_service_pb2 as serving_pb

    seen: list[tuple[str, str]] = []

    def generate(req, **kw):
        seen.append((kw["client"], kw["priority"]))
        return iter(())

    monkeypatch.setattr(secured["serving"].engine, "generate", generate)
    request = serving_pb.GenerateRequest(prompts=["x"], priority=serving_pb.GENERATION_PRIORITY_HIGH).SerializeToString()
    for scope in ("generate", "admin"):
        metadata = [("authorization", f"Bearer {secured['tokens'][scope]}")]
        assert list(secured["channel"].unary_stream("/selma.v1.ServingService/Generate")(request, metadata=metadata, timeout=60)) == []
    assert seen == [("token:generate-client", "normal"), ("token:admin-client", "high")]


def test_the_client_channel_sends_its_token(secured):
    with make_channel(secured["server"].address, ClientSecurity(token=secured["tokens"]["generate"])) as channel:
        stub = channel.unary_unary("/selma.v1.ServingService/ListModels")
        try:
            stub(b"", timeout=60)
        except grpc.RpcError as e:
            assert e.code() not in AUTH_ERRORS


# ----------------------------------------------------------------------------------------------- JWT


def make_jwt(key, *, scope: str = "generate", iss: str = ISSUER, aud: str = AUDIENCE, exp_in: float = 300, kid: str = "k1",
             claim: str = "scope") -> str:
    now = int(time.time())
    claims = {"sub": "ci-pipeline", "iss": iss, "aud": aud, "iat": now, "exp": now + int(exp_in), claim: scope}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def test_a_jwt_signed_by_the_jwks_key_is_accepted_with_its_scopes(secured, signing_key, caplog):
    channel = secured["channel"]
    generate = make_jwt(signing_key, scope="generate")
    with caplog.at_level(logging.INFO, logger="selma.auth"):
        assert call(channel, "/selma.v1.ServingService/ListModels", False, generate) not in AUTH_ERRORS
    assert "ci-pipeline" in caplog.text and generate not in caplog.text
    assert call(channel, "/selma.v1.ServingService/GetLineage", False, generate) == grpc.StatusCode.PERMISSION_DENIED
    both = make_jwt(signing_key, scope=["generate", "read"], claim="scp")  # Azure-style list in `scp`
    assert call(channel, "/selma.v1.ServingService/GetLineage", False, both) not in AUTH_ERRORS


@pytest.mark.parametrize("bad", ["issuer", "audience", "expired", "other key", "unknown kid"])
def test_a_jwt_with_the_wrong_issuer_audience_expiry_or_key_is_unauthenticated(secured, signing_key, bad):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = {
        "issuer": lambda: make_jwt(signing_key, iss="https://evil.example"),
        "audience": lambda: make_jwt(signing_key, aud="someone-else"),
        "expired": lambda: make_jwt(signing_key, exp_in=-600),
        "other key": lambda: make_jwt(other),
        "unknown kid": lambda: make_jwt(other, kid="k2"),
    }[bad]()
    assert call(secured["channel"], "/selma.v1.ServingService/ListModels", False, token) == grpc.StatusCode.UNAUTHENTICATED


def test_auth_is_off_by_default_and_closed_health_needs_a_token(tmp_path):
    assert not SelmaSettings().auth_enabled and auth.interceptors(SelmaSettings()) == []
    token = auth.mint_token()
    (tmp_path / "tokens.yaml").write_text(json.dumps({"tokens": [auth.token_entry("probe", token, ["read"])]}))
    server = SelmaServer(SelmaSettings(data_dir=tmp_path, auth_tokens_file=str(tmp_path / "tokens.yaml"), auth_open_health=False),
                         [], name="closed").start()
    try:
        server.set_ready(True)
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Check(health_pb2.HealthCheckRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)

