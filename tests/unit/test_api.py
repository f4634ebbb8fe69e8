"""Contract tests for the selma.v1 protobuf API (protos/selma/v1).

They check the API's conventions on the real artefacts: the generated stubs (what servers and
clients import), a FileDescriptorSet compiled from the .proto files with source info (for
comments), `buf lint`, and git's index (generated code is never committed).
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import pathlib
import shutil
import subprocess
import sys
from concurrent import futures

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor, MethodDescriptor

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
PROTO_DIR = PROTO_ROOT / "selma" / "v1"

SERVICES = {
    "selma.v1.PromptService": "prompt_service",
    "selma.v1.RenderService": "render_service",
    "selma.v1.TrainingService": "training_service",
    "selma.v1.ServingService": "serving_service",
    "selma.v1.EvaluationService": "evaluation_service",
}
# Every kind of long-running work, by the noun its five RPCs share (StartX, GetX, WatchX, CancelX, ListXs).
LONG_RUNNING = {
    "selma.v1.PromptService": {"PromptGeneration"},
    "selma.v1.RenderService": {"DatasetRender"},
    "selma.v1.TrainingService": {"ExpertTraining"},
    "selma.v1.EvaluationService": {"Evaluation", "Gate"},
    "selma.v1.ServingService": {"Merge"},
}
PROTO_FILES = ["common", *SERVICES.values()]


def _import_generated(name: str):
    """Import selma.v1.<name>; fall back to shared/, where `python setup.py gen` writes the stubs."""
    try:
        return importlib.import_module(f"selma.v1.{name}")
    except ModuleNotFoundError:
        shared = str(REPO / "shared")
        if shared not in sys.path:
            sys.path.insert(0, shared)
        try:
            return importlib.import_module(f"selma.v1.{name}")
        except ModuleNotFoundError as exc:  # pragma: no cover - message for a missing build step
            pytest.fail(f"generated stubs missing ({exc}); run `python setup.py gen` or `pip install -e .`")


@pytest.fixture(scope="module")
def files() -> dict[str, FileDescriptor]:
    """The generated modules' file descriptors, keyed by proto file stem."""
    return {stem: _import_generated(f"{stem}_pb2").DESCRIPTOR for stem in PROTO_FILES}


def _compile(out: pathlib.Path, *, source_info: bool) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_DIR.glob("*.proto"))
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--descriptor_set_out={out}"]
    if source_info:
        args.append("--include_source_info")
    assert protoc.main([*args, *protos]) == 0, "protoc failed on protos/selma/v1"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    """protos/selma/v1 compiled with source info (comments and locations)."""
    return _compile(tmp_path_factory.mktemp("fds") / "selma.binpb", source_info=True)


def _all_enums(file: FileDescriptor):
    def walk(msg):
        yield from msg.enum_types
        for nested in msg.nested_types:
            yield from walk(nested)

    yield from file.enum_types_by_name.values()
    for msg in file.message_types_by_name.values():
        yield from walk(msg)


def _service_methods(files) -> dict[str, dict[str, MethodDescriptor]]:
    out = {}
    for full_name, stem in SERVICES.items():
        service = files[stem].services_by_name[full_name.rsplit(".", 1)[1]]
        out[full_name] = dict(service.methods_by_name)
    return out


def test_each_service_file_defines_exactly_its_fully_qualified_service(files):
    for full_name, stem in SERVICES.items():
        file = files[stem]
        assert file.package == "selma.v1"
        assert file.name == f"selma/v1/{stem}.proto"
        assert [s.full_name for s in file.services_by_name.values()] == [full_name]
    assert files["common"].package == "selma.v1"
    assert not files["common"].services_by_name, "common.proto holds shared messages only"


def test_long_running_work_has_start_get_watch_cancel_list(files):
    methods = _service_methods(files)
    for service, groups in LONG_RUNNING.items():
        starts = {name[len("Start"):] for name in methods[service] if name.startswith("Start")}
        assert starts == groups, f"{service}: unexpected Start RPCs {sorted(starts)}"
        for noun in groups:
            rpc = {verb: methods[service].get(f"{verb}{noun}") for verb in ("Start", "Get", "Watch", "Cancel")}
            rpc["List"] = methods[service].get(f"List{noun}s")
            missing = [verb for verb, m in rpc.items() if m is None]
            assert not missing, f"{service}: {noun} lacks {missing}"

            watch = rpc["Watch"]
            assert watch.server_streaming and not watch.client_streaming, f"Watch{noun} must be server-streaming"
            for verb in ("Start", "Get", "Cancel", "List"):
                assert not rpc[verb].server_streaming and not rpc[verb].client_streaming, f"{verb}{noun} must be unary"

            key = rpc["Start"].input_type.fields_by_name.get("idempotency_key")
            assert key is not None and key.type == FieldDescriptor.TYPE_STRING, f"Start{noun}Request.idempotency_key"
            assert "validate_only" in rpc["Start"].input_type.fields_by_name
            assert "created" in rpc["Start"].output_type.fields_by_name
            for verb in ("Get", "Watch", "Cancel"):
                assert "job_id" in rpc[verb].input_type.fields_by_name, f"{verb}{noun}Request.job_id"

            # Every job message carries the shared JobStatus, the spec it runs, and its own stats.
            for verb in ("Start", "Get", "Watch", "Cancel"):
                job = rpc[verb].output_type.fields_by_name["job"].message_type
                assert job.full_name == f"{service.rsplit('.', 1)[0]}.{noun}Job"
                assert job.fields_by_name["status"].message_type.full_name == "selma.v1.JobStatus"
                assert {"spec", "stats"} <= set(job.fields_by_name)
            assert rpc["Start"].input_type.fields_by_name["spec"].message_type is job.fields_by_name["spec"].message_type

            list_req, list_resp = rpc["List"].input_type, rpc["List"].output_type
            assert list_req.fields_by_name["filter"].message_type.full_name == "selma.v1.JobFilter"
            assert list_req.fields_by_name["page_size"].type == FieldDescriptor.TYPE_INT32
            assert list_req.fields_by_name["page_token"].type == FieldDescriptor.TYPE_STRING
            assert list_resp.fields_by_name["next_page_token"].type == FieldDescriptor.TYPE_STRING
            jobs = list_resp.fields_by_name["jobs"]
            assert jobs.is_repeated and jobs.message_type is job


def test_job_status_carries_progress_output_timestamps_error_and_details(files):
    status = files["common"].message_types_by_name["JobStatus"]
    fields = status.fields_by_name
    assert fields["phase"].enum_type.full_name == "selma.v1.JobPhase"
    assert fields["output"].message_type.full_name == "selma.v1.ArtifactRef"
    assert fields["error"].message_type.full_name == "selma.v1.JobError"
    for stamp in ("created_at", "updated_at", "started_at", "finished_at"):
        assert fields[stamp].message_type.full_name == "google.protobuf.Timestamp"
    assert fields["details"].message_type.GetOptions().map_entry
    progress = fields["progress"].message_type.fields_by_name
    assert {"done", "total", "rate_per_second", "eta"} <= set(progress)
    assert progress["eta"].message_type.full_name == "google.protobuf.Duration"
    phases = set(files["common"].enum_types_by_name["JobPhase"].values_by_name)
    assert {"JOB_PHASE_SUCCEEDED", "JOB_PHASE_FAILED", "JOB_PHASE_CANCELLED"} <= phases


def test_pure_reads_are_marked_no_side_effects(files):
    no_side_effects = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    for service, methods in _service_methods(files).items():
        for name, method in methods.items():
            if name.startswith(("Get", "Watch", "List")):
                assert method.GetOptions().idempotency_level == no_side_effects, f"{service}.{name}"


def test_every_enum_zero_value_ends_in_unspecified(files):
    seen = 0
    for file in files.values():
        for enum in _all_enums(file):
            zero = enum.values_by_number[0]
            assert zero.index == 0 and zero.name.endswith("_UNSPECIFIED"), f"{enum.full_name}: {zero.name}"
            seen += 1
    assert seen >= 20


def test_generate_streams_one_png_image_per_response(files):
    methods = _service_methods(files)["selma.v1.ServingService"]
    generate = methods["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    image = generate.output_type.fields_by_name["image"]
    assert not image.is_repeated, "one image per streamed response"
    png = image.message_type.fields_by_name["png"]
    assert png.type == FieldDescriptor.TYPE_BYTES
    assert {"seed", "prompt"} <= set(image.message_type.fields_by_name)
    assert "model" in generate.output_type.fields_by_name, "responses say which model was used"

    oneof = generate.input_type.oneofs_by_name["model"]
    assert {f.name for f in oneof.fields} == {"model_name", "experts"}
    assert generate.input_type.fields_by_name["experts"].message_type.full_name == "selma.v1.MergeSpec"

    export = methods["ExportAdapter"]
    assert export.server_streaming
    assert export.output_type.fields_by_name["data"].type == FieldDescriptor.TYPE_BYTES

    preview = _service_methods(files)["selma.v1.RenderService"]["Preview"]
    assert preview.output_type.fields_by_name["images"].message_type is image.message_type


def test_merge_methods_match_the_spec(files):
    methods = set(files["common"].enum_types_by_name["MergeMethod"].values_by_name)
    assert methods == {
        "MERGE_METHOD_UNSPECIFIED",
        "MERGE_METHOD_MEAN_DELTA",
        "MERGE_METHOD_TIES",
        "MERGE_METHOD_DARE_LINEAR",
        "MERGE_METHOD_DARE_TIES",
        "MERGE_METHOD_MAGNITUDE_PRUNE",
    }


def _undocumented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    documented = {
        tuple(loc.path) for loc in file.source_code_info.location if loc.leading_comments.strip()
    }
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if path not in documented:
            missing.append(f"{file.name}: {what}")

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        need(path, f"enum {prefix}{e.name}")
        for i, value in enumerate(e.value):
            need((*path, 2, i), f"enum value {prefix}{e.name}.{value.name}")

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str) -> None:
        if m.options.map_entry:  # synthesized for map<K, V> fields
            return
        name = f"{prefix}{m.name}"
        need(path, f"message {name}")
        for i, field in enumerate(m.field):
            need((*path, 2, i), f"field {name}.{field.name}")
        for i, oneof in enumerate(m.oneof_decl):
            synthetic = any(f.proto3_optional and f.oneof_index == i for f in m.field)
            if not synthetic:  # proto3 `optional` fields get a synthetic oneof with no source
                need((*path, 8, i), f"oneof {name}.{oneof.name}")
        for i, nested in enumerate(m.nested_type):
            message(nested, (*path, 3, i), f"{name}.")
        for i, nested in enumerate(m.enum_type):
            enum(nested, (*path, 4, i), f"{name}.")

    for i, m in enumerate(file.message_type):
        message(m, (4, i), "")
    for i, e in enumerate(file.enum_type):
        enum(e, (5, i), "")
    for i, service in enumerate(file.service):
        need((6, i), f"service {service.name}")
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"rpc {service.name}.{method.name}")
    return missing


def test_every_element_has_a_leading_comment(descriptor_set):
    selma_files = [f for f in descriptor_set.file if f.package == "selma.v1"]
    assert sorted(f.name for f in selma_files) == sorted(f"selma/v1/{stem}.proto" for stem in PROTO_FILES)
    missing = [item for f in selma_files for item in _undocumented(f)]
    assert not missing, "undocumented elements:\n" + "\n".join(missing)


def test_comment_check_catches_an_undocumented_field(descriptor_set):
    file = next(f for f in descriptor_set.file if f.name == "selma/v1/common.proto")
    stripped = descriptor_pb2.FileDescriptorProto()
    stripped.CopyFrom(file)
    index = [m.name for m in file.message_type].index("ArtifactRef")
    kept = [loc for loc in stripped.source_code_info.location if tuple(loc.path) != (4, index, 2, 0)]
    del stripped.source_code_info.location[:]
    stripped.source_code_info.location.extend(kept)
    newly_missing = set(_undocumented(stripped)) - set(_undocumented(file))
    assert newly_missing == {"selma/v1/common.proto: field ArtifactRef.id"}


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """Drop json_name, which descriptor sets record and the Python generator leaves out."""

    def strip(m: descriptor_pb2.DescriptorProto) -> None:
        for field in m.field:
            field.ClearField("json_name")
        for nested in m.nested_type:
            strip(nested)

    for m in file.message_type:
        strip(m)
    return file


def test_generated_stubs_are_current_with_the_protos(files, tmp_path):
    compiled = _compile(tmp_path / "plain.binpb", source_info=False).file
    fresh = {f.name: _without_json_names(f) for f in compiled}
    for file in files.values():
        generated = _without_json_names(descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb))
        assert generated == fresh[file.name], f"{file.name}: stubs are stale; run `python setup.py gen`"


def test_generated_stubs_serve_a_streaming_generate_over_a_real_server(files):
    import grpc

    serving_pb2 = _import_generated("serving_service_pb2")
    serving_grpc = _import_generated("serving_service_pb2_grpc")
    common_pb2 = _import_generated("common_pb2")

    class Servicer(serving_grpc.ServingServiceServicer):
        def Generate(self, request, context):
            for i, prompt in enumerate(request.prompts):
                image = common_pb2.GeneratedImage(png=b"\x89PNG\r\n\x1a\n", seed=i, prompt=prompt, prompt_index=i)
                yield serving_pb2.GenerateResponse(image=image, index=i, total=len(request.prompts))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    serving_grpc.add_ServingServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serving_grpc.ServingServiceStub(channel)
            request = serving_pb2.GenerateRequest(prompts=["a red cube", "two cats"], model_name="selma-5")
            replies = list(stub.Generate(request, timeout=10))
            assert [r.image.prompt for r in replies] == ["a red cube", "two cats"]
            assert all(r.image.png.startswith(b"\x89PNG") for r in replies)
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(serving_pb2.ListModelsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)


def _buf() -> str | None:
    local = REPO / ".tools" / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_is_clean():
    buf = _buf()
    if buf is None:
        message = "buf not found: `npm install --prefix .tools --no-save @bufbuild/buf@1.75.0`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run([buf, "lint"], cwd=PROTO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"buf lint failed:\n{result.stdout}{result.stderr}"


def test_no_generated_code_is_tracked_by_git():
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run([git, "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    generated = [p for p in result.stdout.splitlines() if p.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))]
    assert not generated, f"generated stubs are committed: {generated}"
