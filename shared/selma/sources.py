"""Which paths and URIs a request may name: one rule for every request field that reads something.

A client names models, datasets, prompt sets and adapters by reference, and the service then
reads them with its own filesystem and credentials.  Without a rule a client could make a service
copy any host directory into its model cache (``file:///etc``) or read a bucket it has no business
in.  Services apply :func:`check_request` to a request before anything is resolved, downloaded or
copied.  What the operator configured (a service's default or base model, ``SELMA_LLM_*``) is
trusted and never passes through here.

A request may name, in a model source (``ModelRef.source`` / ``vae_source``):

* a Hugging Face hub id (``org/name``),
* ``tiny://…`` and the schemes plugins registered (:mod:`selma.plugins`, e.g. ``shapesworld://``),
* ``s3://bucket/…`` in the storage bucket or a bucket listed in ``SELMA_MODEL_ALLOWED_BUCKETS``,
* a ``file://`` URI or a local path under a directory listed in ``SELMA_MODEL_ALLOWED_DIRS`` or under
  the service's own ``file://`` storage root, after symlinks and ``..`` are resolved;

and in an artifact reference (``ArtifactRef.uri``) only an artifact of the service's own store.
Anything else is PERMISSION_DENIED naming the field and the setting an operator would change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from google.protobuf.message import Message

from selma import plugins
from selma.config import SelmaSettings
from selma.errors import InvalidArgument, PermissionDenied
from selma.storage import parse_uri

DIRS_SETTING = "SELMA_MODEL_ALLOWED_DIRS"
BUCKETS_SETTING = "SELMA_MODEL_ALLOWED_BUCKETS"

# org/name or name: what the hub takes; anything else that is not a URI is read as a path by the loaders.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_BUILTIN_SCHEMES = ("tiny://",)

MODEL_REF = "selma.v1.ModelRef"
ARTIFACT_REF = "selma.v1.ArtifactRef"


def check_source(source: str, settings: SelmaSettings, *, field: str) -> None:
    """Refuse (PermissionDenied) a request's model/data source the service may not read; "" passes (the default)."""
    source = source.strip()
    if not source or source.startswith(_BUILTIN_SCHEMES) or plugins.registry().model_scheme(source) is not None:
        return
    if "://" in source:
        scheme = urlsplit(source).scheme.lower()
        if scheme == "s3":
            _check_bucket(source, settings, field=field)
            return
        if scheme == "file":
            _check_local(_file_uri_path(source, field=field), source, settings, field=field)
            return
        raise PermissionDenied(
            f"{source!r}: a request may name a hub id (org/name), s3://, file://, tiny:// or a registered scheme; "
            f"not {scheme}://",
            field=field,
        )
    if _HUB_ID.fullmatch(source) and ".." not in source and not os.path.lexists(source):
        return  # a hub id; one that is also a relative path on this host would be loaded from disk, so it is a path
    _check_local(source, source, settings, field=field)


def check_artifact_uri(uri: str, settings: SelmaSettings, *, field: str) -> None:
    """Refuse (PermissionDenied) an artifact URI outside the service's own artifact store; "" passes (resolve by id)."""
    uri = uri.strip().rstrip("/")
    if not uri:
        return
    root = settings.resolved_storage_uri
    inside = False
    try:
        parsed, own = parse_uri(uri, field=field), parse_uri(root, field="storage_uri")
    except InvalidArgument:
        parsed = own = None
    if parsed is not None and own is not None and parsed.scheme == own.scheme:
        if parsed.scheme == "s3":
            inside = parsed.container == own.container and _under_key(parsed.prefix, own.prefix)
        else:
            inside = _under(Path(os.path.realpath(parsed.container)), Path(os.path.realpath(own.container)))
    if not inside:
        raise PermissionDenied(
            f"{uri!r} is not in this service's artifact store ({root}); name the artifact by id, or copy it into the store first",
            field=field,
        )


def check_request(msg: Message, settings: SelmaSettings, *, prefix: str = "") -> None:
    """Apply :func:`check_source` to every ``ModelRef`` and :func:`check_artifact_uri` to every ``ArtifactRef`` in ``msg``.

    Walks the message's set fields (nested messages, repeated fields, map values, oneofs); errors
    name the field as ``spec.settings.model.source``.
    """
    name = msg.DESCRIPTOR.full_name
    if name == MODEL_REF:
        for fld in ("source", "vae_source"):
            check_source(getattr(msg, fld), settings, field=_join(prefix, fld))
        return
    if name == ARTIFACT_REF:
        check_artifact_uri(msg.uri, settings, field=_join(prefix, "uri"))
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.full_name.startswith("google.protobuf."):
            continue
        path = _join(prefix, fd.name)
        if fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.message_type is not None:
                for key, item in value.items():
                    check_request(item, settings, prefix=f"{path}[{key!r}]")
        elif fd.is_repeated:
            for i, item in enumerate(value):
                check_request(item, settings, prefix=f"{path}[{i}]")
        else:
            check_request(value, settings, prefix=path)


def allowed_storage_dirs(settings: SelmaSettings) -> tuple[Path, ...]:
    """The directories a request may name local sources in: ``SELMA_MODEL_ALLOWED_DIRS`` and a file:// storage root."""
    dirs = list(settings.allowed_model_dirs)
    own = parse_uri(settings.resolved_storage_uri, field="storage_uri")
    if own.scheme == "file":
        dirs.append(Path(os.path.realpath(own.container)))
    return tuple(dirs)


# ------------------------------------------------------------------------------------ helpers


def _check_bucket(source: str, settings: SelmaSettings, *, field: str) -> None:
    bucket = parse_uri(source, field=field).container
    allowed = set(settings.allowed_model_buckets)
    own = parse_uri(settings.resolved_storage_uri, field="storage_uri")
    if own.scheme == "s3":
        allowed.add(own.container)
    if bucket not in allowed:
        raise PermissionDenied(
            f"bucket {bucket!r} is not one this service reads requests' sources from; an operator can add it to {BUCKETS_SETTING}",
            field=field,
        )


def _file_uri_path(source: str, *, field: str) -> str:
    parts = urlsplit(source)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise PermissionDenied(f"{source!r}: a file:// source is file:///absolute/path on the service's host", field=field)
    return unquote(parts.path)


def _check_local(path: str, source: str, settings: SelmaSettings, *, field: str) -> None:
    if "\x00" in path:
        raise InvalidArgument(f"{source!r} contains NUL", field=field)
    real = Path(os.path.realpath(os.path.expanduser(path)))  # what a loader would open: symlinks and '..' resolved
    if not any(_under(real, allowed) for allowed in allowed_storage_dirs(settings)):
        raise PermissionDenied(
            f"{source!r} is outside the directories this service may read requests' sources from; "
            f"an operator can add its directory to {DIRS_SETTING} (selma up --allow-model-dir DIR on the local stack)",
            field=field,
        )


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _under_key(prefix: str, root: str) -> bool:
    return not root or prefix == root or prefix.startswith(root + "/")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
