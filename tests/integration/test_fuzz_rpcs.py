"""A fuzzer over every RPC of every ``selma.v1`` service, built from the descriptors.

All five services run for real on 127.0.0.1 in this process (the offline tiny models, local
storage, the local batch launcher), as the other integration tests start them.  For each RPC,
enumerated from ``selma.v1.*_pb2.DESCRIPTOR.services_by_name`` (a new RPC is fuzzed without a line
here), hypothesis builds requests from the request's message descriptor: empty requests, random and
plausible values in any field, unknown enum numbers, out-of-range Duration/Timestamp, huge strings
(MBs) and huge repeated fields, nested messages.  Each answer must be:

* a status other than INTERNAL or UNKNOWN (bad input is a client error naming the field);
* within a per-call deadline (the client seeing DEADLINE_EXCEEDED means the server hung);
  a server stream is read for a bounded number of messages, then cancelled;

and after each RPC's examples every service still answers SERVING on the health service and this
process's RSS (the servers' memory: they run in it) has grown less than a bound.

Work the fuzzer manages to start is cancelled at once (a Start answering ``created``), and the
services run with small limits (steps, resolution, one local job), so it cannot swamp the box.

Profiles (``SELMA_FUZZ_PROFILE``): ``ci`` (the default: a few derandomized examples per RPC, part
of ``make test``) and ``long`` (``make fuzz``: many random examples per RPC, failures remembered in
``.hypothesis/``); ``SELMA_FUZZ_EXAMPLES`` overrides the count, ``SELMA_FUZZ_LOG=FILE`` logs every answer.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import selma.v1

pytestmark = [pytest.mark.integration]

# -- profiles -----------------------------------------------------------------------------------

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("ci", max_examples=int(os.environ.get("SELMA_FUZZ_EXAMPLES", "10")), derandomize=True,
                          database=None, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("SELMA_FUZZ_EXAMPLES", "300")), **_COMMON)
PROFILE = os.environ.get("SELMA_FUZZ_PROFILE", "ci")
CALL_LOG = os.environ.get("SELMA_FUZZ_LOG", "")  # a file to append "RPC<TAB>code<TAB>details" to per call: what a run exercised

CALL_DEADLINE_S = 30.0  # one call: a hang if passed; a loaded 2-core box answers any of them within seconds
MAX_STREAM_MESSAGES = 2  # server streams: read this many, then cancel
RSS_GROWTH_BOUND = 1536 * 1024 * 1024  # the services' memory may grow this much over the whole fuzz
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
MiB = 1024 * 1024


# -- the RPCs, from the descriptors ----------------------------------------------------------------


def selma_services() -> dict[str, Any]:
    """Every ``selma.v1`` service descriptor by full name, from the generated ``*_pb2`` modules."""
    out = {}
    for info in pkgutil.iter_modules(selma.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"selma.v1.{info.name}")
            out.update({s.full_name: s for s in module.DESCRIPTOR.services_by_name.values()})
    return out


SERVICES = selma_services()
RPCS = [m for s in SERVICES.values() for m in s.methods]


# -- requests from descriptors -----------------------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Strings that get a request past its first checks (ids, names, sources, skills, devices), and some
# that try to get out of them (paths, URIs, keys).
_PLAUSIBLE = ["", " ", "a", "0", "-1", "k", "run-1", "counting", "spatial", "base", "tiny://sd", "tiny://sdxl", "cpu", "cuda:0",
              "auto", "../../etc/passwd", "/etc/passwd", "file:///etc", "s3://bucket/key", "s3://", "experts/run/skill",
              "SCHEDULER_DDIM", "tiny_test", "yes", "\x00", "é😀", "a/b", "*", "NaN", "1e309"]
_DURATION_LIKE = {"google.protobuf.Duration", "google.protobuf.Timestamp"}


def _int(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Integers in [lo, hi]: edges (0, ±1, the type's limits, 2^31...), small ones, or any."""
    edges = sorted({v for v in (0, 1, -1, 2, 8, 64, 100_000, 2**31 - 1, -(2**31), 2**32, 2**53, lo, hi) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, 0), min(hi, 16)), st.integers(lo, hi))


@dataclass
class Request:
    """A drawn request, printed short when hypothesis reports it (a fuzzed request may hold MBs)."""

    message: Message

    def __repr__(self) -> str:
        text = text_format.MessageToString(self.message, as_one_line=True, use_short_repeated_primitives=True)
        if len(text) > 1500:
            text = text[:1500] + f"... ({len(text)} characters)"
        return f"{type(self.message).__name__}({text})"


class _Drawer:
    """Fills a message field by field from hypothesis draws.

    A request holds at most ``MAX_HUGE`` huge values (a string or bytes of MBs, a repeated field or
    map of 1,000 to 100,000 entries), and a huge repeat is built from small elements, so no request
    needs more than a few tens of MB to build (100,000 copies of a 4 MB string would need 400 GB).
    """

    MAX_HUGE = 2

    def __init__(self, draw: Any, *, mutate: bool = False) -> None:
        self.draw = draw
        self.huge_left = self.MAX_HUGE
        self.mutate = mutate  # a valid request: change few of its fields (1 in 6), so most of it stays valid

    def _huge(self) -> bool:
        """Whether the next value is a huge one (1 in 10, while the budget lasts)."""
        if self.huge_left <= 0 or self.draw(st.integers(0, 9)) != 9:
            return False
        self.huge_left -= 1
        return True

    def fill(self, msg: Message, depth: int) -> None:
        desc: Descriptor = msg.DESCRIPTOR
        if desc.full_name in _DURATION_LIKE:
            # seconds/nanos anywhere in their wire ranges: in range, just out of it, absurd
            msg.seconds = self.draw(_int(-(2**63), 2**63 - 1))
            msg.nanos = self.draw(_int(-(2**31), 2**31 - 1))
            return
        for fd in desc.fields:
            if self.mutate and fd.type == FieldDescriptor.TYPE_MESSAGE and not fd.is_repeated and msg.HasField(fd.name) \
                    and fd.message_type.full_name not in _DURATION_LIKE and self.draw(st.booleans()):
                self.fill(getattr(msg, fd.name), depth + 1)  # mutate inside a valid nested message
                continue
            if self.draw(st.integers(0, 5)) if self.mutate else not self.draw(st.integers(0, 2)):
                continue  # a field is (re)drawn with probability 2/3, or 1/6 when mutating
            if self.mutate:
                msg.ClearField(fd.name)
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                self._map(getattr(msg, fd.name), fd.message_type, depth)
            elif fd.is_repeated:
                self._repeated(getattr(msg, fd.name), fd, depth)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                sub = getattr(msg, fd.name)
                sub.SetInParent()
                if depth < 4:
                    self.fill(sub, depth + 1)
            else:
                setattr(msg, fd.name, self.scalar(fd))

    def scalar(self, fd: FieldDescriptor) -> Any:
        t = fd.type
        if t in _INT_RANGES:
            return self.draw(_int(*_INT_RANGES[t]))
        if t == FieldDescriptor.TYPE_ENUM:
            known = [v.number for v in fd.enum_type.values]
            return self.draw(st.one_of(st.sampled_from(known), st.sampled_from(known), _int(-(2**31), 2**31 - 1)))
        if t == FieldDescriptor.TYPE_BOOL:
            return self.draw(st.booleans())
        if t == FieldDescriptor.TYPE_DOUBLE:
            return self.draw(st.floats())
        if t == FieldDescriptor.TYPE_FLOAT:
            return self.draw(st.floats(width=32))
        if t == FieldDescriptor.TYPE_BYTES:
            return b"\x00" * self.draw(st.sampled_from([1 * MiB, 4 * MiB])) if self._huge() else self.draw(st.binary(max_size=64))
        if self._huge():  # a huge string, built here, so only its size is drawn (and reported)
            return "x" * self.draw(st.sampled_from([64 * 1024, 1 * MiB, 4 * MiB]))
        if self.draw(st.booleans()):
            return self.draw(st.sampled_from(_PLAUSIBLE))
        return self.draw(st.text(max_size=40))

    def _count(self) -> int:
        if self._huge():
            self.huge_left = 0  # its elements, and the rest of the request, stay small
            return self.draw(st.sampled_from([1000, 100_000]))
        return self.draw(st.integers(0, 3))

    def _repeated(self, field: Any, fd: FieldDescriptor, depth: int) -> None:
        n = self._count()
        if fd.type == FieldDescriptor.TYPE_MESSAGE:
            # a huge repeat copies one of three drawn elements, so drawing stays cheap; of messages, 10,000 at most
            n = min(n, 10_000)
            cls = GetMessageClass(fd.message_type)
            distinct = []
            for _ in range(min(n, 3)):
                item = cls()
                if depth < 4:
                    self.fill(item, depth + 1)
                distinct.append(item)
            field.extend(distinct[i % len(distinct)] for i in range(n)) if distinct else None
        else:
            values = [self.scalar(fd) for _ in range(min(n, 3))]
            field.extend(values[i % len(values)] for i in range(n)) if values else None

    def _map(self, field: Any, entry: Descriptor, depth: int) -> None:
        key_fd, value_fd = entry.fields_by_name["key"], entry.fields_by_name["value"]
        n = self._count()
        keys = [self.scalar(key_fd) for _ in range(min(n, 3))]
        if n > 3:  # a huge map: distinct keys
            keys += [f"k{i}" if key_fd.type == FieldDescriptor.TYPE_STRING else i for i in range(n)]
        for key in keys:
            if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                field[key].SetInParent()
                if depth < 4 and len(keys) <= 3:
                    self.fill(field[key], depth + 1)
            else:
                field[key] = self.scalar(value_fd) if len(keys) <= 3 else ""


@st.composite
def requests(draw: Any, method: MethodDescriptor, valid: Message | None = None) -> Request:
    """A request for ``method``: empty (1 in 8), filled from its descriptor, or (half the time, when
    there is one) a ``valid`` request with a few fields changed, to get past the first checks."""
    msg = GetMessageClass(method.input_type)()
    choice = draw(st.integers(0, 7))
    if valid is not None and choice >= 4:
        msg.CopyFrom(valid)
        _Drawer(draw, mutate=True).fill(msg, 0)
    elif choice:
        _Drawer(draw).fill(msg, 0)
    return Request(msg)


# -- the stack ------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """All five services on 127.0.0.1 with small limits, two experts and a prompt set in their storage.

    {"channels": by service name, "valid": a valid request by RPC full name, "rss0": bytes}.
    """
    from selma.server import start_hosted
    from selma_evaluation import server as evaluation
    from selma_evaluation.settings import EvaluationSettings
    from selma_prompts.server import build_server as build_prompts
    from selma_prompts.settings import PromptSettings
    from selma_render.server import build_server as build_render
    from selma_render.settings import RenderSettings
    from selma_serving.server import build_server as build_serving
    from selma_serving.settings import ServingSettings
    from selma_training import server as training_server
    from selma_training.settings import TrainingSettings

    root = tmp_path_factory.mktemp("fuzz")
    storage_uri = (root / "storage").as_uri()
    # the tiny models' directory is the one local path requests may name (SELMA_MODEL_ALLOWED_DIRS)
    base = dict(storage_uri=storage_uri, log_level="ERROR", grpc_workers=8, model_allowed_dirs=str(Path(tiny_models.sd).parent.resolve()))
    prompts = build_prompts(PromptSettings(**base, data_dir=root / "prompts", llm_default_backend="tiny_test",
                                           prompts_preload_default_backend=False, prompts_max_concurrent_jobs=1,
                                           prompts_preview_limit=4)).start()
    render = build_render(RenderSettings(**base, data_dir=root / "render", render_default_model=str(tiny_models.sd),
                                         render_max_steps=2, render_max_resolution=64, render_preview_max_prompts=2,
                                         render_preview_max_images=2)).start()
    serving = build_serving(ServingSettings(**base, data_dir=root / "serving", serving_base_model=str(tiny_models.sd),
                                            serving_max_steps=2, serving_max_resolution=64, serving_max_prompts=2,
                                            serving_max_images_per_prompt=2)).start()
    serving.core.engine.load_base()
    store = serving.core.store
    common = dict(**base, data_dir=root / "training", device="cpu", batch_progress_interval_seconds=0, batch_poll_seconds=0.2,
                  batch_max_local_jobs=1, hf_offline=True)
    hosted_training = training_server.hosted(TrainingSettings(**common))
    hosted_evaluation = evaluation.hosted(EvaluationSettings(**common, eval_serving_endpoint=serving.address),
                                          launchers=hosted_training.core.launchers)
    training = start_hosted(TrainingSettings(**common), [hosted_training, hosted_evaluation], name="training")
    for server in (prompts, render, serving):
        server.set_ready(True)
    servers = {"selma.v1.PromptService": prompts, "selma.v1.RenderService": render, "selma.v1.ServingService": serving,
               "selma.v1.TrainingService": training, "selma.v1.EvaluationService": training}
    assert set(servers) == set(SERVICES), "a selma.v1 service the fuzzer does not start"
    channels = {name: grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 256 * MiB),
                                                                ("grpc.max_receive_message_length", 256 * MiB)])
                for name, s in servers.items()}
    valid = valid_requests(store, str(tiny_models.sd))
    valid.update(requests_on_a_finished_job(channels["selma.v1.PromptService"]))
    # each valid request once, untimed: what loads lazily (the tiny LM, pipelines) is loaded before the fuzz
    by_name = {m.full_name: m for m in RPCS}
    warm_up = {name: call(channels[by_name[name].containing_service.full_name], by_name[name], request, deadline=300)
               for name, request in valid.items()}
    try:
        yield {"channels": channels, "valid": valid, "warm_up": warm_up, "rss0": _rss_bytes()}
    finally:
        for channel in channels.values():
            channel.close()
        training.stop(0)
        hosted_evaluation.on_stop()
        hosted_training.on_stop()
        for server in (prompts, render, serving):
            server.stop(0)
        serving.core.shutdown()


def valid_requests(store: Any, base_model: str) -> dict[str, Message]:
    """Requests the stack accepts, for the fuzzer to change a few fields of: the work they start is tiny."""
    from selma.v1 import (
        common_pb2,
        evaluation_service_pb2,
        prompt_service_pb2,
        render_service_pb2,
        serving_service_pb2,
    )
    from selma_serving.testing import make_expert

    experts = [make_expert(store, base_model, seed=s, rank=4, skill=f"skill{s}", run="fuzz") for s in (1, 2)]
    lines = [{"id": f"p{i:06d}", "index": i, "text": f"{i + 1} green apples", "skill": "count"} for i in range(2)]
    with store.writer("prompt_set", key="fuzz-prompts", labels={"selma.dev/skill": "count"}, parameters={"skill": "count"}) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    prompt_set = common_pb2.ArtifactRef(id=w.manifest.id, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET)
    merge = common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=e.id) for e in experts])
    diffusion = common_pb2.DiffusionSettings(steps=2, width=64, height=64, scheduler=common_pb2.SCHEDULER_DDIM)
    render_settings = render_service_pb2.RenderSettings(model=common_pb2.ModelRef(source=base_model), diffusion=diffusion)
    prompt_spec = prompt_service_pb2.PromptGenerationSpec(skill_name="counting", count=4, prompts_per_request=2, seed=1)
    out = {
        "selma.v1.ServingService.Generate": serving_service_pb2.GenerateRequest(prompts=["a red ball"], diffusion=diffusion, seed=7,
                                                                                experts=merge),
        "selma.v1.ServingService.StartMerge": serving_service_pb2.StartMergeRequest(
            idempotency_key="fuzz/merge", validate_only=True,
            spec=serving_service_pb2.MergeJobSpec(run="fuzz", model_name="fuzzed", merge=merge)),
        "selma.v1.ServingService.ExportAdapter": serving_service_pb2.ExportAdapterRequest(expert_id=experts[0].id),
        "selma.v1.ServingService.GetLineage": serving_service_pb2.GetLineageRequest(
            artifact=common_pb2.ArtifactRef(id=experts[0].id)),
        "selma.v1.ServingService.RegisterModel": serving_service_pb2.RegisterModelRequest(
            model_name="fuzzed", artifact=common_pb2.ArtifactRef(id=experts[0].id)),
        "selma.v1.RenderService.Preview": render_service_pb2.PreviewRequest(prompts=["a red ball"], settings=render_settings),
        "selma.v1.RenderService.StartDatasetRender": render_service_pb2.StartDatasetRenderRequest(
            idempotency_key="fuzz/render", validate_only=True,
            spec=render_service_pb2.DatasetRenderSpec(run="fuzz", prompt_set=prompt_set, settings=render_settings)),
        "selma.v1.PromptService.PreviewPrompts": prompt_service_pb2.PreviewPromptsRequest(spec=prompt_spec),
        "selma.v1.PromptService.StartPromptGeneration": prompt_service_pb2.StartPromptGenerationRequest(
            idempotency_key="fuzz/prompts", validate_only=True, spec=prompt_spec),
        "selma.v1.EvaluationService.StartEvaluation": evaluation_service_pb2.StartEvaluationRequest(
            idempotency_key="fuzz/eval", validate_only=True,
            spec=evaluation_service_pb2.EvaluationSpec(
                run="fuzz", benchmark=evaluation_service_pb2.EVALUATION_BENCHMARK_PROMPT_SET, prompt_set=prompt_set,
                diffusion=diffusion, targets=[evaluation_service_pb2.EvaluationTarget(label="base")],
                vqa=evaluation_service_pb2.VqaBackend(tiny_test=evaluation_service_pb2.TinyTestVqaBackend()))),
    }
    assert set(out) <= {m.full_name for m in RPCS}
    return out


def requests_on_a_finished_job(channel: grpc.Channel) -> dict[str, Message]:
    """Get/Watch/Cancel/List requests naming a real (finished) prompt-generation job, so the fuzzer reaches
    the job RPCs past NOT_FOUND (a Watch of it with a fuzzed min_interval streams its last state)."""
    from selma.v1 import common_pb2, prompt_service_pb2, prompt_service_pb2_grpc

    service = SERVICES["selma.v1.PromptService"]
    spec = prompt_service_pb2.PromptGenerationSpec(skill_name="counting", count=2, prompts_per_request=2, seed=1, run="fuzz")
    code, details, (started, *_) = call(channel, service.methods_by_name["StartPromptGeneration"],
                                        prompt_service_pb2.StartPromptGenerationRequest(idempotency_key="fuzz/job", spec=spec),
                                        deadline=300)
    assert code == grpc.StatusCode.OK, details
    job_id = started.job.status.job_id
    watch = prompt_service_pb2.WatchPromptGenerationRequest(job_id=job_id)
    last = list(prompt_service_pb2_grpc.PromptServiceStub(channel).WatchPromptGeneration(watch, timeout=300))[-1]
    assert last.job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, last.job.status
    names = {"Get": "GetPromptGeneration", "Watch": "WatchPromptGeneration", "Cancel": "CancelPromptGeneration"}
    out = {service.methods_by_name[name].full_name: GetMessageClass(service.methods_by_name[name].input_type)(job_id=job_id)
           for name in names.values()}
    out["selma.v1.PromptService.ListPromptGenerations"] = prompt_service_pb2.ListPromptGenerationsRequest(
        filter=common_pb2.JobFilter(run="fuzz", phases=[common_pb2.JOB_PHASE_SUCCEEDED]), page_size=10)
    return out


# -- calls ------------------------------------------------------------------------------------------


def call(channel: grpc.Channel, method: MethodDescriptor, request: Message,
         deadline: float = CALL_DEADLINE_S) -> tuple[grpc.StatusCode, str, list[Message]]:
    """One call within the deadline: (code, details, responses); a stream is read for a few messages, then cancelled."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    out_cls = GetMessageClass(method.output_type)
    kwargs = dict(request_serializer=type(request).SerializeToString, response_deserializer=out_cls.FromString)
    responses: list[Message] = []
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path, **kwargs)(request, timeout=deadline)
            try:
                for response in stream:
                    responses.append(response)
                    if len(responses) >= MAX_STREAM_MESSAGES:
                        break
            finally:
                stream.cancel()
        else:
            responses.append(channel.unary_unary(path, **kwargs)(request, timeout=deadline))
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and responses:
            return grpc.StatusCode.OK, "", responses  # a stream that answered and waits for its next update (a Watch)
        return e.code(), e.details() or "", responses
    return grpc.StatusCode.OK, "", responses


def cancel_started_work(channel: grpc.Channel, method: MethodDescriptor, responses: list[Message]) -> None:
    """A Start that created a job: cancel it at once (the fuzzer must not leave work running)."""
    if not method.name.startswith("Start") or not responses:
        return
    response = responses[0]
    if not getattr(response, "created", False):
        return
    cancel = method.containing_service.methods_by_name["Cancel" + method.name.removeprefix("Start")]
    request = GetMessageClass(cancel.input_type)(job_id=response.job.status.job_id, reason="fuzzer")
    code, details, _ = call(channel, cancel, request)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION), f"cancelling a fuzzed job: {code.name}: {details}"


def assert_serving(channels: dict[str, grpc.Channel]) -> None:
    for name, channel in channels.items():
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=CALL_DEADLINE_S)
        assert status.status == health_pb2.HealthCheckResponse.SERVING, f"{name} is not SERVING after the fuzz"


# -- the property --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RPCS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
def test_every_rpc_answers_fuzzed_requests_with_a_client_status_in_time(stack, method):
    channel = stack["channels"][method.containing_service.full_name]

    @settings(settings.get_profile(PROFILE))
    @given(request=requests(method, stack["valid"].get(method.full_name)))
    def fuzz(request: Request) -> None:
        code, details, responses = call(channel, method, request.message)
        event(code.name)  # the spread of answers: pytest --hypothesis-show-statistics
        if CALL_LOG:
            with open(CALL_LOG, "a") as f:
                f.write(f"{method.name}\t{code.name}\t{details[:150]!r}\n")
        assert code not in FORBIDDEN, f"{method.full_name} answered {code.name}: {details[:500]}"
        # the server's answer reached the client (not a transport error raised in the client instead)
        assert "Stream removed" not in details and len(details.encode()) <= 4096, f"{code.name}: {details[:500]}"
        cancel_started_work(channel, method, responses)
        grown = _rss_bytes() - stack["rss0"]
        assert grown < RSS_GROWTH_BOUND, f"the services' memory grew by {grown / MiB:.0f} MiB"

    fuzz()
    assert_serving(stack["channels"])


def test_the_fuzzer_covers_every_rpc_of_every_service():
    # against the .proto sources, read independently of the descriptors the fuzzer walks
    protos = Path(__file__).resolve().parents[2] / "protos" / "selma" / "v1"
    declared = {(svc, rpc) for path in protos.glob("*.proto")
                for svc, body in re.findall(r"^service (\w+) \{(.*?)^\}", path.read_text(), re.S | re.M)
                for rpc in re.findall(r"^\s*rpc (\w+)\(", body, re.M)}
    assert {(m.containing_service.name, m.name) for m in RPCS} == declared
    assert len(SERVICES) == 5


# -- the API boundary's own rule (issue #18 item 4), field by field ------------------------------


def _bad_value_paths(desc: Descriptor, prefix: str = "", seen: tuple[str, ...] = ()) -> Iterator[tuple[str, list[FieldDescriptor]]]:
    """(path as the error names it, the fields leading there) for every enum, Duration and Timestamp field under ``desc``."""
    for fd in desc.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue  # no map of this API holds one; check_request's unit test covers map values
        name = prefix + fd.name + ("[0]" if fd.is_repeated else "")
        if fd.type == FieldDescriptor.TYPE_ENUM or (fd.message_type is not None and fd.message_type.full_name in _DURATION_LIKE):
            yield name, [fd]
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.full_name not in seen:
            for path, chain in _bad_value_paths(fd.message_type, name + ".", (*seen, fd.message_type.full_name)):
                yield path, [fd, *chain]


def _with_bad_value(cls: type[Message], chain: list[FieldDescriptor]) -> Message:
    msg = cls()
    target = msg
    for fd in chain[:-1]:
        target = getattr(target, fd.name).add() if fd.is_repeated else getattr(target, fd.name)
    last = chain[-1]
    if last.type == FieldDescriptor.TYPE_ENUM:
        bad = max(v.number for v in last.enum_type.values) + 1000
        getattr(target, last.name).append(bad) if last.is_repeated else setattr(target, last.name, bad)
    else:
        wkt = getattr(target, last.name).add() if last.is_repeated else getattr(target, last.name)
        wkt.seconds = 10**15  # beyond the year 9999 and ±10,000 years: json_format raised on it
    return msg


BAD_VALUE_CASES = [(m, path, chain) for m in RPCS for path, chain in _bad_value_paths(m.input_type)]


@pytest.mark.parametrize("method, path, chain", BAD_VALUE_CASES,
                         ids=[f"{m.name}:{p}" for m, p, _ in BAD_VALUE_CASES])
def test_an_unknown_enum_number_or_out_of_range_duration_is_invalid_argument_naming_the_field(stack, method, path, chain):
    request = _with_bad_value(GetMessageClass(method.input_type), chain)
    code, details, _ = call(stack["channels"][method.containing_service.full_name], method, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert path in details, details


def test_the_bad_value_cases_include_the_ones_seen_in_the_field():
    cases = {(m.name, p) for m, p, _ in BAD_VALUE_CASES}
    assert ("StartDatasetRender", "spec.prompt_set.kind") in cases
    assert ("WatchExpertTraining", "min_interval") in cases
    assert {m.name for m in RPCS if m.name.startswith("Watch")} <= {name for name, p in cases if p == "min_interval"}


def test_the_valid_requests_the_fuzzer_starts_from_are_accepted(stack):
    for name, (code, details, responses) in stack["warm_up"].items():
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED), f"{name}: {code.name}: {details}"
        assert responses, name


@pytest.mark.parametrize("size", [64 * 1024, 4 * MiB])
def test_a_huge_id_is_refused_with_a_message_the_client_receives(stack, size):
    # found by the fuzzer: a NOT_FOUND quoting a 1 MB job id reached the client as "received metadata size exceeds hard limit"
    method = SERVICES["selma.v1.PromptService"].methods_by_name["GetPromptGeneration"]
    request = GetMessageClass(method.input_type)(job_id="x" * size)
    code, details, _ = call(stack["channels"]["selma.v1.PromptService"], method, request)
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), f"{code.name}: {details[:300]}"
    # the request limit (SELMA_MAX_ID_CHARS) answers first now; the cut of every status detail stays the backstop
    assert "job_id" in details and len(details.encode()) <= 2048
