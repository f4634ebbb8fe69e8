"""TIFA-style scoring: answer → choice mapping (rules, then MiniLM embeddings) and the averages."""

from __future__ import annotations

import pytest

from selma.errors import InvalidArgument
from selma_evaluation.tifa import ChoiceMapper, normalize, score_tifa
from selma_evaluation.types import EvalItem, Question


class _NoModel:
    """Fails the test if the mapper reaches for embeddings when a rule should have matched."""

    def encode(self, *args, **kwargs):
        raise AssertionError("the embedding model was used")


@pytest.fixture(scope="module")
def minilm_mapper():
    import torch

    torch.set_num_threads(1)
    return ChoiceMapper()  # the bundled all-MiniLM-L6-v2, loaded on first use


def test_normalize_drops_case_punctuation_articles_and_spells_numbers_as_digits():
    assert normalize("  The Red  Apple. ") == "red apple"
    assert normalize("Two!") == normalize("2") == "2"
    assert normalize("an owl's nest") == "owls nest"


def test_exact_and_yes_no_matches_never_load_a_model():
    mapper = ChoiceMapper(model=_NoModel())
    got = mapper.map(
        ["Dog.", "the CAR", "two", "Yes, there is.", "no it is not", "a red apple"],
        [["dog", "cat"], ["dog", "car"], ["1", "2", "3"], ["yes", "no"], ["yes", "no"], ["Red apple", "green apple"]],
    )
    assert got == ["dog", "car", "2", "yes", "no", "Red apple"]


@pytest.mark.slow
def test_near_answers_map_to_the_closest_choice_by_embedding(minilm_mapper):
    answers = ["a puppy", "kitten", "automobile", "sofa", "wooden", "nope"]
    choices = [
        ["dog", "cat", "car"],
        ["dog", "cat", "car"],
        ["dog", "cat", "car"],
        ["couch", "table", "lamp"],
        ["wood", "metal", "glass"],
        ["yes", "no"],
    ]
    assert minilm_mapper.map(answers, choices) == ["dog", "cat", "car", "couch", "wood", "no"]
    # Cached embeddings give the same answers on a second batch (and keep choice spelling).
    assert minilm_mapper.map(["puppy"], [["Dog", "Cat"]]) == ["Dog"]


def test_map_rejects_mismatched_lengths_and_empty_choices():
    mapper = ChoiceMapper(model=_NoModel())
    with pytest.raises(InvalidArgument):
        mapper.map(["a"], [])
    with pytest.raises(InvalidArgument, match="no choices"):
        mapper.map(["a"], [[]])


def _q(qid: str, answer: str, choices: tuple[str, ...] = (), category: str = "entity") -> Question:
    return Question(id=qid, text=f"q{qid}?", choices=choices, answer=answer, category=category)


def test_per_prompt_mean_differs_from_the_micro_average():
    colors = ("red", "blue", "green")
    # Item a: 1 question, right.  Item b: 4 questions, 1 right.  Per prompt: (1 + 0.25) / 2 = 62.5 %;
    # micro: 2 right of 5 = 40 %.
    a = EvalItem("a", "a red ball", "whoops", (_q("1", "red", colors, "attribute"),))
    b = EvalItem(
        "b",
        "four things",
        "countbench",
        (_q("1", "yes"), _q("2", "yes"), _q("3", "red", colors, "attribute"), _q("4", "2", ("1", "2", "3"), "attribute")),
    )
    samples = [
        (a, 0, {"1": "Red."}),
        (b, 0, {"1": "yes", "2": "no", "3": "blue", "4": "three"}),
    ]
    table = score_tifa(samples, ChoiceMapper(model=_NoModel()))
    assert table.metric == "tifa"
    assert table.overall.score_percent == pytest.approx(62.5)
    assert table.overall.micro_percent == pytest.approx(40.0)
    assert (table.overall.prompt_count, table.overall.question_count) == (2, 5)
    assert table.per_category["whoops"].score_percent == pytest.approx(100.0)
    assert table.per_category["countbench"].score_percent == pytest.approx(25.0)
    assert table.per_item == {"a": 1.0, "b": 0.25}
    # Question categories: entity = b's two yes/no questions (1 of 2); attribute = a:1 right, b: 0 of 2.
    assert table.per_question_category["entity"].score_percent == pytest.approx(50.0)
    assert table.per_question_category["attribute"].score_percent == pytest.approx(50.0)
    assert table.per_question_category["attribute"].micro_percent == pytest.approx(100 / 3)
    assert table.per_question[("b", 0, "4")] == 0.0 and table.per_question[("a", 0, "1")] == 1.0


def test_prompt_score_is_the_mean_over_its_images_first():
    item = EvalItem("x", "a cat", "c", (_q("1", "yes"), _q("2", "cat", ("cat", "dog"))))
    other = EvalItem("y", "a dog", "c", (_q("1", "yes"),))
    samples = [
        (item, 0, {"1": "yes", "2": "cat"}),  # 1.0
        (item, 1, {"1": "no", "2": "cat"}),  # 0.5
        (other, 0, {"1": "no"}),  # 0.0
    ]
    table = score_tifa(samples, ChoiceMapper(model=_NoModel()))
    assert table.per_item == {"x": 0.75, "y": 0.0}
    assert table.overall.score_percent == pytest.approx(37.5)
    assert table.overall.micro_percent == pytest.approx(60.0)
    assert table.overall.question_count == 5


def test_missing_answer_names_item_and_question():
    item = EvalItem("p7", "a cat", "c", (_q("1", "yes"), _q("2", "cat", ("cat", "dog"))))
    with pytest.raises(InvalidArgument, match=r"question '2' of item 'p7'"):
        score_tifa([(item, 0, {"1": "yes"})], ChoiceMapper(model=_NoModel()))


def test_bad_sample_sets_are_rejected():
    item = EvalItem("p", "a cat", "c", (_q("1", "yes"),))
    mapper = ChoiceMapper(model=_NoModel())
    with pytest.raises(InvalidArgument, match="no answered images"):
        score_tifa([], mapper)
    with pytest.raises(InvalidArgument, match="answered twice"):
        score_tifa([(item, 0, {"1": "yes"}), (item, 0, {"1": "no"})], mapper)
    with pytest.raises(InvalidArgument, match="no questions"):
        score_tifa([(EvalItem("e", "x", "c", ()), 0, {})], mapper)
