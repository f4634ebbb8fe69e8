"""Turning API messages (proto-JSON dicts) into typed values: one rule per kind of field, errors naming the field.

Every service, the SkillSet loader and the CLI parse request fields with these, so the same bad
value is refused with the same message whichever way it came in.
"""

from __future__ import annotations

import math
import re
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
    if not math.isfinite(out):  # the parsed value: proto-JSON spells NaN "NaN", YAML .nan, Python nan
        raise InvalidArgument(f"must be a finite number; got {out}", field=fld)
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


def parse_bool(value: Any, fld: str, default: bool = False) -> bool:
    if value is None or value == "":
        return default
    if not isinstance(value, bool):
        raise InvalidArgument(f"must be true or false; got {value!r}", field=fld)
    return value


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


# --- field rules shared by the services, the SkillSet loader and the CLI ---------------------------------

DEFAULT_ROUGE_L_THRESHOLD = 0.8  # SELMA's diversity filter: a candidate this close (ROUGE-L F) to an accepted prompt is dropped


def unit_interval(value: Any, fld: str, *, default: float) -> float:
    """A fraction in (0, 1]; unset or 0 means ``default`` (a proto3 double has no 'unset' but 0)."""
    x = parse_float(value, fld, 0.0)
    assert x is not None
    if x == 0:
        return default
    if not 0 < x <= 1:
        raise InvalidArgument(f"must be in (0, 1] (0 = default {default:g}); got {x:g}", field=fld)
    return x


def rouge_l_threshold(value: Any, fld: str = "spec.rouge_l_threshold") -> float:
    """``PromptGenerationSpec.rouge_l_threshold`` / SkillSet ``prompts.rougeLThreshold`` / ``--threshold``."""
    return unit_interval(value, fld, default=DEFAULT_ROUGE_L_THRESHOLD)


def expert_weights(weights: list[Any], fld: str = "experts.weight", *, max_abs: float | None = None, setting: str = "") -> list[float]:
    """Merge weights, one per expert (None = not set): every expert sets a finite weight or none does (then each gets 1/N).

    ``max_abs`` bounds |weight| (the service's ``setting``, e.g. ``serving_max_merge_weight``): a weight
    like 1e30 is finite but turns every image into noise or NaN.
    """
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise InvalidArgument("either every expert sets a weight or none does (then each gets 1/N)", field=fld)
    if not all(given):
        return [1.0 / len(weights)] * len(weights) if weights else []
    out = [float(w) for w in (parse_float(w, fld) for w in weights) if w is not None]
    if max_abs is not None:
        for w in out:
            bounded_weight(w, fld, max_abs, setting)
    return out


def bounded_weight(w: float, fld: str, max_abs: float, setting: str) -> float:
    """``w`` if |w| <= ``max_abs``; INVALID_ARGUMENT naming the limit's setting otherwise."""
    if not abs(w) <= max_abs:
        name = f"SELMA_{setting.upper()}=" if setting else ""
        raise InvalidArgument(f"|weight| must be at most {name}{max_abs:g}; got {w:g}", field=fld)
    return w


def density(value: Any, fld: str = "density") -> float:
    """A merge density (``MergeSpec.density``, merge-search candidates, SkillSet ``merge.density``): in (0, 1]; 0 = the service default."""
    x = parse_float(value, fld, 0.0)
    assert x is not None
    if x != 0 and not 0 < x <= 1:
        raise InvalidArgument(f"must be in (0, 1] (0 = the service default); got {x:g}", field=fld)
    return x


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_options(value: Any, fld: str) -> tuple[str, str]:
    """A ``selma.v1.DeviceOptions`` (proto-JSON): (device, precision short name); "" = the service's setting.

    Devices are what :func:`selma.pipelines.resolve_device` loads on: auto, cpu, cuda, cuda:N.
    """
    from selma.api import enum_name
    from selma.v1 import common_pb2

    d = parse_mapping(value, fld)
    check_known_fields(d, {"device", "precision"}, fld)
    device = parse_str(d.get("device"), f"{fld}.device").lower()
    if device and not _DEVICE.fullmatch(device):
        raise InvalidArgument(f"must be auto, cpu, cuda or cuda:N; got {device!r}", field=f"{fld}.device")
    return device, enum_name(common_pb2.Precision, d.get("precision"), field=f"{fld}.precision")


MAX_CANDIDATES_PER_PROMPT = 16


def gate_threshold(value: Any, fld: str = "spec.gate.threshold") -> float:
    """The gate's keep threshold (``GateSettings.threshold``): a DSG score in [0, 1]; unset = 1 (every question)."""
    x = parse_float(value, fld, 1.0)
    assert x is not None
    if not 0.0 <= x <= 1.0:
        raise InvalidArgument(f"must be a DSG score in [0, 1] (1 = every question passes); got {x:g}", field=fld)
    return x


def candidates_per_prompt(value: Any, fld: str = "spec.gate.candidates_per_prompt") -> int:
    """Best-of-K candidates per prompt (``GateSettings.candidates_per_prompt``): 1..16; 0 = 1."""
    k = parse_int(value, fld)
    if not 0 <= k <= MAX_CANDIDATES_PER_PROMPT:
        raise InvalidArgument(f"must be in 1..{MAX_CANDIDATES_PER_PROMPT} (0 = 1); got {k}", field=fld)
    return k or 1


def gate_budget(target: Any, budget: Any, fld: str = "spec.gate") -> tuple[int, int]:
    """(target_kept, max_candidates) of a gate: both >= 0, and a budget (when set) at least the target."""
    t = parse_int(target, f"{fld}.target_kept")
    b = parse_int(budget, f"{fld}.max_candidates")
    if t < 0:
        raise InvalidArgument(f"must be >= 0 (0 = no target); got {t}", field=f"{fld}.target_kept")
    if b < 0:
        raise InvalidArgument(f"must be >= 0 (0 = prompts x candidates_per_prompt); got {b}", field=f"{fld}.max_candidates")
    if b and b < t:
        raise InvalidArgument(f"must be >= target_kept ({t}): the budget cannot reach the target; got {b}", field=f"{fld}.max_candidates")
    return t, b
