"""``selma artifacts``: list, show and trace artifacts in any storage URI; collect garbage through the serving service."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from selma.api import enum_name
from selma.artifacts import ArtifactStore
from selma.client import Endpoints, SelmaClient
from selma.config import SelmaSettings
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as serving_pb


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

    gc = asub.add_parser(
        "gc",
        help="remove what nothing retained references (through the serving service)",
        description="Ask the serving service to collect garbage: published artifacts no registered model, job or retained "
        "artifact references, staging leftovers and orphaned job scratch older than its grace period. Never anything a "
        "pending or running job uses.",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    gc.add_argument("--dir", default=".selma", help="state directory holding endpoints.json (default .selma)")
    gc.add_argument("--endpoints", default="", help="endpoints file (default <dir>/endpoints.json or SELMA_ENDPOINTS)")
    gc.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the collection (default 3600)")
    gc.add_argument("--json", action="store_true", help="print the response as JSON")
    gc.set_defaults(func=_gc)


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


def print_removed(console: Console, items, verb: str) -> None:  # noqa: ANN001 - repeated RemovedItem
    """One line per RemovedItem (CollectGarbage, DeleteRun): plain, so ids are never cut and lines grep well."""
    for r in items:
        what = enum_name(serving_pb.RemovedItemType, r.type)
        kind = f" {enum_name(common_pb2.ArtifactKind, r.kind)}" if r.kind else ""
        console.print(f"{verb} {what}{kind} {r.key} ({r.size_bytes} bytes): {r.reason}", highlight=False)


def _gc(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToJson

    console = Console(soft_wrap=True)
    with SelmaClient(Endpoints.for_cli(args.endpoints, args.dir)) as client, console.status("collecting garbage ..."):
        resp = client.collect_garbage(dry_run=args.dry_run, timeout=args.timeout)
    if args.json:
        console.print_json(MessageToJson(resp))
        return 0
    verb = "would remove" if resp.dry_run else "removed"
    print_removed(console, resp.removed, verb)
    console.print(
        f"gc{' (dry run)' if resp.dry_run else ''}: {verb} {resp.removed_count} item(s), {resp.bytes_freed} bytes; "
        f"{resp.retained_artifacts} artifact(s) retained; grace period {resp.grace_period.seconds} s"
        + (f"; kept {len(resp.skipped)} a job started using meanwhile" if resp.skipped else ""),
        highlight=False,
    )
    return 0
