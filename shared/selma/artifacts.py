"""Artifacts with lineage: immutable, content-addressed bundles of files that services hand to
each other (prompt set → image dataset → expert → merged model → evaluation report).

Layout under the storage root::

    artifacts/<id>/files/<path>       the artifact's files, uploaded first
    artifacts/<id>/staging.json       a writer's resume journal (never read as an artifact)
    artifacts/<id>/manifest.json      written LAST: the commit point
    aliases/<name>.json               a named pointer to an artifact id, replaced atomically

The manifest is the commit point: an artifact without one does not exist for readers
(``get`` raises NotFound, ``list`` skips it).  The manifest is one atomic object write, so a
writer killed mid-upload leaves no visible artifact and a reader never sees a partial one.
Artifacts are immutable: publishing an id again with identical content is a no-op, with
different content it raises AlreadyExists.  Every file is verified against its recorded
sha256 when read.

A long job resumes by reopening a writer for the same id: files recorded in the journal
(written by :meth:`ArtifactWriter.checkpoint`, every few uploads, and when the writer exits
with an exception) and still present in storage are kept; :meth:`ArtifactWriter.existing`
tells the job what it can skip.  One writer per id at a time: the idempotency key that
derives the id belongs to one job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import selma
from selma.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from selma.storage import CHUNK_SIZE, Storage, _HashingReader, check_key, open_storage, verifying_reader

if TYPE_CHECKING:
    from selma.config import SelmaSettings

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ARTIFACTS_PREFIX = "artifacts"
ALIASES_PREFIX = "aliases"
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = "staging.json"

_ID_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ALIAS_RE = re.compile(r"^[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_SUFFIX_HEX = 20  # 80 bits: collision-free in practice, ids stay short and DNS-label safe


class ArtifactKind(str, Enum):
    """What an artifact is; the id prefix is the kind with dashes (``prompt-set-…``)."""

    PROMPT_SET = "prompt_set"
    IMAGE_DATASET = "image_dataset"
    LATENT_CACHE = "latent_cache"
    EXPERT = "expert"
    MERGED_MODEL = "merged_model"
    EVAL_REPORT = "eval_report"
    RUN = "run"
    TRAINING_CONFIG = "training_config"

    @property
    def id_prefix(self) -> str:
        return self.value.replace("_", "-")


class FileEntry(BaseModel):
    """One file of an artifact: its relative path, size and sha256."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return _as_value_error(check_key, v, field="path")

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str) -> str:
        if not _SHA256_RE.match(v):
            raise ValueError(f"sha256 must be 64 lowercase hex characters; got {v!r}")
        return v


class Producer(BaseModel):
    """The program that made an artifact."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)


def _as_value_error(check: Any, value: Any, **kwargs: Any) -> Any:
    """Run a domain check inside a pydantic validator, where failures must be ValueError."""
    try:
        return check(value, **kwargs)
    except InvalidArgument as e:
        raise ValueError(str(e)) from None


def default_producer() -> Producer:
    return Producer(name="selma", version=selma.__version__)


def files_digest(files: Iterable[FileEntry]) -> str:
    """sha256 over the files sorted by path, one ``path NUL sha256 NUL size LF`` record each.

    Keys cannot contain NUL or newlines, so the encoding is unambiguous; two artifacts with
    the same digest have byte-identical files under the same paths.
    """
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.sha256}\0{f.size}\n".encode())
    return h.hexdigest()


class Manifest(BaseModel):
    """The record of one published artifact (``artifacts/<id>/manifest.json``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = SCHEMA_VERSION
    id: str
    kind: ArtifactKind
    uri: str = Field(description="The artifact's prefix; its files live under <uri>/files/.")
    digest: str = Field(description="files_digest(files).")
    files: tuple[FileEntry, ...] = ()
    created_at: datetime
    producer: Producer
    parents: tuple[str, ...] = ()
    parameters: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _as_value_error(check_id, v)

    @field_validator("parents")
    @classmethod
    def _parents(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_as_value_error(check_id, p, field="parents") for p in v)

    @field_validator("created_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        if v.tzinfo is None:
            raise ValueError("created_at must carry a timezone (UTC)")
        return v.astimezone(timezone.utc)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        paths = [f.path for f in self.files]
        if paths != sorted(paths) or len(set(paths)) != len(paths):
            raise ValueError("files must be sorted by path and unique")
        if self.digest != files_digest(self.files):
            raise ValueError(f"digest {self.digest} does not match the files (expected {files_digest(self.files)})")
        if self.id in self.parents:
            raise ValueError(f"artifact {self.id} cannot be its own parent")
        return self

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; NotFound if the artifact has no such file."""
        for f in self.files:
            if f.path == path:
                return f
        raise NotFound(f"artifact {self.id} has no file {path!r}", field="path")

    def file_uri(self, path: str) -> str:
        return f"{self.uri}/files/{self.file(path).path}"

    @property
    def size(self) -> int:
        """Total bytes over all files."""
        return sum(f.size for f in self.files)

    def same_content(self, other: Manifest) -> bool:
        """Equal as far as immutability cares: kind, files, parents and parameters (not time or producer)."""
        return (
            self.kind == other.kind
            and self.digest == other.digest
            and sorted(self.parents) == sorted(other.parents)
            and _canonical(self.parameters) == _canonical(other.parameters)
        )


class Alias(BaseModel):
    """A name pointing at an artifact id (e.g. the current merged model), replaced atomically."""

    model_config = ConfigDict(frozen=True)

    name: str
    artifact_id: str
    updated_at: datetime


def check_id(artifact_id: str, *, field: str = "id") -> str:
    """Return ``artifact_id`` if it is a DNS-label-safe id, else raise InvalidArgument."""
    if not isinstance(artifact_id, str) or not _ID_RE.match(artifact_id):
        raise InvalidArgument(
            f"artifact id {artifact_id!r} is not valid: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit (e.g. 'expert-3f9c...')",
            field=field,
        )
    return artifact_id


def check_alias(name: str) -> str:
    if not isinstance(name, str) or not _ALIAS_RE.match(name):
        raise InvalidArgument(
            f"alias {name!r} is not valid: use 1-63 lowercase letters, digits, '-', '.', '_', "
            "starting and ending with a letter or digit",
            field="alias",
        )
    return name


def new_artifact_id(kind: ArtifactKind | str, key: str | None = None) -> str:
    """A new id such as ``merged-model-3f9c0a…``: derived from ``key`` (an idempotency key) when
    given, so retries of one job land on one artifact; random otherwise."""
    kind = _kind(kind)
    if key is None:
        suffix = secrets.token_hex(_ID_SUFFIX_HEX // 2)
    else:
        if not isinstance(key, str) or not key:
            raise InvalidArgument("idempotency key must be a non-empty string", field="key")
        suffix = hashlib.sha256(f"selma-artifact\0{kind.value}\0{key}".encode()).hexdigest()[:_ID_SUFFIX_HEX]
    return f"{kind.id_prefix}-{suffix}"


def _kind(kind: ArtifactKind | str) -> ArtifactKind:
    try:
        return ArtifactKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in ArtifactKind)
        raise InvalidArgument(f"unknown artifact kind {kind!r}; use one of {allowed}", field="kind") from None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ArtifactStore:
    """Publish, read and trace artifacts kept in one :class:`~selma.storage.Storage`."""

    def __init__(self, storage: Storage, *, producer: Producer | None = None) -> None:
        self.storage = storage
        self.producer = producer or default_producer()

    def __repr__(self) -> str:
        return f"ArtifactStore(storage={self.storage!r})"

    @property
    def uri(self) -> str:
        return self.storage.uri

    # --- keys

    @staticmethod
    def _dir(artifact_id: str) -> str:
        return f"{ARTIFACTS_PREFIX}/{artifact_id}"

    def _manifest_key(self, artifact_id: str) -> str:
        return f"{self._dir(artifact_id)}/{MANIFEST_NAME}"

    def _file_key(self, artifact_id: str, path: str) -> str:
        return f"{self._dir(artifact_id)}/files/{path}"

    # --- writing

    new_id = staticmethod(new_artifact_id)

    def writer(
        self,
        kind: ArtifactKind | str,
        *,
        id: str | None = None,  # noqa: A002 - the manifest's field name
        key: str | None = None,
        parents: Iterable[str] = (),
        parameters: Mapping[str, Any] | None = None,
        producer: Producer | tuple[str, str] | Mapping[str, str] | None = None,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
        checkpoint_every: int = 50,
    ) -> ArtifactWriter:
        """A writer for a new artifact (use as a context manager; publishes on clean exit).

        ``id`` names the artifact; otherwise it is derived from the idempotency ``key`` or
        random.  Reopening a writer for an unpublished id resumes it (see ``existing()``).
        """
        kind = _kind(kind)
        if id is None:
            id = self.new_id(kind, key)  # noqa: A001
        if name is not None and not isinstance(name, str):
            raise InvalidArgument(f"name must be a string; got {type(name).__name__}", field="name")
        if labels and not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise InvalidArgument("labels must map strings to strings", field="labels")
        try:
            producer = _producer(producer) if producer is not None else self.producer
        except (ValidationError, IndexError, TypeError) as e:
            raise InvalidArgument(f"producer needs a non-empty name and version: {e}", field="producer") from None
        return ArtifactWriter(
            self,
            kind,
            check_id(id),
            parents=parents,
            parameters=dict(parameters or {}),
            producer=producer,
            name=name,
            labels=dict(labels or {}),
            checkpoint_every=checkpoint_every,
        )

    def put_staged_bytes(self, artifact_id: str, path: str, data: bytes) -> FileEntry:
        """Upload one file of an *unpublished* artifact from a helper process (a render shard worker).

        The file is invisible to readers until the artifact's one writer adopts it
        (:meth:`ArtifactWriter.adopt`) and publishes; helpers keep their own journal of what they uploaded.
        """
        check_id(artifact_id)
        check_key(path, field="path")
        if self.exists(artifact_id):
            raise AlreadyExists(f"artifact {artifact_id} is already published; its files cannot change")
        info = self.storage.put_bytes(self._file_key(artifact_id, path), data)
        return FileEntry(path=path, size=info.size, sha256=info.sha256 or "")

    # --- reading

    def get(self, artifact_id: str) -> Manifest:
        """The manifest of a published artifact; NotFound if it has none (unpublished or absent)."""
        check_id(artifact_id)
        key = self._manifest_key(artifact_id)
        try:
            raw = self.storage.get_bytes(key)
        except NotFound:
            raise NotFound(f"artifact {artifact_id} does not exist in {self.uri}", field="id") from None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as e:
            raise FailedPrecondition(f"manifest {self.storage.uri_for(key)} is unreadable: {e}") from e
        if manifest.id != artifact_id:
            raise FailedPrecondition(f"manifest {self.storage.uri_for(key)} names id {manifest.id}, not {artifact_id}")
        return manifest

    def exists(self, artifact_id: str) -> bool:
        """Whether ``artifact_id`` is published."""
        try:
            self.get(artifact_id)
        except NotFound:
            return False
        return True

    def list(self, kind: ArtifactKind | str | None = None, *, labels: Mapping[str, str] | None = None) -> list[Manifest]:
        """Published artifacts, oldest first; optionally of one kind and carrying all ``labels``."""
        want = _kind(kind) if kind is not None else None
        try:
            ids = self.storage.list_dirs(f"{ARTIFACTS_PREFIX}/")
        except NotFound:  # the bucket does not exist yet: nothing was published
            return []
        out = []
        for artifact_id in ids:
            if not _ID_RE.match(artifact_id) or (want and not artifact_id.startswith(want.id_prefix + "-")):
                continue
            try:
                manifest = self.get(artifact_id)
            except NotFound:  # unpublished: in flight, or its writer died
                continue
            except FailedPrecondition as e:
                log.warning("skipping artifact %s: %s", artifact_id, e)
                continue
            if want and manifest.kind != want:
                continue
            if labels and any(manifest.labels.get(k) != v for k, v in labels.items()):
                continue
            out.append(manifest)
        out.sort(key=lambda m: (m.created_at, m.id))
        return out

    def _resolve_manifest(self, artifact: str | Manifest) -> Manifest:
        return artifact if isinstance(artifact, Manifest) else self.get(artifact)

    def open(self, artifact: str | Manifest, path: str) -> BinaryIO:
        """A streaming reader over one file; reading it to the end verifies size and sha256
        (FailedPrecondition on a mismatch).  Pass a Manifest instead of an id to save a lookup."""
        manifest = self._resolve_manifest(artifact)
        entry = manifest.file(path)
        inner = self.storage.open(self._file_key(manifest.id, entry.path))
        return verifying_reader(inner, size=entry.size, sha256=entry.sha256, what=f"file {path!r} of artifact {manifest.id}")

    def read_bytes(self, artifact: str | Manifest, path: str) -> bytes:
        """One file, whole and verified; for small files."""
        with self.open(artifact, path) as f:
            return f.read()

    def download(self, artifact: str | Manifest, dest_dir: str | os.PathLike[str], *, paths: Iterable[str] | None = None) -> Path:
        """Download the artifact's files (or ``paths`` of them) into ``dest_dir/<path>``, verified.

        Each file lands atomically; files already there with the right size and sha256 are
        skipped, so a download can be repeated to resume.  Returns ``dest_dir``.
        """
        manifest = self._resolve_manifest(artifact)
        artifact_id = manifest.id
        entries = manifest.files if paths is None else tuple(manifest.file(p) for p in paths)
        dest_root = Path(dest_dir)
        for entry in entries:
            dest = dest_root.joinpath(*entry.path.split("/"))
            if dest.is_file() and dest.stat().st_size == entry.size and _file_sha256(dest) == entry.sha256:
                continue
            info = self.storage.download_file(self._file_key(artifact_id, entry.path), dest)
            if info.sha256 != entry.sha256 or info.size != entry.size:
                dest.unlink(missing_ok=True)
                raise FailedPrecondition(
                    f"file {entry.path!r} of artifact {artifact_id} is corrupt: got {info.size} bytes with sha256 "
                    f"{info.sha256}, expected {entry.size} bytes with {entry.sha256}"
                )
        return dest_root

    def lineage(self, artifact_id: str) -> list[Manifest]:
        """This artifact then all its ancestors, breadth first, each once (cycle-safe).

        E.g. merged model → experts → image datasets → prompt sets.  An ancestor that was
        deleted is skipped with a warning; the artifact itself must exist.
        """
        out = [self.get(artifact_id)]
        seen = {artifact_id}
        queue = deque(out[0].parents)
        while queue:
            parent = queue.popleft()
            if parent in seen:
                continue
            seen.add(parent)
            try:
                manifest = self.get(parent)
            except NotFound:
                log.warning("lineage of %s: ancestor %s no longer exists", artifact_id, parent)
                continue
            out.append(manifest)
            queue.extend(manifest.parents)
        return out

    def delete(self, artifact_id: str) -> None:
        """Unpublish (manifest first, so readers stop seeing it at once), then delete the files."""
        check_id(artifact_id)
        self.storage.delete(self._manifest_key(artifact_id))
        self.storage.delete_prefix(f"{self._dir(artifact_id)}/")

    # --- aliases

    def set_alias(self, name: str, artifact_id: str) -> Alias:
        """Point ``name`` at a published artifact, replacing any previous target atomically."""
        check_alias(name)
        self.get(artifact_id)  # NotFound unless published
        alias = Alias(name=name, artifact_id=artifact_id, updated_at=_utcnow())
        self.storage.put_bytes(f"{ALIASES_PREFIX}/{name}.json", alias.model_dump_json(indent=2).encode(), content_type="application/json")
        return alias

    def get_alias(self, name: str) -> Alias:
        """The alias ``name``; NotFound if it is not set."""
        check_alias(name)
        try:
            raw = self.storage.get_bytes(f"{ALIASES_PREFIX}/{name}.json")
        except NotFound:
            raise NotFound(f"alias {name!r} is not set in {self.uri}", field="alias") from None
        return Alias.model_validate_json(raw)

    def resolve(self, ref: str) -> Manifest:
        """The artifact named by an id or, failing that, by an alias."""
        if _ID_RE.match(ref) and self.exists(ref):
            return self.get(ref)
        try:
            alias = self.get_alias(ref)
        except (NotFound, InvalidArgument):
            raise NotFound(f"no artifact or alias named {ref!r} in {self.uri}", field="ref") from None
        return self.get(alias.artifact_id)

    def delete_alias(self, name: str) -> None:
        check_alias(name)
        self.storage.delete(f"{ALIASES_PREFIX}/{name}.json")

    def list_aliases(self) -> list[Alias]:
        out = []
        try:
            objects = self.storage.list(f"{ALIASES_PREFIX}/")
        except NotFound:
            return []
        for obj in objects:
            try:
                out.append(Alias.model_validate_json(self.storage.get_bytes(obj.key)))
            except (NotFound, ValidationError):
                continue
        return sorted(out, key=lambda a: a.name)


class ArtifactWriter:
    """Uploads the files of one artifact, then publishes its manifest (see :meth:`ArtifactStore.writer`).

    If the id is already published, the writer verifies instead of writing: uploads are only
    hashed and compared, and ``publish()`` returns the existing manifest when everything
    matches, or raises AlreadyExists at the first difference.
    """

    def __init__(
        self,
        store: ArtifactStore,
        kind: ArtifactKind,
        artifact_id: str,
        *,
        parents: Iterable[str],
        parameters: dict[str, Any],
        producer: Producer,
        name: str | None,
        labels: dict[str, str],
        checkpoint_every: int,
    ) -> None:
        self.store = store
        self.kind = kind
        self.id = artifact_id
        self.parents = tuple(dict.fromkeys(check_id(p, field="parents") for p in parents))
        if artifact_id in self.parents:
            raise InvalidArgument(f"artifact {artifact_id} cannot be its own parent", field="parents")
        try:
            _canonical_strict(parameters)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"parameters must be JSON-serialisable: {e}", field="parameters") from None
        self.parameters = parameters
        self.producer = producer
        self.name = name
        self.labels = labels
        self._checkpoint_every = max(1, checkpoint_every)
        self._lock = threading.Lock()
        self._entries: dict[str, FileEntry] = {}
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._manifest: Manifest | None = None
        self._published = self._load()

    # --- state

    def _load(self) -> Manifest | None:
        """Find an existing manifest (verify mode) or resume from the journal."""
        try:
            published = self.store.get(self.id)
        except NotFound:
            published = None
        if published is not None:
            if published.kind != self.kind:
                raise AlreadyExists(f"artifact {self.id} is already published as a {published.kind.value}, not {self.kind.value}")
            self._entries = {f.path: f for f in published.files}
            return published
        storage = self.store.storage
        try:
            journal = json.loads(storage.get_bytes(self._journal_key))
            recorded = [FileEntry.model_validate(f) for f in journal.get("files", [])]
        except NotFound:
            return None
        except (ValueError, ValidationError) as e:
            log.warning("ignoring unreadable journal of %s: %s", self.id, e)
            return None
        present = self._present()
        self._entries = {f.path: f for f in recorded if present.get(f.path) == f.size}
        if self._entries:
            log.info("resuming artifact %s with %d files already uploaded", self.id, len(self._entries))
        return None

    def _present(self) -> dict[str, int]:
        """Path → size of the objects now under this artifact's files/ prefix."""
        prefix = f"{self.store._dir(self.id)}/files/"
        try:
            return {o.key[len(prefix):]: o.size for o in self.store.storage.list(prefix)}
        except NotFound:
            return {}

    @property
    def _journal_key(self) -> str:
        return f"{self.store._dir(self.id)}/{JOURNAL_NAME}"

    @property
    def uri(self) -> str:
        return self.store.storage.uri_for(self.store._dir(self.id))

    @property
    def manifest(self) -> Manifest | None:
        """The published manifest, once ``publish()`` succeeded."""
        return self._manifest

    def existing(self) -> dict[str, FileEntry]:
        """Files already part of this artifact: uploaded by an earlier writer (resume) or this one."""
        with self._lock:
            return dict(self._entries)

    # --- uploads

    def put_stream(self, path: str, stream: BinaryIO | IO[bytes] | Iterable[bytes], *, length: int = -1) -> FileEntry:
        """Upload one file from a stream or an iterable of byte chunks (unknown length is fine)."""
        check_key(path, field="path")
        self._check_open()
        if self._published is not None:
            return self._verify(path, stream)
        info = self.store.storage.put_stream(self.store._file_key(self.id, path), stream, length=length)
        return self._record(FileEntry(path=path, size=info.size, sha256=info.sha256 or ""))

    def put_bytes(self, path: str, data: bytes) -> FileEntry:
        """Upload one small file from memory."""
        check_key(path, field="path")
        self._check_open()
        if self._published is not None:
            return self._verify(path, bytes(data))
        info = self.store.storage.put_bytes(self.store._file_key(self.id, path), data)
        return self._record(FileEntry(path=path, size=info.size, sha256=info.sha256 or ""))

    def put_file(self, path: str, local_path: str | os.PathLike[str]) -> FileEntry:
        """Upload one local file, streaming."""
        local_path = Path(local_path)
        if not local_path.is_file():
            raise NotFound(f"local file {local_path} does not exist", field="local_path")
        with local_path.open("rb") as f:
            return self.put_stream(path, f, length=os.fstat(f.fileno()).st_size)

    def put_dir(self, local_dir: str | os.PathLike[str], prefix: str = "") -> list[FileEntry]:
        """Upload every file under ``local_dir`` (e.g. a ``save_pretrained`` output) as ``prefix/<relpath>``."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise NotFound(f"local directory {local_dir} does not exist", field="local_dir")
        prefix = prefix.strip("/")
        out = []
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = file.relative_to(local_dir).as_posix()
            out.append(self.put_file(f"{prefix}/{rel}" if prefix else rel, file))
        return out

    def adopt(self, entries: Iterable[FileEntry]) -> None:
        """Make files that helper processes uploaded (:meth:`ArtifactStore.put_staged_bytes`) part of this artifact.

        Each must be in storage with its recorded size (FailedPrecondition otherwise); ``publish`` checks again.
        """
        self._check_open()
        entries = list(entries)
        if self._published is not None:
            for e in entries:
                if self._entries.get(e.path) != e:
                    raise AlreadyExists(f"artifact {self.id} is already published and its file {e.path!r} differs or does not exist")
            return
        present = self._present()
        for e in entries:
            if present.get(e.path) != e.size:
                raise FailedPrecondition(f"file {e.path!r} of artifact {self.id} is missing or changed in storage; render it again")
        with self._lock:
            self._entries.update({e.path: e for e in entries})

    def discard(self, path: str) -> None:
        """Leave ``path`` out of the artifact (e.g. a file carried over from an earlier attempt)."""
        self._check_open()
        if self._published is not None:
            raise AlreadyExists(f"artifact {self.id} is already published; its files cannot change")
        with self._lock:
            self._entries.pop(path, None)
        self.store.storage.delete(self.store._file_key(self.id, path))

    def _check_open(self) -> None:
        if self._manifest is not None:
            raise FailedPrecondition(f"artifact {self.id} was already published by this writer; open a new writer")

    def _record(self, entry: FileEntry) -> FileEntry:
        with self._lock:
            self._entries[entry.path] = entry
            self._since_checkpoint += 1
            due = self._since_checkpoint >= self._checkpoint_every or time.monotonic() - self._last_checkpoint > 30
        if due:
            self.checkpoint()
        return entry

    def _verify(self, path: str, source: Any) -> FileEntry:
        """Verify mode: hash the would-be upload and compare it with the published file."""
        reader = _HashingReader(source)
        while reader.read(CHUNK_SIZE):
            pass
        entry = FileEntry(path=path, size=reader.size, sha256=reader.sha256)
        published = self._entries.get(path)
        if published != entry:
            raise AlreadyExists(
                f"artifact {self.id} is already published and its file {path!r} "
                + ("differs" if published else "does not exist")
                + "; artifacts are immutable: write a new artifact id"
            )
        return entry

    def checkpoint(self) -> None:
        """Record the files uploaded so far, so a writer reopened after a crash can skip them."""
        if self._published is not None or self._manifest is not None:
            return
        with self._lock:
            files = [f.model_dump() for f in sorted(self._entries.values(), key=lambda f: f.path)]
            self._since_checkpoint = 0
            self._last_checkpoint = time.monotonic()
        body = json.dumps({"id": self.id, "kind": self.kind.value, "files": files}, indent=1).encode()
        self.store.storage.put_bytes(self._journal_key, body, content_type="application/json")

    # --- publishing

    def _draft(self) -> Manifest:
        with self._lock:
            files = tuple(sorted(self._entries.values(), key=lambda f: f.path))
        return Manifest(
            id=self.id,
            kind=self.kind,
            uri=self.uri,
            digest=files_digest(files),
            files=files,
            created_at=_utcnow(),
            producer=self.producer,
            parents=self.parents,
            parameters=self.parameters,
            name=self.name,
            labels=self.labels,
        )

    def publish(self) -> Manifest:
        """Commit the artifact by writing its manifest last.

        Checks that every parent is published and every file is in storage; removes stray
        uploads that are not part of the artifact.  Idempotent for identical content;
        AlreadyExists if the id was published with different content.
        """
        if self._manifest is not None:
            return self._manifest
        draft = self._draft()
        if self._published is not None:
            return self._accept_existing(self._published, draft)
        for parent in self.parents:
            if not self.store.exists(parent):
                raise NotFound(f"parent artifact {parent} of {self.id} does not exist; publish it first", field="parents")
        present = self._present()
        for entry in draft.files:
            if present.get(entry.path) != entry.size:
                raise FailedPrecondition(
                    f"file {entry.path!r} of artifact {self.id} is missing or changed in storage "
                    "(another writer for the same id?); re-upload it"
                )
        for stray in sorted(set(present) - {f.path for f in draft.files}):
            self.store.storage.delete(self.store._file_key(self.id, stray))
        try:  # someone may have published this id since we opened
            return self._accept_existing(self.store.get(self.id), draft)
        except NotFound:
            pass
        key = self.store._manifest_key(self.id)
        self.store.storage.put_bytes(key, draft.model_dump_json(indent=2).encode(), content_type="application/json")
        self._manifest = draft
        try:
            self.store.storage.delete(self._journal_key)
        except Exception:  # noqa: BLE001 - a leftover journal is harmless; the manifest is what counts
            log.warning("could not delete the journal of %s", self.id, exc_info=True)
        log.info("published %s %s (%d files, %d bytes)", self.kind.value, self.id, len(draft.files), draft.size)
        return draft

    def _accept_existing(self, existing: Manifest, draft: Manifest) -> Manifest:
        if existing.same_content(draft):
            self._manifest = existing
            return existing
        raise AlreadyExists(
            f"artifact {self.id} is already published with different content "
            f"(digest {existing.digest[:12]}…, parents {list(existing.parents)}); artifacts are immutable: use a new id"
        )

    # --- context manager

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.publish()
            return
        try:  # keep what was uploaded so a retry can resume; never mask the original error
            self.checkpoint()
        except Exception:  # noqa: BLE001
            log.warning("could not checkpoint %s after a failure", self.id, exc_info=True)


def _canonical_strict(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _producer(value: Producer | tuple[str, str] | Mapping[str, str]) -> Producer:
    if isinstance(value, Producer):
        return value
    if isinstance(value, tuple):
        return Producer(name=value[0], version=value[1])
    return Producer.model_validate(dict(value))


def tree_sha256(root: str | Path, names: Iterable[str]) -> str:
    """One sha256 over files under ``root``, in the order given: each relative name, NUL, then its bytes."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        with (Path(root) / name).open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
    return h.hexdigest()


def open_artifact_store(settings: SelmaSettings, uri: str | None = None, *, producer: Producer | None = None) -> ArtifactStore:
    """The artifact store rooted at ``uri`` (default ``settings.resolved_storage_uri``)."""
    return ArtifactStore(open_storage(settings, uri), producer=producer)
