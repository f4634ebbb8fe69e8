"""``selma docs cli``: the CLI reference (``docs/cli.md``) rendered from the CLI's own parser.

Hidden from ``selma --help``.  ``make cli-docs`` (or ``selma docs cli --out docs/cli.md``) rewrites the
file; ``tests/unit/test_cli_grammar.py`` fails when the file differs from what the parser says.
The rendering is fixed-width and ignores the terminal, so it is the same on every machine.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

WIDTH = 100
HEADER = (
    "# selma CLI reference\n\n"
    "<!-- generated from the CLI's parser by `make cli-docs` (selma docs cli --out docs/cli.md); do not edit by hand -->\n\n"
    "Shared grammar: listings and status commands take `--json` (for programs) and `--plain` (tab-separated lines); "
    "the store is `--storage URI` or `--dir DIR` (its `storage/`); expert weights are `ID=WEIGHT,ID=WEIGHT` "
    "(`quickstart/counting=0.7,quickstart/spatial=0.3`) everywhere.\n"
)


def register(sub: argparse._SubParsersAction) -> None:
    # no help=: argparse then leaves the command out of `selma --help`
    p = sub.add_parser("docs", description="Render documentation generated from the code.")
    dsub = p.add_subparsers(dest="docs_command", metavar="WHAT", required=True)
    cli = dsub.add_parser("cli", help="the CLI reference in Markdown, from the parser")
    cli.add_argument("--out", type=Path, default=None, help="write here (default stdout)")
    cli.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from selma.app.cli import build_parser

    text = render(build_parser())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        sys.stderr.write(f"wrote {args.out}\n")
    else:
        sys.stdout.write(text)
    return 0


def render(parser: argparse.ArgumentParser) -> str:
    """Markdown for every visible command: its help, usage and options, depth first in the parser's order."""
    parts = [HEADER]
    for path, p, summary in _commands(parser, ["selma"]):
        parts.append(f"\n{'#' * min(len(path) + 1, 4)} `{' '.join(path)}`\n\n")
        text = summary or p.description or ""
        if text and path != ["selma"]:
            parts.append(" ".join(text.split()) + "\n\n")
        fmt = argparse.HelpFormatter(prog=" ".join(path), width=WIDTH)
        fmt.add_usage(p.usage, p._actions, p._mutually_exclusive_groups)
        parts.append("```\n" + fmt.format_help().strip() + "\n```\n")
        rows = [_option_row(a) for a in p._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._SubParsersAction)]
        rows = [r for r in rows if r]
        if rows:
            parts.append("\n| argument | meaning |\n|---|---|\n" + "".join(f"| {a} | {m} |\n" for a, m in rows))
    return "".join(parts)


def _commands(parser: argparse.ArgumentParser, path: list[str], summary: str = "") -> Iterator[tuple[list[str], argparse.ArgumentParser, str]]:
    yield path, parser, summary
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        visible = {c.dest: c.help or "" for c in action._choices_actions}  # commands listed by --help
        for name, child in action.choices.items():
            if name in visible:
                yield from _commands(child, [*path, name], visible[name])


def _option_row(action: argparse.Action) -> tuple[str, str] | None:
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    if action.option_strings:
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or (action.dest.upper())
            flags += f" `{metavar if isinstance(metavar, str) else ' '.join(metavar)}`"
    else:
        flags = f"`{action.metavar or action.dest}`"
    meaning = " ".join((action.help or "").split()).replace("|", "\\|")
    if action.choices and not isinstance(action.choices, dict):
        meaning += f" (one of: {', '.join(str(c) for c in action.choices)})"
    if "%(default)" in meaning:
        meaning = meaning.replace("%(default)s", str(action.default))
    return flags, meaning
