"""The options and formats every ``selma`` command shares, so the CLI has one grammar.

* **Output**: every command that lists or shows something takes ``--json`` (machine-readable, on
  stdout) and ``--plain`` (tab-separated lines with a header: no colours, boxes or live bars, for
  logs, ``grep`` and ``awk``); the default is a table.
* **The store**: ``--storage URI`` (an artifact root, ``file:///dir`` or ``s3://bucket/prefix``) and
  ``--dir DIR`` (the local stack's directory, whose ``storage/`` is the default root), resolved by
  one rule: ``--storage``, else ``SELMA_STORAGE_URI``, else ``<dir>/storage``.
* **Expert weights**: ``ID=WEIGHT`` pairs, comma-separated (``quickstart/counting=0.7,quickstart/spatial=0.3``);
  an ``ID`` is an expert artifact id or ``<run>/<skill>``; either every expert has a weight or none has
  (then each gets 1/N).

They live in the library (not ``selma.app``) because service packages register CLI commands too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from selma.errors import InvalidArgument, NotFound

EXPERT_WEIGHTS_SYNTAX = "ID=WEIGHT,ID=WEIGHT (e.g. quickstart/counting=0.7,quickstart/spatial=0.3; ids or <run>/<skill>)"
DEFAULT_DIR = ".selma"


# ------------------------------------------------------------------------------------------- output


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--plain`` (mutually exclusive); the default is a table."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="print JSON (for programs)")
    group.add_argument("--plain", action="store_true", help="print tab-separated lines with a header (no colours, boxes or live bars)")


def print_rows(
    args: argparse.Namespace,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str = "",
    records: Any = None,
    out: IO[str] | None = None,
) -> None:
    """One listing in the format the options chose: a rich table, tab-separated lines, or JSON.

    ``records`` is what ``--json`` prints (default: one object per row, keyed by column).
    """
    out = out or sys.stdout
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    if getattr(args, "json", False):
        data = records if records is not None else [dict(zip(columns, r, strict=True)) for r in rows]
        out.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    if getattr(args, "plain", False):
        out.write("\t".join(columns) + "\n")
        for r in rows:
            out.write("\t".join(c.replace("\t", " ").replace("\n", " ") for c in r) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console(file=out, soft_wrap=True).print(table)


def print_record(args: argparse.Namespace, fields: dict[str, Any], *, title: str = "", record: Any = None, out: IO[str] | None = None) -> None:
    """One object (a manifest, a job): ``field  value`` lines, tab-separated lines, or JSON (``record``, default ``fields``)."""
    if getattr(args, "json", False):
        (out or sys.stdout).write(json.dumps(record if record is not None else fields, indent=2, default=str) + "\n")
        return
    print_rows(args, ("field", "value"), [(k, _cell(v)) for k, v in fields.items()], title=title, out=out)


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return "" if value is None else str(value)


# -------------------------------------------------------------------------------------------- store


def add_store_options(parser: argparse.ArgumentParser, *, storage: bool = True, directory: bool = True) -> None:
    """``--storage URI`` and ``--dir DIR``, named and documented alike on every command."""
    if storage:
        parser.add_argument("--storage", default="", metavar="URI",
                            help="artifact root, file:///dir or s3://bucket/prefix (default: SELMA_STORAGE_URI, else <dir>/storage)")
    if directory:
        parser.add_argument("--dir", default=DEFAULT_DIR, help=f"local stack directory: endpoints.json, runs/, storage/ (default {DEFAULT_DIR})")


def storage_uri(args: argparse.Namespace, settings: Any, *, must_exist: bool = True) -> str:
    """The artifact root a command reads: ``--storage``, else ``SELMA_STORAGE_URI``, else ``<dir>/storage``.

    With ``must_exist`` a ``file://`` root that does not exist is NOT_FOUND (a mistyped path would
    otherwise read as an empty store).
    """
    uri = getattr(args, "storage", "") or settings.storage_uri or (Path(getattr(args, "dir", "") or DEFAULT_DIR) / "storage").resolve().as_uri()
    uri = uri.rstrip("/")
    if must_exist and uri.startswith("file://"):
        from selma.storage import parse_uri

        root = Path(parse_uri(uri, field="storage").container)
        if not root.is_dir():
            raise NotFound(
                f"no artifact storage at {uri}: {root} does not exist; check --storage, --dir or SELMA_STORAGE_URI "
                "(`selma up --dir DIR` keeps its storage in DIR/storage)",
                field="--storage",
            )
    return uri


# ----------------------------------------------------------------------------------- expert weights


def parse_expert_weights(text: str, flag: str = "--experts") -> list[tuple[str, float | None]]:
    """``ID=WEIGHT,ID=WEIGHT`` (or ``ID,ID`` for 1/N each) → [(id, weight or None)], by the merge's weight rule.

    Any other form (``ID:WEIGHT``, an empty id, a weight that is not a number) is refused with the syntax.
    """
    from selma.specs import expert_weights

    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or not all(parts):
        raise InvalidArgument(f"{flag} {text!r} is not a list of expert weights; use {EXPERT_WEIGHTS_SYNTAX}", field=flag)
    out: list[tuple[str, float | None]] = []
    for part in parts:
        eid, eq, w = part.partition("=")
        eid, w = eid.strip(), w.strip()
        hint = f"{flag}: {part!r} is not ID=WEIGHT; use {EXPERT_WEIGHTS_SYNTAX}"
        if not eid or ":" in eid or (eq and not w):
            raise InvalidArgument(hint, field=flag)
        if not eq:
            out.append((eid, None))
            continue
        try:
            out.append((eid, float(w)))
        except ValueError:
            raise InvalidArgument(hint, field=flag) from None
    expert_weights([w for _, w in out], fld=flag)  # every expert has a weight or none has; finite
    return out
