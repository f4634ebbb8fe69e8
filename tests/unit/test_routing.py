"""Rendezvous routing of serving requests: stable keys, stable order, minimal movement, DNS replicas."""

from __future__ import annotations

import time

import grpc
import pytest

from selma.errors import InvalidArgument
from selma.routing import ReplicaSet, parse_serving_endpoint, rank, routing_key
from selma.security import ClientSecurity


def test_the_key_is_the_model_or_the_canonical_mix_or_base():
    mix = {"experts": [{"expert_id": "b", "weight": 0.3}, {"expert_id": "a", "weight": 0.7}], "method": "MERGE_METHOD_TIES", "density": 0.5}
    same = {"density": 0.5, "method": "MERGE_METHOD_TIES", "experts": [{"expert_id": "a", "weight": 0.7}, {"expert_id": "b", "weight": 0.3}]}
    assert routing_key("", mix) == routing_key("", same)
    assert routing_key("", mix) != routing_key("", {**mix, "density": 0.6})
    assert routing_key("", mix) != routing_key("", {**mix, "seed": 3})
    assert routing_key("quickstart") == "model:quickstart" and routing_key() == "base" == routing_key("base")


def test_rank_is_stable_and_removing_a_replica_moves_only_its_keys():
    replicas = [f"10.0.0.{i}:50051" for i in range(5)]
    keys = [routing_key("", {"experts": [{"expert_id": f"e{i}", "weight": 1.0}]}) for i in range(200)]
    first = {k: rank(k, replicas)[0] for k in keys}
    assert first == {k: rank(k, list(reversed(replicas)))[0] for k in keys}  # the listing order does not matter
    assert len(set(first.values())) == 5  # every replica gets some keys
    gone = replicas[2]
    after = {k: rank(k, [r for r in replicas if r != gone])[0] for k in keys}
    for k in keys:
        if first[k] != gone:
            assert after[k] == first[k]
        else:
            assert after[k] == rank(k, replicas)[1]  # the next replica in the key's own order


def test_endpoint_entries_are_checked():
    assert parse_serving_endpoint("a:1| b:2 |dns:///svc.ns:50051") == ["a:1", "b:2", "dns:///svc.ns:50051"]
    with pytest.raises(InvalidArgument, match="host:port"):
        parse_serving_endpoint("a:1|b")


def test_a_dns_name_becomes_its_addresses_and_is_resolved_again():
    answers = [["10.0.0.1:50051", "10.0.0.2:50051"], ["10.0.0.2:50051", "10.0.0.3:50051"]]
    asked = []

    def resolver(host, port):
        asked.append((host, port))
        return answers[min(len(asked) - 1, 1)]

    replicas = ReplicaSet("dns:///selma-serving-replicas.ns.svc:50051", ClientSecurity(), resolve_interval=0, resolver=resolver)
    try:
        assert [r.address for r in replicas.replicas()] == ["10.0.0.1:50051", "10.0.0.2:50051"]
        kept = {r.address: r.channel for r in replicas.replicas()}
        assert sorted(kept) == ["10.0.0.2:50051", "10.0.0.3:50051"]
        assert asked[0] == ("selma-serving-replicas.ns.svc", 50051)
        assert sorted(r.address for r in replicas.ranked("base")) == sorted(kept)
    finally:
        replicas.close()


def test_a_replica_found_through_dns_is_verified_against_the_dns_name(tmp_path):
    ca = tmp_path / "ca.crt"
    replicas = ReplicaSet("dns:///selma-serving-replicas:50051", ClientSecurity(ca_cert=ca), resolver=lambda h, p: ["10.0.0.1:50051"])
    assert replicas.security_for("selma-serving-replicas").server_name == "selma-serving-replicas"
    assert replicas.security_for("").server_name == ""
    named = ReplicaSet("a:1", ClientSecurity(ca_cert=ca, server_name="selma.example"))
    assert named.security_for("selma-serving-replicas").server_name == "selma.example"  # an explicit override wins


def test_the_retry_policy_comes_from_the_client_settings():
    from selma.config import ClientSettings
    from selma.routing import RetryPolicy

    policy = RetryPolicy.from_settings(ClientSettings(retry_max_attempts=1, retry_max_seconds=5))
    assert policy.max_attempts == 1 and policy.max_total == 5
    assert RetryPolicy.from_settings(ClientSettings()) == RetryPolicy()  # the defaults agree


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", hint_ms: int | None = None) -> None:
        self._code, self._details = code, details
        self._trailers = (("retry-after-ms", str(hint_ms)),) if hint_ms is not None else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):  # noqa: ANN201
        return self._trailers


def test_only_busy_or_unreachable_is_retried_never_a_message_over_a_size_limit():
    from selma.routing import RetryPolicy, next_wait, retryable

    busy = _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "the line is full", hint_ms=250)
    too_big = _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (70000000 vs. 67108864)")
    assert retryable(busy) and retryable(_Err(grpc.StatusCode.UNAVAILABLE)) and retryable(_Err(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert not retryable(too_big) and not retryable(_Err(grpc.StatusCode.INVALID_ARGUMENT))
    policy = RetryPolicy(max_attempts=5, max_total=60.0)
    assert 0.25 <= next_wait(policy, busy, 1, time.monotonic()) <= 0.25 * (1 + policy.jitter)  # the hint, jittered upwards
    assert next_wait(policy, too_big, 1, time.monotonic()) is None


def test_a_round_over_no_replica_is_unavailable_not_an_index_error():
    from selma.errors import Unavailable
    from selma.routing import round_error

    with pytest.raises(Unavailable, match="resolved to no address"):
        round_error([])
    hinted = [_Err(grpc.StatusCode.UNAVAILABLE), _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, hint_ms=900),
              _Err(grpc.StatusCode.RESOURCE_EXHAUSTED, hint_ms=300)]
    assert round_error(hinted) is hinted[2]
