"""``selma serve NAME``: run one service in the foreground (the container entrypoint of each Deployment)."""

from __future__ import annotations

import argparse
import importlib

from selma.errors import FailedPrecondition

SERVICES = ("prompts", "render", "training", "serving")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one selma service (settings from SELMA_* variables)")
    p.add_argument("service", choices=SERVICES, help="which service")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module(f"selma_{args.service}.server")
    except ModuleNotFoundError as e:
        if e.name != f"selma_{args.service}.server":
            raise
        module = None
    main = getattr(module, "main", None)
    if main is None:
        raise FailedPrecondition(f"the {args.service} service has no server entry point in this build")
    return int(main() or 0)
