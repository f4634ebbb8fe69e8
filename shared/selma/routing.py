"""Serving replicas: which replica serves a request, and retrying a refused or unreachable one.

Several ServingService replicas share one artifact store, so any of them can serve any model, but
each keeps its own fused UNets (registered models, per-request mixes) in memory.  A client keeps
those caches warm by sending every request for one model or mix to the same replica:
:func:`routing_key` names what decides the merge cache, and :func:`rank` orders the replicas for
it by rendezvous (highest-random-weight) hashing.  While the set of replicas is stable a key
always goes to the same replica; when one goes away only its keys move, each to the next replica
in its own order (no ring, no virtual nodes, no shared state between clients).

Rendezvous hashing is 10 lines over :mod:`hashlib`; gRPC's ``ring_hash`` policy would need a
request-hash header and hides which replica served a call, and the consistent-hash packages on
PyPI are either unmaintained or whole ring implementations for what is one sort here.

:class:`ReplicaSet` turns the serving endpoint into replicas: ``a:1|b:2`` (a list), or
``dns:///name:port`` (every address of a name, e.g. a headless Service's A records, resolved again
every ``resolve_interval`` seconds).  Each replica's channel comes from
:func:`selma.security.make_channel` (TLS + token); a replica found through DNS is verified against
the DNS name, not its pod IP.

A request refused for load (RESOURCE_EXHAUSTED) or unreachable (UNAVAILABLE) at its replica spills
over to the next replica in its own order at once: a busy preferred replica costs a cold cache
elsewhere, not a back-off.  Only when every replica refused does the client back off
(:func:`round_error` picks the shortest ``retry-after-ms``), then it starts again from the
preferred replica, whose cache is the warm one.

:class:`RetryPolicy` is the SDK's back-off: RESOURCE_EXHAUSTED and UNAVAILABLE are retried with
jittered exponential back-off, a bounded number of attempts within a bounded time, honouring the
server's ``retry-after-ms`` trailing metadata.  gRPC's own retry policy cannot do this here: it
ignores ``retry-after-ms`` (it knows only ``grpc-retry-pushback-ms``), caps attempts at 5 with no
total-time budget, and commits a server stream on its first message, while Generate may be
retried until its first image.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from selma.config import ClientSettings
from selma.errors import InvalidArgument
from selma.security import ClientSecurity, make_channel

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
RETRYABLE = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
SEPARATOR = "|"
DNS_PREFIX = "dns:///"


def routing_key(model_name: str = "", merge: dict[str, Any] | None = None) -> str:
    """What decides a request's merge cache: the registered model, the canonical per-request mix, or the base.

    ``merge`` is a MergeSpec as a dict (``expert_id``/``weight`` entries, method, density, seed, ...);
    experts are sorted, so the order a client lists them in does not matter.
    """
    if model_name and model_name != "base":
        return "model:" + model_name
    if merge and merge.get("experts"):
        experts = sorted((str(e.get("expert_id", "")), e.get("weight")) for e in merge["experts"])
        rest = {k: v for k, v in sorted(merge.items()) if k != "experts" and v not in (None, "", 0, False)}
        return "mix:" + json.dumps({"experts": experts, **rest}, sort_keys=True, default=str)
    return "base"


def _score(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


def rank(key: str, replicas: Sequence[str]) -> list[str]:
    """``replicas`` in the order ``key`` tries them: highest rendezvous score first (ties by name)."""
    return sorted(dict.fromkeys(replicas), key=lambda r: (-_score(key, r), r))


def parse_serving_endpoint(spec: str) -> list[str]:
    """The entries of a serving endpoint: ``host:port``, ``a:1|b:2`` or ``dns:///name:port`` (any mix)."""
    entries = [e.strip() for e in spec.split(SEPARATOR) if e.strip()]
    for e in entries:
        target = e.removeprefix(DNS_PREFIX)
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"serving endpoint entry {e!r} is not host:port or dns:///name:port (replicas are separated by '|')",
                                  field="endpoints.serving")
    return entries


@dataclass(frozen=True)
class RetryPolicy:
    """Jittered exponential back-off for RESOURCE_EXHAUSTED / UNAVAILABLE, bounded in attempts and time.

    The ``n``-th retry waits ``retry-after-ms`` (plus up to ``jitter`` of it) when the server sent
    one, else a random time in ``[(1 - jitter), 1] * min(initial * multiplier**(n-1), max_backoff)``.
    No retry starts once ``max_attempts`` calls were made or its wait would end past ``max_total``
    seconds after the first call.  ``max_attempts=1`` turns retrying off.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.25
    max_backoff: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    max_total: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise InvalidArgument("retry policy: max_attempts >= 1, back-offs >= 0, multiplier >= 1 and jitter in [0, 1]", field="retry")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            return retry_after * (1 + self.jitter * random.random())
        cap = min(self.initial_backoff * self.multiplier ** min(retry - 1, 60), self.max_backoff)
        return cap * (1 - self.jitter * random.random())

    @classmethod
    def off(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    @classmethod
    def from_settings(cls, settings: ClientSettings | None = None) -> RetryPolicy:
        """From ``SELMA_RETRY_MAX_ATTEMPTS``, ``SELMA_RETRY_MAX_SECONDS``, ``SELMA_RETRY_*_BACKOFF_SECONDS``."""
        s = ClientSettings() if settings is None else settings
        return cls(max_attempts=s.retry_max_attempts, max_total=s.retry_max_seconds,
                   initial_backoff=s.retry_initial_backoff_seconds, max_backoff=s.retry_max_backoff_seconds)


def retry_after(error: grpc.RpcError) -> float | None:
    """The server's ``retry-after-ms`` hint in seconds (None if absent or not a number)."""
    try:
        metadata = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 (an error raised before any call: no metadata)
        return None
    for key, value in metadata:
        if key == RETRY_AFTER_KEY:
            try:
                return max(int(value), 0) / 1000.0
            except (TypeError, ValueError):
                return None
    return None


def retryable(error: grpc.RpcError) -> bool:
    """Whether another try (the next replica, or later) may succeed: busy or unreachable, not a message
    over a size limit (gRPC answers that RESOURCE_EXHAUSTED too, and it fails the same everywhere)."""
    if error.code() not in RETRYABLE:
        return False
    return not (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (error.details() or ""))


def round_error(errors: Sequence[grpc.RpcError]) -> grpc.RpcError:
    """What a round over the replicas answers when every replica refused or was unreachable: the
    RESOURCE_EXHAUSTED with the shortest ``retry-after-ms`` (the soonest any replica expects room;
    the first refusal when none has a hint), else the last error."""
    if not errors:
        from selma.errors import Unavailable

        raise Unavailable("no serving replica to call: the serving endpoint resolved to no address (check SELMA_ENDPOINTS "
                          "or the headless Service's DNS name)")
    busy = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    if not busy:
        return errors[-1]
    hinted = [(hint, i) for i, e in enumerate(busy) if (hint := retry_after(e)) is not None]
    return busy[min(hinted)[1]] if hinted else busy[0]


def call_with_retry(policy: RetryPolicy, attempt: Callable[[], Any], what: str = "call") -> Any:
    """``attempt()``, retried as ``policy`` says on RESOURCE_EXHAUSTED / UNAVAILABLE; the last error otherwise."""
    started = time.monotonic()
    calls = 0
    while True:
        calls += 1
        try:
            return attempt()
        except grpc.RpcError as e:
            wait = next_wait(policy, e, calls, started)
            if wait is None:
                raise
            log.debug("%s: %s (%s); retry %d in %.2f s", what, e.code().name, e.details(), calls, wait)
            policy.sleep(wait)


def next_wait(policy: RetryPolicy, error: grpc.RpcError, calls: int, started: float) -> float | None:
    """How long to wait before the next try after ``calls`` calls failed with ``error``; None = give up."""
    if not retryable(error) or calls >= policy.max_attempts:
        return None
    wait = policy.delay(calls, retry_after(error))
    if time.monotonic() - started + wait > policy.max_total:
        return None
    return wait


@dataclass
class Replica:
    address: str  # what the channel dials: host:port
    channel: grpc.Channel


class ReplicaSet:
    """The serving replicas an endpoint names, one channel each, kept current for DNS names."""

    def __init__(self, spec: str, security: ClientSecurity, *, options: Sequence[tuple[str, Any]] = (),
                 resolve_interval: float = 30.0, resolver: Callable[[str, int], list[str]] | None = None) -> None:
        self.spec = spec
        self.entries = parse_serving_endpoint(spec)
        self.security = security
        self.options = list(options)
        self.resolve_interval = resolve_interval
        self._resolver = resolver or _resolve
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica] = {}
        self._resolved_at = -float("inf")
        self._dns_names: dict[str, str] = {}  # address -> the DNS name it was found under (TLS verifies that name)

    def _targets(self) -> dict[str, str]:
        """address -> DNS name ("" for a listed address)."""
        out: dict[str, str] = {}
        for e in self.entries:
            if not e.startswith(DNS_PREFIX):
                out.setdefault(e, "")
                continue
            host, _, port = e.removeprefix(DNS_PREFIX).rpartition(":")
            try:
                addresses = self._resolver(host, int(port))
            except OSError as err:
                log.warning("cannot resolve the serving replicas %s (%s); keeping %d known", e, err,
                            sum(1 for n in self._dns_names.values() if n == host))
                addresses = [a for a, n in self._dns_names.items() if n == host]
            for a in addresses:
                out.setdefault(a, host)
        return out

    def security_for(self, dns_name: str) -> ClientSecurity:
        """How a replica is reached: one found through DNS is verified against that name, not its pod IP."""
        if dns_name and self.security.tls and not self.security.server_name:
            return replace(self.security, server_name=dns_name)
        return self.security

    def _channel(self, address: str, dns_name: str) -> grpc.Channel:
        return make_channel(address, self.security_for(dns_name), options=self.options)

    def replicas(self) -> list[Replica]:
        """The current replicas (re-resolving DNS entries at most every ``resolve_interval`` s)."""
        with self._lock:
            now = time.monotonic()
            if now - self._resolved_at >= self.resolve_interval or not self._replicas:
                targets = self._targets()
                self._resolved_at = now
                for gone in set(self._replicas) - set(targets):
                    self._replicas.pop(gone).channel.close()
                for address, name in targets.items():
                    if address not in self._replicas:
                        self._replicas[address] = Replica(address, self._channel(address, name))
                self._dns_names = targets
            return list(self._replicas.values())

    def ranked(self, key: str) -> list[Replica]:
        """The replicas in the order a request with routing ``key`` tries them."""
        by_address = {r.address: r for r in self.replicas()}
        return [by_address[a] for a in rank(key, list(by_address))]

    def close(self) -> None:
        with self._lock:
            for r in self._replicas.values():
                r.channel.close()
            self._replicas.clear()


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, as ``ip:port`` (IPv6 in brackets), sorted."""
    out = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = sockaddr[0]
        out.add(f"[{ip}]:{port}" if family == socket.AF_INET6 or ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}")
    return sorted(out)
