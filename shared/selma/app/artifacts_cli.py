"""``selma artifacts``: list, show and trace artifacts in any storage URI; collect garbage through the serving service.

The store is named like everywhere else (``--storage URI`` or ``--dir DIR``, see
:mod:`selma.cli_options`); a ``file://`` store that does not exist is an error, not an empty table.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from selma.api import enum_name
from selma.artifacts import ArtifactStore
from selma.cli_options import add_output_options, add_store_options, print_record, print_rows, storage_uri
from selma.client import SelmaClient, add_client_arguments
from selma.config import SelmaSettings
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as serving_pb

DIGEST_CHARS = 12  # as shown in tables; --json has the whole digest


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("artifacts", help="list, show and trace artifacts")
    asub = p.add_subparsers(dest="artifacts_command", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    add_store_options(common)
    add_output_options(common)

    ls = asub.add_parser("list", parents=[common], help="list published artifacts with their aliases and digests")
    ls.add_argument("--kind", default=None, help="only this kind (prompt_set, image_dataset, expert, ...)")
    ls.set_defaults(func=_list)

    show = asub.add_parser("show", parents=[common], help="show one artifact's manifest (--json: the manifest itself)")
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
    add_store_options(gc, storage=False)
    gc.add_argument("--endpoints", default="", help="endpoints file (default <dir>/endpoints.json or SELMA_ENDPOINTS)")
    add_client_arguments(gc)
    gc.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the collection (default 3600)")
    add_output_options(gc)
    gc.set_defaults(func=_gc)


def _store(args: argparse.Namespace) -> ArtifactStore:
    settings = SelmaSettings()
    return ArtifactStore(open_storage(settings, storage_uri(args, settings)))


_COLUMNS = ("id", "alias", "kind", "digest", "files", "bytes", "created", "parents")


def _rows(manifests, aliases: dict[str, list[str]]) -> list[tuple]:  # noqa: ANN001
    return [
        (m.id, ", ".join(aliases.get(m.id, [])), m.kind.value, m.digest[:DIGEST_CHARS], len(m.files), m.size,
         m.created_at.strftime("%Y-%m-%d %H:%M:%S"), ", ".join(m.parents))
        for m in manifests
    ]


def _aliases(store: ArtifactStore) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for a in store.list_aliases():
        out.setdefault(a.artifact_id, []).append(a.name)
    return out


def _records(manifests, aliases: dict[str, list[str]]) -> list[dict]:  # noqa: ANN001
    return [m.model_dump(mode="json") | {"aliases": aliases.get(m.id, [])} for m in manifests]


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    manifests = store.list(args.kind)
    aliases = _aliases(store)
    print_rows(args, _COLUMNS, _rows(manifests, aliases), title=f"artifacts in {store.uri}", records=_records(manifests, aliases))
    return 0


def _show(args: argparse.Namespace) -> int:
    store = _store(args)
    m = store.resolve(args.ref)
    aliases = _aliases(store).get(m.id, [])
    fields = {
        "id": m.id, "kind": m.kind.value, "aliases": aliases, "digest": m.digest, "uri": m.uri,
        "created": m.created_at.strftime("%Y-%m-%d %H:%M:%S"), "producer": m.producer.model_dump(mode="json"),
        "parents": m.parents, "name": m.name or "", "labels": m.labels, "parameters": m.parameters,
        "files": [f"{f.path} ({f.size} bytes)" for f in m.files],
    }
    print_record(args, fields, title=f"artifact {m.id}", record=m.model_dump(mode="json") | {"aliases": aliases})
    return 0


def _lineage(args: argparse.Namespace) -> int:
    store = _store(args)
    chain = store.lineage(store.resolve(args.ref).id)
    aliases = _aliases(store)
    print_rows(args, _COLUMNS, _rows(chain, aliases), title=f"lineage of {args.ref}", records=_records(chain, aliases))
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
    with SelmaClient.for_cli(args) as client, console.status("collecting garbage ..."):
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
