"""selma: SELMA skill experts on auto-generated data, as gRPC services.

One entry point; each subcommand is registered by the module that owns it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import grpc

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
    "selma.app.cli_docs",
    "selma.app.auth_cli",
)
# Per-service command modules (``services/<name>/selma_<name>/cli.py``); absent ones are skipped.
# Plugins (testbeds) add theirs through selma.plugins.
_SERVICE_COMMAND_MODULES = ("selma_prompts.cli", "selma_render.cli", "selma_training.cli", "selma_serving.cli", "selma_evaluation.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selma", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"selma {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of a failure (default: one line)")
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
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"selma: error: {e}\n")
        return 2
    except grpc.RpcError as e:
        # A service's answer (or no answer): one line naming the call, the address and what to do.
        if args.debug:
            traceback.print_exc()
        sys.stderr.write(f"selma: error: {describe_rpc_error(e, args.command)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("selma: interrupted\n")
        return 130


# What to do about a failed call, by status code.
_RPC_HINTS = {
    "UNAVAILABLE": "is `selma up` running there? Check the endpoints (--endpoints, --dir or SELMA_ENDPOINTS)",
    "DEADLINE_EXCEEDED": "the service did not answer in time; check that it is up and its log",
    "NOT_FOUND": "check the name or id (`selma models list`, `selma experts list`, `selma artifacts list`, `selma runs`)",
    "INVALID_ARGUMENT": "fix the argument the message names",
    "UNIMPLEMENTED": "that address does not serve this selma API; check the endpoints",
    "PERMISSION_DENIED": "when it names a scope, use a token that has it (--token or SELMA_TOKEN; `selma auth token` mints one); otherwise check the service's own credentials",
    "UNAUTHENTICATED": "pass a valid token with --token or SELMA_TOKEN (`selma auth token` mints one; `selma up --tls` stores one in <dir>/token)",
}


def describe_rpc_error(e: grpc.RpcError, command: str = "") -> str:
    """One line for a failed gRPC call: which command, which service at which address, its answer, what to do."""
    code = e.code() if callable(getattr(e, "code", None)) else None
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    from selma.client import last_target  # only here: worker commands (selma train, eval execute) never load the SDK

    name = code.name if code is not None else "an error"
    service, address = last_target()
    where = f"the {service} service at {address}" if address else "the service"
    hint = _RPC_HINTS.get(name, "see the service's log (`selma up` keeps them in <dir>/logs)")
    if name == "UNAVAILABLE" and any(w in str(details or "") for w in ("SSL", "ssl", "certificate", "handshake", "TLS")):
        hint = "the TLS handshake failed: check --ca-cert / SELMA_TLS_CA (the CA that signed the service's certificate) and, for mutual TLS, --client-cert/--client-key"
    what = f"`selma {command}` failed: " if command else ""
    return f"{what}{where} answered {name}: {' '.join(str(details or '').split())}; {hint}"


if __name__ == "__main__":
    raise SystemExit(main())
