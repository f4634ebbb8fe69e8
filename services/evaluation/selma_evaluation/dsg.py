"""DSG (Davidsonian Scene Graph) scoring and the DSG-1k benchmark.

* :func:`load_dsg1k` reads DSG-1k (1,060 prompts, 8,182 yes/no questions with dependencies), shipped
  with this package under ``data/`` together with its Apache-2.0 license (:func:`dsg1k_license`).
* :func:`question_scores` applies the dependency rule to one answered image;
  :func:`score_dsg` aggregates answered images into a :class:`~selma_evaluation.types.ScoreTable`
  with both averages: the mean over prompts (the DSG standard) and the question-level micro-average
  (what SELMA's evaluation script printed).
* :func:`read_answers_file` parses and validates the answers CSV of ``selma eval dsg-score``;
  :func:`summary_dict` / :func:`format_table` render a score table for people and programs.

Answers files are scored as they are released with published DSG results: an answer is "yes"
(case and spaces ignored) or it fails its question, as in the DSG reference scorer; blank cells
and free-form answers ("unanswerable", "a dog") are failed questions and are counted per category
(:class:`AnswerCounts`).  ``strict=True`` refuses them instead.

The dependency rule (``rule="transitive"``, the default): a question scores 1 iff it is answered
"yes" and every question it depends on scores 1.  Unrolled, that is: a question scores 1 iff it
and every question it depends on, directly or through other questions, is answered "yes".  That
second form is what is computed; it needs no recursion and is well defined on the few cyclic
dependency graphs DSG-1k contains (e.g. ``diffusiondb_16``, where questions 7 and 11 depend on
each other through 6): all members of a cycle depend on each other, so a "no" anywhere in the
cycle zeroes all of them, and a cycle answered "yes" throughout scores 1.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from selma.errors import InvalidArgument, NotFound
from selma_evaluation.types import EvalItem, Question, ScoreTable, SliceScore

log = logging.getLogger(__name__)

BENCHMARK = "dsg-1k"
RULES = ("transitive", "direct")
ANSWER_COLUMNS = ("item_id", "question_id", "answer")

_PACKAGE = "selma_evaluation"
_ANNOTATIONS = "data/dsg-1k-anns.csv"
_LICENSE = "data/dsg-1k-LICENSE.txt"
_ITEM_NUMBER = re.compile(r"_\d+$")
# Problems of each kind quoted in an answers-file error; the rest are only counted.
_MAX_QUOTED = 10
# An answers file for all of DSG-1k is ~150 KB; anything this big is not one.
_MAX_ANSWERS_BYTES = 64 * 1024 * 1024

Sample = tuple[EvalItem, int, Mapping[str, bool]]


@dataclass
class AnswerCounts:
    """How the answers of one slice were spelled: yes, no, blank, or anything else ("other")."""

    yes: int = 0
    no: int = 0
    blank: int = 0
    other: int = 0

    def add(self, verdict: str) -> None:
        setattr(self, verdict, getattr(self, verdict) + 1)

    @property
    def unusual(self) -> int:
        """Answers that are neither yes nor no: each failed its question."""
        return self.blank + self.other


@dataclass
class AnswersFile:
    """A parsed answers file: one sample per scored item, and answer spellings per category and overall."""

    samples: list[Sample]
    per_category: dict[str, AnswerCounts] = field(default_factory=dict)
    overall: AnswerCounts = field(default_factory=AnswerCounts)


def answer_verdict(answer: str) -> str:
    """``yes``, ``no``, ``blank`` or ``other`` for an answer cell (case and spaces ignored)."""
    text = " ".join(answer.split()).lower()
    if text in ("yes", "no"):
        return text
    return "blank" if not text else "other"


# --------------------------------------------------------------------------- DSG-1k


def dsg1k_annotations_path() -> Traversable:
    """The shipped DSG-1k annotation CSV (package data of ``selma_evaluation``)."""
    return resources.files(_PACKAGE).joinpath(_ANNOTATIONS)


def dsg1k_license_path() -> Traversable:
    """The Apache-2.0 license DSG-1k is distributed under, shipped beside the annotations."""
    return resources.files(_PACKAGE).joinpath(_LICENSE)


def dsg1k_license() -> str:
    """The text of DSG-1k's license (Apache-2.0)."""
    return dsg1k_license_path().read_text(encoding="utf-8")


def item_category(item_id: str) -> str:
    """The DSG-1k source dataset of an item id: ``whoops_5`` → ``whoops``."""
    return _ITEM_NUMBER.sub("", item_id)


@functools.lru_cache(maxsize=1)
def _dsg1k() -> tuple[EvalItem, ...]:
    """All DSG-1k items in file order (parsed once per process)."""
    text = dsg1k_annotations_path().read_text(encoding="utf-8")
    rows_by_item: dict[str, list[dict[str, str]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        rows_by_item.setdefault(row["item_id"], []).append(row)
    items = []
    ignored = 0
    for item_id, rows in rows_by_item.items():
        ids = {row["proposition_id"].strip() for row in rows}
        questions = []
        for row in rows:
            qid = row["proposition_id"].strip()
            parents: list[str] = []
            for token in row["dependency"].split(","):
                token = token.strip()
                if token == "0":
                    continue
                # The file has a few noisy tokens ("5, right", "2, ground") and self-references
                # ("10" on question 10): keep only references to other questions of the item.
                if token.isdigit() and token in ids and token != qid:
                    if token not in parents:
                        parents.append(token)
                else:
                    ignored += 1
            questions.append(Question(
                id=qid,
                text=row["question_natural_language"].strip(),
                parents=tuple(parents),
                category=row["category_broad"].strip(),
                detail=row["category_detailed"].strip(),
                tuple=row["tuple"].strip(),
            ))
        items.append(EvalItem(id=item_id, prompt=rows[0]["text"], category=item_category(item_id), questions=tuple(questions)))
    if ignored:
        log.debug("DSG-1k: ignored %d dependency tokens that name no other question of their item", ignored)
    return tuple(items)


def dsg1k_categories() -> list[str]:
    """The DSG-1k categories (source datasets), sorted: countbench, diffusiondb, drawtext, ..."""
    return sorted({item.category for item in _dsg1k()})


def load_dsg1k(categories: Sequence[str] = (), max_prompts: int = 0) -> list[EvalItem]:
    """DSG-1k items in file order, restricted to ``categories`` (all when empty), at most
    ``max_prompts`` of them (all when 0).

    Raises InvalidArgument (field ``spec.categories``) for an unknown category name.
    """
    if max_prompts < 0:
        raise InvalidArgument(f"max_prompts must be >= 0 (0 = all); got {max_prompts}", field="spec.max_prompts")
    wanted = set(categories)
    if wanted:
        valid = dsg1k_categories()
        unknown = sorted(wanted.difference(valid))
        if unknown:
            raise InvalidArgument(
                f"unknown DSG-1k categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(valid)}",
                field="spec.categories",
            )
    items = [item for item in _dsg1k() if not wanted or item.category in wanted]
    return items[:max_prompts] if max_prompts else items


# --------------------------------------------------------------------------- the dependency rule


def question_scores(item: EvalItem, answers: Mapping[str, bool], rule: str = "transitive") -> dict[str, float]:
    """Each question's score (1.0 / 0.0) after the dependency rule, for one answered image.

    ``answers`` maps question id → answered "yes"; every question of ``item`` must be answered
    (answers for ids the item lacks are ignored).

    * ``"transitive"`` (default): a question scores 1 iff it is answered "yes" and every parent
      scores 1, i.e. iff it and all its ancestors are answered "yes".  A chain a → b → c with a
      answered "no" zeroes b and c; with several parents, all must hold.  Cycles are safe: see the
      module docstring.
    * ``"direct"``: the DSG reference code's one-level variant: a question scores 1 iff it is
      answered "yes" and every parent's *raw* answer is "yes".  It differs from "transitive" only on
      chains: with a "no", b "yes", c "yes" on a → b → c, "direct" zeroes b but keeps c.
    """
    _check_rule(rule)
    missing = [q.id for q in item.questions if q.id not in answers]
    if missing:
        raise InvalidArgument(
            f"item {item.id!r}: no answer for question{'s' if len(missing) > 1 else ''} {', '.join(missing[:_MAX_QUOTED])}"
            + (f" (and {len(missing) - _MAX_QUOTED} more)" if len(missing) > _MAX_QUOTED else ""),
            field="answers",
        )
    yes = {q.id: bool(answers[q.id]) for q in item.questions}
    for q in item.questions:
        for p in q.parents:
            if p not in yes:
                raise InvalidArgument(f"item {item.id!r}: question {q.id} depends on {p!r}, which is not one of its questions", field="items")
    if rule == "direct":
        return {q.id: float(yes[q.id] and all(yes[p] for p in q.parents)) for q in item.questions}
    # transitive: a "no" fails its question and everything that depends on it, directly or not;
    # walking child edges from every "no" with a visited set terminates on any graph.
    children: dict[str, list[str]] = defaultdict(list)
    for q in item.questions:
        for p in q.parents:
            children[p].append(q.id)
    failed = {qid for qid, ok in yes.items() if not ok}
    stack = list(failed)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in failed:
                failed.add(child)
                stack.append(child)
    return {q.id: 0.0 if q.id in failed else 1.0 for q in item.questions}


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise InvalidArgument(f"unknown DSG dependency rule {rule!r}; valid: {', '.join(RULES)}", field="rule")


# --------------------------------------------------------------------------- aggregation


class _Slice:
    """Running sums of one slice: per-item score sums/counts and question totals."""

    __slots__ = ("item_sum", "item_n", "question_sum", "question_n", "questions")

    def __init__(self) -> None:
        self.item_sum: dict[str, float] = defaultdict(float)
        self.item_n: dict[str, int] = defaultdict(int)
        self.question_sum = 0.0
        self.question_n = 0
        self.questions: set[tuple[str, str]] = set()

    def add(self, item_id: str, scores: Sequence[tuple[str, float]]) -> None:
        total = sum(s for _, s in scores)
        self.item_sum[item_id] += total / len(scores)
        self.item_n[item_id] += 1
        self.question_sum += total
        self.question_n += len(scores)
        self.questions.update((item_id, qid) for qid, _ in scores)

    def result(self) -> SliceScore:
        per_item = [self.item_sum[i] / self.item_n[i] for i in self.item_sum]
        return SliceScore(
            score_percent=100.0 * sum(per_item) / len(per_item) if per_item else 0.0,
            micro_percent=100.0 * self.question_sum / self.question_n if self.question_n else 0.0,
            prompt_count=len(per_item),
            question_count=self.question_n,
        )


def score_dsg(samples: Iterable[Sample], rule: str = "transitive") -> ScoreTable:
    """Score answered images with the DSG method.

    ``samples``: (item, image index, answers) per image, answers mapping each of the item's
    question ids to "answered yes".  Per image, the prompt score is the mean of its question scores
    after the dependency rule (see :func:`question_scores`); an item's score is the mean over its
    images.  For each category (``item.category``) and overall: ``score_percent`` is the mean over
    items ×100 (the DSG standard), ``micro_percent`` the question scores summed over all questions of
    all images ×100 (what SELMA's script printed); ``prompt_count`` counts items and
    ``question_count`` answered questions (questions × images, as TIFA counts them).  ``per_question_category`` groups questions by their broad
    category (entity, attribute, relation, global, other): ``micro_percent`` is that type's accuracy,
    ``score_percent`` the mean over items having such questions of their mean on them.

    Raises InvalidArgument for an unknown rule, no samples, an item without questions, a missing
    answer (naming item and question), or the same (item, image index) twice.
    """
    _check_rule(rule)
    overall = _Slice()
    categories: dict[str, _Slice] = defaultdict(_Slice)
    question_categories: dict[str, _Slice] = defaultdict(_Slice)
    per_question: dict[tuple[str, int, str], float] = {}
    seen: set[tuple[str, int]] = set()
    for item, image_index, answers in samples:
        if (item.id, image_index) in seen:
            raise InvalidArgument(f"item {item.id!r} image {image_index} is scored twice", field="answers")
        seen.add((item.id, image_index))
        if not item.questions:
            raise InvalidArgument(f"item {item.id!r} has no questions; nothing to score", field="items")
        scores = question_scores(item, answers, rule)
        pairs = [(q.id, scores[q.id]) for q in item.questions]
        overall.add(item.id, pairs)
        categories[item.category].add(item.id, pairs)
        by_type: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for q in item.questions:
            by_type[q.category].append((q.id, scores[q.id]))
            per_question[(item.id, image_index, q.id)] = scores[q.id]
        for qcat, qpairs in by_type.items():
            question_categories[qcat].add(item.id, qpairs)
    if not seen:
        raise InvalidArgument("no answered images to score", field="answers")
    return ScoreTable(
        metric="dsg",
        overall=overall.result(),
        per_category={k: v.result() for k, v in sorted(categories.items())},
        per_question_category={k: v.result() for k, v in sorted(question_categories.items())},
        per_item={i: overall.item_sum[i] / overall.item_n[i] for i in overall.item_sum},
        per_question=per_question,
    )


# --------------------------------------------------------------------------- answers files


class _Problems:
    """Problems of one kind found in an answers file: the first few quoted, all counted."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.quoted: list[str] = []
        self.count = 0

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.quoted) < _MAX_QUOTED:
            self.quoted.append(text)

    def lines(self) -> list[str]:
        if not self.count:
            return []
        more = f"; {self.count - len(self.quoted)} more not shown" if self.count > len(self.quoted) else ""
        return [f"{self.title} ({self.count}{more}):"] + [f"  {text}" for text in self.quoted]


def read_answers_file(
    path: str | Path, items: Sequence[EvalItem], all_items: Sequence[EvalItem] | None = None, *, strict: bool = False
) -> AnswersFile:
    """Parse and validate an answers CSV for ``items``; one sample (image index 0) per item.

    The file is UTF-8 CSV with a header naming at least the columns ``item_id``, ``question_id`` and
    ``answer`` (any order; other columns are ignored), then one row per question.  An answer is
    "yes" iff it reads ``yes`` once case and spaces are normalised; anything else fails its question
    (and, through the dependency rule, the questions depending on it), as the DSG reference scorer
    does with released answer files: ``no``, a blank cell, ``unanswerable``, ``true``...  Blank and
    other non-yes/no answers are counted per category.  With ``strict``, only yes and no are
    accepted and any other answer is a problem of the file.  Rows may name any item of
    ``all_items`` (default: ``items``), so that a full DSG-1k answers file can be scored on a
    category subset; every question of ``items`` must have exactly one row.

    All problems are collected and raised as one InvalidArgument (field ``--answers``) naming rows
    by their 1-based line number in the file: unknown item ids, unknown question ids, short rows,
    duplicate rows, missing questions (and with ``strict``, answers other than yes/no).  A missing
    file raises NotFound.
    """
    path = Path(path)
    text = _read_text(path)
    known = {item.id: item for item in (all_items if all_items is not None else items)}
    known.update((item.id, item) for item in items)
    question_ids = {item_id: {q.id for q in item.questions} for item_id, item in known.items()}

    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        while not any(cell.strip() for cell in header):  # leading blank lines
            header = next(reader)
    except StopIteration:
        raise InvalidArgument(
            f"--answers {path}: the file is empty; expected a header row {','.join(ANSWER_COLUMNS)} and one row per question",
            field="--answers",
        ) from None
    except csv.Error as e:
        raise InvalidArgument(f"--answers {path} line {reader.line_num}: not valid CSV ({e})", field="--answers") from None
    names = [name.strip().lower() for name in header]
    missing_columns = [c for c in ANSWER_COLUMNS if c not in names]
    if missing_columns:
        raise InvalidArgument(
            f"--answers {path} line {reader.line_num}: header lacks column{'s' if len(missing_columns) > 1 else ''} "
            f"{', '.join(missing_columns)} (found: {', '.join(n for n in names if n) or 'none'}); "
            f"expected a header with {','.join(ANSWER_COLUMNS)}",
            field="--answers",
        )
    doubled = sorted({c for c in ANSWER_COLUMNS if names.count(c) > 1})
    if doubled:
        raise InvalidArgument(f"--answers {path} line {reader.line_num}: header repeats column {', '.join(doubled)}", field="--answers")
    col = {c: names.index(c) for c in ANSWER_COLUMNS}
    width = max(col.values()) + 1

    malformed = _Problems("rows with too few fields")
    unknown_items = _Problems("unknown item ids")
    unknown_questions = _Problems("unknown question ids")
    bad_answers = _Problems("answers other than yes/no (only yes and no are accepted with --strict)")
    duplicates = _Problems("duplicate rows")
    answers: dict[str, dict[str, bool]] = defaultdict(dict)
    verdicts: dict[tuple[str, str], str] = {}
    first_line: dict[tuple[str, str], int] = {}
    line = reader.line_num
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < width:
                malformed.add(f"line {start}: {len(row)} field{'s' if len(row) != 1 else ''}, the header has {len(header)}")
                continue
            item_id, qid, answer = (row[col[c]].strip() for c in ANSWER_COLUMNS)
            if item_id not in known:
                unknown_items.add(f"line {start}: {_quote(item_id)}")
                continue
            if qid not in question_ids[item_id]:
                unknown_questions.add(f"line {start}: item {item_id} has no question {_quote(qid)}{_id_range(question_ids[item_id])}")
                continue
            key = (item_id, qid)
            if key in first_line:
                duplicates.add(f"line {start}: item {item_id} question {qid} again (first on line {first_line[key]})")
                continue
            first_line[key] = start
            verdict = answer_verdict(answer)
            if strict and verdict not in ("yes", "no"):
                bad_answers.add(f"line {start}: {_quote(answer)}")
                continue
            verdicts[key] = verdict
            answers[item_id][qid] = verdict == "yes"
    except csv.Error as e:
        raise InvalidArgument(f"--answers {path} line {reader.line_num}: not valid CSV ({e})", field="--answers") from None

    missing = _Problems("questions without a row")
    for item in items:
        for q in item.questions:
            if (item.id, q.id) not in first_line:
                missing.add(f"item {item.id} question {q.id}")
    problems = [p for p in (malformed, unknown_items, unknown_questions, bad_answers, duplicates, missing) if p.count]
    if problems:
        body = "\n".join(text for p in problems for text in p.lines())
        raise InvalidArgument(f"--answers {path}: {sum(p.count for p in problems)} problem(s) in the file:\n{body}", field="--answers")
    out = AnswersFile(samples=[(item, 0, answers[item.id]) for item in items])
    for item in items:  # only the scored items' answers are counted, as only they are scored
        counts = out.per_category.setdefault(item.category, AnswerCounts())
        for q in item.questions:
            verdict = verdicts[(item.id, q.id)]
            counts.add(verdict)
            out.overall.add(verdict)
    out.per_category = dict(sorted(out.per_category.items()))
    return out


def _quote(value: str, limit: int = 40) -> str:
    """``value`` quoted for an error message, cut short so one odd cell cannot flood it."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _id_range(ids: set[str]) -> str:
    """`` (it has 1..n)`` when question ids are exactly 1..n (as in DSG-1k), else nothing."""
    return f" (it has 1..{len(ids)})" if ids == {str(i) for i in range(1, len(ids) + 1)} else ""


def _read_text(path: Path) -> str:
    """The file's text, or a domain error saying why it cannot be read as UTF-8."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise InvalidArgument(f"--answers {path}: a directory, not a file; give a CSV file", field="--answers")
        if size > _MAX_ANSWERS_BYTES:
            raise InvalidArgument(f"--answers {path}: the file has {size} bytes; an answers file is at most {_MAX_ANSWERS_BYTES}", field="--answers")
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"--answers {path}: no such file", field="--answers") from None
    except OSError as e:
        raise InvalidArgument(f"--answers {path}: the file cannot be read: {e.strerror or e}", field="--answers") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InvalidArgument(f"--answers {path}: the file is not UTF-8 text (bad byte at line {line}); save it as UTF-8 CSV", field="--answers") from None


# --------------------------------------------------------------------------- output


def _slice_dict(score: SliceScore) -> dict[str, Any]:
    return {
        "score_percent": round(score.score_percent, 1),
        "micro_percent": round(score.micro_percent, 1),
        "prompt_count": int(score.prompt_count),
        "question_count": int(score.question_count),
    }


def summary_dict(table: ScoreTable, rule: str, benchmark: str = BENCHMARK, answers: AnswersFile | None = None) -> dict[str, Any]:
    """The JSON summary of ``selma eval dsg-score --json``; percentages rounded to one decimal.

    With ``answers``, ``"answers"`` counts how they were spelled (yes, no, blank, other) overall
    and per category.
    """
    out: dict[str, Any] = {
        "benchmark": benchmark,
        "rule": rule,
        "overall": _slice_dict(table.overall),
        "categories": {k: _slice_dict(v) for k, v in sorted(table.per_category.items())},
        "question_categories": {k: _slice_dict(v) for k, v in sorted(table.per_question_category.items())},
    }
    if answers is not None:
        out["answers"] = {
            "overall": asdict(answers.overall),
            "categories": {k: asdict(v) for k, v in answers.per_category.items()},
        }
    return out


def format_answer_counts(answers: AnswersFile) -> str:
    """A plain-text table of blank and other non-yes/no answers per category, or "" when there are none."""
    if not answers.overall.unusual:
        return ""
    header = ("category", "blank", "other")
    rows = [(name, c) for name, c in answers.per_category.items() if c.unusual] + [("overall", answers.overall)]
    cells = [header] + [(name, str(c.blank), str(c.other)) for name, c in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [f"{answers.overall.unusual} answer(s) other than yes/no, each scored as a failed question "
             "(as the DSG reference scorer does; --strict refuses them):"]
    lines += ["  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True)])
              for row in cells]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def format_table(table: ScoreTable) -> str:
    """A plain-text table: one row per category (sorted) and an ``overall`` row.

    ``score`` is the mean over prompts, ``micro`` the question-level average, both in percent with
    one decimal.
    """
    header = ("category", "prompts", "questions", "score", "micro")
    rows = [(name, s) for name, s in sorted(table.per_category.items())] + [("overall", table.overall)]
    cells = [header] + [(name, str(s.prompt_count), str(s.question_count), f"{s.score_percent:.1f}", f"{s.micro_percent:.1f}")
                        for name, s in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=False)])

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(row) for row in cells[1:]]
    return "\n".join(lines) + "\n"


def answers_template(items: Sequence[EvalItem]) -> str:
    """The answers CSV skeleton for ``items``: one row per question with the ``answer`` cell empty,
    plus ``category``, ``prompt`` and ``question`` columns for whoever fills it in (the scorer ignores them)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*ANSWER_COLUMNS, "category", "prompt", "question"])
    for item in items:
        for q in item.questions:
            writer.writerow([item.id, q.id, "", item.category, item.prompt, q.text])
    return out.getvalue()
