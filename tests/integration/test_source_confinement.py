"""Requests cannot make a service read the host or a foreign bucket (issue 17, item 5).

Every request field that names a model source or an artifact URI is found from the ``selma.v1``
descriptors (a ModelRef's ``source``/``vae_source``, an ArtifactRef's ``uri``), and each is sent to
the real gRPC server of its service with a ``file://`` URI outside ``SELMA_MODEL_ALLOWED_DIRS``:
PERMISSION_DENIED naming the field, and nothing copied into any model cache.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass

from selma.server import wait_for_serving
from selma.sources import ARTIFACT_REF, MODEL_REF
from selma.storage import open_storage
from selma.v1 import (
    common_pb2,
    evaluation_service_pb2,
    evaluation_service_pb2_grpc,
    prompt_service_pb2,
    prompt_service_pb2_grpc,
    render_service_pb2,
    render_service_pb2_grpc,
    serving_service_pb2,
    serving_service_pb2_grpc,
    training_service_pb2,
    training_service_pb2_grpc,
)

pytestmark = [pytest.mark.integration]

MODULES = {
    "PromptService": (prompt_service_pb2, prompt_service_pb2_grpc),
    "RenderService": (render_service_pb2, render_service_pb2_grpc),
    "TrainingService": (training_service_pb2, training_service_pb2_grpc),
    "ServingService": (serving_service_pb2, serving_service_pb2_grpc),
    "EvaluationService": (evaluation_service_pb2, evaluation_service_pb2_grpc),
}
MARKER = f"secret-{uuid.uuid4().hex}"  # in the files outside the allowlist: must never show up under a service's directories


def source_fields(md: Descriptor, seen: tuple[str, ...] = ()) -> Iterator[tuple[tuple[FieldDescriptor, ...], str]]:
    """(field chain, leaf) for every ModelRef source/vae_source and ArtifactRef uri reachable from ``md``."""
    for fd in md.fields:
        mt = fd.message_type
        if mt is None or mt.full_name.startswith("google.protobuf.") or mt.GetOptions().map_entry:
            continue
        if mt.full_name == MODEL_REF:
            yield (fd,), "source"
            yield (fd,), "vae_source"
        elif mt.full_name == ARTIFACT_REF:
            yield (fd,), "uri"
        elif mt.full_name not in seen:
            for chain, leaf in source_fields(mt, (*seen, md.full_name)):
                yield (fd, *chain), leaf


def cases() -> list[tuple[str, str, tuple[FieldDescriptor, ...], str]]:
    out = []
    for service, (module, _) in MODULES.items():
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            out += [(service, method.name, chain, leaf) for chain, leaf in source_fields(method.input_type)]
    return out


CASES = cases()


def field_name(chain: tuple[FieldDescriptor, ...], leaf: str) -> str:
    return ".".join(fd.name + ("[0]" if fd.is_repeated else "") for fd in chain) + f".{leaf}"


def build_request(service: str, method: str, chain: tuple[FieldDescriptor, ...], leaf: str, value: str):  # noqa: ANN201
    module, _ = MODULES[service]
    request = GetMessageClass(module.DESCRIPTOR.services_by_name[service].methods_by_name[method].input_type)()
    if "idempotency_key" in request.DESCRIPTOR.fields_by_name:
        request.idempotency_key = "confined/start"  # a valid request in every other respect that is checked first
    msg = request
    for fd in chain:
        msg = getattr(msg, fd.name).add() if fd.is_repeated else getattr(msg, fd.name)
    setattr(msg, leaf, value)
    return request


def test_the_table_covers_every_service_that_takes_sources():
    rpcs = {(service, method) for service, method, _, _ in CASES}
    assert {("RenderService", "StartDatasetRender"), ("RenderService", "Preview"), ("TrainingService", "StartExpertTraining"),
            ("PromptService", "StartPromptGeneration"), ("PromptService", "PreviewPrompts"), ("ServingService", "RegisterModel"),
            ("ServingService", "GetLineage"), ("EvaluationService", "StartEvaluation")} <= rpcs
    names = {field_name(chain, leaf) for _, _, chain, leaf in CASES}
    assert {"spec.settings.model.source", "spec.dataset.uri", "spec.config.base_model.vae_source", "spec.vqa.transformers.model.source",
            "spec.backend.local_causal_lm.model.source", "spec.embedding_filter.model.source", "spec.prompt_sets[0].uri",
            "spec.merge_search.validation_prompt_set.uri", "artifact.uri"} <= names


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    """The five services on 127.0.0.1 sharing one file:// store; only <root>/allowed and the tiny models are allowlisted."""
    from selma_evaluation.server import build_server as build_evaluation
    from selma_evaluation.settings import EvaluationSettings
    from selma_prompts.server import build_server as build_prompts
    from selma_prompts.settings import PromptSettings
    from selma_render.server import build_server as build_render
    from selma_render.settings import RenderSettings
    from selma_serving.server import build_server as build_serving
    from selma_serving.settings import ServingSettings
    from selma_training.server import build_server as build_training
    from selma_training.settings import TrainingSettings

    root = tmp_path_factory.mktemp("confined")
    outside = root / "outside" / "model"
    for sub in ("", "unet", "artifacts/prompt_set-x"):
        (outside / sub).mkdir(parents=True, exist_ok=True)
    for name in ("model_index.json", "config.json", "unet/config.json", "artifacts/prompt_set-x/manifest.json"):
        (outside / name).write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "note": MARKER}))
    (root / "allowed").mkdir()
    (root / "allowed" / "escape").symlink_to(outside, target_is_directory=True)

    def common(name: str) -> dict:
        # each service's own model cache (not the per-user one), so the test sees exactly what each wrote
        return dict(data_dir=root / name, model_cache_dir=root / name / "models", storage_uri=(root / "storage").as_uri(), log_level="WARNING",
                    device="cpu", hf_offline=True, model_allowed_dirs=f"{root / 'allowed'},{tiny_models.sd.parent}")

    servers = {
        "PromptService": build_prompts(PromptSettings(**common("prompts"), llm_default_backend="tiny_test",
                                                      prompts_preload_default_backend=False)).start(),
        "RenderService": build_render(RenderSettings(**common("render"), render_max_resolution=128)).start(),
        "TrainingService": build_training(TrainingSettings(**common("training"), batch_poll_seconds=0.2)),
        "ServingService": build_serving(ServingSettings(**common("serving"), serving_base_model="tiny://sd")).start(),
        "EvaluationService": build_evaluation(EvaluationSettings(**common("evaluation"), batch_poll_seconds=0.2)),
    }
    channels = {}
    try:
        for service, server in servers.items():
            server.set_ready(True)
            wait_for_serving(server.address, f"selma.v1.{service}", timeout=30)
            channels[service] = grpc.insecure_channel(server.address)
        stubs = {service: getattr(MODULES[service][1], f"{service}Stub")(channels[service]) for service in servers}
        yield {"root": root, "outside": outside, "stubs": stubs}
    finally:
        for channel in channels.values():
            channel.close()
        for server in servers.values():
            server.stop(0)


def caches(root: Path) -> list[Path]:
    return [root / name / "models" for name in ("prompts", "render", "training", "serving", "evaluation")]


def assert_nothing_copied(root: Path) -> None:
    for cache in caches(root):
        assert not cache.exists() or not any(cache.iterdir()), f"{cache} was written to"
    for path in root.rglob("*"):
        if path.is_file() and "outside" not in path.relative_to(root).parts:
            assert MARKER not in path.read_text(errors="replace"), f"{path} holds a copy of a file outside the allowlist"


def call(stub, method: str, request):  # noqa: ANN001, ANN201
    response = getattr(stub, method)(request, timeout=60)
    return list(response) if hasattr(response, "__iter__") and not hasattr(response, "ListFields") else response


@pytest.mark.parametrize(("service", "method", "chain", "leaf"), CASES, ids=[f"{s}.{m}:{field_name(c, leaf)}" for s, m, c, leaf in CASES])
def test_a_file_uri_outside_the_allowlist_is_denied_for_every_source_field(stack, service, method, chain, leaf):
    outside = stack["outside"]
    for value in (outside.as_uri(), str(outside), f"{(stack['root'] / 'allowed').as_uri()}/../outside/model",
                  (stack["root"] / "allowed" / "escape").as_uri()):
        if leaf == "uri":  # an artifact in another store's root
            value = f"{value.rstrip('/')}/artifacts/prompt_set-x"
        with pytest.raises(grpc.RpcError) as e:
            call(stack["stubs"][service], method, build_request(service, method, chain, leaf, value))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, (value, e.value.details())
        assert field_name(chain, leaf) in e.value.details()
        assert ("SELMA_MODEL_ALLOWED_DIRS" if leaf != "uri" else "artifact store") in e.value.details()
    assert_nothing_copied(stack["root"])


def test_an_allowed_dir_is_accepted_and_an_escape_from_it_is_not(stack, tiny_models):
    stub = stack["stubs"]["RenderService"]
    settings = render_service_pb2.RenderSettings(diffusion=common_pb2.DiffusionSettings(steps=1, width=64, height=64))

    def preview(source: str) -> render_service_pb2.PreviewResponse:
        settings.model.source = source
        return stub.Preview(render_service_pb2.PreviewRequest(prompts=["a red square"], settings=settings), timeout=120)

    with pytest.raises(grpc.RpcError) as e:
        up = "../" * (len(tiny_models.sd.parent.parts) - 1)  # from an allowed dir up to / and down to the outside one
        preview(f"{tiny_models.sd.parent.as_uri()}/{up}{stack['outside'].relative_to(Path('/'))}")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert_nothing_copied(stack["root"])
    assert len(preview(tiny_models.sd.as_uri()).images) == 1  # allowlisted: mirrored into the cache and rendered
    assert any((stack["root"] / "render" / "models" / "mirror").iterdir())


def test_s3_sources_in_the_storage_bucket_load_and_other_buckets_are_denied(make_settings, s3_server, tiny_models, tmp_path):
    from selma_render.server import build_server
    from selma_render.settings import RenderSettings

    bucket, other = f"selma-own-{uuid.uuid4().hex[:12]}", f"selma-other-{uuid.uuid4().hex[:12]}"
    base = make_settings(storage_uri=f"s3://{bucket}/root", s3_endpoint=f"http://{s3_server}")
    settings = RenderSettings(**{**base.model_dump(), "render_max_resolution": 128, "device": "cpu"})
    for uri in (f"s3://{bucket}/models/tiny-sd", f"s3://{other}/models/tiny-sd"):  # the same model in both buckets
        storage = open_storage(settings, uri)
        for path in sorted(p for p in tiny_models.sd.rglob("*") if p.is_file()):
            storage.put_file(path.relative_to(tiny_models.sd).as_posix(), path)
    server = build_server(settings).start()
    server.set_ready(True)
    cache = settings.resolved_model_cache_dir
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = render_service_pb2_grpc.RenderServiceStub(channel)
            msg = render_service_pb2.RenderSettings(diffusion=common_pb2.DiffusionSettings(steps=1, width=64, height=64))
            msg.model.source = f"s3://{other}/models/tiny-sd"
            with pytest.raises(grpc.RpcError) as e:
                stub.Preview(render_service_pb2.PreviewRequest(prompts=["a cat"], settings=msg), timeout=60)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert other in e.value.details() and "SELMA_MODEL_ALLOWED_BUCKETS" in e.value.details()
            assert not cache.exists() or not any(cache.rglob("*")), "the denied bucket was mirrored"
            msg.model.source = f"s3://{bucket}/models/tiny-sd"
            assert len(stub.Preview(render_service_pb2.PreviewRequest(prompts=["a cat"], settings=msg), timeout=120).images) == 1
    finally:
        server.stop(0)
