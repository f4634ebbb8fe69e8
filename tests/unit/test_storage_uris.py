"""Pure checks of storage keys, URIs, endpoints and routing (no server, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma.config import SelmaSettings
from selma.errors import InvalidArgument
from selma.storage import (
    FileStorage,
    S3Storage,
    check_key,
    check_prefix,
    open_storage,
    parse_endpoint,
    parse_uri,
    resolve_uri,
)


@pytest.mark.parametrize("key", ["a", "a/b/c.png", "experts/run-1/skill_2/adapter.safetensors", "a..b", ".hidden", "ünï/cöde"])
def test_safe_keys_are_accepted(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        ("..", "'..' segment"),
        ("a/../b", "'..' segment"),
        ("./a", "'.' segment"),
        ("/abs", "absolute"),
        ("a//b", "empty path segment"),
        ("a/", "empty path segment"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        ("a\tb", "control character"),
        (".selma-tmp-x", "reserved"),
        ("x" * 1025, "longer than 1024"),
    ],
)
def test_unsafe_keys_are_rejected_naming_the_key(key: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=reason) as e:
        check_key(key)
    assert repr(key)[:40] in str(e.value)


def test_prefixes_may_be_empty_or_end_with_a_slash() -> None:
    assert check_prefix("") == ""
    assert check_prefix("a/b/") == "a/b/"
    assert check_prefix("a/b") == "a/b"
    for bad in ("/", "../", "a//"):
        with pytest.raises(InvalidArgument):
            check_prefix(bad)


def test_parse_uri_s3_and_file() -> None:
    assert parse_uri("s3://my-bucket") == parse_uri("s3://my-bucket/")
    parsed = parse_uri("s3://my-bucket/some/prefix/")
    assert (parsed.scheme, parsed.container, parsed.prefix) == ("s3", "my-bucket", "some/prefix")
    parsed = parse_uri("file:///tmp/with%20space/dir")
    assert (parsed.scheme, parsed.container) == ("file", "/tmp/with space/dir")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("gs://bucket/x", "unsupported storage URI scheme 'gs'"),
        ("/just/a/path", "has no scheme"),
        ("file://relative/dir", "names host"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("s3://bucket/../x", "'..' segment"),
    ],
)
def test_bad_uris_are_invalid_argument(uri: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_uri(uri)


@pytest.mark.parametrize(
    ("endpoint", "default", "expected"),
    [
        ("minio:9000", True, ("minio:9000", True)),
        ("minio:9000", False, ("minio:9000", False)),
        ("http://minio:9000", True, ("minio:9000", False)),
        ("https://minio:9000/", False, ("minio:9000", True)),
    ],
)
def test_endpoint_scheme_decides_tls(endpoint: str, default: bool, expected: tuple[str, bool]) -> None:
    assert parse_endpoint(endpoint, default) == expected


@pytest.mark.parametrize("endpoint", ["ftp://host:21", "http://host:9000/path", "http://user:pw@host:9000"])
def test_bad_endpoints_are_rejected(endpoint: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_endpoint(endpoint, True)


def test_open_storage_routes_by_scheme_without_network(tmp_path: Path) -> None:
    settings = SelmaSettings(data_dir=tmp_path, storage_uri="", s3_endpoint="http://127.0.0.1:1", s3_access_key="AK", s3_secret_key="SK")
    local = open_storage(settings)
    assert isinstance(local, FileStorage) and local.root == (tmp_path / "storage").resolve()
    remote = open_storage(settings, "s3://bucket-a/p")
    assert isinstance(remote, S3Storage) and remote.uri == "s3://bucket-a/p" and remote.endpoint == "127.0.0.1:1"
    assert remote.uri_for("x/y") == "s3://bucket-a/p/x/y"
    assert "SK" not in repr(remote) and "AK" not in repr(remote)
    with pytest.raises(InvalidArgument):
        open_storage(settings, "gs://bucket")


def test_resolve_uri_splits_an_object_uri(tmp_path: Path) -> None:
    settings = SelmaSettings(data_dir=tmp_path, s3_endpoint="127.0.0.1:1")
    storage, key = resolve_uri(settings, "s3://bucket-a/p/q/obj.bin")
    assert (storage.uri, key) == ("s3://bucket-a/p/q", "obj.bin")
    target = tmp_path / "d" / "f.txt"
    target.parent.mkdir()
    target.write_text("hi")
    storage, key = resolve_uri(settings, target.as_uri())
    assert storage.get_bytes(key) == b"hi"


def test_file_storage_uri_round_trips_through_parse(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "with space")
    storage.put_bytes("a b/c.txt", b"x")
    [info] = storage.list()
    assert Path(parse_uri(info.uri).container).read_bytes() == b"x"
