"""selma: SELMA skill experts on auto-generated data, as gRPC services.

One entry point; each subcommand is registered by the module that owns it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from selma import __version__, plugins
from selma.errors import SelmaError
from selma.logs import configure_logging, quiet_third_party

# Modules exposing ``register(subparsers)``; each adds its own subcommand tree.
_COMMAND_MODULES = (
    "selma.app.models_cli",
    "selma.app.artifacts_cli",
    "selma.app.serve_cli",
    "selma.app.demo",
    "selma.app.local_stack",
    "selma.app.runner",
)
# Per-service command modules (``services/<name>/selma_<name>/cli.py``); absent ones are skipped.
# Plugins (testbeds) add theirs through selma.plugins.
_SERVICE_COMMAND_MODULES = ("selma_prompts.cli", "selma_render.cli", "selma_training.cli", "selma_serving.cli", "selma_evaluation.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selma", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"selma {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for name in _SERVICE_COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    for add in plugins.registry().commands:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except SelmaError as e:
        # A domain error is the user's to fix: say what, without a traceback.
        sys.stderr.write(f"selma: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("selma: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
