"""``selma artifacts``: list, show and trace artifacts in any storage URI.

The store is named like everywhere else (``--storage URI`` or ``--dir DIR``, see
:mod:`selma.cli_options`); a ``file://`` store that does not exist is an error, not an empty table.
"""

from __future__ import annotations

import argparse

from selma.artifacts import ArtifactStore
from selma.cli_options import add_output_options, add_store_options, print_record, print_rows, storage_uri
from selma.config import SelmaSettings
from selma.storage import open_storage

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
