"""Storage behaviour on both backends (file:// and s3:// on a moto server), plus S3 retries and errors."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import socket
import threading
import time
import tracemalloc
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from selma.config import SelmaSettings
from selma.errors import Aborted, InvalidArgument, NotFound, Unavailable
from selma.storage import TMP_MARKER, FileStorage, S3Storage, Storage, open_storage

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
S3_PART_SIZE = 5 * MiB  # what tests/conftest.py configures


def unique_bucket() -> str:
    return f"selma-test-{uuid.uuid4().hex[:16]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking test data."""
    block = hashlib.sha256(str(seed).encode()).digest() * 32  # 1 KiB
    return (block * (size // len(block) + 1))[:size]


def chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# ------------------------------------------------------------------------------ both backends


def test_streaming_upload_of_unknown_length_is_multipart_bounded_in_memory_and_reads_back(storage: Storage) -> None:
    block = pattern(MiB, seed=1)
    n_blocks = 64
    expected = hashlib.sha256()
    for _ in range(n_blocks):
        expected.update(block)

    def stream() -> Iterator[bytes]:
        for _ in range(n_blocks):
            yield block  # the same 1 MiB object: only what storage buffers is new memory

    tracemalloc.start()
    try:
        info = storage.put_stream("models/big.bin", stream())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert info.size == n_blocks * MiB
    assert info.sha256 == expected.hexdigest()
    assert peak < 8 * S3_PART_SIZE < info.size  # buffers a few parts at most, never the object
    stat = storage.stat("models/big.bin")
    assert stat.size == info.size
    if isinstance(storage, S3Storage):
        assert stat.etag and stat.etag.endswith(f"-{n_blocks * MiB // S3_PART_SIZE + 1}")  # 13 parts
    assert storage.digest("models/big.bin") == expected.hexdigest()


def test_put_get_stat_and_overwrite(storage: Storage) -> None:
    info = storage.put_bytes("a/b.txt", b"hello")
    assert info.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert storage.get_bytes("a/b.txt") == b"hello"
    stat = storage.stat("a/b.txt")
    assert stat.size == 5 and stat.key == "a/b.txt"
    assert stat.modified is not None and stat.modified.tzinfo is not None
    assert stat.uri == storage.uri_for("a/b.txt") and stat.uri.startswith(storage.uri + "/")
    assert storage.exists("a/b.txt") and not storage.exists("a/c.txt")
    storage.put_bytes("a/b.txt", b"bye")
    assert storage.get_bytes("a/b.txt") == b"bye"


def test_put_file_and_download_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = pattern(3 * MiB + 17, seed=2)
    src.write_bytes(data)
    up = storage.put_file("files/src.bin", src)
    down = storage.download_file("files/src.bin", tmp_path / "out" / "dst.bin")
    assert up.sha256 == down.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out" / "dst.bin").read_bytes() == data
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(TMP_MARKER)]
    assert b"".join(storage.iter_chunks("files/src.bin", 1000)) == data
    with storage.open("files/src.bin") as f:
        assert f.read(10) == data[:10]


def test_list_is_recursive_sorted_and_filtered_by_prefix(storage: Storage) -> None:
    for key in ["b/2.txt", "a/x/1.txt", "a/0.txt", "a-c.txt", "z.txt"]:
        storage.put_bytes(key, key.encode())
    assert [o.key for o in storage.list()] == ["a-c.txt", "a/0.txt", "a/x/1.txt", "b/2.txt", "z.txt"]
    assert [o.key for o in storage.list("a/")] == ["a/0.txt", "a/x/1.txt"]
    assert [o.key for o in storage.list("a")] == ["a-c.txt", "a/0.txt", "a/x/1.txt"]
    assert [o.size for o in storage.list("b/")] == [len(b"b/2.txt")]
    assert storage.list("nothing/") == []
    assert storage.list_dirs("") == ["a", "b"]
    assert storage.list_dirs("a/") == ["x"]


def test_delete_and_delete_prefix(storage: Storage) -> None:
    for key in ["run/1/a", "run/1/b/c", "run/2/a", "keep"]:
        storage.put_bytes(key, b"x")
    storage.delete("run/2/a")
    storage.delete("run/2/a")  # idempotent, as in S3
    assert not storage.exists("run/2/a")
    assert storage.delete_prefix("run/1/") == 2
    assert [o.key for o in storage.list()] == ["keep"]
    assert storage.list_dirs("") == []
    with pytest.raises(InvalidArgument):
        storage.delete_prefix("")


def test_missing_key_is_not_found_naming_the_uri(storage: Storage) -> None:
    uri = storage.uri_for("no/such.bin")
    for call in (storage.get_bytes, storage.stat, storage.open, storage.digest):
        with pytest.raises(NotFound) as e:
            call("no/such.bin")
        assert uri in str(e.value)
    storage.put_bytes("dir/obj", b"x")
    with pytest.raises(NotFound):
        storage.get_bytes("dir")  # a prefix is not an object


@pytest.mark.parametrize(
    "key",
    ["../escape", "a/../../escape", "/etc/passwd", "a//b", "a/", "a\\b", "a\x00b", "", ".", "a/./b", "a\nb", f"a/{TMP_MARKER}x"],
)
def test_keys_that_could_escape_the_root_are_rejected(storage: Storage, key: str) -> None:
    storage.put_bytes("ok", b"x")
    for call in (lambda: storage.put_bytes(key, b"x"), lambda: storage.get_bytes(key), lambda: storage.stat(key), lambda: storage.delete(key)):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert repr(key) in str(e.value)
    assert [o.key for o in storage.list()] == ["ok"]


def test_failed_upload_publishes_nothing(storage: Storage) -> None:
    storage.put_bytes("obj", b"old")

    def broken() -> Iterator[bytes]:
        yield pattern(6 * MiB)  # past one S3 part, so a multipart upload is under way
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        storage.put_stream("obj", broken())
    with pytest.raises(RuntimeError, match="source failed"):
        storage.put_stream("new", broken())
    assert storage.get_bytes("obj") == b"old"
    assert [o.key for o in storage.list()] == ["obj"]
    if isinstance(storage, FileStorage):
        assert [p.name for p in storage.root.iterdir()] == ["obj"]  # temp files cleaned up


def test_stream_shorter_than_its_declared_length_writes_nothing(storage: Storage) -> None:
    with pytest.raises(InvalidArgument, match="ended after 3 bytes but length said 10"):
        storage.put_stream("short", iter([b"abc"]), length=10)
    assert not storage.exists("short")


def test_concurrent_reader_sees_old_or_new_object_never_partial(storage: Storage) -> None:
    size = 6 * MiB  # > one S3 part: every overwrite is a multipart upload
    versions = {bytes([v]) * size for v in range(1, 6)}
    storage.put_bytes("obj", bytes([1]) * size)
    stop = threading.Event()
    reading = threading.Event()
    seen: list[bytes] = []
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            reading.set()
            data = storage.get_bytes("obj")
            if data not in versions:
                bad.append(f"partial read: {len(data)} bytes starting {data[:1]!r}")
            seen.append(data[:1])
            keys = [o.key for o in storage.list()]
            if keys != ["obj"]:
                bad.append(f"listing showed {keys}")

    thread = threading.Thread(target=reader)
    thread.start()
    assert reading.wait(10)
    try:
        for v in range(2, 6):
            storage.put_stream("obj", chunks(bytes([v]) * size))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not bad
    assert seen
    assert storage.get_bytes("obj") == bytes([5]) * size


def test_writer_killed_mid_upload_leaves_no_visible_object(
    storage_settings: SelmaSettings, stalled_writer: Callable[..., object], s3_server_if_s3: str | None
) -> None:
    storage = open_storage(storage_settings)
    storage.put_bytes("other", b"x")
    proc = stalled_writer(storage_settings, "object", "partial.bin", 12 * MiB)
    if s3_server_if_s3:  # prove the kill lands mid-multipart: an upload is in progress
        assert isinstance(storage, S3Storage)
        assert _wait_for_multipart(s3_server_if_s3, storage.bucket, "partial.bin")
    else:
        assert isinstance(storage, FileStorage)
        assert any(p.name.startswith(TMP_MARKER) for p in storage.root.iterdir())
    os.kill(proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    proc.wait(timeout=10)  # type: ignore[attr-defined]

    assert not storage.exists("partial.bin")
    with pytest.raises(NotFound):
        storage.get_bytes("partial.bin")
    assert [o.key for o in storage.list()] == ["other"]


def _wait_for_multipart(endpoint: str, bucket: str, key_suffix: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{endpoint}/{bucket}?uploads", timeout=5) as r:
            if f"{key_suffix}</Key>".encode() in r.read():
                return True
        time.sleep(0.05)
    return False


@pytest.fixture
def s3_server_if_s3(storage_settings: SelmaSettings, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("s3_server") if storage_settings.storage_uri.startswith("s3://") else None


# ---------------------------------------------------------------------------------- S3 only


def test_bucket_is_created_on_first_write_when_allowed(s3_server: str, make_settings: Callable[..., SelmaSettings]) -> None:
    bucket = unique_bucket()
    storage = open_storage(make_settings(storage_uri=f"s3://{bucket}", s3_endpoint=s3_server))
    with pytest.raises(NotFound, match=bucket):
        storage.get_bytes("k")
    storage.put_bytes("k", b"v")
    assert storage.get_bytes("k") == b"v"


def test_missing_bucket_is_not_found_when_creation_is_off(s3_server: str, make_settings: Callable[..., SelmaSettings]) -> None:
    bucket = unique_bucket()
    storage = open_storage(make_settings(storage_uri=f"s3://{bucket}", s3_endpoint=s3_server, s3_create_buckets=False))
    with pytest.raises(NotFound, match=f"bucket '{bucket}' does not exist"):
        storage.put_bytes("k", b"v")
    with pytest.raises(NotFound, match=bucket):
        storage.list()


def test_closed_port_is_unavailable_fast_naming_the_endpoint(make_settings: Callable[..., SelmaSettings]) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    storage = open_storage(make_settings(storage_uri="s3://some-bucket", s3_endpoint=f"http://{endpoint}"))
    start = time.monotonic()
    with pytest.raises(Unavailable) as e:
        storage.stat("k")
    assert time.monotonic() - start < 3
    assert endpoint in str(e.value) and "3 attempts" in str(e.value)


class FlakyProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of moto that can answer 503 SlowDown or cut a GET body short."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        host, port = upstream.split(":")
        self.upstream = (host, int(port))
        self.fail_next = 0
        self.cut_next_get = False
        self.on_cut: Callable[[], None] | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.failed = 0
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FlakyProxy

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output clean
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        srv = self.server
        with srv.lock:
            srv.requests.append((self.command, self.path, dict(self.headers)))
            fail = srv.fail_next > 0
            srv.fail_next -= fail
            srv.failed += fail
            cut = self.command == "GET" and srv.cut_next_get and "?" not in self.path
            srv.cut_next_get = srv.cut_next_get and not cut
        if fail:
            payload = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*srv.upstream, timeout=30)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", resp.getheader("Content-Length", str(len(data))))
        self.end_headers()
        if cut:  # promise the whole body, send half, hang up
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            if srv.on_cut:
                srv.on_cut()
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


@pytest.fixture
def proxy(s3_server: str) -> Iterator[FlakyProxy]:
    srv = FlakyProxy(s3_server)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def proxied(proxy: FlakyProxy, make_settings: Callable[..., SelmaSettings]) -> Storage:
    return open_storage(make_settings(storage_uri=f"s3://{unique_bucket()}", s3_endpoint=proxy.endpoint, storage_retries=3))


def test_transient_errors_are_retried_then_succeed(proxy: FlakyProxy, proxied: Storage) -> None:
    proxy.fail_next = 2
    proxied.put_bytes("k", b"v")
    proxy.fail_next = 3
    assert proxied.get_bytes("k") == b"v"
    assert proxy.failed == 5


def test_retries_are_bounded_and_end_unavailable(proxy: FlakyProxy, proxied: Storage) -> None:
    proxy.fail_next = 1000
    with pytest.raises(Unavailable) as e:
        proxied.stat("k")
    assert len(proxy.requests) == 4  # 1 try + storage_retries (3)
    assert proxy.endpoint in str(e.value)


def test_not_found_is_not_retried(proxy: FlakyProxy, proxied: Storage) -> None:
    proxied.put_bytes("exists", b"v")
    before = len(proxy.requests)
    with pytest.raises(NotFound):
        proxied.stat("missing")
    assert len(proxy.requests) == before + 1


def test_broken_download_resumes_from_its_offset(proxy: FlakyProxy, proxied: Storage) -> None:
    data = pattern(3 * MiB, seed=3)
    proxied.put_bytes("obj", data)
    proxy.cut_next_get = True
    assert proxied.get_bytes("obj") == data
    gets = [headers for method, path, headers in proxy.requests if method == "GET" and "?" not in path]
    assert len(gets) == 2
    assert gets[1].get("Range", "").startswith("bytes=") and gets[1]["Range"] != "bytes=0-"
    assert "If-Match" in gets[1]


def test_object_replaced_during_a_broken_download_is_aborted_not_spliced(proxy: FlakyProxy, proxied: Storage) -> None:
    proxied.put_bytes("obj", pattern(3 * MiB, seed=4))
    proxy.cut_next_get = True
    proxy.on_cut = lambda: proxied.put_bytes("obj", pattern(3 * MiB, seed=5))
    with pytest.raises(Aborted, match="changed while it was being read"):
        proxied.get_bytes("obj")


def test_repr_shows_no_credentials(make_settings: Callable[..., SelmaSettings]) -> None:
    settings = make_settings(
        storage_uri="s3://bucket-x/p", s3_endpoint="https://minio.example:9000", s3_access_key="AKIAXYZ", s3_secret_key="s3cr3t-value"
    )
    storage = open_storage(settings)
    text = repr(storage) + str(vars(storage).get("uri"))
    assert "minio.example:9000" in text
    assert "AKIAXYZ" not in text and "s3cr3t-value" not in text
