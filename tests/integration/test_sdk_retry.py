"""The SDK's retry and replica fallback against real gRPC servers on 127.0.0.1 that script their answers."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from selma.client import Endpoints, SelmaClient, generate_routing_key
from selma.routing import RetryPolicy, rank
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc


class ScriptedServing(pb_grpc.ServingServiceServicer):
    """Answers each Generate with the next scripted outcome: a status code (with optional retry-after-ms), or "ok"."""

    def __init__(self, script: list[tuple]) -> None:
        self.script = list(script)
        self.calls = 0
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            self.calls += 1
            step = self.script.pop(0) if self.script else ("ok",)
        if step[0] == "image-then":  # one image, then the error
            yield pb.GenerateResponse(image=common_pb2.GeneratedImage(png=b"png-0"), index=0, total=2)
            context.abort(step[1], "failed after the first image")
        if step[0] != "ok":
            code, retry_after_ms = step[0], (step[1] if len(step) > 1 else None)
            if retry_after_ms is not None:
                context.set_trailing_metadata((("retry-after-ms", str(retry_after_ms)),))
            context.abort(code, f"scripted {code.name}")
        for i in range(2):
            yield pb.GenerateResponse(image=common_pb2.GeneratedImage(png=f"png-{i}".encode()), index=i, total=2)

    def ListModels(self, request, context):
        with self.lock:
            self.calls += 1
            step = self.script.pop(0) if self.script else ("ok",)
        if step[0] != "ok":
            context.abort(step[0], f"scripted {step[0].name}")
        return pb.ListModelsResponse(models=[pb.ModelInfo(model_name="base")])


@pytest.fixture
def start_server():
    servers = []

    def start(script: list[tuple]) -> tuple[str, ScriptedServing]:
        servicer = ScriptedServing(script)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ServingServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", servicer

    yield start
    for s in servers:
        s.stop(0)


def _recording_policy(**kwargs) -> tuple[RetryPolicy, list[float]]:
    waits: list[float] = []
    return RetryPolicy(sleep=waits.append, **kwargs), waits


def test_generate_retries_resource_exhausted_honouring_retry_after_ms_then_succeeds(start_server):
    address, servicer = start_server([(grpc.StatusCode.RESOURCE_EXHAUSTED, 40), (grpc.StatusCode.RESOURCE_EXHAUSTED, 70)])
    policy, waits = _recording_policy(jitter=0.25)
    with SelmaClient(Endpoints(serving=address), retry=policy) as client:
        images = [r.image.png for r in client.generate(["a cat"], experts={"e1": 0.5, "e2": 0.5})]
    assert images == [b"png-0", b"png-1"]
    assert servicer.calls == 3
    # each wait is the server's hint, never less, plus at most the policy's jitter
    assert len(waits) == 2
    assert 0.040 <= waits[0] <= 0.040 * 1.25 and 0.070 <= waits[1] <= 0.070 * 1.25


def test_generate_without_hint_backs_off_exponentially_within_the_attempt_bound(start_server):
    address, servicer = start_server([(grpc.StatusCode.RESOURCE_EXHAUSTED,)] * 10)
    policy, waits = _recording_policy(max_attempts=4, initial_backoff=1.0, multiplier=2.0, max_backoff=3.0, jitter=0.5)
    with SelmaClient(Endpoints(serving=address), retry=policy) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate(["a cat"]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls == 4 and len(waits) == 3
    caps = [1.0, 2.0, 3.0]
    assert all(cap * 0.5 <= w <= cap for w, cap in zip(waits, caps, strict=True))


def test_generate_is_not_retried_once_an_image_arrived(start_server):
    address, servicer = start_server([("image-then", grpc.StatusCode.UNAVAILABLE)])
    policy, waits = _recording_policy()
    got = []
    with SelmaClient(Endpoints(serving=address), retry=policy) as client, pytest.raises(grpc.RpcError) as err:
        for r in client.generate(["a cat"]):
            got.append(r.image.png)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert got == [b"png-0"] and servicer.calls == 1 and waits == []


def test_other_errors_are_not_retried(start_server):
    address, servicer = start_server([(grpc.StatusCode.INVALID_ARGUMENT,)])
    policy, waits = _recording_policy()
    with SelmaClient(Endpoints(serving=address), retry=policy) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate(["a cat"]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and servicer.calls == 1 and waits == []


def test_an_unavailable_replica_falls_through_to_the_next_in_hash_order_without_waiting(start_server):
    a, serv_a = start_server([(grpc.StatusCode.UNAVAILABLE,)] * 5)
    b, serv_b = start_server([])
    request = pb.GenerateRequest(prompts=["a cat"], experts=common_pb2.MergeSpec(
        method=common_pb2.MERGE_METHOD_MEAN_DELTA, experts=[common_pb2.ExpertWeight(expert_id="e1", weight=1.0)]))
    first, second = rank(generate_routing_key(request), [a, b])
    policy, waits = _recording_policy()
    by_address = {a: serv_a, b: serv_b}
    # make the scripted-unavailable server the preferred one for this key
    if first != a:
        by_address[first].script, by_address[second].script = [(grpc.StatusCode.UNAVAILABLE,)] * 5, []
    with SelmaClient(Endpoints(serving=f"{a}|{b}"), retry=policy) as client:
        assert [address for address, _ in client.serving_stubs(generate_routing_key(request))] == [first, second]
        images = [r.image.png for r in client.generate(["a cat"], experts={"e1": 1.0})]
    assert images == [b"png-0", b"png-1"]
    assert by_address[first].calls == 1 and by_address[second].calls == 1 and waits == []


def _two_replicas(start_server, request, preferred_script, other_script):
    """Two scripted servers; the one ``request``'s key prefers gets ``preferred_script``."""
    a, serv_a = start_server([])
    b, serv_b = start_server([])
    first, second = rank(generate_routing_key(request), [a, b])
    by_address = {a: serv_a, b: serv_b}
    by_address[first].script, by_address[second].script = list(preferred_script), list(other_script)
    return f"{a}|{b}", by_address[first], by_address[second]


MIX_REQUEST = pb.GenerateRequest(prompts=["a cat"], experts=common_pb2.MergeSpec(
    method=common_pb2.MERGE_METHOD_MEAN_DELTA, experts=[common_pb2.ExpertWeight(expert_id="e1", weight=1.0)]))


def test_a_busy_preferred_replica_spills_over_to_the_next_in_hash_order_without_waiting(start_server):
    serving, preferred, other = _two_replicas(start_server, MIX_REQUEST, [(grpc.StatusCode.RESOURCE_EXHAUSTED, 5000)], [])
    policy, waits = _recording_policy()
    with SelmaClient(Endpoints(serving=serving), retry=policy) as client:
        images = [r.image.png for r in client.generate(["a cat"], experts={"e1": 1.0})]
    assert images == [b"png-0", b"png-1"]
    # refused once by the preferred replica, served at once by the next one: no back-off at all
    assert preferred.calls == 1 and other.calls == 1 and waits == []


def test_when_every_replica_is_busy_the_client_waits_the_shortest_hint_then_starts_again_at_the_preferred(start_server):
    busy = grpc.StatusCode.RESOURCE_EXHAUSTED
    serving, preferred, other = _two_replicas(start_server, MIX_REQUEST, [(busy, 90)], [(busy, 30)])
    policy, waits = _recording_policy(jitter=0.25)
    with SelmaClient(Endpoints(serving=serving), retry=policy) as client:
        images = [r.image.png for r in client.generate(["a cat"], experts={"e1": 1.0})]
    assert images == [b"png-0", b"png-1"]
    assert len(waits) == 1 and 0.030 <= waits[0] <= 0.030 * 1.25  # the soonest any replica expects room
    assert preferred.calls == 2 and other.calls == 1  # the second round asked the warm replica first


def test_every_replica_busy_within_the_attempt_bound_raises_resource_exhausted(start_server):
    busy = grpc.StatusCode.RESOURCE_EXHAUSTED
    serving, preferred, other = _two_replicas(start_server, MIX_REQUEST, [(busy, 10)] * 5, [(busy, 10)] * 5)
    policy, waits = _recording_policy(max_attempts=3)
    with SelmaClient(Endpoints(serving=serving), retry=policy) as client, pytest.raises(grpc.RpcError) as err:
        list(client.generate(["a cat"], experts={"e1": 1.0}))
    assert err.value.code() == busy and len(waits) == 2
    assert preferred.calls == 3 and other.calls == 3  # each attempt is one round over both replicas


def test_unary_calls_spill_over_a_busy_replica_too(start_server):
    serving, preferred, other = _two_replicas(start_server, pb.GenerateRequest(prompts=["x"]),
                                              [(grpc.StatusCode.RESOURCE_EXHAUSTED, 5000)], [])
    policy, waits = _recording_policy()
    with SelmaClient(Endpoints(serving=serving), retry=policy) as client:
        resp = client.serving_call("ListModels", pb.ListModelsRequest(), key="base")
    assert [m.model_name for m in resp.models] == ["base"]
    assert preferred.calls == 1 and other.calls == 1 and waits == []


def test_unary_serving_calls_retry_and_fail_over(start_server):
    address, servicer = start_server([(grpc.StatusCode.UNAVAILABLE,), (grpc.StatusCode.RESOURCE_EXHAUSTED,)])
    policy, waits = _recording_policy(initial_backoff=0.01)
    with SelmaClient(Endpoints(serving=address), retry=policy) as client:
        resp = client.serving_call("ListModels", pb.ListModelsRequest())
    assert [m.model_name for m in resp.models] == ["base"] and servicer.calls == 3 and len(waits) == 2


def test_an_endpoints_file_lists_replicas_as_a_list_or_with_bars(tmp_path):
    f = tmp_path / "endpoints.json"
    f.write_text('{"serving": ["127.0.0.1:1", "127.0.0.1:2"]}')
    assert Endpoints.load(f).serving == "127.0.0.1:1|127.0.0.1:2"
    assert Endpoints.load(env={"SELMA_ENDPOINTS": "prompts=p:1,serving=127.0.0.1:1|127.0.0.1:2"}).serving == "127.0.0.1:1|127.0.0.1:2"


def test_a_dns_endpoint_reaches_the_replicas_its_name_resolves_to(start_server):
    address, servicer = start_server([])
    port = address.rpartition(":")[2]
    with SelmaClient(Endpoints(serving=f"dns:///localhost:{port}"), retry=RetryPolicy.off()) as client:
        replicas = [a for a, _ in client.serving_stubs("base")]
        assert address in replicas  # localhost's addresses (::1 too, where it resolves; nothing listens there)
        images = [r.image.png for r in client.generate(["a cat"])]
    assert images == [b"png-0", b"png-1"] and servicer.calls == 1
