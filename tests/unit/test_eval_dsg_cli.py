"""``selma eval dsg-score``: scores of synthetic answers files, JSON output, and errors naming rows."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from selma.app.cli import main
from selma_evaluation import dsg


@pytest.fixture(scope="module")
def raw_rows() -> list[dict[str, str]]:
    """DSG-1k straight from the shipped CSV, independent of the loader under test."""
    with dsg.dsg1k_annotations_path().open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_answers(path: Path, rows: list[dict[str, str]], answer, header=("item_id", "question_id", "answer")) -> Path:
    """An answers file with one row per raw DSG-1k row, ``answer(row)`` giving yes/no."""
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            values = {"item_id": row["item_id"], "question_id": row["proposition_id"], "answer": answer(row), "note": "x"}
            w.writerow([values.get(h.strip().lower(), "") for h in header])
    return path


def run_json(capsys, *args: str) -> dict:
    assert main(["eval", "dsg-score", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *args: str) -> str:
    assert main(["eval", "dsg-score", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("selma: error: ")
    return captured.err


def table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    assert lines[0].split() == ["category", "prompts", "questions", "score", "micro"]
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines[2:])}


# --------------------------------------------------------------------------- scores


def test_all_yes_scores_100_everywhere(tmp_path, capsys, raw_rows):
    path = write_answers(tmp_path / "a.csv", raw_rows, lambda r: "yes")
    assert main(["eval", "dsg-score", "--answers", str(path)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert list(rows) == sorted(dsg.dsg1k_categories()) + ["overall"]
    assert rows["overall"] == ["1060", "8182", "100.0", "100.0"]
    assert rows["tifa160"][0] == "160"
    assert all(cells[2:] == ["100.0", "100.0"] for cells in rows.values())


def test_all_no_scores_0_everywhere(tmp_path, capsys, raw_rows):
    summary = run_json(capsys, "--answers", str(write_answers(tmp_path / "a.csv", raw_rows, lambda r: "no")))
    slices = [summary["overall"], *summary["categories"].values(), *summary["question_categories"].values()]
    assert all(s["score_percent"] == 0.0 and s["micro_percent"] == 0.0 for s in slices)


def test_yes_only_for_independent_questions_matches_an_independent_computation(tmp_path, capsys, raw_rows):
    # Questions without dependencies answered yes score 1; every other one is answered no and scores 0.
    root = {(r["item_id"], r["proposition_id"]) for r in raw_rows if r["dependency"].strip() == "0"}
    path = write_answers(tmp_path / "a.csv", raw_rows, lambda r: "yes" if (r["item_id"], r["proposition_id"]) in root else "no")
    per_item: dict[str, list[int]] = defaultdict(list)
    for r in raw_rows:
        per_item[r["item_id"]].append((r["item_id"], r["proposition_id"]) in root)
    by_category: dict[str, list[list[int]]] = defaultdict(list)
    for item_id, scores in per_item.items():
        by_category[item_id.rsplit("_", 1)[0]].append(scores)

    def expected(groups: list[list[int]]) -> dict:
        return {"score_percent": round(100 * sum(sum(g) / len(g) for g in groups) / len(groups), 1),
                "micro_percent": round(100 * sum(map(sum, groups)) / sum(map(len, groups)), 1),
                "prompt_count": len(groups), "question_count": sum(map(len, groups))}

    summary = run_json(capsys, "--answers", str(path))
    assert summary["benchmark"] == "dsg-1k" and summary["rule"] == "transitive"
    assert summary["overall"] == expected(list(per_item.values()))
    assert summary["categories"] == {cat: expected(groups) for cat, groups in sorted(by_category.items())}
    # The two averages genuinely differ here (prompts have different question counts).
    assert summary["overall"]["score_percent"] != summary["overall"]["micro_percent"]
    entity = summary["question_categories"]["entity"]
    assert entity["question_count"] == 3395 and 0 < entity["micro_percent"] < 100


def test_direct_rule_scores_at_least_transitive_and_differs_on_chains(tmp_path, capsys, raw_rows):
    rng = random.Random(7)
    path = write_answers(tmp_path / "a.csv", raw_rows, lambda r: rng.choice(["yes", "yes", "no"]))
    transitive = run_json(capsys, "--answers", str(path))
    direct = run_json(capsys, "--answers", str(path), "--rule", "direct")
    assert direct["rule"] == "direct"
    assert direct["overall"]["micro_percent"] > transitive["overall"]["micro_percent"]
    for cat, s in direct["categories"].items():
        assert s["score_percent"] >= transitive["categories"][cat]["score_percent"]


def test_columns_in_any_order_extra_columns_case_and_spaces_are_accepted(tmp_path, capsys, raw_rows):
    path = write_answers(tmp_path / "a.csv", raw_rows, lambda r: " Yes " if int(r["proposition_id"]) % 2 else "NO",
                         header=("note", " Answer", "question_id", "ITEM_ID"))
    reference = write_answers(tmp_path / "b.csv", raw_rows, lambda r: "yes" if int(r["proposition_id"]) % 2 else "no")
    assert run_json(capsys, "--answers", str(path)) == run_json(capsys, "--answers", str(reference))


def test_utf8_bom_and_blank_lines_are_accepted(tmp_path, capsys, raw_rows):
    plain = write_answers(tmp_path / "a.csv", raw_rows, lambda r: "yes")
    text = plain.read_text(encoding="utf-8")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.replace("\r\n", "\n").replace("\n", "\n\n").encode())
    assert run_json(capsys, "--answers", str(bom))["overall"]["score_percent"] == 100.0


def test_categories_restrict_scoring_and_required_rows(tmp_path, capsys, raw_rows):
    whoops_rows = [r for r in raw_rows if r["item_id"].startswith("whoops_")]
    only_whoops = write_answers(tmp_path / "w.csv", whoops_rows, lambda r: "yes")
    summary = run_json(capsys, "--answers", str(only_whoops), "--categories", "whoops")
    assert list(summary["categories"]) == ["whoops"]
    assert summary["overall"]["prompt_count"] == 100 and summary["overall"]["question_count"] == len(whoops_rows)
    # A full answers file may be scored on a subset: the other rows are validated and ignored.
    full = write_answers(tmp_path / "f.csv", raw_rows, lambda r: "yes" if r["item_id"].startswith("vrd_") else "no")
    summary = run_json(capsys, "--answers", str(full), "--categories", "vrd, whoops")
    assert summary["categories"]["vrd"]["score_percent"] == 100.0
    assert summary["categories"]["whoops"]["score_percent"] == 0.0
    assert summary["overall"]["prompt_count"] == 200


# --------------------------------------------------------------------------- bad input


def test_every_kind_of_bad_row_is_reported_at_once_with_line_numbers(tmp_path, capsys, raw_rows):
    lines = ["item_id,question_id,answer"] + [f"{r['item_id']},{r['proposition_id']},yes" for r in raw_rows]
    lines[3] = lines[3].rsplit(",", 1)[0] + ",maybe"                   # line 4: bad answer
    lines[5] = lines[5].rsplit(",", 1)[0] + ",true"                    # line 6: true/false are not accepted
    lines[7] = "nosuchitem_1,1,yes"                                    # line 8: unknown item (and its question is missing)
    lines[9] = "whoops_5,99,yes"                                       # line 10: unknown question (whoops_5 has 3)
    lines[11] = "whoops_5"                                             # line 12: too few fields
    lines.append(lines[1])                                             # last line: duplicate of line 2
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = run_error(capsys, "--answers", str(path), "--strict")
    assert "line 4: 'maybe'" in err and "line 6: 'true'" in err and "only yes and no" in err
    assert "line 8: 'nosuchitem_1'" in err
    assert "line 10: item whoops_5 has no question '99'" in err
    assert "line 12: 1 field" in err
    assert f"line {len(lines)}: item whoops_5 question 1 again (first on line 2)" in err
    missing = [f"item {raw_rows[i]['item_id']} question {raw_rows[i]['proposition_id']}" for i in (6, 8, 10)]
    assert "questions without a row (3)" in err and all(m in err for m in missing)
    assert "Traceback" not in err


def test_missing_columns_are_named(tmp_path, capsys):
    path = tmp_path / "a.csv"
    path.write_text("item,question_id,verdict\nwhoops_5,1,yes\n", encoding="utf-8")
    err = run_error(capsys, "--answers", str(path))
    assert "line 1: header lacks columns item_id, answer" in err


def test_missing_questions_are_counted_and_a_few_named(tmp_path, capsys, raw_rows):
    path = write_answers(tmp_path / "a.csv", raw_rows[:100], lambda r: "yes")
    err = run_error(capsys, "--answers", str(path))
    assert f"questions without a row ({8182 - 100}; {8182 - 110} more not shown)" in err
    assert f"item {raw_rows[100]['item_id']} question {raw_rows[100]['proposition_id']}" in err


def test_messages_stay_bounded(tmp_path, capsys, raw_rows):
    path = write_answers(tmp_path / "a.csv", raw_rows, lambda r: "perhaps")
    err = run_error(capsys, "--answers", str(path), "--strict")
    assert "(8182; 8172 more not shown)" in err
    assert err.count("'perhaps'") == 10 and len(err) < 2000


@pytest.mark.parametrize("content, expected", [
    (b"", "the file is empty"),
    (b"\n \n", "the file is empty"),
    (b"item_id,question_id,answer\nwhoops_5,1,\xff\xfeyes\n", "not UTF-8 text (bad byte at line 2)"),
])
def test_empty_and_non_utf8_files_are_clear_errors(tmp_path, capsys, content, expected):
    path = tmp_path / "a.csv"
    path.write_bytes(content)
    assert expected in run_error(capsys, "--answers", str(path))


def test_missing_file_directory_and_unknown_category_are_clear_errors(tmp_path, capsys, raw_rows):
    assert "no such file" in run_error(capsys, "--answers", str(tmp_path / "absent.csv"))
    assert "a directory" in run_error(capsys, "--answers", str(tmp_path))
    path = write_answers(tmp_path / "a.csv", raw_rows, lambda r: "yes")
    err = run_error(capsys, "--answers", str(path), "--categories", "whoops,coco")
    assert "--categories" in err and "'coco'" in err and "countbench" in err


def test_malformed_file_through_the_installed_command_exits_2_without_traceback(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("item_id,question_id,answer\nwhoops_5,1,maybe\n", encoding="utf-8")
    selma = Path(sys.executable).parent / "selma"
    proc = subprocess.run([str(selma), "eval", "dsg-score", "--answers", str(path), "--strict"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "selma: error: " in proc.stderr and "line 2: 'maybe'" in proc.stderr


# --------------------------------------------------------------------------- answers as released (blank, free-form)


def _first_item_with_a_chain(raw_rows):
    """(item id, a root question id, a question depending on it) of the first such DSG-1k item."""
    for r in raw_rows:
        deps = [t.strip() for t in r["dependency"].split(",") if t.strip() not in ("", "0")]
        if deps and deps[0].isdigit():
            return r["item_id"], deps[0], r["proposition_id"]
    raise AssertionError("DSG-1k has dependencies")


@pytest.mark.parametrize("odd", ["", "   ", "unanswerable", "Unanswerable.", "true", "y"])
def test_any_answer_other_than_yes_fails_its_question_and_its_dependents_as_no_does(tmp_path, capsys, raw_rows, odd):
    item_id, parent, child = _first_item_with_a_chain(raw_rows)

    def answer(r, parent_answer):
        return parent_answer if (r["item_id"], r["proposition_id"]) == (item_id, parent) else "yes"

    odd_file = write_answers(tmp_path / "odd.csv", raw_rows, lambda r: answer(r, odd))
    no_file = write_answers(tmp_path / "no.csv", raw_rows, lambda r: answer(r, "no"))
    scored = run_json(capsys, "--answers", str(odd_file))
    as_no = run_json(capsys, "--answers", str(no_file))
    kind = "blank" if not odd.strip() else "other"
    category = item_id.rsplit("_", 1)[0]
    n = _count(raw_rows, category)
    counts = scored.pop("answers")["categories"][category]
    assert counts == {"yes": n - 1, "no": 0, "blank": 0, "other": 0} | {kind: 1}
    as_no.pop("answers")
    assert scored == as_no  # scored as "no" is: the question failed, and its dependents with it
    failed = _failed_through(raw_rows, item_id, parent)
    assert child in failed  # the child's own "yes" did not save it
    assert scored["categories"][category]["micro_percent"] == round(100 * (n - len(failed)) / n, 1)


def _count(raw_rows, category: str) -> int:
    return sum(1 for r in raw_rows if r["item_id"].rsplit("_", 1)[0] == category)


def _failed_through(raw_rows, item_id: str, parent: str) -> set[str]:
    """The questions of ``item_id`` that fail when ``parent`` fails (itself included), by the transitive rule."""
    rows = [r for r in raw_rows if r["item_id"] == item_id]
    ids = {r["proposition_id"] for r in rows}
    parents = {r["proposition_id"]: {t.strip() for t in r["dependency"].split(",") if t.strip() in ids} - {r["proposition_id"]}
               for r in rows}
    failed = {parent}
    changed = True
    while changed:
        changed = False
        for qid, ps in parents.items():
            if qid not in failed and ps & failed:
                failed.add(qid)
                changed = True
    return failed


def test_blank_and_other_answers_are_counted_per_category(tmp_path, capsys, raw_rows):
    odd = {("whoops", 0): "", ("whoops", 1): "unanswerable", ("whoops", 2): "  ", ("vrd", 0): "N/A"}
    seen: dict[str, int] = defaultdict(int)

    def answer(r):
        cat = r["item_id"].rsplit("_", 1)[0]
        i = seen[cat]
        seen[cat] += 1
        return odd.get((cat, i), " YES " if i % 2 else "No")

    path = write_answers(tmp_path / "a.csv", raw_rows, answer)
    counts = run_json(capsys, "--answers", str(path))["answers"]
    assert counts["categories"]["whoops"]["blank"] == 2 and counts["categories"]["whoops"]["other"] == 1
    assert counts["categories"]["vrd"]["blank"] == 0 and counts["categories"]["vrd"]["other"] == 1
    assert counts["categories"]["countbench"] | {"yes": 0, "no": 0} == {"yes": 0, "no": 0, "blank": 0, "other": 0}
    assert counts["overall"]["blank"] == 2 and counts["overall"]["other"] == 2
    assert sum(counts["overall"].values()) == 8182
    # the table names them too, per category, below the scores
    assert main(["eval", "dsg-score", "--answers", str(path)]) == 0
    out = capsys.readouterr().out
    scores, _, tail = out.partition("\n\n")
    assert "4 answer(s) other than yes/no, each scored as a failed question" in tail
    rows = {cells[0]: cells[1:] for cells in (line.split() for line in tail.splitlines()[3:])}
    assert rows == {"vrd": ["0", "1"], "whoops": ["2", "1"], "overall": ["2", "2"]}
    assert table_rows(scores)["overall"][:2] == ["1060", "8182"]


def test_strict_refuses_blank_and_free_form_answers_naming_their_lines(tmp_path, capsys, raw_rows):
    lines = ["item_id,question_id,answer"] + [f"{r['item_id']},{r['proposition_id']},yes" for r in raw_rows]
    lines[2] = lines[2].rsplit(",", 1)[0] + ","                        # line 3: blank
    lines[4] = lines[4].rsplit(",", 1)[0] + ",unanswerable"            # line 5: free-form
    path = tmp_path / "a.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = run_error(capsys, "--answers", str(path), "--strict")
    assert "(2)" in err and "line 3: ''" in err and "line 5: 'unanswerable'" in err and "--strict" in err
    # without --strict the same file is scored
    assert run_json(capsys, "--answers", str(path))["answers"]["overall"] == {"yes": 8180, "no": 0, "blank": 1, "other": 1}


def test_structure_problems_are_still_errors_when_answers_are_free_form(tmp_path, capsys, raw_rows):
    lines = ["item_id,question_id,answer"] + [f"{r['item_id']},{r['proposition_id']},unanswerable" for r in raw_rows]
    lines[7] = "nosuchitem_1,1,yes"                                    # line 8: unknown item (and its question is missing)
    lines[9] = "whoops_5,99,"                                          # line 10: unknown question, blank answer
    lines.append(lines[1])                                             # last line: duplicate of line 2
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = run_error(capsys, "--answers", str(path))
    assert "line 8: 'nosuchitem_1'" in err and "line 10: item whoops_5 has no question '99'" in err
    assert f"line {len(lines)}: item whoops_5 question 1 again (first on line 2)" in err
    assert "questions without a row (2)" in err
    assert "unanswerable" not in err  # free-form answers are no problem of the file
