"""The evaluation report: numbers, tables, charts, HTML page and image files from synthetic results."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from selma.errors import InvalidArgument
from selma_evaluation.report import (
    CHART_DPI,
    CHART_INCHES,
    ReportInput,
    TargetResult,
    build_report,
    format_table,
)
from selma_evaluation.types import EvalItem, Question, ScoreTable, SliceScore

SCRIPT_PROMPT = "<script>alert('x')</script> a dog left of a cat"
SELMA = "selma/5 $x$"  # a user label: a slash for the slug, dollars for matplotlib's mathtext

ITEMS = [
    EvalItem("i1", "two cats", "count", (
        Question("q1", "Is there a cat?", category="entity"),
        Question("q2", "Are there two cats?", parents=("q1",), category="attribute"),
    )),
    EvalItem("i2", SCRIPT_PROMPT, "spatial", (
        Question("q1", "Is there a dog?", category="entity"),
        Question("q2", "Is there a cat?", category="entity"),
        Question("q3", "Is the dog left of the cat?", parents=("q1", "q2"), category="relation"),
    )),
    EvalItem("i3", "a red ball", "spatial", (
        Question("q1", "Is there a ball?", category="entity"),
        Question("q2", "Is the ball red?", parents=("q1",), category="attribute"),
    )),
]
# raw yes/no answers per target: base wins i3, selma wins i1 and i2
ANSWERS = {
    "base": {"i1": ["yes", "no"], "i2": ["no", "yes", "yes"], "i3": ["yes", "yes"]},
    SELMA: {"i1": ["yes", "yes"], "i2": ["yes", "yes", "yes"], "i3": ["yes", "no"]},
}


def _mean(xs):
    return sum(xs) / len(xs)


def _table(answers: dict[str, list[str]]) -> ScoreTable:
    """Score by the DSG rule (a question whose parent is not 'yes' scores 0); one image per item."""
    per_question, per_item, by_cat, by_qcat = {}, {}, {}, {}
    for item in ITEMS:
        raw = dict(zip((q.id for q in item.questions), answers[item.id], strict=False))
        scores = {q.id: float(raw[q.id] == "yes" and all(raw[p] == "yes" for p in q.parents)) for q in item.questions}
        per_question.update({(item.id, 0, qid): s for qid, s in scores.items()})
        per_item[item.id] = _mean(list(scores.values()))
        by_cat.setdefault(item.category, []).append(list(scores.values()))
        for q in item.questions:
            by_qcat.setdefault(q.category, {}).setdefault(item.id, []).append(scores[q.id])

    def slice_(prompts: list[list[float]]) -> SliceScore:
        flat = [s for p in prompts for s in p]
        return SliceScore(100 * _mean([_mean(p) for p in prompts]), 100 * _mean(flat), len(prompts), len(flat))

    return ScoreTable(
        metric="dsg",
        overall=slice_([p for ps in by_cat.values() for p in ps]),
        per_category={c: slice_(ps) for c, ps in by_cat.items()},
        per_question_category={c: slice_(list(d.values())) for c, d in by_qcat.items()},
        per_item=per_item,
        per_question=per_question,
    )


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def _target(label: str, description: str, colour: tuple[int, int, int]) -> TargetResult:
    answers = {(item.id, 0, q.id): a for item in ITEMS for q, a in zip(item.questions, ANSWERS[label][item.id], strict=False)}
    return TargetResult(label=label, description=description, scores={"dsg": _table(ANSWERS[label])},
                        images={(item.id, 0): _png(colour) for item in ITEMS}, answers={"dsg": answers})


SEARCH = [
    {"index": 0, "merge": {"method": "linear", "experts": [{"expert_id": "e1", "weight": 0.5}], "density": None},
     "validation_score_percent": 70.0},
    {"index": 1, "merge": {"method": "ties", "experts": [{"expert_id": "e1", "weight": 1.0}], "density": 0.5},
     "validation_score_percent": 80.0},
    {"index": 2, "merge": {"method": "linear", "experts": [{"expert_id": "e1", "weight": 1.0}], "density": None},
     "validation_score_percent": 75.0},
]


def _input(**overrides) -> ReportInput:
    kw = dict(
        title="DSG <eval>", benchmark="dsg-1k", items=ITEMS,
        targets=[_target("base", "base model", (255, 0, 0)),
                 _target(SELMA, "merged: mean_delta of 5 experts", (0, 0, 255))],
        seeds={(item.id, 0): 1000 + n for n, item in enumerate(ITEMS)},
        vqa="tiny-test", settings={"steps": 4, "scheduler": "ddim", "guidance_scale": 7.5},
    )
    kw.update(overrides)
    return ReportInput(**kw)


@pytest.fixture(scope="module")
def report() -> dict[str, bytes]:
    return build_report(_input())


def _item_block(page: str, item_id: str) -> str:
    start = page.index(f'<div class="item" id="item-{item_id}">')
    end = page.find('<div class="item" ', start + 1)
    return page[start: end if end != -1 else len(page)]


def _verdicts(cell: str) -> dict[str, str]:
    return {qid: cls for cls, qid in re.findall(r'<li class="q (\w+)" data-question="([^"]+)">', cell)}


def test_report_has_every_expected_file(report):
    expected = {"report.json", "verdicts.jsonl", "tables.md", "index.html", "charts/overall.png",
                "charts/dsg_by_category.png", "charts/dsg_delta.png"}
    expected |= {f"images/{slug}/{item.id}-0.png" for slug in ("base", "selma-5-x") for item in ITEMS}
    assert set(report) == expected
    assert all(isinstance(v, bytes) for v in report.values())


def test_report_json_holds_scores_and_deltas_in_points(report):
    data = json.loads(report["report.json"])
    assert data["reference"] == "base" and data["metrics"] == ["dsg"] and data["vqa"] == "tiny-test"
    base = data["targets"][0]["scores"]["dsg"]
    assert base["overall"]["score_percent"] == pytest.approx(100 * (0.5 + 1 / 3 + 1) / 3)
    assert base["per_item"] == pytest.approx({"i1": 0.5, "i2": 1 / 3, "i3": 1.0})
    assert set(base["per_question_category"]) == {"entity", "attribute", "relation"}
    delta = data["deltas"][SELMA]["dsg"]
    assert delta["overall"]["score_pp"] == pytest.approx(100 * (2.5 / 3 - (0.5 + 1 / 3 + 1) / 3), abs=1e-5)
    assert delta["overall"]["micro_pp"] == pytest.approx(100 * (6 / 7 - 4 / 7), abs=1e-5)
    assert delta["per_category"]["count"]["score_pp"] == pytest.approx(50.0)
    assert delta["per_category"]["spatial"]["score_pp"] == pytest.approx(100 * (0.75 - 2 / 3), abs=1e-5)
    assert delta["per_question_category"]["relation"]["score_pp"] == pytest.approx(100.0)
    assert data["seeds"][0] == {"item_id": "i1", "image_index": 0, "seed": 1000}
    items = {it["id"]: it for it in data["items"]}
    assert items["i3"]["swing"] == {"target": SELMA, "metric": "dsg", "delta_pp": -50.0}
    assert data["search"] is None


def test_verdicts_jsonl_marks_dependency_zeroed_questions_skipped(report):
    rows = [json.loads(line) for line in report["verdicts.jsonl"].decode().splitlines()]
    assert len(rows) == 2 * 7
    row = {(r["target"], r["item_id"], r["question_id"]): r for r in rows}
    assert row[("base", "i2", "q1")]["status"] == "fail" and row[("base", "i2", "q1")]["answer"] == "no"
    assert row[("base", "i2", "q3")]["status"] == "skipped" and row[("base", "i2", "q3")]["answer"] == "yes"
    assert row[("base", "i1", "q2")]["status"] == "fail"
    assert row[(SELMA, "i2", "q3")]["status"] == "pass"


def test_tables_md_shows_scores_deltas_micro_and_question_categories(report):
    md = report["tables.md"].decode()
    assert "| category | prompts | base | selma/5 $x$ |" in md
    assert "| count | 1 | 50.0 | 100.0 |" in md
    assert "| spatial | 2 | 66.7 | 75.0 |" in md
    assert "| overall | 3 | 61.1 | 83.3 |" in md
    assert "| count | +50.0 |" in md and "| spatial | +8.3 |" in md and "| overall | +22.2 |" in md
    assert "micro-average" in md and "| overall | 3 | 57.1 | 85.7 |" in md  # micro: 4/7 vs 6/7
    assert "| relation | 1 | 0.0 | 100.0 |" in md
    assert "search" not in md.lower()


def test_charts_are_pngs_of_the_configured_size(report):
    for path, kind in [("charts/overall.png", "overall"), ("charts/dsg_by_category.png", "by_category"),
                       ("charts/dsg_delta.png", "delta")]:
        with Image.open(io.BytesIO(report[path])) as im:
            assert im.format == "PNG"
            w, h = CHART_INCHES[kind]
            assert im.size == (round(w * CHART_DPI), round(h * CHART_DPI))
    with Image.open(io.BytesIO(report["images/base/i1-0.png"])) as im:
        assert im.size == (8, 8) and im.getpixel((0, 0)) == (255, 0, 0)


def test_two_builds_give_identical_bytes(report):
    again = build_report(_input())
    assert again.keys() == report.keys()
    assert [p for p in report if report[p] != again[p]] == []


def test_html_shows_side_by_side_images_and_question_verdicts(report):
    page = report["index.html"].decode()
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained, inert
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; a dog left of a cat" in page
    assert "DSG &lt;eval&gt;" in page
    for chart in ("charts/overall.png", "charts/dsg_by_category.png", "charts/dsg_delta.png"):
        assert f'src="{chart}"' in page
    block = _item_block(page, "i2")
    assert 'src="images/base/i2-0.png"' in block and 'src="images/selma-5-x/i2-0.png"' in block
    assert "seed 1001" in block
    base_cell, selma_cell = block.split('<div class="cell">')[1:3]
    assert _verdicts(base_cell) == {"q1": "fail", "q2": "pass", "q3": "skipped"}
    assert "skipped: parent failed" in base_cell
    assert _verdicts(selma_cell) == {"q1": "pass", "q2": "pass", "q3": "pass"}
    # wins and losses first: i2 (+66.7), then the ±50 ties in benchmark order
    assert [page.index(f'id="item-{i}"') for i in ("i2", "i1", "i3")] == sorted(
        page.index(f'id="item-{i}"') for i in ("i2", "i1", "i3"))
    assert "items not shown" not in page and "Merge-weight search" not in page


def test_item_cap_limits_the_page_and_says_how_many_are_omitted():
    page = build_report(_input(), max_items=1)["index.html"].decode()
    assert 'id="item-i2"' in page and 'id="item-i1"' not in page and 'id="item-i3"' not in page
    assert "2 of 3 items not shown" in page and "report.json" in page


def test_search_section_appears_when_a_search_ran():
    files = build_report(_input(search=SEARCH, best_merge=SEARCH[1]["merge"]))
    md = files["tables.md"].decode()
    section = md[md.index("## Merge-weight search"):]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "rank" not in line]
    assert [r.split(" | ")[1] for r in rows] == ["1", "2", "0"]  # trials by validation score
    assert "★ best" in rows[0] and "80.0" in rows[0] and "e1×1" in rows[0]
    assert "★" not in "".join(rows[1:])
    with Image.open(io.BytesIO(files["charts/search.png"])) as im:
        assert im.size == (round(CHART_INCHES["search"][0] * CHART_DPI), round(CHART_INCHES["search"][1] * CHART_DPI))
    page = files["index.html"].decode()
    assert "Merge-weight search" in page and 'src="charts/search.png"' in page
    assert json.loads(files["report.json"])["search"]["best_index"] == 1


def test_slugs_are_path_safe_and_unique():
    targets = [_target("base", "base model", (0, 0, 0)), _target(SELMA, "merged", (1, 1, 1))]
    targets[1].label = "../BASE"
    files = build_report(_input(targets=targets))
    dirs = {p.split("/")[1] for p in files if p.startswith("images/")}
    assert dirs == {"base", "base-2"}


def test_single_target_has_no_delta_charts():
    files = build_report(_input(targets=[_target("base", "base model", (0, 0, 0))]), max_items=0)
    assert "charts/dsg_delta.png" not in files and "charts/overall.png" in files
    assert json.loads(files["report.json"])["deltas"] == {}
    assert "3 of 3 items not shown" in files["index.html"].decode()


def test_bad_input_is_rejected_naming_the_field():
    with pytest.raises(InvalidArgument, match="at least one target"):
        build_report(_input(targets=[]))
    with pytest.raises(InvalidArgument, match="unique"):
        build_report(_input(targets=[_target("base", "a", (0, 0, 0)), _target("base", "b", (0, 0, 0))]))
    with pytest.raises(InvalidArgument, match="max_items"):
        build_report(_input(), max_items=-1)


def test_format_table_aligns_categories_and_targets():
    text = format_table({"base": _table(ANSWERS["base"]), "selma": _table(ANSWERS[SELMA])}, "dsg")
    lines = text.splitlines()
    assert lines[0].split() == ["DSG", "(%)", "prompts", "base", "selma"]
    assert lines[2].split() == ["count", "1", "50.0", "100.0"]
    assert lines[3].split() == ["spatial", "2", "66.7", "75.0"]
    assert lines[-1].split() == ["overall", "3", "61.1", "83.3"]
    assert len({len(line) for line in lines}) == 1  # columns line up


def test_importing_the_report_module_does_not_import_matplotlib():
    code = "import sys, selma_evaluation.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_plumbing_only_vqa_is_called_out_and_a_real_one_is_not():
    """tiny_test answers pseudo-randomly: its report must not read like a faithfulness result (#23)."""
    plain = build_report(_input())
    assert json.loads(plain["report.json"])["vqa_plumbing_only"] is False
    assert "plumbing" not in plain["tables.md"].decode() and "plumbing" not in plain["index.html"].decode()
    flagged = build_report(_input(plumbing_only=True))
    assert json.loads(flagged["report.json"])["vqa_plumbing_only"] is True
    assert "**Warning: the tiny_test VQA answers pseudo-randomly" in flagged["tables.md"].decode()
    assert '<p class="warning"><b>Warning: the tiny_test VQA answers pseudo-randomly' in flagged["index.html"].decode()
