"""The Python client SDK for the selma services (what the CLI itself uses).

```python
from selma.client import SelmaClient
with SelmaClient.from_endpoints(Endpoints.load()) as c:
    for resp in c.generate(["two red apples"], model_name="quickstart"):
        open("out.png", "wb").write(resp.image.png)
```

Every long-running job kind has the same five calls through :class:`JobClient`
(``start``/``get``/``watch``/``cancel``/``list``).  Endpoints come from an endpoints file that
``selma up`` writes, from ``SELMA_ENDPOINTS`` (``prompts=host:port,render=…``), or are given
directly.  The EvaluationService is hosted by the training process unless an ``evaluation``
endpoint says otherwise.

The serving endpoint may name several replicas (``serving=a:1|b:2``, or ``dns:///name:port`` for
every address of a headless Service): each Generate goes to the replica its model or mix hashes to
(:mod:`selma.routing`), spilling over to the next one in hash order when one is busy
(RESOURCE_EXHAUSTED) or UNAVAILABLE; when all are, the round is retried with jittered back-off
(``retry=``, honouring the server's ``retry-after-ms``) as long as no image has arrived.  A merge
job goes to the replica that will serve its model, and its Get/Watch/Cancel follow it.

Channels are TLS and carry a bearer token as :class:`selma.security.ClientSecurity` says: from
``SELMA_TOKEN``/``SELMA_TLS_*`` (or the CLI's ``--token``/``--ca-cert``/``--client-cert``/``--client-key``),
falling back to the CA file and token file an endpoints file of ``selma up --tls`` names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from selma.config import ClientSettings
from selma.errors import InvalidArgument, NotFound, Unavailable
from selma.job_kinds import JOB_KINDS, JobKind
from selma.jobs import EXPERT_TRAINING_KIND, job_id_for, run_stage_key
from selma.routing import (
    SEPARATOR,
    ReplicaSet,
    RetryPolicy,
    call_with_retry,
    next_wait,
    retryable,
    round_error,
    routing_key,
)
from selma.security import ClientSecurity, make_channel
from selma.v1 import (
    common_pb2,
    evaluation_service_pb2_grpc,
    prompt_service_pb2_grpc,
    render_service_pb2_grpc,
    serving_service_pb2,
    serving_service_pb2_grpc,
    training_service_pb2_grpc,
)

log = logging.getLogger(__name__)
MiB = 1024 * 1024
# The service processes (what `selma up` starts, one Deployment each in the chart) ...
SERVICES = ("prompts", "render", "training", "serving")
# ... and the gRPC services they serve: evaluation is hosted by the training process by default.
API_SERVICES = (*SERVICES, "evaluation")
HOSTED_BY = {"evaluation": "training"}
SERVICE_NAMES = {
    "prompts": "selma.v1.PromptService",
    "render": "selma.v1.RenderService",
    "training": "selma.v1.TrainingService",
    "serving": "selma.v1.ServingService",
    "evaluation": "selma.v1.EvaluationService",
}
DEFAULT_ENDPOINTS_FILE = Path(".selma") / "endpoints.json"

# (service, address) of the stub a client handed out last: what a CLI names when a call fails.
_last_target: tuple[str, str] = ("", "")


def last_target() -> tuple[str, str]:
    """The service and address of the most recent call through any :class:`SelmaClient` (("", "") if none)."""
    return _last_target


@dataclass
class Endpoints:
    """gRPC addresses (``host:port``) of the services, plus their metrics URLs when known.

    ``serving`` may name several replicas: ``a:1|b:2`` (a JSON list in an endpoints file is the same)
    or ``dns:///name:port`` (every address of a headless Service), see :mod:`selma.routing`.
    ``evaluation`` is empty when the training process hosts the EvaluationService (the default):
    :meth:`address` then answers with training's address.  ``ca_cert`` and ``token_file`` (paths,
    written by ``selma up --tls``) are what a client uses when nothing else names a CA or a token.
    """

    prompts: str = ""
    render: str = ""
    training: str = ""
    serving: str = ""
    metrics: dict[str, str] | None = None
    evaluation: str = ""
    ca_cert: str = ""
    token_file: str = ""

    def address(self, service: str) -> str:
        """Where ``service`` (one of API_SERVICES) answers; "" if unknown."""
        return getattr(self, service) or getattr(self, HOSTED_BY.get(service, service))

    @classmethod
    def for_cli(cls, endpoints_file: str = "", directory: str | Path = ".selma") -> Endpoints:
        """What a CLI command uses: ``--endpoints FILE``, else ``SELMA_ENDPOINTS``, else ``<--dir>/endpoints.json``."""
        if endpoints_file:
            return cls.load(endpoints_file)
        if os.environ.get("SELMA_ENDPOINTS"):
            return cls.load()
        return cls.load(Path(directory) / "endpoints.json")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> Endpoints:
        """From ``SELMA_ENDPOINTS`` if set, else the endpoints file (default ``.selma/endpoints.json``)."""
        env = os.environ if env is None else env
        spec = env.get("SELMA_ENDPOINTS", "")
        if spec and path is None:
            values: dict[str, str] = {}
            for part in spec.split(","):
                name, _, addr = part.partition("=")
                if name.strip() not in API_SERVICES or not addr.strip():
                    raise InvalidArgument(f"SELMA_ENDPOINTS entry {part!r} is not <service>=<host:port> with service in {API_SERVICES}", field="SELMA_ENDPOINTS")
                values[name.strip()] = addr.strip()
            return cls(**values)
        path = Path(path) if path else DEFAULT_ENDPOINTS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidArgument(
                f"no endpoints file at {path}: start the local stack with `selma up`, or pass --endpoints / set SELMA_ENDPOINTS",
                field="endpoints",
            ) from None
        if isinstance(data.get("serving"), list):  # replicas as a list: the same as "a:1|b:2"
            data["serving"] = SEPARATOR.join(str(a) for a in data["serving"])
        return cls(**{k: v for k, v in data.items() if k in {*API_SERVICES, "metrics", "ca_cert", "token_file"}})

    def default_security(self, security: ClientSecurity | None = None) -> ClientSecurity:
        """``security`` (default: from ``SELMA_TOKEN``/``SELMA_TLS_*``) with this file's CA and token where it has none."""
        security = ClientSecurity.from_settings() if security is None else security
        token = "" if security.token or not self.token_file else read_token_file(self.token_file)
        return security.with_defaults(token=token, ca_cert=self.ca_cert or None)


def read_token_file(path: str | Path) -> str:
    """A token a local stack stored (mode 0600); refused when other users may read it, like ssh keys."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise InvalidArgument(f"cannot read the token file {path}: {e.strerror or e}; pass --token or set SELMA_TOKEN",
                              field="token") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(f"the token file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 {path}",
                              field="token")
    return token


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The CLI's connection flags, next to ``--endpoints``: token and TLS (each also an environment variable)."""
    parser.add_argument("--token", default="", help="bearer token for the services (default SELMA_TOKEN, SELMA_TOKEN_FILE, "
                                                    "or the token `selma up --tls` stored in <dir>/token)")
    parser.add_argument("--ca-cert", default="", help="CA bundle that signed the services' certificates: use TLS "
                                                      "(default SELMA_TLS_CA, or the CA of `selma up --tls`)")
    parser.add_argument("--client-cert", default="", help="client certificate for mutual TLS (default SELMA_TLS_CLIENT_CERT)")
    parser.add_argument("--client-key", default="", help="key of --client-cert (default SELMA_TLS_CLIENT_KEY)")


def cli_security(args: argparse.Namespace, endpoints: Endpoints) -> ClientSecurity:
    """Flags over ``SELMA_*`` variables over what the endpoints file names (see :func:`add_client_arguments`)."""
    flags = ClientSecurity.from_settings().overridden(
        token=getattr(args, "token", ""), ca_cert=getattr(args, "ca_cert", ""),
        client_cert=getattr(args, "client_cert", ""), client_key=getattr(args, "client_key", ""))
    return endpoints.default_security(flags)


def generate_routing_key(request: serving_service_pb2.GenerateRequest) -> str:
    """The routing key of a GenerateRequest: its registered model, its canonical expert mix, or "base"."""
    from selma.api import message_to_dict

    which = request.WhichOneof("model")
    return routing_key(request.model_name if which == "model_name" else "", message_to_dict(request.experts) if which == "experts" else None)


PRIORITY_NAMES = ("low", "normal", "high")  # GenerateRequest.priority as the CLI and SDK spell it


def generation_priority(name: str) -> int:
    """``low``/``normal``/``high`` ("" = unset, served as normal) as a ``GenerationPriority`` value."""
    if not name:
        return serving_service_pb2.GENERATION_PRIORITY_UNSPECIFIED
    if name.lower() not in PRIORITY_NAMES:
        raise InvalidArgument(f"priority must be one of {', '.join(PRIORITY_NAMES)}; got {name!r}", field="priority")
    return serving_service_pb2.GenerationPriority.Value("GENERATION_PRIORITY_" + name.upper())


def merge_routing_key(spec: serving_service_pb2.MergeJobSpec) -> str:
    """Where a merge job runs among serving replicas: the replica that will serve its model
    (``model:<name>``, as Generate routes it), so the replica that built the merge holds it warm."""
    return routing_key(spec.model_name) if spec.model_name else "base"


# Job kinds whose calls are pinned to one serving replica, by what their spec names.
JOB_ROUTES: dict[str, Callable[[Any], str]] = {"merge": merge_routing_key}


class JobClient:
    """Start/Get/Watch/Cancel/List for one job kind (its stub's method names: :data:`selma.job_kinds.JOB_KINDS`).

    With ``replicas`` (a kind the serving replicas run: ``key -> [(address, stub)]`` in the key's
    order) a job is pinned: Start goes to the replica ``route(spec)`` names, and Get/Watch/Cancel of
    that job to the same one (``keys``, job id -> routing key, is learnt from every answer and shared
    by the client's JobClients; a job id never seen goes where ``base`` does).  A replica that is
    UNAVAILABLE hands the call to the next one in the key's order (any replica can load a job's
    record from the shared store); List goes to the ``base`` replica."""

    def __init__(self, stub: Any, kind: JobKind, timeout: float, *,
                 replicas: Callable[[str], list[tuple[str, Any]]] | None = None,
                 route: Callable[[Any], str] | None = None, keys: dict[str, str] | None = None) -> None:
        self._stub = stub
        self._k = kind
        self._timeout = timeout
        self._replicas = replicas
        self._route = route
        self._keys = {} if keys is None else keys

    def _req(self, method: str, **fields: Any) -> Any:
        return getattr(self._k.module, f"{method}Request")(**fields)

    def _learn(self, job: Any) -> Any:
        if self._route is not None and job.status.job_id:
            self._keys.setdefault(job.status.job_id, self._route(job.spec))
        return job

    def _stubs(self, key: str) -> list[tuple[str, Any]]:
        return [("", self._stub)] if self._replicas is None else self._replicas(key)

    def _unary(self, method: str, request: Any, key: str) -> Any:
        global _last_target
        error: grpc.RpcError | None = None
        for address, stub in self._stubs(key):
            if address:
                _last_target = ("serving", address)
            try:
                return getattr(stub, method)(request, timeout=self._timeout)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or self._replicas is None:
                    raise
                error = e  # gone: the next replica in the key's order
        assert error is not None
        raise error

    def _key(self, job_id: str) -> str:
        return self._keys.get(job_id, "base")

    def start(self, idempotency_key: str, spec: Any, *, validate_only: bool = False) -> tuple[Any, bool]:
        """Returns (job, created)."""
        key = self._route(spec) if self._route is not None else "base"
        resp = self._unary(self._k.start, self._req(self._k.start, idempotency_key=idempotency_key, spec=spec, validate_only=validate_only), key)
        if resp.job.status.job_id:
            self._keys[resp.job.status.job_id] = key
        return resp.job, resp.created

    def get(self, job_id: str) -> Any:
        return self._learn(self._unary(self._k.get, self._req(self._k.get, job_id=job_id), self._key(job_id)).job)

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[Any]:
        """Stream the job until a terminal phase (the server ends the stream)."""
        global _last_target
        address, stub = self._stubs(self._key(job_id))[0]
        if address:
            _last_target = ("serving", address)
        for resp in getattr(stub, self._k.watch)(self._req(self._k.watch, job_id=job_id), timeout=timeout):
            yield resp.job

    def cancel(self, job_id: str, reason: str = "") -> Any:
        return self._unary(self._k.cancel, self._req(self._k.cancel, job_id=job_id, reason=reason), self._key(job_id)).job

    def list(self, *, run: str = "", skill: str = "", page_size: int = 100) -> list[Any]:
        """All jobs matching run/skill (follows page tokens)."""
        out: list[Any] = []
        token = ""
        while True:
            req = self._req(self._k.list, filter=common_pb2.JobFilter(run=run, skill=skill), page_size=page_size, page_token=token)
            resp = self._unary(self._k.list, req, "base")
            out.extend(self._learn(j) for j in resp.jobs)
            token = resp.next_page_token
            if not token:
                return out


class SelmaClient:
    """Channels and stubs for the services; use as a context manager."""

    def __init__(self, endpoints: Endpoints, *, timeout: float = 30.0, max_message_bytes: int = 64 * MiB,
                 security: ClientSecurity | None = None, retry: RetryPolicy | None = None, resolve_interval: float | None = None) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        settings = ClientSettings()
        # how refused/unreachable serving calls are retried: given, else SELMA_RETRY_* (5 attempts within 60 s)
        self.retry = RetryPolicy.from_settings(settings) if retry is None else retry
        if resolve_interval is None:  # how often a dns:/// serving endpoint is resolved again (SELMA_SERVING_RESOLVE_SECONDS)
            resolve_interval = settings.serving_resolve_seconds
        # how the channels authenticate: given, else SELMA_TOKEN/SELMA_TLS_* with the endpoints file's CA and token
        self.security = endpoints.default_security(security)
        options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
        self._channels: dict[str, grpc.Channel] = {}  # by address: a process hosting two services has one channel
        stubs = {
            "prompts": prompt_service_pb2_grpc.PromptServiceStub,
            "render": render_service_pb2_grpc.RenderServiceStub,
            "training": training_service_pb2_grpc.TrainingServiceStub,
            "serving": serving_service_pb2_grpc.ServingServiceStub,
            "evaluation": evaluation_service_pb2_grpc.EvaluationServiceStub,
        }
        self._stubs: dict[str, Any] = {}
        self._serving_stubs: dict[str, Any] = {}  # by replica address
        self._serving: ReplicaSet | None = None
        self._job_routes: dict[str, str] = {}  # serving job id -> routing key (JobClient)
        if endpoints.serving:
            self._serving = ReplicaSet(endpoints.serving, self.security, options=options, resolve_interval=resolve_interval)
        for name in API_SERVICES:
            addr = endpoints.address(name)
            if name == "serving" and self._serving is not None:
                continue  # per replica: serving_stubs()
            if addr:
                if addr not in self._channels:
                    self._channels[addr] = make_channel(addr, self.security, options=options)
                self._stubs[name] = stubs[name](self._channels[addr])

    @classmethod
    def from_endpoints(cls, endpoints: Endpoints | None = None, **kwargs: Any) -> SelmaClient:
        return cls(endpoints or Endpoints.load(), **kwargs)

    @classmethod
    def for_cli(cls, args: argparse.Namespace, **kwargs: Any) -> SelmaClient:
        """What a CLI command uses: ``--endpoints``/``--dir`` and the connection flags of :func:`add_client_arguments`."""
        endpoints = Endpoints.for_cli(getattr(args, "endpoints", ""), getattr(args, "dir", ".selma"))
        return cls(endpoints, security=cli_security(args, endpoints), **kwargs)

    def __enter__(self) -> SelmaClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        if self._serving is not None:
            self._serving.close()

    def stub(self, service: str) -> Any:
        """The stub of ``service`` (for serving: the replica that base-model requests go to)."""
        global _last_target
        if service == "serving" and self._serving is not None:
            address, stub = self.serving_stubs("base")[0]
            _last_target = (service, address)
            return stub
        if service not in self._stubs:
            raise InvalidArgument(f"no endpoint configured for the {service} service", field="endpoints")
        _last_target = (service, self.endpoints.address(service))
        return self._stubs[service]

    def serving_stubs(self, key: str = "base") -> list[tuple[str, Any]]:
        """(address, stub) of every serving replica, in the order a request with routing ``key`` tries them."""
        if self._serving is None:
            raise InvalidArgument("no endpoint configured for the serving service", field="endpoints")
        out = []
        for r in self._serving.ranked(key):
            if r.address not in self._serving_stubs or self._serving_stubs[r.address][0] is not r.channel:
                self._serving_stubs[r.address] = (r.channel, serving_service_pb2_grpc.ServingServiceStub(r.channel))
            out.append((r.address, self._serving_stubs[r.address][1]))
        return out

    def serving_call(self, method: str, request: Any, *, key: str = "base", timeout: float | None = None) -> Any:
        """An idempotent unary ServingService call: the replicas in ``key``'s order (the next one on
        RESOURCE_EXHAUSTED or UNAVAILABLE), the whole round retried with back-off as :attr:`retry` says."""
        global _last_target

        def attempt() -> Any:
            global _last_target
            errors: list[grpc.RpcError] = []
            for address, stub in self.serving_stubs(key):
                _last_target = ("serving", address)
                try:
                    return getattr(stub, method)(request, timeout=timeout or self.timeout)
                except grpc.RpcError as e:
                    if not retryable(e):
                        raise
                    errors.append(e)  # busy or unreachable: the next replica in the key's order
            raise round_error(errors)

        return call_with_retry(self.retry, attempt, f"ServingService/{method}")

    def jobs(self, kind: str) -> JobClient:
        """Job calls for ``prompts``, ``render``, ``training``, ``merge`` or ``evaluation``; a merge job
        goes to the serving replica that will serve its model (:func:`merge_routing_key`)."""
        k = JOB_KINDS[kind]
        if k.service == "serving" and self._serving is not None:  # pinned to a replica (see JobClient)
            return JobClient(None, k, self.timeout, replicas=self.serving_stubs, route=JOB_ROUTES.get(kind), keys=self._job_routes)
        return JobClient(self.stub(k.service), k, self.timeout)

    # -- health --------------------------------------------------------------------------------

    def wait_ready(
        self, timeout: float = 60.0, services: tuple[str, ...] = SERVICES, *, on_wait: Callable[[str, str, float], None] | None = None
    ) -> None:
        """Block until every service answers SERVING, ``timeout`` seconds in all.

        ``on_wait(service, address, seconds_left)`` is called once per service that is not ready at
        the first look; past the deadline :class:`Unavailable` names the service and its address.
        """
        from selma.server import wait_for_serving

        deadline = time.monotonic() + timeout
        targets = []
        for name in services:
            if name == "serving" and self._serving is not None:
                targets += [(name, r.address) for r in self._serving.replicas()]
            else:
                targets.append((name, self.endpoints.address(name)))
        for name, address in targets:
            if not address:
                raise InvalidArgument(f"no endpoint configured for the {name} service", field="endpoints")
            try:
                wait_for_serving(address, SERVICE_NAMES[name], timeout=min(2.0, max(deadline - time.monotonic(), 0.1)), security=self.security)
                continue
            except TimeoutError:
                pass
            if on_wait is not None:
                on_wait(name, address, max(deadline - time.monotonic(), 0.0))
            try:
                wait_for_serving(address, SERVICE_NAMES[name], timeout=max(deadline - time.monotonic(), 0.1), security=self.security)
            except TimeoutError as e:
                raise Unavailable(
                    f"the {name} service at {address} did not answer SERVING within {timeout:.0f} s ({e}); "
                    "is `selma up` running? Check the endpoints (--endpoints, --dir or SELMA_ENDPOINTS)",
                    field="endpoints",
                ) from None

    # -- serving -------------------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str],
        *,
        model_name: str = "",
        experts: Mapping[str, float | None] | None = None,
        method: int = common_pb2.MERGE_METHOD_MEAN_DELTA,
        steps: int = 0,
        guidance_scale: float | None = None,
        width: int = 0,
        height: int = 0,
        seed: int | None = None,
        images_per_prompt: int = 1,
        negative_prompt: str = "",
        timeout: float | None = 600.0,
        seed_policy: str | int | None = None,
        priority: str = "",
        stream_progress: bool = False,
    ) -> Iterator[serving_service_pb2.GenerateResponse]:
        """Stream generated images: a registered model, the base with per-request expert weights, or the base.

        ``seed`` is the base seed (unset: the service picks one at random) and ``seed_policy`` how each
        image's seed derives from it (any spelling :func:`selma.seeds.seed_policy` takes; unset = derived).
        ``priority`` is ``low``, ``normal`` or ``high`` ("" = normal; the service serves ``high`` only
        to admin callers); ``stream_progress`` asks for GenerateProgress messages (place in line,
        start of generation) before the images.
        """
        from selma.seeds import seed_policy as _seed_policy

        if model_name and experts:
            raise InvalidArgument("give either a model name or expert weights, not both", field="model")
        diffusion = common_pb2.DiffusionSettings(steps=steps, width=width, height=height, negative_prompt=negative_prompt)
        if guidance_scale is not None:
            diffusion.guidance_scale = guidance_scale
        req = serving_service_pb2.GenerateRequest(prompts=list(prompts), diffusion=diffusion, images_per_prompt=images_per_prompt,
                                                  priority=generation_priority(priority), stream_progress=stream_progress)
        if seed is not None:
            req.seed = seed
        if seed_policy is not None:
            req.seed_policy = common_pb2.SeedPolicy.Value("SEED_POLICY_" + _seed_policy(seed_policy).name)
        if model_name:
            req.model_name = model_name
        elif experts:
            req.experts.CopyFrom(common_pb2.MergeSpec(method=method, experts=[common_pb2.ExpertWeight(expert_id=k, weight=v) for k, v in experts.items()]))
        yield from self.generate_request(req, timeout=timeout)

    def generate_request(self, request: serving_service_pb2.GenerateRequest, *,
                         timeout: float | None = 600.0) -> Iterator[serving_service_pb2.GenerateResponse]:
        """Stream a GenerateRequest from the replica its model or mix routes to (see :mod:`selma.routing`).

        Until the first image arrives, RESOURCE_EXHAUSTED or UNAVAILABLE moves on to the next replica
        in hash order at once; when every replica refused, the round is retried from the preferred
        replica after a back-off (honouring the shortest ``retry-after-ms``); once an image has
        arrived an error is raised as it is (the images already yielded stay valid).  Progress
        messages of a replica that then refuses are not a reason to stop spilling over.
        """
        global _last_target
        key = generate_routing_key(request)
        started = time.monotonic()
        calls = 0
        while True:
            errors: list[grpc.RpcError] = []
            for address, stub in self.serving_stubs(key):
                _last_target = ("serving", address)
                received = False
                try:
                    for resp in stub.Generate(request, timeout=timeout):
                        received = received or resp.HasField("image")
                        yield resp
                    return
                except grpc.RpcError as e:
                    if received or not retryable(e):
                        raise
                    errors.append(e)  # busy or unreachable: spill over to the next replica in the key's order
            error = round_error(errors)  # every replica refused: back off, then start again at the preferred one
            calls += 1
            wait = next_wait(self.retry, error, calls, started)
            if wait is None:
                raise error
            log.debug("Generate: %s (%s); retry %d in %.2f s", error.code().name, error.details(), calls, wait)
            self.retry.sleep(wait)

    def resolve_artifact(self, ref: str) -> str:
        """The artifact id a user's name stands for: a registered model name (ListModels), a
        ``<run>/<skill>`` expert reference (the expert that run recorded: the output of its training
        job ``<run>/<skill>/training``, never the newest artifact with its labels), or else an artifact id as given."""
        ref = ref.strip()
        if not ref:
            raise InvalidArgument("give a model name, a <run>/<skill> expert or an artifact id", field="artifact")
        if "/" in ref:
            run, _, skill = ref.partition("/")
            key = run_stage_key(run, skill, "training")
            try:
                job = self.jobs("training").get(job_id_for(EXPERT_TRAINING_KIND, key))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                job = None
            if job is None or job.status.phase != common_pb2.JOB_PHASE_SUCCEEDED or not job.status.output.id:
                raise NotFound(f"run {run!r} has recorded no expert for skill {skill!r} (its training job {key!r} has not succeeded); "
                               f"`selma status {run}` shows the run's stages", field="artifact")
            return job.status.output.id
        token = ""
        while True:
            resp = self.serving_call("ListModels", serving_service_pb2.ListModelsRequest(page_size=1000, page_token=token))
            for m in resp.models:
                if m.model_name == ref:
                    if not m.artifact.id:
                        raise InvalidArgument(f"model {ref!r} is the base model: it has no artifact and no lineage", field="artifact")
                    return m.artifact.id
            token = resp.next_page_token
            if not token:
                return ref

    def lineage(self, artifact_id: str) -> list[common_pb2.ArtifactManifest]:
        req = serving_service_pb2.GetLineageRequest(artifact=common_pb2.ArtifactRef(id=artifact_id))
        return list(self.serving_call("GetLineage", req).artifacts)

    # -- retention -----------------------------------------------------------------------------

    def delete_model(self, model_name: str) -> serving_service_pb2.DeleteModelResponse:
        """Unregister a model (its artifact becomes collectable unless something else references it)."""
        return self.stub("serving").DeleteModel(serving_service_pb2.DeleteModelRequest(model_name=model_name), timeout=self.timeout)

    def delete_run(self, run: str, *, dry_run: bool = False, timeout: float | None = None) -> serving_service_pb2.DeleteRunResponse:
        """Delete a run's jobs and the artifacts nothing outside it depends on (``dry_run``: report only)."""
        req = serving_service_pb2.DeleteRunRequest(run=run, dry_run=dry_run)
        return self.stub("serving").DeleteRun(req, timeout=timeout or self.timeout)

    def collect_garbage(self, *, dry_run: bool = False, timeout: float | None = None) -> serving_service_pb2.CollectGarbageResponse:
        """Collect what nothing retained references (``dry_run``: report only)."""
        req = serving_service_pb2.CollectGarbageRequest(dry_run=dry_run)
        return self.stub("serving").CollectGarbage(req, timeout=timeout or self.timeout)
