"""Conversions between the shared ``selma.v1`` protobuf messages and the core's domain types.

Servicers are glue: they call these to turn requests into plain Python (specs as dicts,
filters as keyword arguments, enums as short names: :func:`enum_name`) and job
records/manifests back into protobuf.  The five job RPCs themselves are written once, in
:mod:`selma.job_rpcs`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp

from selma.artifacts import ArtifactKind, Manifest
from selma.errors import InvalidArgument
from selma.jobs import JobPhase, JobRecord, OutputRef
from selma.v1 import common_pb2

M = TypeVar("M", bound=Message)


# -- enums ------------------------------------------------------------------------------------
#
# Every selma.v1 enum spells its values <PREFIX>_<NAME> with <PREFIX>_UNSPECIFIED = 0
# (tests/unit/test_api.py holds the API to that); the domain side uses the short lower-case
# <name> ("ddim", "ties", "fp16") and "" for UNSPECIFIED.


def _enum_descriptor(enum_type: Any) -> EnumDescriptor:
    return enum_type if isinstance(enum_type, EnumDescriptor) else enum_type.DESCRIPTOR


def enum_prefix(enum_type: Any) -> str:
    """The prefix of an enum's value names, e.g. ``"SCHEDULER_"`` for ``selma.v1.Scheduler``."""
    return _enum_descriptor(enum_type).values_by_number[0].name.removesuffix("UNSPECIFIED")


def enum_value(enum_type: Any, value: int | str | None, *, field: str = "") -> int:
    """A proto enum value, given any of its spellings, as its number.

    ``enum_type`` is the generated enum (``common_pb2.Scheduler``) or its descriptor.  ``value``
    may be the number, the proto name (``"SCHEDULER_DDIM"``, what proto JSON writes) or the
    short name (``"ddim"``, any case, ``-`` for ``_``); None, ``""``, 0 and UNSPECIFIED in any
    spelling are 0.  Anything else (an unknown number or name) is INVALID_ARGUMENT naming
    ``field`` (default: the enum's prefix in lower case, e.g. ``scheduler``) and the choices.
    """
    desc = _enum_descriptor(enum_type)
    prefix = enum_prefix(desc)
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        if value in desc.values_by_number:
            return value
    elif isinstance(value, str):
        name = value.strip().upper().replace("-", "_")
        v = desc.values_by_name.get(name if name.startswith(prefix) else prefix + name)
        if v is not None:
            return v.number
    field = field or prefix.lower().rstrip("_")
    choices = ", ".join(v.name.removeprefix(prefix).lower() for v in desc.values if v.number)
    raise InvalidArgument(f"unknown {field} {value!r}; use one of: {choices}", field=field)


def enum_name(enum_type: Any, value: int | str | None, *, field: str = "") -> str:
    """A proto enum value, given any of its spellings, as its short lower-case name: ``"ddim"``.

    UNSPECIFIED is ``""``; what :func:`enum_value` accepts and refuses, this does too.
    """
    number = enum_value(enum_type, value, field=field)
    if not number:
        return ""
    desc = _enum_descriptor(enum_type)
    return desc.values_by_number[number].name.removeprefix(enum_prefix(desc)).lower()


def enum_proto_name(enum_type: Any, value: int | str | None, *, field: str = "") -> str:
    """A proto enum value, given any of its spellings, as proto JSON writes it: ``"SCHEDULER_DDIM"``.

    UNSPECIFIED is ``"SCHEDULER_UNSPECIFIED"``; what :func:`enum_value` accepts and refuses, this does too.
    """
    return _enum_descriptor(enum_type).values_by_number[enum_value(enum_type, value, field=field)].name


# -- what the wire lets through and the API has no meaning for ---------------------------------
#
# proto3 enums are open: a client may send any int32 where an enum goes, and the number arrives
# as is.  Duration and Timestamp are plain (seconds, nanos) pairs on the wire whatever their
# documented range.  Both used to surface as ValueError/OverflowError deep in json_format (an
# INTERNAL).  :func:`check_request` refuses them once, for every request, at the server boundary.

DURATION_MAX_SECONDS = 315_576_000_000  # ±10,000 years, google/protobuf/duration.proto
TIMESTAMP_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z, google/protobuf/timestamp.proto
TIMESTAMP_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_NANOS_MAX = 999_999_999


_CHECKED_TYPES = (FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_MESSAGE)


def check_request(msg: Message, prefix: str = "") -> None:
    """Refuse a request holding an unknown enum number or an out-of-range Duration/Timestamp.

    Walks every set field of ``msg`` by its descriptor (nested messages, repeated fields and map
    values included), so a new field is covered without a line here.  The error is
    INVALID_ARGUMENT naming the field's path from the request, e.g. ``spec.prompt_set.kind``,
    ``filter.phases[1]``, ``min_interval``.
    """
    for fd, value in msg.ListFields():
        if fd.type not in _CHECKED_TYPES:
            continue  # strings, numbers, bytes: any value is well-formed here (limits are the services')
        path = prefix + fd.name
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.type not in _CHECKED_TYPES:
                continue
            for key in value:
                _check_value(value_fd, value[key], f"{path}[{_short_repr(key)}]")
        elif fd.is_repeated:
            for i, item in enumerate(value):
                _check_value(fd, item, f"{path}[{i}]")
        else:
            _check_value(fd, value, path)


def _check_value(fd: FieldDescriptor, value: Any, path: str) -> None:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        enum_value(fd.enum_type, value, field=path)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        name = fd.message_type.full_name
        if name == Duration.DESCRIPTOR.full_name:
            check_duration(value, path)
        elif name == Timestamp.DESCRIPTOR.full_name:
            check_timestamp(value, path)
        else:
            check_request(value, path + ".")


def check_duration(d: Duration, fld: str) -> None:
    """A ``google.protobuf.Duration`` within its documented range, or INVALID_ARGUMENT naming ``fld``."""
    s, n = d.seconds, d.nanos
    if not (-DURATION_MAX_SECONDS <= s <= DURATION_MAX_SECONDS and -_NANOS_MAX <= n <= _NANOS_MAX) or (s > 0 > n or s < 0 < n):
        raise InvalidArgument(
            f"is not a valid duration (seconds within ±{DURATION_MAX_SECONDS}, nanos within ±{_NANOS_MAX} "
            f"and of the same sign); got seconds={s}, nanos={n}",
            field=fld,
        )


def check_timestamp(t: Timestamp, fld: str) -> None:
    """A ``google.protobuf.Timestamp`` within 0001-01-01..9999-12-31 UTC, or INVALID_ARGUMENT naming ``fld``."""
    s, n = t.seconds, t.nanos
    if not (TIMESTAMP_MIN_SECONDS <= s <= TIMESTAMP_MAX_SECONDS and 0 <= n <= _NANOS_MAX):
        raise InvalidArgument(
            f"is not a valid timestamp (0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z, nanos in [0, {_NANOS_MAX}]); "
            f"got seconds={s}, nanos={n}",
            field=fld,
        )


def _short_repr(value: Any, limit: int = 40) -> str:
    """``value`` quoted for a field path, cut short so a huge map key cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_KIND_TO_PROTO = {k: enum_value(common_pb2.ArtifactKind, k.name) for k in ArtifactKind}
_PROTO_TO_KIND = {v: k for k, v in _KIND_TO_PROTO.items()}
_PHASE_TO_PROTO = {p: enum_value(common_pb2.JobPhase, p.name) for p in JobPhase}
_PROTO_TO_PHASE = {v: k for k, v in _PHASE_TO_PROTO.items()}


def message_to_dict(msg: Message) -> dict[str, Any]:
    """A spec message as a plain JSON-able dict (proto field names; unset fields omitted)."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def dict_to_message(data: Mapping[str, Any], cls: type[M]) -> M:
    """The inverse of :func:`message_to_dict`."""
    return json_format.ParseDict(dict(data), cls(), ignore_unknown_fields=True)


def struct_from(data: Mapping[str, Any]) -> Struct:
    s = Struct()
    s.update(_jsonable(data))
    return s


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def timestamp(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(dt)
    return ts


def artifact_kind_to_proto(kind: ArtifactKind | str) -> int:
    return _KIND_TO_PROTO[ArtifactKind(kind)]


def artifact_kind_from_proto(kind: int) -> ArtifactKind | None:
    return _PROTO_TO_KIND.get(kind)


def phase_from_proto(phase: int) -> JobPhase | None:
    return _PROTO_TO_PHASE.get(phase)


def artifact_ref(ref: OutputRef | Manifest | None) -> common_pb2.ArtifactRef | None:
    """An ArtifactRef for a job output or a manifest."""
    if ref is None:
        return None
    if isinstance(ref, Manifest):
        return common_pb2.ArtifactRef(
            id=ref.id, kind=artifact_kind_to_proto(ref.kind), uri=ref.uri, sha256=ref.digest
        )
    kind = artifact_kind_to_proto(ref.kind) if ref.kind else common_pb2.ARTIFACT_KIND_UNSPECIFIED
    return common_pb2.ArtifactRef(id=ref.id, kind=kind, uri=ref.uri, sha256=ref.sha256)


def output_ref(manifest: Manifest) -> OutputRef:
    """A job output pointing at a published artifact."""
    return OutputRef(id=manifest.id, kind=manifest.kind.value, uri=manifest.uri, sha256=manifest.digest)


def manifest_to_proto(m: Manifest) -> common_pb2.ArtifactManifest:
    out = common_pb2.ArtifactManifest(
        id=m.id,
        kind=artifact_kind_to_proto(m.kind),
        uri=m.uri,
        sha256=m.digest,
        size_bytes=m.size,
        producer=m.producer.name,
        producer_version=m.producer.version,
        parent_ids=list(m.parents),
        run=m.labels.get("selma.dev/run", ""),
        skill=m.labels.get("selma.dev/skill", ""),
    )
    out.created_at.CopyFrom(timestamp(m.created_at))
    out.parameters.CopyFrom(struct_from(m.parameters))
    return out


def job_status(rec: JobRecord) -> common_pb2.JobStatus:
    """The shared JobStatus message for a job record."""
    p = rec.progress
    progress = common_pb2.Progress(done=p.done, total=p.total, unit=p.unit, rate_per_second=p.rate_per_second)
    if p.eta_seconds is not None:
        progress.eta.FromMilliseconds(int(p.eta_seconds * 1000))
    status = common_pb2.JobStatus(
        job_id=rec.job_id,
        idempotency_key=rec.idempotency_key,
        phase=_PHASE_TO_PROTO[rec.phase],
        progress=progress,
        message=rec.message,
        details=rec.details,
        attempt=rec.attempt,
        warnings=rec.warnings,
        queue_position=rec.queue_position,
    )
    if rec.output is not None:
        status.output.CopyFrom(artifact_ref(rec.output))
    for name in ("created_at", "started_at", "updated_at", "finished_at"):
        ts = timestamp(getattr(rec, name))
        if ts is not None:
            getattr(status, name).CopyFrom(ts)
    if rec.error is not None:
        status.error.CopyFrom(
            common_pb2.JobError(
                code=grpc.StatusCode[rec.error.code].value[0], reason=rec.error.reason, message=rec.error.message
            )
        )
    return status


def filter_kwargs(f: common_pb2.JobFilter) -> dict[str, Any]:
    """JobManager.list keyword arguments for a JobFilter."""
    phases = {p for p in (phase_from_proto(x) for x in f.phases) if p is not None}
    return {
        "run": f.run,
        "skill": f.skill,
        "phases": phases or None,
        "labels": dict(f.labels),
        "idempotency_key": f.idempotency_key,
    }


def generated_image(img: Any) -> common_pb2.GeneratedImage:
    """The GeneratedImage message for any rendered image (render previews, serving responses)."""
    return common_pb2.GeneratedImage(
        png=img.png,
        seed=img.seed,
        prompt=img.prompt,
        prompt_index=img.prompt_index,
        image_index=img.image_index,
        width=img.width,
        height=img.height,
    )
