"""``selma auth token``: mint a bearer token for the services and the tokens-file entry that admits it.

The token is printed once and never stored here; the entry holds only its sha256, so the tokens
file (a Kubernetes Secret on a cluster, ``SELMA_AUTH_TOKENS_FILE``) reveals no token.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from selma.auth import SCOPES, add_token_entry, mint_token, parse_scopes, token_entry


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("auth", help="access control: mint bearer tokens for the services")
    asub = p.add_subparsers(dest="auth_command", metavar="SUBCOMMAND", required=True)
    t = asub.add_parser("token", help="print a fresh random token (once) and its tokens-file entry (sha256 only)")
    t.add_argument("--name", required=True, help="who the token is for; logs and metrics name calls by it (e.g. app-frontend)")
    t.add_argument("--scopes", required=True, help=f"comma-separated scopes: {', '.join(SCOPES)} (admin implies all)")
    t.add_argument("--add-to", default="", metavar="FILE", help="also add the entry to this tokens file (YAML, or JSON by suffix; created if missing)")
    t.set_defaults(func=_token)


def _token(args: argparse.Namespace) -> int:
    scopes = parse_scopes(args.scopes, field="scopes")
    token = mint_token()
    entry = token_entry(args.name, token, scopes)
    if args.add_to:
        add_token_entry(args.add_to, entry)
    out = sys.stdout
    out.write(f"token for {args.name} (shown only now; clients send it as SELMA_TOKEN or --token):\n{token}\n\n")
    out.write("tokens-file entry (the services read the files SELMA_AUTH_TOKENS_FILE names):\n")
    out.write(yaml.safe_dump({"tokens": [entry]}, sort_keys=False, default_flow_style=None))
    if args.add_to:
        out.write(f"added to {args.add_to}\n")
    return 0
