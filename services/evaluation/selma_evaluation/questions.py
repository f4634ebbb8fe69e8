"""Questions for prompts that come without any: written by the prompt service's LLM backends, or supplied inline.

Generation follows DSG's three steps, with selma's own prompt templates, plus one for TIFA:

(a) **facts**: the prompt → numbered semantic tuples, one per line ``N. kind (detail) | fact``,
    kind one of entity, attribute, count, relation, global (detail optional);
(b) **dependencies**: the tuples → ``N. ids`` (the earlier tuples tuple N presupposes; ``0`` = none);
(c) **yes/no questions**: the tuples → ``N. question`` (one per tuple, answer "yes" when the image
    matches the prompt) → DSG questions with the dependencies as ``parents``;
(d) **multiple choice** (``tifa=True``): the tuples → ``N. question | choice; choice; … | answer`` →
    TIFA questions.

Every request ends with a dangling ``1.`` (completion APIs) or asks for a list numbered from 1
(chat APIs; local chat models get their answer pre-filled with ``1.``), so all backends answer
in the same shape.  Step (a) is one round of requests (one per prompt); steps (b)–(d) depend
only on (a) and go out together in a second round.  Rounds are cut to the backend's
``round_size``.

Parsers are lenient about form (markdown bullets and bold, ``1)``/``1:``/``1 |`` numbering,
table rows, extra whitespace, echoed columns, missing or unparseable lines) and strict about
content: a dependency must name an existing *earlier* tuple (so the graph is acyclic; others
are dropped), a question needs text, a multiple-choice question needs two distinct choices and
an answer among them, and every fact must share a content word with its prompt and every
question with its fact (LLMs copy the worked example).  A question dropped in (c) passes its
own parents on to its children.

A prompt that yields no usable yes/no question (or, with ``tifa=True``, no multiple-choice
question) is generated again from scratch with other seeds, ``retries`` times (default 1); if
it still fails, :func:`generate_questions` raises FailedPrecondition naming every such prompt —
an evaluation never silently drops a prompt.  :func:`try_generate_questions` returns the
prompts that worked plus the reasons for the others, for callers that decide themselves.

Return shape: one :class:`EvalItem` per prompt, in input order, holding both kinds of question,
told apart by ``choices`` as ``Question`` documents: DSG yes/no questions (``choices`` empty,
answer "yes", ``parents`` = dependencies, ids "1", "2", … = the tuple numbers) followed, with
``tifa=True``, by TIFA multiple-choice questions (``choices`` non-empty, no parents, ids
"mc1", "mc2", … = ``MC_PREFIX`` + the tuple number).  Ids are unique within an item, so one
answer table keyed by (item, image, question id) serves both metrics; :func:`for_metric` cuts
an item down to one metric's questions.

Users can bring their own questions instead: prompt-set records with a ``questions`` list
(:func:`questions_from_records`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from selma.config import SelmaSettings
from selma.errors import Cancelled, FailedPrecondition, InvalidArgument
from selma_evaluation.types import EvalItem, Question

if TYPE_CHECKING:
    from selma.llm.backend import LlmBackend, LlmRequest

log = logging.getLogger(__name__)

KINDS = ("entity", "attribute", "count", "relation", "global", "other")
# Words an LLM uses for a kind → (kind, detail).  Lines with other kind words are skipped ("other" itself is kept).
_KIND_ALIASES = {
    "entity": ("entity", ""), "object": ("entity", ""), "thing": ("entity", ""), "person": ("entity", ""),
    "part": ("entity", "part"),
    "attribute": ("attribute", ""), "property": ("attribute", ""),
    **{w: ("attribute", w) for w in ("color", "material", "shape", "size", "state", "texture", "type", "text")},
    "colour": ("attribute", "color"),
    "count": ("count", "count"), "number": ("count", "count"), "quantity": ("count", "count"), "counting": ("count", "count"),
    "relation": ("relation", ""), "relationship": ("relation", ""),
    **{w: ("relation", w) for w in ("spatial", "action", "position")},
    "global": ("global", ""), "style": ("global", "style"), "scene": ("global", ""), "setting": ("global", ""),
}
# DSG-1k's broad categories: counts are attributes there.
_BROAD = {"count": "attribute"}
_DEFAULT_DETAIL = {"entity": "whole", "count": "count", "global": "-"}

MAX_TUPLES = 40  # per prompt; a rambling model's extra lines are ignored
MAX_TEXT_CHARS = 300
MAX_CHOICES = 8
# Question generation is extraction, not invention: unless the spec sets them, sample cooler
# than the prompt service's default (1.0) but not greedily, so a retry with another seed differs;
# and cap the answer length (a few dozen short lines) so a small local model cannot ramble for long.
QUESTION_TEMPERATURE = 0.3
QUESTION_MAX_TOKENS = 512

# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SemanticTuple:
    """One atomic fact of a prompt (DSG's semantic tuple), as parsed from step (a)."""

    id: str
    kind: str  # one of KINDS
    detail: str
    text: str

    @property
    def category(self) -> str:
        """DSG-1k's broad category (entity, attribute, relation, global, other)."""
        return _BROAD.get(self.kind, self.kind)

    @property
    def detail_or_default(self) -> str:
        return self.detail or _DEFAULT_DETAIL.get(self.kind, "")

    def render(self) -> str:
        """The tuple as it is shown to the LLM in steps (b)–(d)."""
        kind = f"{self.kind} ({self.detail})" if self.detail and self.detail != self.kind else self.kind
        return f"{self.id}. {kind} | {self.text}"

    def tuple_string(self) -> str:
        """The tuple in DSG-1k's notation, for ``Question.tuple``."""
        return f"{self.category} - {self.detail_or_default or '-'} ({self.text})"


MC_PREFIX = "mc"  # id prefix of multiple-choice questions: "mc3" asks about tuple 3


@dataclass
class GenerationResult:
    """What :func:`try_generate_questions` got: items for the prompts that worked, reasons for the rest."""

    items: list[EvalItem]
    failures: dict[str, str] = field(default_factory=dict)  # item id → why it has no usable questions


def for_metric(item: EvalItem, metric: str) -> EvalItem:
    """``item`` with only ``metric``'s questions: "dsg" = yes/no (no choices), "tifa" = multiple choice."""
    if metric not in ("dsg", "tifa"):
        raise InvalidArgument(f"metric must be dsg or tifa; got {metric!r}", field="metric")
    keep = tuple(q for q in item.questions if bool(q.choices) == (metric == "tifa"))
    return replace(item, questions=keep)


# ------------------------------------------------------------------------------------------
# Templates (selma's own wording; one worked example shared by every step)
# ------------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You turn image descriptions into checklists for testing whether a picture shows what its description says. "
    "You answer with a numbered list only, in exactly the format asked for."
)
_EXAMPLE_PROMPT = "a watercolor painting of three yellow taxis parked beside a brick wall"
_EXAMPLE_TUPLES = (
    SemanticTuple("1", "global", "style", "watercolor painting"),
    SemanticTuple("2", "entity", "", "taxis"),
    SemanticTuple("3", "count", "", "there are three taxis"),
    SemanticTuple("4", "attribute", "color", "the taxis are yellow"),
    SemanticTuple("5", "entity", "", "wall"),
    SemanticTuple("6", "attribute", "material", "the wall is made of brick"),
    SemanticTuple("7", "relation", "spatial", "the taxis are parked beside the wall"),
)
_EXAMPLE_DEPENDENCIES = ("0", "0", "2", "2", "0", "5", "2, 5")
_EXAMPLE_QUESTIONS = (
    "Is this a watercolor painting?",
    "Are there taxis?",
    "Are there three taxis?",
    "Are the taxis yellow?",
    "Is there a wall?",
    "Is the wall made of brick?",
    "Are the taxis parked beside the wall?",
)
_EXAMPLE_CHOICES = (
    "What kind of picture is this? | watercolor painting; photograph; pencil sketch; 3D render | watercolor painting",
    "Are there taxis? | yes; no | yes",
    "How many taxis are there? | one; two; three; four | three",
    "What color are the taxis? | yellow; red; blue; white | yellow",
    "Is there a wall? | yes; no | yes",
    "What is the wall made of? | brick; wood; glass; stone | brick",
    "Where are the taxis parked? | beside the wall; on a bridge; inside a garage | beside the wall",
)

_FACTS_RULES = (
    "List the separate facts a picture must show to match an image description. Kinds of fact:\n"
    "- entity: an object, animal, person or part that appears;\n"
    "- attribute: one property of one entity (color, size, material, shape, state, text written on it);\n"
    "- count: how many of an entity there are;\n"
    "- relation: how two entities relate (position, action, comparison);\n"
    "- global: the style or setting of the whole picture.\n"
    'Write one fact per line as "number. kind (detail) | fact"; the detail is optional. '
    "List each entity before the facts about it and add nothing the description does not say."
)
_DEPENDENCY_RULES = (
    "Each fact below is about an image description. For every fact, give the numbers of the earlier facts it "
    "takes for granted: an attribute or count needs its entity, a relation needs both entities; an entity or "
    'global fact needs nothing, written 0. Write one line per fact as "number. numbers".'
)
_QUESTION_RULES = (
    "Turn every fact below into one yes/no question about the picture. The answer must be yes when the picture "
    "matches the description. Ask only about the fact itself, in plain words. "
    'Write one line per fact as "number. question", keeping the fact\'s number.'
)
_CHOICE_RULES = (
    "Turn every fact below into one multiple-choice question about the picture, with two to four short, distinct "
    "choices and the answer the description implies, which must be one of the choices. Questions about whether "
    'something is there use the choices "yes; no". '
    'Write one line per fact as "number. question | choice; choice; ... | answer", keeping the fact\'s number.'
)


def _facts_block(tuples: Sequence[SemanticTuple]) -> str:
    return "\n".join(t.render() for t in tuples)


def _numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))


# step → (rules, header the answer list follows, example answer lines)
_STEPS: dict[str, tuple[str, str, Sequence[str] | None]] = {
    "facts": (_FACTS_RULES, "Facts:", None),
    "dependencies": (_DEPENDENCY_RULES, "Dependencies:", _EXAMPLE_DEPENDENCIES),
    "questions": (_QUESTION_RULES, "Yes/no questions:", _EXAMPLE_QUESTIONS),
    "choices": (_CHOICE_RULES, "Multiple-choice questions:", _EXAMPLE_CHOICES),
}


def render_step(step: str, prompt: str, tuples: Sequence[SemanticTuple] = ()) -> tuple[str, str]:
    """(shared body, answer header) of one step's request for ``prompt`` (and its parsed tuples)."""
    rules, header, example_answer = _STEPS[step]
    if step == "facts":
        example = f"Description: {_EXAMPLE_PROMPT}\n{header}\n{_facts_block(_EXAMPLE_TUPLES)}"
        task = f"Description: {prompt}"
    else:
        example = (
            f"Description: {_EXAMPLE_PROMPT}\nFacts:\n{_facts_block(_EXAMPLE_TUPLES)}\n{header}\n{_numbered(example_answer or ())}"
        )
        task = f"Description: {prompt}\nFacts:\n{_facts_block(tuples)}"
    return f"{rules}\n\nExample:\n{example}\n\nNow you:\n{task}", header


def build_request(step: str, prompt: str, tuples: Sequence[SemanticTuple], *, index: int, seed: int) -> LlmRequest:
    """The LlmRequest of one step for one prompt (every backend rendering filled in)."""
    from selma.llm.backend import LlmRequest

    body, header = render_step(step, prompt, tuples)
    expected = len(tuples) if tuples else 0
    user = f"{body}\n{header}\n\nWrite the list for this description only, numbered from 1, and nothing else."
    return LlmRequest(
        index=index,
        seed=seed,
        example_ids=(),  # no in-context prompt ids: the example is fixed
        completion_prompt=f"{body}\n{header}\n1.",
        system=SYSTEM_PROMPT,
        user=user,
        first_number=1,  # local chat models get "1." pre-filled
        n_prompts=expected,
    )


# ------------------------------------------------------------------------------------------
# Parsers
# ------------------------------------------------------------------------------------------

_BULLET = re.compile(r"^\s*(?:[-*•>+]\s+)+")
_MARKUP = re.compile(r"\*\*|__|`")
_NUMBERED = re.compile(r"^(?:(?:fact|question|tuple|id|no\.?|#)\s*)?(\d{1,3})\s*(?:[.):\]]|\||-(?=\s)|\s)\s*(.*)$", re.I)
_KIND_FIELD = re.compile(r"^([a-z]+)(?:\s*(?:\(|/|:|-)\s*([a-z][a-z ]*?)\s*\)?)?$", re.I)
_KIND_INLINE = re.compile(r"^([a-z]+)\s*(?:\(([a-z ]+)\))?\s*[:\-–]\s+(.+)$", re.I)
_LETTER = re.compile(r"^\(?[a-dA-D][).:]\s+")
_INT = re.compile(r"\d+")
_WORD = re.compile(r"[a-z0-9]+")


def numbered_lines(text: str) -> list[tuple[str, str]]:
    """``[(number, rest)]`` of a numbered list in an LLM answer, in order.

    Bullets, bold, backticks and markdown table rows are unwrapped; lines that are not list
    items are skipped; the list ends where its numbering restarts (a model that goes on to
    invent another example), so the first occurrence of each number is kept.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        line = _MARKUP.sub("", _BULLET.sub("", raw)).strip()
        if line.startswith("|"):
            line = line.strip("|").strip()
            if set(line) <= set("-:| "):
                continue  # a table's separator row
        m = _NUMBERED.match(line)
        if not m:
            continue
        number, rest = str(int(m.group(1))), m.group(2).strip()
        if number in seen:
            break
        seen.add(number)
        out.append((number, rest))
    return out


_STOPWORDS = frozenset(
    "the and are there with this that what which who how many much does kind picture image photo "
    "made its from into onto for has have being been is was were of".split()
)


def _stems(text: str) -> set[str]:
    """Content-word stems: words of 3+ letters (or digits) minus stop words, plural "s" cut, 5 letters kept."""
    out = set()
    for w in _WORD.findall(text.lower()):
        if w.isdigit() or (len(w) >= 3 and w not in _STOPWORDS):
            if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
                w = w[:-1]
            out.add(w[:5])
    return out


def grounded(text: str, source: str) -> bool:
    """Whether ``text`` shares a content word with ``source``.

    LLMs, small ones above all, copy the template's worked example ("Is the wall made of
    brick?" for "two dogs"); a fact must come from its prompt and a question from its fact.
    """
    return bool(_stems(text) & _stems(source))


def _clean(text: str) -> str:
    text = " ".join(text.split()).strip(" \"'“”")
    return text[:MAX_TEXT_CHARS].strip()


def _kind(word: str, detail: str = "") -> tuple[str, str] | None:
    """(kind, detail) for a kind word an LLM wrote; None when it is not one (the line is skipped)."""
    word = word.lower()
    if word == "other":
        return "other", detail.strip().lower()
    if word not in _KIND_ALIASES:
        return None
    kind, implied = _KIND_ALIASES[word]
    return kind, (detail.strip().lower() or implied)


def parse_tuples(text: str, prompt: str = "") -> list[SemanticTuple]:
    """Step (a): ``N. kind (detail) | fact`` lines → tuples (also ``N | kind | fact`` and ``N. kind: fact``).

    With ``prompt``, facts that share no content word with it are dropped (see :func:`grounded`).
    """
    out: list[SemanticTuple] = []
    for number, rest in numbered_lines(text):
        parts = [p.strip() for p in rest.split("|") if p.strip()]
        kind: tuple[str, str] | None = None
        fact = ""
        if len(parts) >= 2 and (m := _KIND_FIELD.match(parts[0])) and (kind := _kind(m.group(1), m.group(2) or "")):
            if len(parts) >= 3 and not kind[1] and len(parts[1].split()) == 1:
                kind = (kind[0], parts[1].lower())  # "N | attribute | color | the ball is red"
            fact = parts[-1]
        elif len(parts) == 2 and (m := _KIND_FIELD.match(parts[1])) and (kind := _kind(m.group(1), m.group(2) or "")):
            fact = parts[0]  # "N. the ball is red | attribute": columns swapped
        elif len(parts) == 1 and (m := _KIND_INLINE.match(parts[0])) and (kind := _kind(m.group(1), m.group(2) or "")):
            fact = m.group(3)
        fact = _clean(fact).rstrip(".")
        if kind and fact and any(c.isalpha() for c in fact) and (not prompt or grounded(fact, prompt)):
            out.append(SemanticTuple(number, kind[0], kind[1], fact))
        if len(out) >= MAX_TUPLES:
            break
    return out


def parse_dependencies(text: str, tuples: Sequence[SemanticTuple]) -> dict[str, tuple[str, ...]]:
    """Step (b): ``N. ids`` lines → parents per tuple id, keeping only existing earlier tuples.

    A missing line means no parents; ``0``, "none" and self or forward references are ignored.
    """
    order = {t.id: i for i, t in enumerate(tuples)}
    out: dict[str, tuple[str, ...]] = {t.id: () for t in tuples}
    for number, rest in numbered_lines(text):
        if number not in order:
            continue
        # An echoed fact ("3. count | three taxis | 2") keeps the ids in its last column.
        ids = _INT.findall(rest.split("|")[-1])
        parents = []
        for p in (str(int(x)) for x in ids):
            if p in order and order[p] < order[number] and p not in parents:
                parents.append(p)
        out[number] = tuple(parents)
    return out


def parse_yes_no_questions(text: str, tuples: Sequence[SemanticTuple]) -> dict[str, str]:
    """Step (c): ``N. question`` lines → question text per tuple id.

    Dropped: unknown ids, empty questions, and questions sharing no content word with their fact.
    """
    facts = {t.id: t.text for t in tuples}
    ids = set(facts)
    out: dict[str, str] = {}
    for number, rest in numbered_lines(text):
        if number not in ids:
            continue
        parts = [p.strip() for p in rest.split("|") if p.strip()]
        if not parts:
            continue
        question = next((p for p in parts if p.endswith("?")), parts[-1])
        question = _question_text(question)
        if question and grounded(question, facts[number]):
            out[number] = question
    return out


def _question_text(text: str) -> str:
    text = re.sub(r"^(?:q(?:uestion)?\s*[:.]\s*)", "", _clean(text), flags=re.I).strip()
    if not any(c.isalpha() for c in text):
        return ""
    return text if text.endswith("?") else text.rstrip(".") + "?"


def parse_choice_questions(text: str, tuples: Sequence[SemanticTuple]) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Step (d): ``N. question | choices | answer`` lines → (question, choices, answer) per tuple id.

    Choices are split on ";" (or "," / "/" when there is no ";"), letter markers ("a)") removed,
    duplicates dropped; the answer must equal one of them (compared without case, articles and
    punctuation) and is returned with the choice's spelling; the question and choices must share
    a content word with the fact.  Lines failing a rule are dropped.
    """
    from selma_evaluation.tifa import normalize

    facts = {t.id: t.text for t in tuples}
    ids = set(facts)
    out: dict[str, tuple[str, tuple[str, ...], str]] = {}
    for number, rest in numbered_lines(text):
        if number not in ids:
            continue
        parts = [p.strip() for p in rest.split("|") if p.strip()]
        if len(parts) < 3:
            continue
        q_index = next((i for i, p in enumerate(parts[:-2]) if p.endswith("?")), len(parts) - 3)
        question = _question_text(parts[q_index])
        raw_choices = _strip_label(parts[-2], ("choices", "options"))
        sep = ";" if ";" in raw_choices else ("," if "," in raw_choices else "/")
        choices: list[str] = []
        for c in raw_choices.split(sep):
            c = _clean(_LETTER.sub("", c.strip())).rstrip(".")
            if c and normalize(c) and normalize(c) not in {normalize(x) for x in choices}:
                choices.append(c)
        answer = normalize(_LETTER.sub("", _strip_label(parts[-1], ("answer", "correct answer"))))
        match = next((c for c in choices if normalize(c) == answer), None)
        if (
            question
            and 2 <= len(choices) <= MAX_CHOICES
            and match is not None
            and grounded(" ".join([question, *choices]), facts[number])
        ):
            out[number] = (question, tuple(choices), match)
    return out


def _strip_label(text: str, labels: Iterable[str]) -> str:
    for label in labels:
        m = re.match(rf"^\s*{label}\s*[:=]\s*", text, flags=re.I)
        if m:
            return text[m.end() :]
    return text


# ------------------------------------------------------------------------------------------
# Building items
# ------------------------------------------------------------------------------------------


def yes_no_questions(
    tuples: Sequence[SemanticTuple], dependencies: Mapping[str, Sequence[str]], questions: Mapping[str, str]
) -> list[Question]:
    """DSG questions: one per tuple that got one; a dropped question's parents pass to its children."""
    effective: dict[str, tuple[str, ...]] = {}
    out = []
    for t in tuples:  # tuples are in order and parents are earlier, so effective[] is filled in time
        parents: list[str] = []
        for p in dependencies.get(t.id, ()):
            for q in ((p,) if p in questions else effective.get(p, ())):
                if q not in parents:
                    parents.append(q)
        effective[t.id] = tuple(parents)
        if t.id in questions:
            out.append(
                Question(
                    id=t.id, text=questions[t.id], parents=tuple(parents), category=t.category,
                    detail=t.detail_or_default, tuple=t.tuple_string(),
                )
            )
    return out


def choice_questions(
    tuples: Sequence[SemanticTuple], parsed: Mapping[str, tuple[str, tuple[str, ...], str]]
) -> list[Question]:
    """TIFA questions: one per tuple that got a valid one, id ``MC_PREFIX`` + tuple number."""
    return [
        Question(
            id=f"{MC_PREFIX}{t.id}", text=parsed[t.id][0], category=t.category, detail=t.detail_or_default,
            tuple=t.tuple_string(), choices=parsed[t.id][1], answer=parsed[t.id][2],
        )
        for t in tuples
        if t.id in parsed
    ]


# ------------------------------------------------------------------------------------------
# The LLM pipeline
# ------------------------------------------------------------------------------------------


def _seed(seed: int, item_id: str, step: str, attempt: int) -> int:
    digest = hashlib.sha256(f"selma-questions:{seed}:{item_id}:{step}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class _Rounds:
    """Sends requests to a backend in rounds of its ``round_size``, numbering them and honouring cancel."""

    def __init__(self, backend: LlmBackend, cancel: threading.Event | None) -> None:
        self.backend = backend
        self.cancel = cancel
        self.index = 0

    def next_index(self) -> int:
        self.index += 1
        return self.index

    def run(self, requests: list[LlmRequest]) -> list[str]:
        size = max(1, int(getattr(self.backend, "round_size", 1) or 1))
        texts: list[str] = []
        for start in range(0, len(requests), size):
            if self.cancel is not None and self.cancel.is_set():
                raise Cancelled("question generation was cancelled")
            chunk = requests[start : start + size]
            for req, resp in zip(chunk, self.backend.generate(chunk, cancel=self.cancel), strict=True):
                # A completion that continues the prompt's dangling "1." starts mid-item.
                texts.append(f"{req.first_number}.{resp.text}" if resp.starts_mid_item else resp.text)
        return texts


def _attempt(
    rounds: _Rounds, prompts: Sequence[tuple[str, str, str]], *, tifa: bool, seed: int, attempt: int
) -> tuple[dict[str, EvalItem], dict[str, str]]:
    """One pass of steps (a)–(d) over ``prompts`` → (items per id, failure reason per id)."""
    facts = rounds.run(
        [build_request("facts", p, (), index=rounds.next_index(), seed=_seed(seed, i, "facts", attempt)) for i, p, _ in prompts]
    )
    failures: dict[str, str] = {}
    parsed: list[tuple[tuple[str, str, str], list[SemanticTuple]]] = []
    for (item_id, prompt, category), text in zip(prompts, facts, strict=True):
        tuples = parse_tuples(text, prompt)
        if tuples:
            parsed.append(((item_id, prompt, category), tuples))
        else:
            failures[item_id] = f"no facts about the prompt could be parsed from the LLM's answer {_excerpt(text)}"
    steps = ("dependencies", "questions", "choices") if tifa else ("dependencies", "questions")
    requests = [
        build_request(step, prompt, tuples, index=rounds.next_index(), seed=_seed(seed, item_id, step, attempt))
        for (item_id, prompt, _), tuples in parsed
        for step in steps
    ]
    answers = iter(rounds.run(requests))
    out: dict[str, EvalItem] = {}
    for (item_id, prompt, category), tuples in parsed:
        texts = {step: next(answers) for step in steps}
        yes_no = yes_no_questions(
            tuples, parse_dependencies(texts["dependencies"], tuples), parse_yes_no_questions(texts["questions"], tuples)
        )
        mc = choice_questions(tuples, parse_choice_questions(texts["choices"], tuples)) if tifa else []
        if not yes_no:
            failures[item_id] = f"no yes/no question could be parsed from the LLM's answer {_excerpt(texts['questions'])}"
        elif tifa and not mc:
            failures[item_id] = f"no valid multiple-choice question in the LLM's answer {_excerpt(texts['choices'])}"
        else:
            out[item_id] = EvalItem(id=item_id, prompt=prompt, category=category, questions=(*yes_no, *mc))
    return out, failures


def _excerpt(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return repr(flat[:limit] + ("…" if len(flat) > limit else ""))


def _check_prompts(prompts: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    out = []
    seen: set[str] = set()
    for i, entry in enumerate(prompts):
        try:
            item_id, prompt, category = entry
        except (TypeError, ValueError):
            raise InvalidArgument(f"must be (item_id, prompt, category); got {entry!r}", field=f"prompts[{i}]") from None
        item_id, prompt = str(item_id).strip(), str(prompt).strip()
        if not item_id or item_id in seen:
            raise InvalidArgument(f"item ids must be unique and non-empty; got {item_id!r}", field=f"prompts[{i}].id")
        if not prompt:
            raise InvalidArgument(f"prompt {item_id!r} is empty", field=f"prompts[{i}].text")
        seen.add(item_id)
        out.append((item_id, prompt, str(category or "")))
    return out


def generate_questions(
    prompts: Sequence[tuple[str, str, str]],
    backend: LlmBackend,
    *,
    tifa: bool = True,
    seed: int = 0,
    retries: int = 1,
    cancel: threading.Event | None = None,
) -> list[EvalItem]:
    """Questions for ``prompts`` = ``[(item_id, prompt, category)]``: one item per prompt, in order.

    ``backend`` is an ``LlmBackend`` (:mod:`selma.llm`) (see :func:`backend_from_spec`).  Each item
    holds DSG yes/no questions and, with ``tifa``, TIFA multiple-choice questions (see the module
    docstring), with ``category`` as given.  Prompts without usable questions are retried
    ``retries`` times with other seeds; FailedPrecondition then names those still without.
    LLM failures (UNAVAILABLE after the backend's own retries) and cancellation (``cancel`` set →
    Cancelled) propagate.
    """
    result = try_generate_questions(prompts, backend, tifa=tifa, seed=seed, retries=retries, cancel=cancel)
    if result.failures:
        failed = [(item_id, prompt) for item_id, prompt, _ in _check_prompts(prompts) if item_id in result.failures]
        named = "; ".join(f"{item_id} ({prompt[:80]!r}): {result.failures[item_id]}" for item_id, prompt in failed[:5])
        n = len(result.failures)
        raise FailedPrecondition(
            f"the LLM ({getattr(backend, 'backend_model', type(backend).__name__)}) wrote no usable questions for "
            f"{n} prompt(s) after {retries + 1} attempt(s): {named}{' …' if n > 5 else ''}. Use a stronger "
            'question_backend, or supply questions inline in the prompt set ("questions" in each record)',
            field="spec.question_backend",
        )
    return result.items


def try_generate_questions(
    prompts: Sequence[tuple[str, str, str]],
    backend: LlmBackend,
    *,
    tifa: bool = True,
    seed: int = 0,
    retries: int = 1,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Like :func:`generate_questions`, but prompts still without questions after the retries are
    reported in ``failures`` (item id → reason) instead of raising."""
    prompts = _check_prompts(prompts)
    if retries < 0:
        raise InvalidArgument(f"retries must be >= 0; got {retries}", field="retries")
    rounds = _Rounds(backend, cancel)
    done: dict[str, EvalItem] = {}
    pending = list(prompts)
    failures: dict[str, str] = {}
    for attempt in range(retries + 1):
        if not pending:
            break
        got, failures = _attempt(rounds, pending, tifa=tifa, seed=seed, attempt=attempt)
        done.update(got)
        pending = [p for p in pending if p[0] not in done]
        if pending:
            log.warning(
                "question generation attempt %d: %d of %d prompt(s) gave nothing usable%s",
                attempt + 1, len(pending), len(prompts), "; retrying with other seeds" if attempt < retries else "",
            )
    return GenerationResult(
        items=[done[p[0]] for p in prompts if p[0] in done],
        failures={item_id: failures.get(item_id, "no usable questions") for item_id, _, _ in pending},
    )


def llm_settings_from(settings: SelmaSettings) -> Any:
    """The LLM layer's settings: ``settings`` itself (EvaluationSettings are LlmSettings), else its shared fields plus ``SELMA_LLM_*``."""
    from selma.llm.settings import LlmSettings

    if isinstance(settings, LlmSettings):
        return settings
    shared = {name: getattr(settings, name) for name in SelmaSettings.model_fields}
    return LlmSettings(**shared)


def _with_question_defaults(d: Mapping[str, Any] | None, default_kind: str) -> dict[str, Any]:
    """A copy of an LlmBackend dict with question-generation sampling defaults where the spec sets none."""
    d = dict(d or {})
    if not d:
        d = {default_kind: {}}
    if len(d) != 1:
        return d  # resolve_backend reports the error
    kind, body = next(iter(d.items()))
    if kind == "tiny_test" or not isinstance(body, Mapping):
        return d
    body = dict(body)
    sampling = body.get("sampling")
    if sampling is None or isinstance(sampling, Mapping):
        sampling = dict(sampling or {})
        sampling.setdefault("temperature", QUESTION_TEMPERATURE)
        if not sampling.get("max_tokens"):
            sampling["max_tokens"] = QUESTION_MAX_TOKENS
        body["sampling"] = sampling
    return {kind: body}


def backend_from_spec(llm_backend: Mapping[str, Any] | None, settings: SelmaSettings, *, registry: Any = None) -> LlmBackend:
    """A ready ``LlmBackend`` (:mod:`selma.llm`) for a proto-JSON ``selma.v1.LlmBackend`` dict ({} = ``llm_default_backend``).

    Validation, credentials and model loading are the LLM layer's, as for the prompt service
    (errors name ``spec.question_backend...``; defaults and keys from ``SELMA_LLM_*``).  Unless the dict
    sets them, sampling uses temperature QUESTION_TEMPERATURE and at most QUESTION_MAX_TOKENS
    tokens.  Pass a ``ModelRegistry`` to share loaded models between calls.  Close the backend
    when done.
    """
    from selma.llm.local import ModelRegistry

    llm_settings = llm_settings_from(settings)
    return (registry or ModelRegistry(llm_settings)).backend(resolve_question_backend(llm_backend, llm_settings))


def resolve_question_backend(llm_backend: Mapping[str, Any] | None, settings: SelmaSettings) -> Any:
    """The validated ``BackendSpec`` of a question backend (nothing loaded, nothing called): bad input,
    an endpoint the service may not call or a credential it may not send fail here, at request time."""
    from selma.llm.specs import resolve_backend

    llm_settings = llm_settings_from(settings)
    return resolve_backend(_with_question_defaults(llm_backend, llm_settings.llm_default_backend), llm_settings, fld="spec.question_backend")


# ------------------------------------------------------------------------------------------
# Questions supplied inline in prompt-set records
# ------------------------------------------------------------------------------------------

_QUESTION_FIELDS = {"id", "text", "parents", "category", "detail", "tuple", "choices", "answer"}


def has_inline_questions(records: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any prompt-set record carries its own ``questions``."""
    return any("questions" in r for r in records)


def prompts_from_records(records: Iterable[Mapping[str, Any]], category: str = "") -> list[tuple[str, str, str]]:
    """``(id, text, category)`` per prompt-set record, for :func:`generate_questions` (category: given, else the record's skill)."""
    out = []
    for n, r in enumerate(records):
        where = f"records[{n}]"
        item_id, text = _required_str(r, "id", where), _required_str(r, "text", where)
        out.append((item_id, text, category or str(r.get("category") or r.get("skill") or "")))
    return out


def questions_from_records(records: Iterable[Mapping[str, Any]], category: str = "") -> list[EvalItem]:
    """Items from questions users supplied in prompt-set records: ``{"id", "text", "skill", "questions": [...]}``.

    Each question: ``{"id", "text", "parents": [ids], "category", "detail", "tuple", "choices": [...],
    "answer"}`` (only id and text required).  As in generated items, questions without choices
    are DSG yes/no questions (answer "yes"; ``parents`` name other yes/no questions of the record)
    and questions with choices are TIFA multiple choice (answer required, one of them).  The item's
    category is ``category``, else the record's ``category``, else its ``skill``.  Unlike LLM
    output, bad user input is not dropped but rejected: InvalidArgument naming the record and
    question (no questions, duplicate ids, unknown, self or multiple-choice parents, dependency
    cycles, empty text, an answer not among the choices).
    """
    records = list(records)
    items: list[EvalItem] = []
    seen: set[str] = set()
    for n, (r, (item_id, prompt, cat)) in enumerate(zip(records, prompts_from_records(records, category), strict=True)):
        where = f"records[{n}] ({item_id})"
        if item_id in seen:
            raise InvalidArgument(f"record id {item_id!r} appears twice", field=f"{where}.id")
        seen.add(item_id)
        raw = r.get("questions")
        if not isinstance(raw, list) or not raw:
            raise InvalidArgument(
                f"{where} has no questions: give every record a non-empty questions list, or none to generate them",
                field=f"{where}.questions",
            )
        questions = [_inline_question(q, f"{where}.questions[{k}]") for k, q in enumerate(raw)]
        _check_graph(questions, where)
        items.append(EvalItem(id=item_id, prompt=prompt, category=cat, questions=tuple(questions), skill=str(r.get("skill") or "")))
    return items


def _required_str(d: Mapping[str, Any], key: str, where: str) -> str:
    if not isinstance(d, Mapping):
        raise InvalidArgument(f"must be a JSON object; got {type(d).__name__}", field=where)
    value = d.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and key == "id":
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"needs a non-empty string {key!r}", field=f"{where}.{key}")
    return value.strip()


def _inline_question(q: Any, where: str) -> Question:
    from selma_evaluation.tifa import normalize

    qid = _required_str(q, "id", where)
    unknown = set(q) - _QUESTION_FIELDS
    if unknown:
        raise InvalidArgument(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_QUESTION_FIELDS)}", field=where)
    text = _question_text(_required_str(q, "text", where))
    if not text:
        raise InvalidArgument("question text has no words", field=f"{where}.text")
    parents = q.get("parents") or []
    if not isinstance(parents, list) or not all(isinstance(p, str | int) and not isinstance(p, bool) for p in parents):
        raise InvalidArgument("parents must be a list of question ids", field=f"{where}.parents")
    choices_raw = q.get("choices") or []
    if not isinstance(choices_raw, list) or not all(isinstance(c, str) and c.strip() for c in choices_raw):
        raise InvalidArgument("choices must be a list of non-empty strings", field=f"{where}.choices")
    choices = tuple(c.strip() for c in choices_raw)
    answer = q.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise InvalidArgument("answer must be a string", field=f"{where}.answer")
    if choices:
        if len({normalize(c) for c in choices}) != len(choices) or len(choices) < 2:
            raise InvalidArgument(f"give at least two distinct choices; got {list(choices)}", field=f"{where}.choices")
        match = next((c for c in choices if answer is not None and normalize(c) == normalize(answer)), None)
        if match is None:
            raise InvalidArgument(f"answer {answer!r} is not one of the choices {list(choices)}", field=f"{where}.answer")
        answer = match
    elif answer is not None and normalize(answer) != "yes":
        raise InvalidArgument(
            f'a question without choices is a yes/no question expecting "yes"; got answer {answer!r} '
            '(give choices ["yes", "no"] for another answer)',
            field=f"{where}.answer",
        )
    return Question(
        id=qid, text=text, parents=tuple(str(p) for p in parents), category=str(q.get("category") or ""),
        detail=str(q.get("detail") or ""), tuple=str(q.get("tuple") or ""), choices=choices, answer=answer or "yes",
    )


def _check_graph(questions: Sequence[Question], where: str) -> None:
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidArgument(f"question id {dup!r} appears twice", field=f"{where}.questions")
    yes_no = {q.id for q in questions if not q.choices}
    for q in questions:
        for p in q.parents:
            if p == q.id:
                raise InvalidArgument(f"question {q.id!r} lists itself as a parent", field=f"{where}.questions[{q.id}].parents")
            if p not in ids:
                raise InvalidArgument(f"question {q.id!r} has unknown parent {p!r}", field=f"{where}.questions[{q.id}].parents")
            if p not in yes_no:
                # The DSG rule reads a parent's answer as yes/no; a multiple-choice answer has no such reading.
                raise InvalidArgument(
                    f"question {q.id!r} has parent {p!r}, a multiple-choice question; parents must be yes/no questions",
                    field=f"{where}.questions[{q.id}].parents",
                )
    parents = {q.id: q.parents for q in questions}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for p in parents[node]:
            if state.get(p) == 1:
                raise InvalidArgument(f"questions form a dependency cycle: {' -> '.join([*path, node, p])}", field=f"{where}.questions")
            if p not in state:
                visit(p, [*path, node])
        state[node] = 2

    for q in questions:
        if q.id not in state:
            visit(q.id, [])
