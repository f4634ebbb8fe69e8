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

Channels are TLS and carry a bearer token as :class:`selma.security.ClientSecurity` says: from
``SELMA_TOKEN``/``SELMA_TLS_*`` (or the CLI's ``--token``/``--ca-cert``/``--client-cert``/``--client-key``),
falling back to the CA file and token file an endpoints file of ``selma up --tls`` names.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from selma.errors import InvalidArgument, NotFound, Unavailable
from selma.job_kinds import JOB_KINDS, JobKind
from selma.jobs import EXPERT_TRAINING_KIND, job_id_for, run_stage_key
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


class JobClient:
    """Start/Get/Watch/Cancel/List for one job kind (its stub's method names: :data:`selma.job_kinds.JOB_KINDS`)."""

    def __init__(self, stub: Any, kind: JobKind, timeout: float) -> None:
        self._stub = stub
        self._k = kind
        self._timeout = timeout

    def _req(self, method: str, **fields: Any) -> Any:
        return getattr(self._k.module, f"{method}Request")(**fields)

    def start(self, idempotency_key: str, spec: Any, *, validate_only: bool = False) -> tuple[Any, bool]:
        """Returns (job, created)."""
        resp = getattr(self._stub, self._k.start)(self._req(self._k.start, idempotency_key=idempotency_key, spec=spec, validate_only=validate_only), timeout=self._timeout)
        return resp.job, resp.created

    def get(self, job_id: str) -> Any:
        return getattr(self._stub, self._k.get)(self._req(self._k.get, job_id=job_id), timeout=self._timeout).job

    def watch(self, job_id: str, *, timeout: float | None = None) -> Iterator[Any]:
        """Stream the job until a terminal phase (the server ends the stream)."""
        for resp in getattr(self._stub, self._k.watch)(self._req(self._k.watch, job_id=job_id), timeout=timeout):
            yield resp.job

    def cancel(self, job_id: str, reason: str = "") -> Any:
        return getattr(self._stub, self._k.cancel)(self._req(self._k.cancel, job_id=job_id, reason=reason), timeout=self._timeout).job

    def list(self, *, run: str = "", skill: str = "", page_size: int = 100) -> list[Any]:
        """All jobs matching run/skill (follows page tokens)."""
        out: list[Any] = []
        token = ""
        while True:
            req = self._req(self._k.list, filter=common_pb2.JobFilter(run=run, skill=skill), page_size=page_size, page_token=token)
            resp = getattr(self._stub, self._k.list)(req, timeout=self._timeout)
            out.extend(resp.jobs)
            token = resp.next_page_token
            if not token:
                return out


class SelmaClient:
    """Channels and stubs for the services; use as a context manager."""

    def __init__(self, endpoints: Endpoints, *, timeout: float = 30.0, max_message_bytes: int = 64 * MiB,
                 security: ClientSecurity | None = None) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
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
        for name in API_SERVICES:
            addr = endpoints.address(name)
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

    def stub(self, service: str) -> Any:
        global _last_target
        if service not in self._stubs:
            raise InvalidArgument(f"no endpoint configured for the {service} service", field="endpoints")
        _last_target = (service, self.endpoints.address(service))
        return self._stubs[service]

    def jobs(self, kind: str) -> JobClient:
        """Job calls for ``prompts``, ``render``, ``training``, ``merge`` or ``evaluation``."""
        k = JOB_KINDS[kind]
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
        for name in services:
            address = self.endpoints.address(name)
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
    ) -> Iterator[serving_service_pb2.GenerateResponse]:
        """Stream generated images: a registered model, the base with per-request expert weights, or the base.

        ``seed`` is the base seed (unset: the service picks one at random) and ``seed_policy`` how each
        image's seed derives from it (any spelling :func:`selma.seeds.seed_policy` takes; unset = derived).
        """
        from selma.seeds import seed_policy as _seed_policy

        if model_name and experts:
            raise InvalidArgument("give either a model name or expert weights, not both", field="model")
        diffusion = common_pb2.DiffusionSettings(steps=steps, width=width, height=height, negative_prompt=negative_prompt)
        if guidance_scale is not None:
            diffusion.guidance_scale = guidance_scale
        req = serving_service_pb2.GenerateRequest(prompts=list(prompts), diffusion=diffusion, images_per_prompt=images_per_prompt)
        if seed is not None:
            req.seed = seed
        if seed_policy is not None:
            req.seed_policy = common_pb2.SeedPolicy.Value("SEED_POLICY_" + _seed_policy(seed_policy).name)
        if model_name:
            req.model_name = model_name
        elif experts:
            req.experts.CopyFrom(common_pb2.MergeSpec(method=method, experts=[common_pb2.ExpertWeight(expert_id=k, weight=v) for k, v in experts.items()]))
        yield from self.stub("serving").Generate(req, timeout=timeout)

    def resolve_artifact(self, ref: str) -> str:
        """The artifact id a user's name stands for: a registered model name (ListModels), a
        ``<run>/<skill>`` expert reference (the expert that run recorded: the output of its training
        job ``<run>/<skill>/training``, never the newest artifact with its labels), or else an artifact id as given."""
        ref = ref.strip()
        if not ref:
            raise InvalidArgument("give a model name, a <run>/<skill> expert or an artifact id", field="artifact")
        serving = self.stub("serving")
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
            resp = serving.ListModels(serving_service_pb2.ListModelsRequest(page_size=1000, page_token=token), timeout=self.timeout)
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
        return list(self.stub("serving").GetLineage(req, timeout=self.timeout).artifacts)

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
