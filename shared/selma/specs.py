"""Turning API messages (proto-JSON dicts) into typed values: one rule per kind of field, errors naming the field.

Every service, the SkillSet loader and the CLI parse request fields with these, so the same bad
value is refused with the same message whichever way it came in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from selma.errors import InvalidArgument


def parse_int(value: Any, fld: str, default: int = 0) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidArgument(f"must be an integer; got {value!r}", field=fld)
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"must be an integer; got {value!r}", field=fld) from None


def parse_float(value: Any, fld: str, default: float | None = None) -> float | None:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise InvalidArgument(f"must be a number; got {value!r}", field=fld)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"must be a number; got {value!r}", field=fld) from None
    if not math.isfinite(out):
        raise InvalidArgument(f"must be a finite number; got {value!r}", field=fld)
    return out


def parse_duration(value: Any, fld: str) -> float | None:
    """A protobuf JSON duration ("1.5s") or a number of seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        if not value.endswith("s"):
            raise InvalidArgument(f"must be a duration such as '30s'; got {value!r}", field=fld)
        value = value[:-1]
    return parse_float(value, fld)


def parse_str(value: Any, fld: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"must be a string; got {type(value).__name__}", field=fld)
    return value.strip()


def parse_mapping(value: Any, fld: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"must be an object; got {type(value).__name__}", field=fld)
    return value


def check_known_fields(d: Mapping[str, Any], allowed: set[str], fld: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise InvalidArgument(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}", field=fld)
