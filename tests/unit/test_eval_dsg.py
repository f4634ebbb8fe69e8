"""DSG scoring: the dependency rule, per-prompt vs micro averages, and the shipped DSG-1k benchmark."""

from __future__ import annotations

import csv
import logging
from collections import Counter

import pytest

from selma.errors import InvalidArgument
from selma_evaluation import dsg
from selma_evaluation.types import EvalItem, Question


def make_item(graph: dict[str, tuple[str, ...]], item_id: str = "i", category: str = "c",
              types: dict[str, str] | None = None) -> EvalItem:
    """An item whose questions are ``graph``'s keys, each with the given parents."""
    types = types or {}
    return EvalItem(id=item_id, prompt=f"prompt {item_id}", category=category, questions=tuple(
        Question(id=qid, text=f"q{qid}?", parents=parents, category=types.get(qid, "entity")) for qid, parents in graph.items()))


def answers(yes: str, no: str = "") -> dict[str, bool]:
    return {**{q: True for q in yes.split()}, **{q: False for q in no.split()}}


# --------------------------------------------------------------------------- the dependency rule


@pytest.mark.parametrize("rule", dsg.RULES)
def test_parent_answered_no_zeroes_its_children_but_not_siblings(rule):
    item = make_item({"a": (), "b": ("a",), "c": ("a",), "d": ()})
    assert dsg.question_scores(item, answers("b c d", "a"), rule) == {"a": 0.0, "b": 0.0, "c": 0.0, "d": 1.0}


@pytest.mark.parametrize("rule", dsg.RULES)
def test_child_answered_no_scores_zero_and_leaves_parent(rule):
    item = make_item({"a": (), "b": ("a",)})
    assert dsg.question_scores(item, answers("a", "b"), rule) == {"a": 1.0, "b": 0.0}


def test_chain_head_answered_no_zeroes_the_whole_chain_transitively():
    item = make_item({"a": (), "b": ("a",), "c": ("b",)})
    assert dsg.question_scores(item, answers("b c", "a")) == {"a": 0.0, "b": 0.0, "c": 0.0}
    # A "no" in the middle zeroes what lies below it only.
    assert dsg.question_scores(item, answers("a c", "b")) == {"a": 1.0, "b": 0.0, "c": 0.0}


def test_direct_rule_differs_from_transitive_only_on_chains():
    chain = make_item({"a": (), "b": ("a",), "c": ("b",)})
    assert dsg.question_scores(chain, answers("b c", "a"), "direct") == {"a": 0.0, "b": 0.0, "c": 1.0}
    assert dsg.question_scores(chain, answers("b c", "a"), "transitive") == {"a": 0.0, "b": 0.0, "c": 0.0}
    # Without chains (depth one) the two rules agree on every answer pattern.
    flat = make_item({"a": (), "b": (), "c": ("a", "b"), "d": ("a",)})
    for mask in range(16):
        given = {q: bool(mask >> i & 1) for i, q in enumerate("abcd")}
        assert dsg.question_scores(flat, given, "direct") == dsg.question_scores(flat, given, "transitive")


@pytest.mark.parametrize("rule", dsg.RULES)
def test_multiple_parents_must_all_hold(rule):
    item = make_item({"a": (), "b": (), "c": ("a", "b")})
    assert dsg.question_scores(item, answers("a b c"), rule)["c"] == 1.0
    assert dsg.question_scores(item, answers("a c", "b"), rule)["c"] == 0.0
    assert dsg.question_scores(item, answers("b c", "a"), rule)["c"] == 0.0


def test_diamond_with_one_failing_branch_zeroes_the_join():
    item = make_item({"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")})
    assert dsg.question_scores(item, answers("a b d", "c")) == {"a": 1.0, "b": 1.0, "c": 0.0, "d": 0.0}


@pytest.mark.parametrize("rule", dsg.RULES)
def test_cycles_terminate_and_score_one_only_when_answered_yes_throughout(rule):
    # b <-> c form a cycle below a; d hangs off the cycle; s depends on itself.
    item = make_item({"a": (), "b": ("a", "c"), "c": ("b",), "d": ("c",), "s": ("s",)})
    assert dsg.question_scores(item, answers("a b c d s"), rule) == dict.fromkeys("abcds", 1.0)
    scores = dsg.question_scores(item, answers("a b d s", "c"), rule)
    assert scores["c"] == 0.0 and scores["b"] == 0.0 and scores["d"] == 0.0 and scores["a"] == 1.0
    assert dsg.question_scores(item, answers("a b c d", "s"), rule)["s"] == 0.0


def test_transitive_cycle_member_answered_no_zeroes_every_member_and_descendant():
    item = make_item({"x": ("z",), "y": ("x",), "z": ("y",), "w": ("y",)})
    assert dsg.question_scores(item, answers("y z w", "x")) == dict.fromkeys("xyzw", 0.0)


def test_missing_answer_names_item_and_question():
    item = make_item({"a": (), "b": ("a",)}, item_id="whoops_1")
    with pytest.raises(InvalidArgument, match=r"whoops_1.*\bb\b"):
        dsg.question_scores(item, answers("a"))
    with pytest.raises(InvalidArgument, match=r"whoops_1.*\bb\b"):
        dsg.score_dsg([(item, 0, answers("a"))])


def test_unknown_parent_and_unknown_rule_are_invalid_arguments():
    with pytest.raises(InvalidArgument, match="depends on 'zz'"):
        dsg.question_scores(make_item({"a": ("zz",)}), answers("a"))
    with pytest.raises(InvalidArgument, match="transitive, direct"):
        dsg.question_scores(make_item({"a": ()}), answers("a"), rule="lenient")
    with pytest.raises(InvalidArgument, match="transitive, direct"):
        dsg.score_dsg([], rule="lenient")


def test_answers_for_questions_the_item_lacks_are_ignored():
    assert dsg.question_scores(make_item({"a": ()}), answers("a zz")) == {"a": 1.0}


# --------------------------------------------------------------------------- averages


def test_mean_over_prompts_and_micro_average_differ_as_expected():
    a = make_item({"1": ()}, item_id="A", category="x")
    b = make_item({"1": (), "2": (), "3": ()}, item_id="B", category="x")
    table = dsg.score_dsg([(a, 0, answers("1")), (b, 0, answers("", "1 2 3"))])
    assert table.metric == "dsg"
    assert table.overall.score_percent == pytest.approx(50.0)
    assert table.overall.micro_percent == pytest.approx(25.0)
    assert (table.overall.prompt_count, table.overall.question_count) == (2, 4)
    assert table.per_category["x"] == table.overall
    assert table.per_item == {"A": 1.0, "B": 0.0}
    assert table.per_question == {("A", 0, "1"): 1.0, ("B", 0, "1"): 0.0, ("B", 0, "2"): 0.0, ("B", 0, "3"): 0.0}


def test_categories_and_question_categories_are_separate_slices():
    types = {"1": "entity", "2": "attribute", "3": "relation"}
    a = make_item({"1": (), "2": ("1",), "3": ("1",)}, item_id="A", category="whoops", types=types)
    b = make_item({"1": (), "2": ("1",)}, item_id="B", category="vrd", types=types)
    c = make_item({"1": (), "2": (), "3": ()}, item_id="C", category="vrd", types=types)
    table = dsg.score_dsg([
        (a, 0, answers("1 2", "3")),      # 2/3
        (b, 0, answers("2", "1")),        # parent "no" zeroes 2: 0/2
        (c, 0, answers("1 2 3")),         # 3/3
    ])
    assert list(table.per_category) == ["vrd", "whoops"]
    assert table.per_category["whoops"].score_percent == pytest.approx(200 / 3)
    assert table.per_category["vrd"].score_percent == pytest.approx(50.0)
    assert table.per_category["vrd"].micro_percent == pytest.approx(60.0)
    assert table.overall.score_percent == pytest.approx(100 * (2 / 3 + 0 + 1) / 3)
    assert table.overall.micro_percent == pytest.approx(100 * 5 / 8)
    qc = table.per_question_category
    assert sorted(qc) == ["attribute", "entity", "relation"]
    assert qc["entity"].micro_percent == pytest.approx(200 / 3) and qc["entity"].question_count == 3
    assert qc["attribute"].micro_percent == pytest.approx(200 / 3)
    assert qc["relation"].micro_percent == pytest.approx(50.0) and qc["relation"].prompt_count == 2


def test_item_score_is_the_mean_over_its_images():
    item = make_item({"1": (), "2": ()}, item_id="A")
    other = make_item({"1": ()}, item_id="B")
    table = dsg.score_dsg([(item, 0, answers("1 2")), (item, 1, answers("1", "2")), (item, 2, answers("", "1 2")),
                           (other, 0, answers("1"))])
    assert table.per_item["A"] == pytest.approx(0.5)
    assert table.overall.prompt_count == 2 and table.overall.question_count == 7  # answered: 2 questions × 3 images + 1
    assert table.overall.score_percent == pytest.approx(75.0)
    assert table.overall.micro_percent == pytest.approx(100 * 4 / 7)
    assert table.per_question[("A", 1, "2")] == 0.0


def test_duplicate_images_empty_input_and_itemless_questions_are_rejected():
    item = make_item({"1": ()})
    with pytest.raises(InvalidArgument, match="twice"):
        dsg.score_dsg([(item, 0, answers("1")), (item, 0, answers("1"))])
    with pytest.raises(InvalidArgument, match="no answered images"):
        dsg.score_dsg([])
    with pytest.raises(InvalidArgument, match="no questions"):
        dsg.score_dsg([(EvalItem(id="e", prompt="p", category="c", questions=()), 0, {})])


# --------------------------------------------------------------------------- DSG-1k


def test_dsg1k_has_1060_prompts_and_8182_questions_in_ten_categories():
    items = dsg.load_dsg1k()
    assert len(items) == 1060
    assert sum(len(item.questions) for item in items) == 8182
    assert Counter(item.category for item in items) == {
        "tifa160": 160, "whoops": 100, "countbench": 100, "localized_narratives": 100, "stanford_paragraph": 100,
        "posescript": 100, "vrd": 100, "midjourney": 100, "diffusiondb": 100, "drawtext": 100}
    assert dsg.dsg1k_categories() == sorted({item.category for item in items})
    assert Counter(q.category for item in items for q in item.questions) == {
        "entity": 3395, "relation": 2069, "attribute": 1950, "global": 475, "other": 293}


def test_dsg1k_items_keep_file_order_and_carry_question_metadata():
    items = dsg.load_dsg1k()
    assert [item.id for item in items[:2]] == ["whoops_5", "localized_narratives_95"]
    first = items[0]
    assert first.prompt == "A rubix cube with ten squares of purple"
    q = first.question("2")
    assert (q.text, q.parents, q.category, q.detail, q.tuple) == (
        "Is the rubix cube purple?", ("1",), "attribute", "color", "attribute - color (rubix cube, purple)")
    assert [q.id for q in first.questions] == ["1", "2", "3"]


def test_dsg1k_noisy_dependencies_keep_only_other_questions_of_the_item():
    by_id = {item.id: item for item in dsg.load_dsg1k()}
    assert by_id["posescript_69"].question("9").parents == ("5",)            # "5, right"
    assert by_id["localized_narratives_96"].question("10").parents == ()     # "10": itself
    assert by_id["localized_narratives_34"].question("8").parents == ("4",)  # "4,8"
    assert by_id["tifa160_134"].question("5").parents == ("2",)              # "1,2": the item has no question 1
    for item in by_id.values():
        ids = {q.id for q in item.questions}
        assert all(p in ids and p != q.id for q in item.questions for p in q.parents)


def test_dsg1k_cyclic_items_score_fully_when_everything_is_yes():
    item = next(i for i in dsg.load_dsg1k() if i.id == "diffusiondb_16")
    assert set(dsg.question_scores(item, dict.fromkeys((q.id for q in item.questions), True)).values()) == {1.0}


def test_dsg1k_ignored_dependency_tokens_are_logged_once_at_debug(caplog):
    dsg._dsg1k.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="selma_evaluation.dsg"):
        dsg.load_dsg1k()
        dsg.load_dsg1k()
    assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == 1


def test_dsg1k_is_parsed_once():
    assert dsg.load_dsg1k()[5] is dsg.load_dsg1k()[5]


def test_dsg1k_category_subset_and_prompt_cap():
    whoops = dsg.load_dsg1k(["whoops"])
    assert len(whoops) == 100 and {i.category for i in whoops} == {"whoops"}
    two = dsg.load_dsg1k(["vrd", "whoops"], max_prompts=5)
    assert [i.id for i in two] == [i.id for i in dsg.load_dsg1k() if i.category in ("vrd", "whoops")][:5]


def test_dsg1k_unknown_category_lists_the_valid_ones():
    with pytest.raises(InvalidArgument, match="'coco'.*countbench, diffusiondb") as err:
        dsg.load_dsg1k(["whoops", "coco"])
    assert err.value.field == "spec.categories"
    with pytest.raises(InvalidArgument):
        dsg.load_dsg1k(max_prompts=-1)


def test_dsg1k_ships_its_apache_license():
    assert "Apache License" in dsg.dsg1k_license()
    assert dsg.dsg1k_license_path().is_file() and dsg.dsg1k_annotations_path().is_file()


def test_dsg1k_matches_the_raw_csv_row_for_row():
    with dsg.dsg1k_annotations_path().open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    parsed = [(item.id, q.id, q.text) for item in dsg.load_dsg1k() for q in item.questions]
    assert parsed == [(r["item_id"], r["proposition_id"], r["question_natural_language"].strip()) for r in rows]


# --------------------------------------------------------------------------- output


def test_summary_rounds_percentages_to_one_decimal_and_table_lists_categories_then_overall():
    a = make_item({"1": (), "2": (), "3": ()}, item_id="A", category="b")
    b = make_item({"1": ()}, item_id="B", category="a")
    table = dsg.score_dsg([(a, 0, answers("1", "2 3")), (b, 0, answers("1"))])
    summary = dsg.summary_dict(table, "transitive")
    assert summary["benchmark"] == "dsg-1k" and summary["rule"] == "transitive"
    assert summary["overall"] == {"score_percent": 66.7, "micro_percent": 50.0, "prompt_count": 2, "question_count": 4}
    assert summary["categories"]["b"]["score_percent"] == 33.3
    rows = [line.split() for line in dsg.format_table(table).splitlines()[2:]]
    assert rows == [["a", "1", "1", "100.0", "100.0"], ["b", "1", "3", "33.3", "33.3"], ["overall", "2", "4", "66.7", "50.0"]]
