"""The data model every evaluation module shares: items, questions, answered samples, scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Question:
    """One question about one prompt.

    DSG questions are yes/no (``choices`` empty, expected answer "yes"); TIFA questions are
    multiple choice (``choices`` non-empty, ``answer`` one of them).  ``parents`` are ids of
    questions of the same item that must hold for this one to make sense (DSG dependencies).
    """

    id: str
    text: str
    parents: tuple[str, ...] = ()
    category: str = ""  # question type, e.g. DSG's broad category: entity, attribute, relation, global, other
    detail: str = ""  # finer type, e.g. DSG's detailed category: whole, color, spatial, count, ...
    tuple: str = ""  # the DSG semantic tuple the question was written from, when known
    choices: tuple[str, ...] = ()
    answer: str = "yes"


@dataclass(frozen=True)
class EvalItem:
    """A prompt of a benchmark with its questions.

    ``category`` is the slice reports group prompts by: a DSG-1k source dataset (``whoops``,
    ``countbench``, ...) or, for held-out prompt sets, the skill.
    """

    id: str
    prompt: str
    category: str
    questions: tuple[Question, ...]
    skill: str = ""

    def question(self, question_id: str) -> Question:
        for q in self.questions:
            if q.id == question_id:
                return q
        raise KeyError(question_id)


@dataclass(frozen=True)
class SliceScore:
    """Scores of one slice (a category, a skill, or everything) for one target and metric.

    ``score_percent``: mean over prompts of the per-prompt score (the DSG/TIFA standard figure);
    ``micro_percent``: questions answered correctly over all questions (what SELMA's script printed).
    """

    score_percent: float
    micro_percent: float
    prompt_count: int
    question_count: int

    def to_dict(self) -> dict[str, Any]:
        return {"score_percent": self.score_percent, "micro_percent": self.micro_percent,
                "prompt_count": self.prompt_count, "question_count": self.question_count}


@dataclass
class ScoreTable:
    """Per-category scores and the overall score of one metric for one target.

    ``per_item`` maps item id → per-prompt score in [0, 1] (mean over the item's images);
    ``per_question`` maps (item id, image index, question id) → the question's score after the
    dependency rule (1.0 / 0.0), which the report uses to highlight failing questions.
    """

    metric: str  # "dsg" or "tifa"
    overall: SliceScore
    per_category: dict[str, SliceScore] = field(default_factory=dict)
    per_question_category: dict[str, SliceScore] = field(default_factory=dict)
    per_item: dict[str, float] = field(default_factory=dict)
    per_question: dict[tuple[str, int, str], float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (percentages as floats; ``per_question`` omitted: it is large)."""
        return {
            "metric": self.metric,
            "overall": self.overall.to_dict(),
            "per_category": {k: v.to_dict() for k, v in sorted(self.per_category.items())},
            "per_question_category": {k: v.to_dict() for k, v in sorted(self.per_question_category.items())},
            "per_item": dict(sorted(self.per_item.items())),
        }
