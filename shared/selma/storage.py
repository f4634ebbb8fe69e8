"""Object storage over URIs: ``s3://bucket/prefix`` (S3/MinIO via the ``minio`` client) and
``file:///abs/dir`` (a local directory, the embedded default).

Every service reads and writes artifacts through one :class:`Storage`, rooted at a URI and
addressed by relative keys (``experts/<run>/<skill>/adapter.safetensors``):

* **Streaming.** :meth:`Storage.put_stream` takes a file-like object or an iterable of byte
  chunks of unknown length; S3 uploads go through multipart with ``settings.s3_part_size``
  parts, so a multi-GB object never sits whole in memory.  Reads stream too
  (:meth:`Storage.open`, :meth:`Storage.iter_chunks`).  Every put returns the sha256 it
  computed while streaming.
* **Atomic publish.** A reader sees the old object or the new one, never a partial one, even
  if the writer dies mid-way: the file backend writes a hidden temp file in the target's
  directory, fsyncs it and ``os.replace``-s it into place; on S3 a PUT or a completed
  multipart upload is atomic, and an interrupted multipart upload is invisible (a bucket
  lifecycle rule ``AbortIncompleteMultipartUpload`` reclaims its parts).  No temp key is
  ever visible in :meth:`Storage.list`.
* **Safe keys.** Keys are relative, ``/``-separated paths that cannot escape the root: ``..``,
  ``.``, empty segments, absolute paths, backslashes, NUL and control characters are
  rejected with :class:`~selma.errors.InvalidArgument`.
* **Bounded retries.** Each HTTP request to S3 is retried on transient failures only
  (connection errors, timeouts, HTTP 429/500/502/503/504 such as ``SlowDown``) at most
  ``settings.storage_retries`` times with exponential backoff starting at
  ``settings.storage_backoff_seconds``; a streaming read that breaks mid-body resumes from
  its offset, pinned to the same object version with ``If-Match``.
* **Domain errors.** Missing object or bucket → ``NotFound`` (with the URI), access denied →
  ``PermissionDenied``, endpoint down after the retries → ``Unavailable`` naming the
  endpoint.  Credentials never appear in ``repr``, logs or messages.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError
from urllib3.util.retry import Retry

from selma.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SelmaError,
    Unavailable,
)
from selma.metrics import STORAGE_ERRORS

if TYPE_CHECKING:
    from minio import Minio

    from selma.config import SelmaSettings

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
"""Read/write granularity of streaming copies."""

TMP_MARKER = ".selma-tmp-"
"""Names starting with this are in-flight temp files: hidden from listings, reserved in keys."""

MAX_KEY_BYTES = 1024  # the S3 limit on object names

S3_CONNECT_TIMEOUT_SECONDS = 10.0
S3_READ_TIMEOUT_SECONDS = 300.0
# Status codes worth retrying: throttling (429, 503 SlowDown) and server-side failures.
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "ResourceNotFound", "NoSuchVersion"})
_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "InvalidSecurity",
    }
)
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ObjectInfo:
    """What :meth:`Storage.stat`, :meth:`Storage.list` and the puts report about one object.

    ``sha256`` is the hex digest when it is known without reading the object: always after a
    put (computed while streaming), on ``stat`` only where the writer recorded it up front
    (S3 objects written by ``put_bytes``).  Use :meth:`Storage.digest` to compute it.
    """

    key: str
    uri: str
    size: int
    modified: datetime | None = None
    sha256: str | None = None
    etag: str | None = None


# --------------------------------------------------------------------------------------- keys


def check_key(key: str, *, field: str = "key") -> str:
    """Return ``key`` if it is a safe relative object key, else raise InvalidArgument naming it."""
    reason = _key_problem(key)
    if reason:
        raise InvalidArgument(
            f"key {key!r} is not allowed: {reason}; use a relative path such as 'images/0001.png'",
            field=field,
        )
    return key


def check_prefix(prefix: str, *, field: str = "prefix") -> str:
    """Return ``prefix`` if it is ``""`` or a safe key prefix (a trailing ``/`` is allowed)."""
    if prefix == "":
        return prefix
    body = prefix[:-1] if prefix.endswith("/") else prefix
    reason = _key_problem(body) if body else "it is only '/'"
    if reason:
        raise InvalidArgument(f"prefix {prefix!r} is not allowed: {reason}", field=field)
    return prefix


def _key_problem(key: Any) -> str | None:
    if not isinstance(key, str):
        return f"it must be a string, not {type(key).__name__}"
    if not key:
        return "it is empty"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} bytes"
    if "\x00" in key:
        return "it contains NUL"
    if _CONTROL_RE.search(key):
        return "it contains a control character"
    if "\\" in key:
        return "it contains a backslash"
    if key.startswith("/"):
        return "it is absolute"
    for segment in key.split("/"):
        if segment == "":
            return "it has an empty path segment"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
        if segment.startswith(TMP_MARKER):
            return f"segments starting with {TMP_MARKER!r} are reserved for temp files"
    return None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


# --------------------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class ParsedUri:
    """A storage URI split into scheme, container (bucket or directory) and key prefix."""

    scheme: str  # "s3" or "file"
    container: str  # bucket name, or absolute directory path
    prefix: str  # "" or a safe key without leading/trailing "/" (s3 only; "" for file)


def parse_uri(uri: str, *, field: str = "uri") -> ParsedUri:
    """Parse ``s3://bucket[/prefix]`` or ``file:///abs/dir``; raise InvalidArgument otherwise."""
    if not isinstance(uri, str) or "://" not in uri:
        raise InvalidArgument(
            f"storage URI {uri!r} has no scheme; use s3://bucket/prefix or file:///abs/dir", field=field
        )
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise InvalidArgument(
                f"bucket {bucket!r} in {uri!r} is not a valid S3 bucket name "
                "(3-63 characters: lowercase letters, digits, '.', '-')",
                field=field,
            )
        if parts.query or parts.fragment:
            raise InvalidArgument(f"storage URI {uri!r} must not have a query or fragment", field=field)
        prefix = parts.path.strip("/")
        if prefix:
            check_key(prefix, field=field)
        return ParsedUri("s3", bucket, prefix)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidArgument(
                f"file URI {uri!r} names host {parts.netloc!r}; use an absolute path: file:///abs/dir",
                field=field,
            )
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidArgument(f"file URI {uri!r} must be absolute: file:///abs/dir", field=field)
        if "\x00" in path:
            raise InvalidArgument(f"file URI {uri!r} contains NUL", field=field)
        return ParsedUri("file", os.path.normpath(path), "")
    raise InvalidArgument(
        f"unsupported storage URI scheme {parts.scheme!r} in {uri!r}; use s3://bucket/prefix or file:///abs/dir",
        field=field,
    )


# ------------------------------------------------------------------------------ stream helpers


class _HashingReader:
    """Wraps a binary stream or an iterable of byte chunks; hashes and counts what is read."""

    def __init__(self, source: BinaryIO | IO[bytes] | Iterable[bytes] | bytes) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(bytes(source))
        self._read_fn = source.read if callable(getattr(source, "read", None)) else None
        self._chunks = None if self._read_fn else iter(source)  # type: ignore[arg-type]
        self._pending = b""
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if self._read_fn is not None:
            data = self._read_fn(n)
            if data is None:  # a non-blocking raw stream with nothing yet; we need blocking reads
                raise InvalidArgument("put_stream needs a blocking stream; read() returned None")
            data = bytes(data)
        else:
            data = self._next_chunk(n)
        if data:
            self._hash.update(data)
            self.size += len(data)
        return data

    def _next_chunk(self, n: int) -> bytes:
        while not self._pending:
            try:
                chunk = next(self._chunks)  # type: ignore[arg-type]
            except StopIteration:
                return b""
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                raise InvalidArgument(f"put_stream chunks must be bytes; got {type(chunk).__name__}")
            self._pending = bytes(chunk)
        if n is None or n < 0 or n >= len(self._pending):
            data, self._pending = self._pending, b""
        else:
            data, self._pending = self._pending[:n], self._pending[n:]
        return data

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class _VerifyingReader(io.RawIOBase):
    """A raw reader that checks size and sha256 once the whole stream has been read."""

    def __init__(self, inner: IO[bytes], *, size: int, sha256: str, what: str) -> None:
        super().__init__()
        self._inner = inner
        self._size = size
        self._expected = sha256
        self._what = what
        self._hash = hashlib.sha256()
        self._seen = 0
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._inner.read(len(b))
        n = len(data)
        if n:
            b[:n] = data
            self._hash.update(data)
            self._seen += n
            if self._seen > self._size:
                self._fail(f"it is longer than the recorded {self._size} bytes")
        else:
            self._verify()
        return n

    def _verify(self) -> None:
        if self._checked:
            return
        self._checked = True
        if self._seen != self._size:
            self._fail(f"read {self._seen} bytes, expected {self._size}")
        actual = self._hash.hexdigest()
        if actual != self._expected:
            self._fail(f"sha256 {actual} does not match the recorded {self._expected}")

    def _fail(self, detail: str) -> None:
        self._checked = True
        raise FailedPrecondition(f"{self._what} is corrupt: {detail}; re-create it or restore it from a copy")

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


def verifying_reader(inner: IO[bytes], *, size: int, sha256: str, what: str) -> BinaryIO:
    """Wrap ``inner`` so that reading it to the end raises FailedPrecondition on a size/digest mismatch."""
    return io.BufferedReader(_VerifyingReader(inner, size=size, sha256=sha256, what=what), CHUNK_SIZE)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ storage


class Storage(ABC):
    """Objects under one root URI, addressed by safe relative keys.

    Public methods validate keys and then call the backend primitives (``_write``, ``_open``,
    ``_stat``, ``_list``, ``_list_dirs``, ``_delete``, ``_delete_prefix``).
    """

    uri: str
    """The root URI, without a trailing slash."""

    # --- backend primitives

    @abstractmethod
    def _write(self, key: str, reader: _HashingReader, length: int, *, content_type: str, sha256: str | None) -> str | None:
        """Atomically create/replace ``key`` from ``reader`` (``length`` -1 if unknown); return an ETag if any."""

    @abstractmethod
    def _open(self, key: str) -> BinaryIO:
        """A binary reader over one consistent version of ``key``."""

    @abstractmethod
    def _stat(self, key: str) -> ObjectInfo: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[ObjectInfo]: ...

    @abstractmethod
    def _list_dirs(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _delete_prefix(self, prefix: str) -> int: ...

    # --- public API

    def uri_for(self, key: str) -> str:
        """The full URI of ``key`` (``s3://bucket/prefix/key`` or ``file:///dir/key``)."""
        check_key(key)
        return self._uri(key)

    def _uri(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def put_stream(
        self,
        key: str,
        stream: BinaryIO | IO[bytes] | Iterable[bytes],
        *,
        length: int = -1,
        content_type: str = "application/octet-stream",
    ) -> ObjectInfo:
        """Upload from a file-like object or an iterable of byte chunks, streaming.

        ``length`` may be -1 (unknown); S3 then uses multipart with ``s3_part_size`` parts.
        The object appears atomically when the stream is exhausted.  Returns the size and the
        sha256 computed while streaming.
        """
        check_key(key)
        reader = _HashingReader(stream)
        etag = self._write(key, reader, length, content_type=content_type, sha256=None)
        log.debug("stored %s (%d bytes)", self.uri_for(key), reader.size)
        return ObjectInfo(key, self.uri_for(key), reader.size, _utcnow(), reader.sha256, etag)

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Store ``data`` atomically under ``key``; the sha256 is also recorded with the object where supported."""
        check_key(key)
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        reader = _HashingReader(io.BytesIO(data))
        etag = self._write(key, reader, len(data), content_type=content_type, sha256=digest)
        return ObjectInfo(key, self.uri_for(key), len(data), _utcnow(), digest, etag)

    def put_file(self, key: str, path: str | os.PathLike[str], *, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Upload a local file, streaming."""
        check_key(key)
        path = Path(path)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"local file {path} does not exist", field="path") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            return self.put_stream(key, f, length=size, content_type=content_type)

    def open(self, key: str) -> BinaryIO:
        """A streaming binary reader over ``key`` (use as a context manager). NotFound if missing."""
        check_key(key)
        return self._open(key)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """An iterator over the object's bytes in chunks of at most ``chunk_size``.

        The object is opened here, so NotFound is raised by this call, not by the first ``next``.
        """
        return _read_chunks(self.open(key), chunk_size)

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory; for small objects (manifests, configs)."""
        with self.open(key) as f:
            return f.read()

    def download_file(self, key: str, dest: str | os.PathLike[str]) -> ObjectInfo:
        """Stream ``key`` into the local file ``dest`` atomically (temp file + rename); returns its sha256."""
        check_key(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=TMP_MARKER, dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, self.open(key) as src:
                while chunk := src.read(CHUNK_SIZE):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return ObjectInfo(key, self.uri_for(key), size, _utcnow(), digest.hexdigest())

    def stat(self, key: str) -> ObjectInfo:
        """Size, modification time (UTC) and, when known, sha256 of ``key``; NotFound if missing."""
        check_key(key)
        return self._stat(key)

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def digest(self, key: str) -> str:
        """The sha256 of ``key``, computed by streaming it."""
        h = hashlib.sha256()
        for chunk in self.iter_chunks(key):
            h.update(chunk)
        return h.hexdigest()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive, string prefix as in S3), sorted by key."""
        check_prefix(prefix)
        return self._list(prefix)

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-prefixes ("directories") under ``prefix`` (``""`` or ending in ``/``), sorted."""
        check_prefix(prefix)
        if prefix and not prefix.endswith("/"):
            raise InvalidArgument(f"list_dirs prefix must end with '/'; got {prefix!r}", field="prefix")
        return self._list_dirs(prefix)

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is a no-op (as in S3)."""
        check_key(key)
        self._delete(key)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (which must not be empty); returns how many were deleted."""
        if not prefix:
            raise InvalidArgument("delete_prefix needs a non-empty prefix; refusing to delete the whole root", field="prefix")
        check_prefix(prefix)
        return self._delete_prefix(prefix)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(uri={self.uri!r})"


# ------------------------------------------------------------------------------ file backend


class FileStorage(Storage):
    """A local directory.  Writes go to a hidden temp file beside the target, fsync, ``os.replace``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        if not root.is_absolute():
            raise InvalidArgument(f"file storage root must be absolute; got {str(root)!r}", field="storage_uri")
        self.root = root
        self.uri = root.as_uri().rstrip("/")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _uri(self, key: str) -> str:
        return self._path(key).as_uri()

    @contextmanager
    def _fs_errors(self, key: str) -> Iterator[None]:
        """Map local filesystem errors to domain errors naming the URI, and count failures."""
        with _counted("file"), self._fs_mapped(key):
            yield

    @contextmanager
    def _fs_mapped(self, key: str) -> Iterator[None]:
        uri = self._uri(key)
        try:
            yield
        except FileNotFoundError:
            raise NotFound(f"{uri} does not exist") from None
        except PermissionError as e:
            raise PermissionDenied(f"no permission for {uri}: {e.strerror}") from e
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
            raise FailedPrecondition(
                f"cannot use {uri}: a path segment is both an object and a prefix ({e.strerror})"
            ) from e
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted(f"no space left writing {uri}; free space under {self.root}") from e
            raise Unavailable(f"local storage error on {uri}: {e}") from e

    def _write(self, key: str, reader: _HashingReader, length: int, *, content_type: str, sha256: str | None) -> str | None:
        path = self._path(key)
        with self._fs_errors(key):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a prefix", str(path))
            fd, tmp = tempfile.mkstemp(prefix=TMP_MARKER, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := reader.read(CHUNK_SIZE):  # the caller's errors propagate unchanged
                    with self._fs_errors(key):
                        out.write(chunk)
                if length >= 0 and reader.size != length:
                    raise _short_stream(self._uri(key), reader.size, length)
                with self._fs_errors(key):
                    out.flush()
                    os.fsync(out.fileno())
            with self._fs_errors(key):
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(path.parent)
        return None

    def _open(self, key: str) -> BinaryIO:
        path = self._path(key)
        with self._fs_errors(key):
            if path.is_dir():
                raise FileNotFoundError(errno.ENOENT, "is a prefix", str(path))
            return path.open("rb")

    def _stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with self._fs_errors(key):
            st = path.stat()
        if not path.is_file():
            raise NotFound(f"{self._uri(key)} does not exist (it is a prefix, not an object)")
        return ObjectInfo(key, self._uri(key), st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """(key, path) of every visible file whose key starts with ``prefix``."""
        # Walk only the deepest directory the prefix fully names; filter the rest by string prefix.
        base_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(base_key) if base_key else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(TMP_MARKER)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TMP_MARKER):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key, Path(dirpath, name)

    def _list(self, prefix: str) -> list[ObjectInfo]:
        out = []
        for key, path in self._walk(prefix):
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted while we walked
                continue
            out.append(ObjectInfo(key, self._uri(key), st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc)))
        out.sort(key=lambda o: o.key.encode())  # S3 order: by UTF-8 bytes
        return out

    def _list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith(TMP_MARKER))

    def _delete(self, key: str) -> None:
        path = self._path(key)
        with self._fs_errors(key):
            if path.is_dir():
                return  # a prefix, not an object: nothing to delete (as in S3)
            try:
                path.unlink()
            except FileNotFoundError:
                return
        self._prune(path.parent)

    def _delete_prefix(self, prefix: str) -> int:
        count = 0
        dirs: set[Path] = set()
        with self._fs_errors(prefix):
            for _key, path in list(self._walk(prefix)):
                try:
                    path.unlink()
                    count += 1
                except FileNotFoundError:
                    continue
                dirs.add(path.parent)
            # Temp files of writers that died under this prefix go too.
            base = self._path(prefix.rstrip("/"))
            if prefix.endswith("/") and base.is_dir():
                for dirpath, _dirnames, filenames in os.walk(base):
                    for name in filenames:
                        if name.startswith(TMP_MARKER):
                            _unlink_quietly(os.path.join(dirpath, name))
                    dirs.add(Path(dirpath))
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            self._prune(d)
        return count

    def _prune(self, directory: Path) -> None:
        """Remove now-empty directories up to (not including) the root, so prefixes vanish like in S3."""
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent


# -------------------------------------------------------------------------------- S3 backend


class _BoundedRetry(Retry):
    """urllib3 Retry whose n-th retry waits ``backoff_factor * 2**(n-1)`` (the first one too)."""

    def get_backoff_time(self) -> float:
        n = len(self.history)
        if n == 0:
            return 0.0
        return float(min(self.backoff_max, self.backoff_factor * (2 ** (n - 1))))


def _make_retry(retries: int, backoff: float) -> Retry:
    """Retry transient failures only (connection errors, timeouts, 429/5xx), at most ``retries`` times."""
    return _BoundedRetry(
        total=retries,
        backoff_factor=backoff,
        status_forcelist=_RETRY_STATUSES,
        allowed_methods=None,  # every S3 request we send is safe to repeat (bodies are in memory)
        raise_on_status=False,  # hand the last error response to minio, which parses the S3 error code
        respect_retry_after_header=False,  # a server's Retry-After (MinIO sends 120 s) would defeat the bound
    )


def parse_endpoint(endpoint: str, secure_default: bool) -> tuple[str, bool]:
    """``host:port`` or ``http(s)://host:port`` → (``host:port``, secure).  The scheme decides TLS."""
    endpoint = endpoint.strip()
    secure = secure_default
    lowered = endpoint.lower()
    if lowered.startswith("https://"):
        secure, endpoint = True, endpoint[8:]
    elif lowered.startswith("http://"):
        secure, endpoint = False, endpoint[7:]
    elif "://" in endpoint:
        raise InvalidArgument(f"S3 endpoint {endpoint!r} must be host:port or http(s)://host:port", field="s3_endpoint")
    endpoint = endpoint.rstrip("/")
    if not endpoint or "/" in endpoint or "@" in endpoint:
        raise InvalidArgument(
            f"S3 endpoint {endpoint!r} must be host:port or http(s)://host:port, without a path or credentials",
            field="s3_endpoint",
        )
    return endpoint, secure


AWS_S3_ENDPOINT = "s3.amazonaws.com"


def require_s3_endpoint(endpoint: str, uri: str) -> str:
    """The S3 endpoint for ``uri``; an ``s3://`` URI without one is refused at once.

    The rule: nothing targets AWS implicitly.  A local ``selma up`` or a MinIO deployment names its
    server (``SELMA_S3_ENDPOINT=host:port``); AWS is used only when asked for by name
    (``SELMA_S3_ENDPOINT=s3.amazonaws.com`` or a regional AWS endpoint).
    """
    if endpoint.strip():
        return endpoint
    raise InvalidArgument(
        f"{uri} is an s3:// storage URI but SELMA_S3_ENDPOINT is not set: set SELMA_S3_ENDPOINT=host:port "
        f"(or http://host:port) for MinIO or another S3 server, or SELMA_S3_ENDPOINT={AWS_S3_ENDPOINT} to use AWS "
        "(plus SELMA_S3_ACCESS_KEY / SELMA_S3_SECRET_KEY); AWS is never used implicitly",
        field="s3_endpoint",
    )


class S3Storage(Storage):
    """A bucket (and optional key prefix) on S3 or MinIO, through the ``minio`` client."""

    def __init__(self, uri: str, settings: SelmaSettings) -> None:
        parsed = parse_uri(uri)
        if parsed.scheme != "s3":
            raise InvalidArgument(f"S3Storage needs an s3:// URI; got {uri!r}", field="storage_uri")
        self.bucket = parsed.container
        self.prefix = parsed.prefix
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint, secure = parse_endpoint(require_s3_endpoint(settings.s3_endpoint, self.uri), settings.s3_secure)
        self.region = settings.s3_region or None
        self._create_bucket = settings.s3_create_buckets
        self._part_size = settings.s3_part_size
        self._retries = settings.storage_retries
        self._backoff = settings.storage_backoff_seconds
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=S3_CONNECT_TIMEOUT_SECONDS, read=S3_READ_TIMEOUT_SECONDS),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            retries=_make_retry(self._retries, self._backoff),
        )
        from minio import Minio  # imported by S3 storage only: ~0.1-1 s (its crypto) that file:// processes never need

        access = settings.s3_access_key.get_secret_value() or None
        secret = settings.s3_secret_key.get_secret_value() or None
        self._client: Minio = Minio(
            self.endpoint,
            access_key=access,
            secret_key=secret if access else None,
            secure=secure,
            region=self.region,
            http_client=http,
        )
        self._bucket_checked = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Storage(uri={self.uri!r}, endpoint={self.endpoint!r})"

    def _name(self, key: str) -> str:
        return _join(self.prefix, key)

    @contextmanager
    def _s3_errors(self, key: str | None) -> Iterator[None]:
        """Map minio/urllib3 errors to domain errors naming the URI and endpoint, and count failures."""
        with _counted("s3"), self._s3_mapped(key):
            yield

    @contextmanager
    def _s3_mapped(self, key: str | None) -> Iterator[None]:
        from minio.error import InvalidResponseError, S3Error, ServerError

        uri = f"{self.uri}/{key}" if key else self.uri
        attempts = self._retries + 1
        try:
            yield
        except S3Error as e:
            raise self._map_s3_error(e, uri) from e
        except ServerError as e:
            raise Unavailable(
                f"S3 endpoint {self.endpoint} failed with HTTP {e.status_code} on {uri} after {attempts} attempts; retry later"
            ) from e
        except InvalidResponseError as e:
            status = getattr(e, "_code", 0) or 0
            if status == 403:
                raise PermissionDenied(f"S3 endpoint {self.endpoint} denied access to {uri} (HTTP 403)") from e
            if status == 404:
                raise NotFound(f"{uri} does not exist") from e
            raise Unavailable(f"S3 endpoint {self.endpoint} sent an unexpected response (HTTP {status}) for {uri}") from e
        except MaxRetryError as e:
            raise Unavailable(
                f"S3 endpoint {self.endpoint} is unavailable after {attempts} attempts ({_short(e.reason)}) "
                f"while accessing {uri}; check SELMA_S3_ENDPOINT and that the server is up"
            ) from e
        except HTTPError as e:
            raise Unavailable(f"S3 endpoint {self.endpoint} failed on {uri}: {_short(e)}") from e

    def _map_s3_error(self, e: Any, uri: str) -> SelmaError:
        code = e.code or ""
        status = getattr(e.response, "status", 0) or 0
        if code == "NoSuchBucket":
            return NotFound(f"bucket {self.bucket!r} does not exist at {self.endpoint} (while accessing {uri})")
        if code in _NOT_FOUND_CODES:
            return NotFound(f"{uri} does not exist")
        if code in _DENIED_CODES or status == 403:
            return PermissionDenied(
                f"S3 endpoint {self.endpoint} denied access to {uri} ({code}); "
                "check SELMA_S3_ACCESS_KEY / SELMA_S3_SECRET_KEY and the bucket policy"
            )
        if code == "PreconditionFailed" or status == 412:
            return Aborted(f"{uri} changed while it was being read; read it again")
        if status >= 500 or status in _RETRY_STATUSES or code in ("SlowDown", "InternalError", "ServiceUnavailable"):
            return Unavailable(
                f"S3 endpoint {self.endpoint} is unavailable ({code or status}) for {uri} "
                f"after {self._retries + 1} attempts; retry later"
            )
        return InvalidArgument(f"S3 endpoint {self.endpoint} rejected the request for {uri}: {code}: {e.message}")

    def _ensure_bucket(self) -> None:
        """Check the bucket once per instance before the first write; create it if settings allow."""
        if self._bucket_checked:
            return
        with self._bucket_lock, self._s3_errors(None):
            if self._bucket_checked:
                return
            if not self._client.bucket_exists(self.bucket):
                if not self._create_bucket:
                    raise NotFound(
                        f"bucket {self.bucket!r} does not exist at {self.endpoint}; "
                        "create it or set SELMA_S3_CREATE_BUCKETS=true"
                    )
                from minio.error import S3Error

                try:
                    self._client.make_bucket(self.bucket, location=self.region)
                    log.info("created bucket %s at %s", self.bucket, self.endpoint)
                except S3Error as e:
                    if e.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            self._bucket_checked = True

    def _write(self, key: str, reader: _HashingReader, length: int, *, content_type: str, sha256: str | None) -> str | None:
        self._ensure_bucket()
        metadata = {"sha256": sha256} if sha256 else None
        try:
            with self._s3_errors(key):
                result = self._client.put_object(
                    self.bucket,
                    self._name(key),
                    reader,  # type: ignore[arg-type]
                    length,
                    content_type=content_type,
                    metadata=metadata,
                    part_size=self._part_size,
                )
        except OSError as e:
            if length >= 0 and reader.size < length and "not enough data" in str(e):
                raise _short_stream(self._uri(key), reader.size, length) from None
            raise
        return (result.etag or "").strip('"') or None

    def _get(self, key: str, offset: int = 0, etag: str | None = None) -> Any:
        headers = {"If-Match": f'"{etag}"'} if etag else None
        with self._s3_errors(key):
            return self._client.get_object(self.bucket, self._name(key), offset=offset, request_headers=headers)

    def _open(self, key: str) -> BinaryIO:
        response = self._get(key)
        return io.BufferedReader(_S3Reader(self, key, response), CHUNK_SIZE)  # type: ignore[return-value]

    def _stat(self, key: str) -> ObjectInfo:
        with self._s3_errors(key):
            obj = self._client.stat_object(self.bucket, self._name(key))
        meta = obj.metadata or {}
        sha = meta.get("x-amz-meta-sha256") or meta.get("X-Amz-Meta-Sha256")
        return ObjectInfo(
            key, f"{self.uri}/{key}", int(obj.size or 0), _aware(obj.last_modified), sha, (obj.etag or "").strip('"') or None
        )

    def _list(self, prefix: str) -> list[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        out = []
        with self._s3_errors(prefix or None):
            for obj in self._client.list_objects(self.bucket, prefix=base + prefix, recursive=True):
                if obj.is_dir or not obj.object_name:
                    continue
                key = obj.object_name[len(base):]
                out.append(
                    ObjectInfo(
                        key,
                        f"{self.uri}/{key}",
                        int(obj.size or 0),
                        _aware(obj.last_modified),
                        None,
                        (obj.etag or "").strip('"') or None,
                    )
                )
        return out

    def _list_dirs(self, prefix: str) -> list[str]:
        base = (f"{self.prefix}/" if self.prefix else "") + prefix
        names = []
        with self._s3_errors(prefix or None):
            for obj in self._client.list_objects(self.bucket, prefix=base, recursive=False):
                if obj.is_dir and obj.object_name:
                    names.append(obj.object_name[len(base):].rstrip("/"))
        return sorted(names)

    def _delete(self, key: str) -> None:
        with self._s3_errors(key):
            self._client.remove_object(self.bucket, self._name(key))

    def _delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        names = [self._name(o.key) for o in self._list(prefix)]
        with self._s3_errors(prefix):
            for start in range(0, len(names), 1000):  # S3 DeleteObjects takes at most 1000 keys
                errors = list(self._client.remove_objects(self.bucket, (DeleteObject(n) for n in names[start : start + 1000])))
                if errors:
                    first = errors[0]
                    raise Unavailable(
                        f"S3 endpoint {self.endpoint} failed to delete {len(errors)} objects under "
                        f"{self.uri}/{prefix} (first: {first.name}: {first.code})"
                    )
        return len(names)


class _S3Reader(io.RawIOBase):
    """Streams one GET response; if the connection breaks mid-body, resumes from the current
    offset (bounded retries with backoff), pinned to the same object version with If-Match."""

    def __init__(self, storage: S3Storage, key: str, response: Any) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._response = response
        self._etag = (response.headers.get("ETag") or "").strip('"') or None
        length = response.headers.get("Content-Length")
        self._size = int(length) if length is not None else None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._size is not None and self._pos >= self._size:
            return 0
        failures = 0
        while True:
            try:
                n = self._response.readinto(b)
                if n == 0 and self._size is not None and self._pos < self._size:
                    raise _ShortRead(f"connection closed at byte {self._pos} of {self._size}")
                self._pos += n
                return n
            except (HTTPError, _ShortRead, ConnectionError, TimeoutError) as e:
                failures += 1
                uri = f"{self._storage.uri}/{self._key}"
                if failures > self._storage._retries:
                    raise Unavailable(
                        f"S3 endpoint {self._storage.endpoint} broke the download of {uri} at byte {self._pos} "
                        f"{failures} times ({_short(e)}); retry later"
                    ) from e
                delay = self._storage._backoff * (2 ** (failures - 1))
                log.warning("download of %s broke at byte %d (%s); resuming in %.2fs", uri, self._pos, _short(e), delay)
                time.sleep(delay)
                self._release()
                self._response = self._storage._get(self._key, offset=self._pos, etag=self._etag)

    def _release(self) -> None:
        try:
            self._response.close()
            self._response.release_conn()
        except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is discarded anyway
            log.debug("closing a broken S3 response failed", exc_info=True)

    def close(self) -> None:
        if not self.closed:
            self._release()
        super().close()


class _ShortRead(Exception):
    """The server closed the body before Content-Length bytes arrived."""


# ------------------------------------------------------------------------------------ routing


def open_storage(settings: SelmaSettings, uri: str | None = None) -> Storage:
    """The storage rooted at ``uri`` (default: ``settings.resolved_storage_uri``), picked by scheme."""
    uri = (uri or settings.resolved_storage_uri).rstrip("/")
    parsed = parse_uri(uri, field="storage_uri")
    if parsed.scheme == "s3":
        return S3Storage(uri, settings)
    return FileStorage(parsed.container)


def resolve_uri(settings: SelmaSettings, uri: str) -> tuple[Storage, str]:
    """Split an object URI into (storage rooted at its parent, key) so any URI can be read."""
    parsed = parse_uri(uri)
    if parsed.scheme == "s3":
        parent, _, key = parsed.prefix.rpartition("/")
        if not key:
            raise InvalidArgument(f"{uri!r} names a bucket, not an object", field="uri")
        root = f"s3://{parsed.container}/{parent}" if parent else f"s3://{parsed.container}"
        return S3Storage(root, settings), check_key(key, field="uri")
    path = Path(parsed.container)
    if path == path.parent:
        raise InvalidArgument(f"{uri!r} names the filesystem root, not an object", field="uri")
    return FileStorage(path.parent), check_key(path.name, field="uri")


# ------------------------------------------------------------------------------------ helpers


@contextmanager
def _counted(backend: str) -> Iterator[None]:
    """Count storage failures by backend and status code (NotFound is a normal answer, not a failure).

    Used outside the error mapping, so it sees the domain error the mapping raised.
    """
    try:
        yield
    except NotFound:
        raise
    except SelmaError as e:
        STORAGE_ERRORS.labels(backend, e.code.value).inc()
        raise


def _read_chunks(f: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with f:
        while chunk := f.read(chunk_size):
            yield chunk


def _short_stream(uri: str, got: int, length: int) -> InvalidArgument:
    return InvalidArgument(f"the stream for {uri} ended after {got} bytes but length said {length}; nothing was written")


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _short(e: BaseException | None) -> str:
    text = f"{type(e).__name__}: {e}" if e is not None else "no reason"
    return text if len(text) <= 300 else text[:297] + "..."


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; some filesystems cannot fsync directories, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
