"""``selma artifacts``: list, show and trace artifacts in any storage URI."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from selma.artifacts import ArtifactStore
from selma.config import SelmaSettings
from selma.storage import open_storage


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("artifacts", help="list, show and trace artifacts")
    asub = p.add_subparsers(dest="artifacts_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage", default="", help="artifact root URI (default: SELMA_STORAGE_URI or .selma/storage)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ls = asub.add_parser("list", parents=[common], help="list published artifacts")
    ls.add_argument("--kind", default=None, help="only this kind (prompt_set, image_dataset, expert, ...)")
    ls.set_defaults(func=_list)

    show = asub.add_parser("show", parents=[common], help="print one artifact's manifest")
    show.add_argument("ref", help="artifact id or alias")
    show.set_defaults(func=_show)

    lin = asub.add_parser("lineage", parents=[common], help="walk an artifact's ancestors back to its prompts")
    lin.add_argument("ref", help="artifact id or alias")
    lin.set_defaults(func=_lineage)


def _store(args: argparse.Namespace) -> ArtifactStore:
    settings = SelmaSettings()
    return ArtifactStore(open_storage(settings, args.storage or None))


def _table(manifests, title: str) -> Table:  # noqa: ANN001
    t = Table(title=title)
    for col in ("id", "kind", "files", "bytes", "created", "parents"):
        t.add_column(col)
    for m in manifests:
        t.add_row(m.id, m.kind.value, str(len(m.files)), str(m.size), m.created_at.strftime("%Y-%m-%d %H:%M:%S"), ", ".join(m.parents))
    return t


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    manifests = store.list(args.kind)
    if args.json:
        Console().print_json(json.dumps([m.model_dump(mode="json") for m in manifests]))
    else:
        Console().print(_table(manifests, f"artifacts in {store.uri}"))
    return 0


def _show(args: argparse.Namespace) -> int:
    Console().print_json(_store(args).resolve(args.ref).model_dump_json())
    return 0


def _lineage(args: argparse.Namespace) -> int:
    store = _store(args)
    chain = store.lineage(store.resolve(args.ref).id)
    if args.json:
        Console().print_json(json.dumps([m.model_dump(mode="json") for m in chain]))
    else:
        Console().print(_table(chain, f"lineage of {args.ref}"))
    return 0
