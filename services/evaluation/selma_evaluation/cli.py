"""``selma eval …``: faithfulness evaluation from the command line.

``selma eval dsg-score --template [--categories A,B] > answers.csv`` prints the answers file's skeleton;
``selma eval dsg-score --answers FILE`` scores yes/no answers produced elsewhere on DSG-1k: FILE is
a UTF-8 CSV with the columns ``item_id,question_id,answer``, one row per DSG-1k question; as the DSG
reference scorer, any answer other than yes (blank, "unanswerable", ...) fails its question, and
such answers are counted per category (``--strict`` refuses them).  It prints per-category and
overall scores (mean over prompts and question-level micro-average, percent with one decimal) as a
table, or as JSON with ``--json``.

Each action is one ``_add_<action>`` function registering its parser and one function running it;
heavy modules are imported inside the actions, so ``selma --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``selma eval`` and its actions to the top-level subparsers."""
    p = sub.add_parser("eval", help="faithfulness evaluation (DSG / TIFA-style question answering)")
    actions = p.add_subparsers(dest="eval_command", metavar="COMMAND", required=True)
    _add_dsg_score(actions)
    from selma_evaluation.commands import add_commands

    add_commands(actions)  # run, status, list, cancel, report, execute


# --------------------------------------------------------------------------- dsg-score


def _add_dsg_score(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "dsg-score",
        help="score yes/no answers to the DSG-1k questions (per category and overall)",
        description="Score yes/no VQA answers to the DSG-1k questions with the DSG dependency rule. "
        "The answers file is a UTF-8 CSV whose header names item_id, question_id and answer (other columns "
        "are ignored), with exactly one row per question. As in the DSG reference scorer, an answer other than "
        "yes (case and spaces ignored) fails its question: blank and free-form answers (e.g. unanswerable) "
        "are scored as failed and counted per category.",
    )
    p.add_argument("--answers", type=Path, default=None, metavar="FILE", help="answers CSV (item_id,question_id,answer); required unless --template")
    p.add_argument("--template", action="store_true",
                   help="print the answers CSV skeleton instead (one row per question of the benchmark or --categories, "
                   "answer left empty; the extra category/prompt/question columns are ignored when scoring)")
    p.add_argument("--categories", default="", metavar="A,B",
                   help="score only these DSG-1k categories (comma-separated; only their questions are required)")
    p.add_argument("--rule", choices=("transitive", "direct"), default="transitive",
                   help="dependency rule: transitive (default; a question needs all its ancestors answered yes) "
                   "or direct (the DSG reference code's: only its parents' own answers count)")
    p.add_argument("--strict", action="store_true",
                   help="refuse the file if any answer is other than yes or no (blank, unanswerable, ...)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_dsg_score)


def _dsg_score(args: argparse.Namespace) -> int:
    from selma.errors import InvalidArgument
    from selma_evaluation import dsg

    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    try:
        items = dsg.load_dsg1k(categories)
    except InvalidArgument as e:
        raise InvalidArgument(e.message, field="--categories") from None
    if args.template:
        sys.stdout.write(dsg.answers_template(items))
        return 0
    if args.answers is None:
        raise InvalidArgument("give --answers FILE (a CSV with item_id,question_id,answer), or --template to print its skeleton",
                              field="--answers")
    answers = dsg.read_answers_file(args.answers, items, all_items=dsg.load_dsg1k(), strict=args.strict)
    table = dsg.score_dsg(answers.samples, rule=args.rule)
    if args.json:
        sys.stdout.write(json.dumps(dsg.summary_dict(table, args.rule, answers=answers), indent=2) + "\n")
    else:
        sys.stdout.write(dsg.format_table(table))
        counts = dsg.format_answer_counts(answers)
        if counts:
            sys.stdout.write("\n" + counts)
    return 0
