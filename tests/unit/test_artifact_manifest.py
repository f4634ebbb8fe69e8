"""Pure checks of artifact ids, digests and manifests (no storage)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from selma.artifacts import ArtifactKind, FileEntry, Manifest, Producer, check_id, files_digest, new_artifact_id
from selma.errors import InvalidArgument

SHA_A = "a" * 64
SHA_B = "b" * 64
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@pytest.mark.parametrize("kind", list(ArtifactKind))
def test_ids_are_label_safe_and_prefixed_by_kind(kind: ArtifactKind) -> None:
    artifact_id = new_artifact_id(kind)
    assert LABEL.match(artifact_id) and len(artifact_id) <= 63
    assert artifact_id.startswith(kind.value.replace("_", "-") + "-")


def test_ids_from_an_idempotency_key_are_deterministic() -> None:
    assert new_artifact_id("expert", "job-1") == new_artifact_id(ArtifactKind.EXPERT, "job-1")
    assert new_artifact_id("expert", "job-1") != new_artifact_id("expert", "job-2")
    assert new_artifact_id("expert", "job-1").split("-")[-1] != new_artifact_id("merged_model", "job-1").split("-")[-1]
    assert new_artifact_id("expert") != new_artifact_id("expert")


def test_unknown_kind_and_bad_ids_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unknown artifact kind 'model'"):
        new_artifact_id("model")
    for bad in ("", "Upper", "-lead", "trail-", "a_b", "a" * 64, "../x"):
        with pytest.raises(InvalidArgument):
            check_id(bad)


def test_digest_is_order_independent_and_covers_path_size_and_sha() -> None:
    a, b = FileEntry(path="a", size=1, sha256=SHA_A), FileEntry(path="b", size=2, sha256=SHA_B)
    base = files_digest([a, b])
    assert base == files_digest([b, a])
    assert base != files_digest([a, FileEntry(path="c", size=2, sha256=SHA_B)])
    assert base != files_digest([a, FileEntry(path="b", size=3, sha256=SHA_B)])
    assert base != files_digest([a, FileEntry(path="b", size=2, sha256=SHA_A)])
    assert files_digest([]) == files_digest(())


def _manifest(**overrides: object) -> Manifest:
    files = (FileEntry(path="a.bin", size=1, sha256=SHA_A),)
    values: dict[str, object] = dict(
        id="expert-1",
        kind="expert",
        uri="s3://b/artifacts/expert-1",
        digest=files_digest(files),
        files=files,
        created_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
        producer=Producer(name="selma-training", version="0.1.0"),
        parents=("image-dataset-1",),
        parameters={"rank": 8},
    )
    values.update(overrides)
    return Manifest.model_validate(values)


def test_manifest_round_trips_through_json() -> None:
    manifest = _manifest()
    again = Manifest.model_validate_json(manifest.model_dump_json())
    assert again == manifest
    assert again.created_at.tzinfo is not None and again.file("a.bin").size == 1
    assert again.file_uri("a.bin") == "s3://b/artifacts/expert-1/files/a.bin"


@pytest.mark.parametrize(
    "overrides",
    [
        {"digest": "0" * 64},  # does not match the files
        {"created_at": datetime(2026, 1, 1)},  # naive time
        {"parents": ("expert-1",)},  # its own parent
        {"files": (FileEntry(path="a.bin", size=1, sha256=SHA_A),) * 2},  # duplicate paths
        {"kind": "model"},
    ],
)
def test_inconsistent_manifests_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _manifest(**overrides)


def test_file_entries_reject_unsafe_paths_and_bad_digests() -> None:
    with pytest.raises(ValidationError):
        FileEntry(path="../x", size=1, sha256=SHA_A)
    with pytest.raises(ValidationError):
        FileEntry(path="x", size=1, sha256="nothex")


def test_same_content_ignores_time_and_producer_but_not_parameters() -> None:
    a = _manifest()
    assert a.same_content(_manifest(created_at=datetime(2027, 1, 1, tzinfo=timezone.utc), producer=Producer(name="x", version="9")))
    assert not a.same_content(_manifest(parameters={"rank": 16}))
    assert not a.same_content(_manifest(parents=()))
