"""The one rule for paths and URIs a request names (selma.sources): allowlisted dirs and buckets, the own store."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from selma import plugins
from selma.config import SelmaSettings
from selma.errors import InvalidArgument, PermissionDenied
from selma.sources import check_artifact_uri, check_request, check_source
from selma.v1 import common_pb2, evaluation_service_pb2


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "model").mkdir(parents=True)
    (outside / "model").mkdir(parents=True)
    return {"allowed": allowed, "outside": outside, "storage": tmp_path / "storage"}


@pytest.fixture
def settings(make_settings, dirs) -> SelmaSettings:
    return make_settings(storage_uri=dirs["storage"].as_uri(), model_allowed_dirs=f" {dirs['allowed']} , ")


def denied(source: str, settings: SelmaSettings, field: str = "spec.model.source") -> str:
    with pytest.raises(PermissionDenied) as e:
        check_source(source, settings, field=field)
    assert e.value.field == field
    return e.value.message


@pytest.mark.parametrize("source", ["stabilityai/stable-diffusion-2", "gpt2", "tiny://sd", "tiny://sdxl?seed=3", ""])
def test_hub_ids_tiny_models_and_the_default_pass(source, settings):
    check_source(source, settings, field="model.source")


def test_a_scheme_a_plugin_registered_passes_and_an_unknown_scheme_is_denied(settings, tmp_path):
    reg = plugins.Registry()
    reg.add_model_scheme("bundled", lambda source: tmp_path)
    with plugins.use_registry(reg):
        check_source("bundled://base", settings, field="model.source")
    assert "http://" in denied("http://169.254.169.254/latest", settings)
    assert "bundled://" in denied("bundled://base", settings)


@pytest.mark.parametrize("form", ["uri", "path"])
def test_local_sources_outside_the_allowed_dirs_are_denied_naming_the_setting(form, settings, dirs):
    model = dirs["outside"] / "model"
    message = denied(model.as_uri() if form == "uri" else str(model), settings)
    assert "SELMA_MODEL_ALLOWED_DIRS" in message
    denied("/etc", settings)


@pytest.mark.parametrize("form", ["uri", "path"])
def test_local_sources_under_an_allowed_dir_or_the_own_storage_root_pass(form, settings, dirs):
    for path in (dirs["allowed"] / "model", dirs["allowed"], dirs["storage"] / "models" / "x"):
        check_source(path.as_uri() if form == "uri" else str(path), settings, field="model.source")


def test_dot_dot_and_symlink_escapes_are_denied(settings, dirs):
    denied(f"file://{dirs['allowed']}/../outside/model", settings)
    denied(f"{dirs['allowed']}/model/../../outside/model", settings)
    link = dirs["allowed"] / "link"
    link.symlink_to(dirs["outside"] / "model", target_is_directory=True)
    denied(link.as_uri(), settings)
    denied(str(link), settings)
    # a sibling whose name merely starts with the allowed dir's name is not under it
    sibling = dirs["allowed"].with_name("allowed-not")
    sibling.mkdir()
    denied(str(sibling), settings)


def test_a_hub_id_that_is_a_relative_path_on_the_host_is_a_path(settings, dirs, monkeypatch):
    (dirs["outside"] / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(dirs["outside"])
    denied("org/name", settings)
    monkeypatch.chdir(dirs["allowed"].parent)
    check_source("allowed/model", settings, field="model.source")  # relative, but resolves inside the allowed dir


def test_file_uris_naming_another_host_are_denied(settings):
    denied("file://fileserver/share/model", settings)


def test_s3_sources_only_in_the_storage_bucket_or_allowed_buckets(make_settings):
    s3 = make_settings(storage_uri="s3://team-a/root", s3_endpoint="http://127.0.0.1:1", model_allowed_buckets="models-shared")
    check_source("s3://team-a/models/sd", s3, field="model.source")
    check_source("s3://team-a/other-prefix/sd", s3, field="model.source")  # the bucket, not only the prefix
    check_source("s3://models-shared/sd2", s3, field="model.source")
    assert "SELMA_MODEL_ALLOWED_BUCKETS" in denied("s3://team-b/models/sd", s3)
    with pytest.raises(InvalidArgument):
        check_source("s3://Not_A_Bucket/x", s3, field="model.source")


def test_file_storage_allows_no_bucket_but_the_listed_ones(settings, make_settings):
    denied("s3://any-bucket/models/sd", settings)
    check_source("s3://shared/sd", make_settings(model_allowed_buckets="shared"), field="model.source")


def test_artifact_uris_must_be_in_the_own_store(settings, dirs):
    own = f"{dirs['storage'].as_uri()}/artifacts/prompt_set-1"
    check_artifact_uri(own, settings, field="spec.prompt_set.uri")
    check_artifact_uri("", settings, field="spec.prompt_set.uri")
    for uri in (f"{dirs['outside'].as_uri()}/artifacts/prompt_set-1", f"{dirs['storage'].as_uri()}/../outside/artifacts/x",
                "s3://bucket/artifacts/x", "/etc/passwd", "http://example.com/artifacts/x"):
        with pytest.raises(PermissionDenied) as e:
            check_artifact_uri(uri, settings, field="spec.prompt_set.uri")
        assert e.value.field == "spec.prompt_set.uri" and "artifact store" in e.value.message


def test_artifact_uris_on_s3_must_be_under_the_store_prefix(make_settings):
    s3 = make_settings(storage_uri="s3://team-a/root", s3_endpoint="http://127.0.0.1:1")
    check_artifact_uri("s3://team-a/root/artifacts/x", s3, field="artifact.uri")
    for uri in ("s3://team-a/rootless/artifacts/x", "s3://team-a/other/artifacts/x", "s3://team-b/root/artifacts/x"):
        with pytest.raises(PermissionDenied):
            check_artifact_uri(uri, s3, field="artifact.uri")


def test_check_request_walks_nested_repeated_and_oneof_fields_and_names_them(settings, dirs):
    outside = (dirs["outside"] / "model").as_uri()
    spec = evaluation_service_pb2.EvaluationSpec()
    spec.prompt_sets.add(id="a")
    spec.prompt_sets.add(uri=f"{outside}/artifacts/b")
    request = evaluation_service_pb2.StartEvaluationRequest(spec=spec)
    with pytest.raises(PermissionDenied) as e:
        check_request(request, settings)
    assert e.value.field == "spec.prompt_sets[1].uri"

    request = evaluation_service_pb2.StartEvaluationRequest()
    request.spec.vqa.transformers.model.CopyFrom(common_pb2.ModelRef(source="org/vqa", vae_source=outside))
    with pytest.raises(PermissionDenied) as e:
        check_request(request, settings)
    assert e.value.field == "spec.vqa.transformers.model.vae_source"

    request.spec.vqa.transformers.model.vae_source = str(dirs["allowed"] / "model")
    check_request(request, settings)


def test_allowed_dirs_must_be_absolute():
    with pytest.raises(ValidationError, match="absolute"):
        SelmaSettings(model_allowed_dirs="/models,relative/dir")
