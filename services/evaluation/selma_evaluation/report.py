"""The evaluation report: tables, PNG charts and a self-contained HTML page with image grids.

Pure in-memory: :func:`build_report` turns a :class:`ReportInput` into ``{relative_path: bytes}``
and does no storage I/O; the runner puts those files into the ``eval_report`` artifact.

Files produced (every byte deterministic for a given input, so re-publishing the same
evaluation verifies instead of conflicting):

* ``report.json``    every number: per target × metric the overall, per-category,
                     per-question-category and per-item scores; deltas of every target vs the
                     first (the reference) in percentage points; items with their per-item deltas;
                     merge-search trials and the best one; seeds; VQA model; settings.
* ``verdicts.jsonl`` one line per (target, metric, item, image, question): score after the
                     dependency rule, status (pass / fail / skipped / n/a) and the raw VQA answer.
* ``tables.md``      Markdown tables of the same figures.
* ``charts/*.png``   grouped bars of overall and per-category scores, deltas vs the reference,
                     the merge search.
* ``index.html``     the page: settings, summary, charts, then per item the prompt and every
                     target's image side by side with its per-question verdicts.
* ``images/<target>/<item>-<i>.png``  the rendered images the page shows.

Item order on the page: items are sorted by their *swing*, the per-item score difference
(percentage points) of largest magnitude between any non-reference target and the reference,
over every metric; largest magnitude first, ties and items without a comparison in benchmark
order.  Both big wins and big losses of a merged model therefore come first.

matplotlib is imported lazily and driven through its object API with the Agg canvas (no pyplot,
no global backend switch), under matplotlib's default style so a user's matplotlibrc cannot
change the pictures.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from selma.errors import InvalidArgument
from selma_evaluation.types import EvalItem, Question, ScoreTable, SliceScore

FORMAT = "selma.eval_report/v1"

#: Resolution of every chart; sizes in inches per chart kind (pixels = inches × dpi).
CHART_DPI = 100
CHART_INCHES: dict[str, tuple[float, float]] = {
    "overall": (8.0, 4.5),
    "by_category": (10.0, 5.0),
    "delta": (10.0, 5.0),
    "search": (8.0, 4.5),
}
DEFAULT_MAX_ITEMS = 200

# tab10: distinguishable, colour-blind-tolerant, fixed so pictures never change between runs
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
            "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_POSITIVE = "#2ca02c"
_NEGATIVE = "#d62728"
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "++", "--")
_CHART_LOCK = threading.Lock()  # rc_context is process-global; jobs may build reports in threads
_SLUG_BAD = re.compile(r"[^a-z0-9._-]+")

PASS, FAIL, SKIPPED, UNSCORED = "pass", "fail", "skipped", "n/a"


@dataclass
class TargetResult:
    """One evaluated model: its scores, images and raw VQA answers."""

    label: str  # "base", "selma-5", "search-best", ...
    description: str  # "base model", "merged: mean_delta of 5 experts", ...
    scores: dict[str, ScoreTable]  # metric ("dsg" / "tifa") → table
    images: dict[tuple[str, int], bytes] = field(default_factory=dict)  # (item id, image index) → PNG
    # metric → (item id, image index, question id) → raw VQA answer
    answers: dict[str, dict[tuple[str, int, str], str]] = field(default_factory=dict)


@dataclass
class ReportInput:
    """Everything one report shows; ``targets[0]`` is the reference of every delta."""

    title: str
    benchmark: str  # "dsg-1k" or "prompt-set"
    items: list[EvalItem]
    targets: list[TargetResult]
    seeds: dict[tuple[str, int], int]  # (item id, image index) → seed, identical for all targets
    vqa: str
    settings: dict[str, Any]
    search: list[dict[str, Any]] | None = None  # merge-search trials: {"index", "merge", "validation_score_percent"}
    best_merge: dict[str, Any] | None = None
    plumbing_only: bool = False  # the VQA backend's answers say nothing about the images (tiny_test)


PLUMBING_WARNING = "the tiny_test VQA answers pseudo-randomly: this checks the pipeline's plumbing; its numbers are not faithfulness scores"


# --------------------------------------------------------------------------------------- entry


def build_report(inp: ReportInput, *, max_items: int = DEFAULT_MAX_ITEMS, with_images: bool = True) -> dict[str, bytes]:
    """Build every file of the report as ``{relative_path: bytes}``.

    ``max_items`` caps the items shown on the HTML page (the rest are counted there);
    ``report.json`` and ``verdicts.jsonl`` always hold every item.  With ``with_images=False``
    the PNGs are left out (the page still links them): a caller holding thousands of large
    images writes them one at a time to the paths :func:`image_paths` gives, and
    ``TargetResult.images`` may then be any mapping whose values are only read by that caller.
    """
    _validate(inp, max_items)
    model = _Model(inp)
    files: dict[str, bytes] = {}
    files["report.json"] = _json_bytes(_report_json(model))
    files["verdicts.jsonl"] = _verdicts_jsonl(model)
    files["tables.md"] = _tables_md(model).encode("utf-8")
    charts = _charts(model)
    files.update(charts)
    if with_images:
        files.update(model.image_files())
    files["index.html"] = _html_page(model, max_items, list(charts)).encode("utf-8")
    return files


def image_paths(inp: ReportInput) -> dict[tuple[str, str, int], str]:
    """(target label, item id, image index) → the image's path inside the report."""
    model = _Model(inp)
    return {(t.label, item, idx): model.image_path(t, item, idx) for t in inp.targets for (item, idx) in t.images}


def format_table(tables: dict[str, ScoreTable], metric: str) -> str:
    """Plain-text aligned table (categories × targets, percent with one decimal) for a terminal."""
    categories = sorted({c for t in tables.values() for c in t.per_category})
    labels = list(tables)
    header = [f"{_metric_name(metric)} (%)", "prompts", *labels]
    rows = [header]
    for cat in [*categories, None]:
        slices = [t.overall if cat is None else t.per_category.get(cat) for t in tables.values()]
        count = next((s.prompt_count for s in slices if s is not None), 0)
        rows.append([
            "overall" if cat is None else cat,
            str(count),
            *(_pct(s.score_percent) if s is not None else "-" for s in slices),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=False)]
        lines.append("  ".join(cells).rstrip())
        if n == 0 or n == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- model


def _validate(inp: ReportInput, max_items: int) -> None:
    if not inp.targets:
        raise InvalidArgument("a report needs at least one target; got none", field="targets")
    labels = [t.label for t in inp.targets]
    dupes = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
    if dupes:
        raise InvalidArgument(f"target labels must be unique; repeated: {', '.join(dupes)}", field="targets")
    seen: set[str] = set()
    dupes = sorted({it.id for it in inp.items if it.id in seen or seen.add(it.id)})
    if dupes:
        raise InvalidArgument(f"item ids must be unique; repeated: {', '.join(dupes[:10])}", field="items")
    if max_items < 0:
        raise InvalidArgument(f"max_items must be >= 0; got {max_items}", field="max_items")
    for t in inp.targets:
        bad = [k for k in t.images if not (isinstance(k[1], int) and k[1] >= 0)]
        if bad:
            raise InvalidArgument(f"image indexes must be integers >= 0; target {t.label!r} has {bad[0]!r}",
                                  field="targets.images")


class _Model:
    """Derived views shared by every output: slugs, metrics, categories, deltas, item order."""

    def __init__(self, inp: ReportInput) -> None:
        self.inp = inp
        self.ref = inp.targets[0]
        self.others = inp.targets[1:]
        self.metrics = list(dict.fromkeys(m for t in inp.targets for m in t.scores))
        self.target_slug = _unique_slugs([t.label for t in inp.targets], fallback="target")
        item_ids = list(dict.fromkeys([*(it.id for it in inp.items),
                                       *(k[0] for t in inp.targets for k in sorted(t.images))]))
        self.item_slug = _unique_slugs(item_ids, fallback="item")
        self.metric_slug = _unique_slugs(self.metrics, fallback="metric")
        self.colour = {t.label: _PALETTE[i % len(_PALETTE)] for i, t in enumerate(inp.targets)}
        # (target, metric) → (item, image) → question → score; grouped once so every lookup is O(1)
        self.scored: dict[tuple[str, str], dict[tuple[str, int], dict[str, float]]] = {}
        self.indexes: dict[str, set[int]] = {}
        for t in inp.targets:
            for metric, table in t.scores.items():
                group: dict[tuple[str, int], dict[str, float]] = {}
                for (item_id, index, qid), score in table.per_question.items():
                    group.setdefault((item_id, index), {})[qid] = score
                    self.indexes.setdefault(item_id, set()).add(index)
                self.scored[(t.label, metric)] = group
            for item_id, index in t.images:
                self.indexes.setdefault(item_id, set()).add(index)
        for item_id, index in inp.seeds:
            self.indexes.setdefault(item_id, set()).add(index)
        self.swing = {it.id: self._swing(it.id) for it in inp.items}
        order = {it.id: i for i, it in enumerate(inp.items)}

        def key(it: EvalItem) -> tuple[int, float, int]:
            s = self.swing[it.id]
            return (0, -abs(s[2]), order[it.id]) if s is not None else (1, 0.0, order[it.id])

        self.ordered_items = sorted(inp.items, key=key)

    def categories(self, metric: str, attr: str = "per_category") -> list[str]:
        return sorted({c for t in self.inp.targets if metric in t.scores for c in getattr(t.scores[metric], attr)})

    def image_path(self, target: TargetResult, item_id: str, index: int) -> str:
        return f"images/{self.target_slug[target.label]}/{self.item_slug[item_id]}-{index}.png"

    def image_files(self) -> dict[str, bytes]:
        return {self.image_path(t, item, idx): bytes(data)
                for t in self.inp.targets for (item, idx), data in sorted(t.images.items())}

    def delta(self, target: TargetResult, metric: str, attr: str, key: str | None) -> tuple[float, float] | None:
        """(score pp, micro pp) of ``target`` minus the reference on one slice; None when either lacks it."""
        a, b = _slice(target, metric, attr, key), _slice(self.ref, metric, attr, key)
        if a is None or b is None:
            return None
        return _r(a.score_percent - b.score_percent), _r(a.micro_percent - b.micro_percent)

    def item_delta(self, target: TargetResult, metric: str, item_id: str) -> float | None:
        a, b = _item_score(target, metric, item_id), _item_score(self.ref, metric, item_id)
        return None if a is None or b is None else _r(100.0 * (a - b))

    def _swing(self, item_id: str) -> tuple[str, str, float] | None:
        """(target, metric, signed pp) of the largest-magnitude per-item delta vs the reference."""
        best: tuple[str, str, float] | None = None
        for t in self.others:
            for m in self.metrics:
                d = self.item_delta(t, m, item_id)
                if d is not None and (best is None or abs(d) > abs(best[2])):
                    best = (t.label, m, d)
        return best

    def image_indexes(self, item_id: str) -> list[int]:
        return sorted(self.indexes.get(item_id, ()))

    def verdicts(self, target: TargetResult, metric: str, item: EvalItem | None, item_id: str,
                 index: int) -> list[tuple[Question, float | None, str, str]]:
        """(question, score, status, answer) of every scored question of one image, in question order.

        A zero-scored question is ``skipped`` when one of its parents also scored zero on that
        image (the DSG dependency rule zeroed it, whatever its own answer), ``fail`` otherwise.
        """
        table = target.scores.get(metric)
        if table is None:
            return []
        answers = target.answers.get(metric, {})
        scored = self.scored[(target.label, metric)].get((item_id, index), {})
        questions = list(item.questions) if item is not None else []
        known = {q.id for q in questions}
        questions = [q for q in questions if q.id in scored or (item_id, index, q.id) in answers]
        questions += [Question(id=qid, text=qid) for qid in sorted(set(scored) - known)]
        out = []
        for q in questions:
            score = scored.get(q.id)
            if score is None:
                status = UNSCORED
            elif score >= 0.5:
                status = PASS
            elif any(scored.get(p, 1.0) < 0.5 for p in q.parents):
                status = SKIPPED
            else:
                status = FAIL
            out.append((q, score, status, answers.get((item_id, index, q.id), "")))
        return out


def _slice(target: TargetResult, metric: str, attr: str, key: str | None) -> SliceScore | None:
    table = target.scores.get(metric)
    if table is None:
        return None
    return table.overall if key is None else getattr(table, attr).get(key)


def _item_score(target: TargetResult, metric: str, item_id: str) -> float | None:
    table = target.scores.get(metric)
    return None if table is None else table.per_item.get(item_id)


def _unique_slugs(names: Iterable[str], *, fallback: str) -> dict[str, str]:
    """Path-safe, case-insensitively unique slugs (``[a-z0-9._-]``, at most 64 chars) for user strings."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        if name in out:
            continue
        base = _SLUG_BAD.sub("-", str(name).lower()).strip("-._")[:64].strip("-._") or fallback
        slug, n = base, 1
        while slug in used:
            n += 1
            slug = f"{base}-{n}"
        used.add(slug)
        out[name] = slug
    return out


# --------------------------------------------------------------------------------------- json


def _r(x: float) -> float:
    """Round away float noise (12.499999999 → 12.5) so JSON and tables stay stable."""
    return round(x, 6) + 0.0  # + 0.0 turns -0.0 into 0.0


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(_finite(obj), indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def _report_json(m: _Model) -> dict[str, Any]:
    inp = m.inp
    deltas: dict[str, Any] = {}
    for t in m.others:
        per_metric = {}
        for metric in m.metrics:
            entry: dict[str, Any] = {}
            d = m.delta(t, metric, "per_category", None)
            if d is None:
                continue
            entry["overall"] = {"score_pp": d[0], "micro_pp": d[1]}
            for attr in ("per_category", "per_question_category"):
                entry[attr] = {}
                for cat in m.categories(metric, attr):
                    d = m.delta(t, metric, attr, cat)
                    if d is not None:
                        entry[attr][cat] = {"score_pp": d[0], "micro_pp": d[1]}
            per_metric[metric] = entry
        deltas[t.label] = per_metric
    shown_rank = {it.id: n for n, it in enumerate(m.ordered_items)}
    items = []
    for it in inp.items:
        swing = m.swing[it.id]
        items.append({
            "id": it.id, "prompt": it.prompt, "category": it.category, "skill": it.skill,
            "question_count": len(it.questions),
            "scores": {t.label: {mt: _item_score(t, mt, it.id) for mt in t.scores if it.id in t.scores[mt].per_item}
                       for t in inp.targets},
            "delta_pp": {t.label: {mt: m.item_delta(t, mt, it.id) for mt in m.metrics
                                   if m.item_delta(t, mt, it.id) is not None} for t in m.others},
            "swing": None if swing is None else {"target": swing[0], "metric": swing[1], "delta_pp": swing[2]},
            "page_rank": shown_rank[it.id],
        })
    return {
        "format": FORMAT,
        "title": inp.title,
        "benchmark": inp.benchmark,
        "vqa": inp.vqa,
        "vqa_plumbing_only": inp.plumbing_only,
        "settings": inp.settings,
        "reference": m.ref.label,
        "metrics": m.metrics,
        "targets": [{
            "label": t.label, "slug": m.target_slug[t.label], "description": t.description,
            "image_count": len(t.images),
            "scores": {mt: table.to_dict() for mt, table in t.scores.items()},
        } for t in inp.targets],
        "deltas": deltas,
        "items": items,
        "seeds": [{"item_id": k[0], "image_index": k[1], "seed": v} for k, v in sorted(inp.seeds.items())],
        "search": None if inp.search is None else {"trials": inp.search, "best": inp.best_merge,
                                                   "best_index": _best_trial_index(inp)},
    }


def _verdicts_jsonl(m: _Model) -> bytes:
    items = {it.id: it for it in m.inp.items}
    lines = []
    for t in m.inp.targets:
        for metric in t.scores:
            for item_id, index in sorted(m.scored[(t.label, metric)]):
                for q, score, status, answer in m.verdicts(t, metric, items.get(item_id), item_id, index):
                    lines.append(json.dumps({
                        "target": t.label, "metric": metric, "item_id": item_id, "image_index": index,
                        "question_id": q.id, "score": score, "status": status, "answer": answer,
                    }, sort_keys=True, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


# --------------------------------------------------------------------------------------- search


def _score_of(trial: dict[str, Any]) -> float | None:
    v = trial.get("validation_score_percent")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _best_trial_index(inp: ReportInput) -> Any:
    """The index of the best trial: ``best_merge["index"]``, else the trial whose merge equals
    ``best_merge`` (or its ``"merge"``), else the highest validation score (first on ties)."""
    trials = inp.search or []
    if not trials:
        return None
    best = inp.best_merge
    indexes = [tr.get("index") for tr in trials]
    if isinstance(best, dict):
        if "index" in best and best["index"] in indexes:
            return best["index"]
        for tr in trials:
            if tr.get("merge") is not None and tr.get("merge") in (best, best.get("merge")):
                return tr.get("index")
    scored = [tr for tr in trials if _score_of(tr) is not None]
    if not scored:
        return None
    return max(scored, key=lambda tr: _score_of(tr)).get("index")  # max keeps the first of ties


def _sorted_trials(inp: ReportInput) -> list[dict[str, Any]]:
    """Trials by validation score, best first; unscored (failed) trials last, in run order."""
    trials = list(enumerate(inp.search or []))
    trials.sort(key=lambda p: (_score_of(p[1]) is None, -(_score_of(p[1]) or 0.0), p[0]))
    return [tr for _, tr in trials]


def _merge_cells(trial: dict[str, Any]) -> tuple[str, str, str]:
    """(method, experts "id×weight, ...", density) of one trial's merge, as text."""
    merge = trial.get("merge") or {}
    experts = ", ".join(
        f"{e.get('expert_id', '?')}×{_num(e.get('weight'))}" for e in merge.get("experts") or [] if isinstance(e, dict)
    )
    density = merge.get("density")
    return str(merge.get("method", "")), experts, "" if density is None else _num(density)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


# --------------------------------------------------------------------------------------- markdown


def _pct(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.1f}"


def _pp(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    s = f"{v:+.1f}"
    return "+0.0" if s == "-0.0" else s


def _metric_name(metric: str) -> str:
    return metric.upper()


def _md_cell(s: Any) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """``align``: one letter per column, ``l`` or ``r``; default: first column left, the rest right."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _slice_rows(m: _Model, metric: str, attr: str, value: str) -> list[list[str]]:
    """Rows of categories (+ overall for per_category) × targets of one SliceScore field."""
    keys: list[str | None] = list(m.categories(metric, attr))
    if attr == "per_category":
        keys.append(None)
    rows = []
    for key in keys:
        slices = [_slice(t, metric, attr, key) for t in m.inp.targets]
        count = next((s.prompt_count if attr == "per_category" else s.question_count for s in slices if s), 0)
        rows.append(["overall" if key is None else key, str(count),
                     *(_pct(getattr(s, value)) if s else "-" for s in slices)])
    return rows


def _delta_rows(m: _Model, metric: str, attr: str = "per_category") -> list[list[str]]:
    rows = []
    for key in [*m.categories(metric, attr), None]:
        cells = []
        for t in m.others:
            d = m.delta(t, metric, attr, key)
            cells.append(_pp(d[0]) if d else "-")
        rows.append(["overall" if key is None else key, *cells])
    return rows


def _tables_md(m: _Model) -> str:
    inp = m.inp
    labels = [t.label for t in inp.targets]
    out = [f"# {_md_cell(inp.title)}\n",
           f"Benchmark: {_md_cell(inp.benchmark)} · VQA: {_md_cell(inp.vqa)} · reference: {_md_cell(m.ref.label)}\n",
           "Scores are percentages (mean over prompts of the per-prompt score); deltas are percentage points.\n"]
    if inp.plumbing_only:
        out.insert(1, f"**Warning: {PLUMBING_WARNING}.**\n")
    for metric in m.metrics:
        name = _metric_name(metric)
        out.append(f"## {name} score by category (%)\n")
        out.append(_md_table(["category", "prompts", *labels], _slice_rows(m, metric, "per_category", "score_percent")))
        if m.others:
            out.append(f"## {name} delta vs {_md_cell(m.ref.label)} (pp)\n")
            out.append(_md_table(["category", *(t.label for t in m.others)], _delta_rows(m, metric)))
        out.append(f"## {name} micro-average by category (% of questions)\n")
        out.append(_md_table(["category", "prompts", *labels], _slice_rows(m, metric, "per_category", "micro_percent")))
        if m.categories(metric, "per_question_category"):
            out.append(f"## {name} by question category (%)\n")
            out.append(_md_table(["question category", "questions", *labels],
                                 _slice_rows(m, metric, "per_question_category", "score_percent")))
    if inp.search is not None:
        out.append("## Merge-weight search (validation prompts)\n")
        out.append(_md_table(["rank", "trial", "method", "experts (id×weight)", "density", "validation %", "best"],
                             _search_rows(inp), align="rrllrrl"))
    return "\n".join(out)


def _search_rows(inp: ReportInput) -> list[list[str]]:
    best = _best_trial_index(inp)
    rows = []
    for rank, tr in enumerate(_sorted_trials(inp), 1):
        method, experts, density = _merge_cells(tr)
        score = _score_of(tr)
        rows.append([str(rank) if score is not None else "-", str(tr.get("index", "")), method, experts, density,
                     _pct(score), "★ best" if best is not None and tr.get("index") == best else ""])
    return rows


# --------------------------------------------------------------------------------------- charts


def _charts(m: _Model) -> dict[str, bytes]:
    """Every chart as PNG bytes; delta charts only when there is something to compare."""
    if not m.metrics and m.inp.search is None:
        return {}
    import matplotlib  # lazy: keeps `import selma_evaluation.report` light
    import matplotlib.style

    out: dict[str, bytes] = {}
    with _CHART_LOCK, matplotlib.style.context("default"):
        if m.metrics:
            out["charts/overall.png"] = _chart_overall(m)
            for metric in m.metrics:
                out[f"charts/{m.metric_slug[metric]}_by_category.png"] = _chart_by_category(m, metric)
                if m.others:
                    out[f"charts/{m.metric_slug[metric]}_delta.png"] = _chart_delta(m, metric)
        if m.inp.search:
            out["charts/search.png"] = _chart_search(m)
    return out


def _figure(kind: str) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=CHART_INCHES[kind], dpi=CHART_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # no Software/version metadata and no timestamps: identical bytes for identical input
    fig.savefig(buf, format="png", dpi=CHART_DPI, metadata={"Software": None})
    return buf.getvalue()


def _mpl(text: Any, limit: int = 28) -> str:
    """User text safe for matplotlib: shortened, and '$' escaped so it is never parsed as mathtext."""
    s = " ".join(str(text).split())
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("$", r"\$")


def _grouped_bars(ax: Any, groups: list[str], series: list[tuple[str, list[float | None], dict[str, Any]]],
                  value_labels: bool = True) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values, style) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width=width * 0.95, label=_mpl(name), **style)
        if value_labels:
            _label_bars(ax, bars, [_pct(v) if v is not None else "" for v in values], len(groups) * n)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_mpl(g, 20) for g in groups], rotation=30 if len(groups) > 4 else 0,
                       ha="right" if len(groups) > 4 else "center", fontsize=8)


def _label_bars(ax: Any, bars: Any, labels: list[str], total_bars: int) -> None:
    """Value labels on bars: level when there is room, vertical when crowded, none beyond that
    (the tables carry every number)."""
    if total_bars <= 16:
        ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
    elif total_bars <= 60:
        ax.bar_label(bars, labels=labels, fontsize=6, padding=1, rotation=90)


def _finish(fig: Any, ax: Any, title: str, ylabel: str, legend: bool) -> None:
    ax.set_title(_mpl(title, 80))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if legend:  # outside, right of the axes: never hides a bar, however many targets
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()


def _chart_overall(m: _Model) -> bytes:
    fig = _figure("overall")
    ax = fig.add_subplot()
    series = [(t.label, [_slice(t, mt, "per_category", None).score_percent if mt in t.scores else None
                         for mt in m.metrics], {"color": m.colour[t.label]}) for t in m.inp.targets]
    _grouped_bars(ax, [_metric_name(mt) for mt in m.metrics], series)
    ax.set_ylim(0, 110)
    _finish(fig, ax, f"{m.inp.title}: overall", "score (%)", legend=True)
    return _png(fig)


def _chart_by_category(m: _Model, metric: str) -> bytes:
    fig = _figure("by_category")
    ax = fig.add_subplot()
    cats = m.categories(metric)
    keys: list[str | None] = [*cats, None]
    series = []
    for t in m.inp.targets:
        values = []
        for key in keys:
            s = _slice(t, metric, "per_category", key)
            values.append(None if s is None else s.score_percent)
        series.append((t.label, values, {"color": m.colour[t.label]}))
    _grouped_bars(ax, [*cats, "overall"], series)
    ax.set_ylim(0, 110)
    _finish(fig, ax, f"{_metric_name(metric)} by category", "score (%)", legend=True)
    return _png(fig)


def _chart_delta(m: _Model, metric: str) -> bytes:
    from matplotlib.patches import Patch

    fig = _figure("delta")
    ax = fig.add_subplot()
    cats = m.categories(metric)
    keys: list[str | None] = [*cats, None]
    n = len(m.others)
    width = 0.8 / n
    handles = []
    for i, t in enumerate(m.others):
        values = [(m.delta(t, metric, "per_category", k) or (None,))[0] for k in keys]
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(keys))]
        colours = [_POSITIVE if (v or 0.0) >= 0 else _NEGATIVE for v in values]
        hatch = _HATCHES[i % len(_HATCHES)]
        bars = ax.bar(xs, [v or 0.0 for v in values], width=width * 0.95, color=colours, hatch=hatch,
                      edgecolor="black", linewidth=0.5)
        _label_bars(ax, bars, [_pp(v) if v is not None else "" for v in values], len(keys) * n)
        handles.append(Patch(facecolor="white", edgecolor="black", hatch=hatch, label=_mpl(t.label)))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([_mpl(g, 20) for g in [*cats, "overall"]], rotation=30 if len(keys) > 4 else 0,
                       ha="right" if len(keys) > 4 else "center", fontsize=8)
    lo, hi = ax.get_ylim()
    pad = max(1.0, 0.15 * (hi - lo))  # room for the value labels above/below the bars
    ax.set_ylim(min(lo, 0) - pad, max(hi, 0) + pad)
    title = (f"{_metric_name(metric)}: {m.others[0].label} vs {m.ref.label} (pp)" if n == 1
             else f"{_metric_name(metric)} delta vs {m.ref.label} (pp)")
    if n > 1:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    _finish(fig, ax, title, "delta (pp)", legend=False)
    return _png(fig)


def _chart_search(m: _Model) -> bytes:
    from matplotlib.ticker import MaxNLocator

    fig = _figure("search")
    ax = fig.add_subplot()
    trials = [tr for tr in m.inp.search or [] if _score_of(tr) is not None]
    best = _best_trial_index(m.inp)
    xs = [tr.get("index", n) for n, tr in enumerate(trials)]
    ys = [_score_of(tr) for tr in trials]
    numeric = all(isinstance(x, (int, float)) for x in xs)
    if not numeric:  # indexes are labels: plot in run order
        xs = list(range(len(trials)))
    ax.scatter(xs, ys, color=_PALETTE[0], s=25, label="trial", zorder=2)
    running, top = [], -math.inf
    for y in ys:
        top = max(top, y)
        running.append(top)
    if xs:
        ax.step(xs, running, where="post", color=_PALETTE[7], linewidth=1, label="best so far", zorder=1)
    for x, y, tr in zip(xs, ys, trials, strict=False):
        if best is not None and tr.get("index") == best:
            ax.scatter([x], [y], marker="*", s=220, color=_PALETTE[1], edgecolor="black", zorder=3, label="best")
            ax.annotate(f"best: {_pct(y)}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(fig, ax, "merge-weight search", "validation score (%)", legend=bool(xs))
    return _png(fig)


# --------------------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;max-width:1600px}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;font-size:.9em}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pos{color:#1a7f37} .neg{color:#c62828} .muted{color:#777}
.charts img{max-width:100%;border:1px solid #eee;margin:.3em 0}
.item{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:1em 0}
.item .prompt{font-size:1.05em;font-weight:600;white-space:pre-wrap}
.badge{display:inline-block;border-radius:4px;padding:0 .4em;font-size:.85em;background:#eee;margin-right:.3em}
.badge.pos{background:#e6f4ea} .badge.neg{background:#fdecea}
.grid{display:flex;flex-wrap:wrap;gap:.8em;margin-top:.5em}
.cell{width:272px} .cell img{width:256px;height:auto;display:block;border:1px solid #ccc;image-rendering:auto}
.noimg{width:256px;height:96px;display:flex;align-items:center;justify-content:center;background:#f6f6f6;color:#888}
ul.qs{list-style:none;padding:0;margin:.3em 0;font-size:.82em}
li.q{padding:.1em .3em;margin:.1em 0;border-left:4px solid #ccc}
li.q.pass{border-color:#2e7d32;background:#edf7ee}
li.q.fail{border-color:#c62828;background:#fdecea;color:#8e0000}
p.warning{border:1px solid #c62828;background:#fdecea;color:#8e0000;padding:.5em}
li.q.skipped{border-color:#9e9e9e;background:#f2f2f2;color:#666}
li.q.na{border-color:#ddd;color:#888}
.verdict{font-weight:600;margin-right:.3em}
.answer{color:#555}
"""

_VERDICT = {PASS: ("pass", "✓ pass"), FAIL: ("fail", "✗ fail"),
            SKIPPED: ("skipped", "– skipped: parent failed"), UNSCORED: ("na", "? not scored")}


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _pp_html(v: float | None, badge: bool = False) -> str:
    cls = "" if v is None else ("pos" if v > 0 else "neg" if v < 0 else "")
    return f'<span class="{"badge " if badge else ""}{cls}">{_e(_pp(v))}</span>'


def _html_table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """Header cells are escaped here; row cells must already be HTML.  ``align`` as in ``_md_table``."""
    align = align or "l" + "r" * (len(header) - 1)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if a == "r" else f"<td>{c}</td>"
                         for a, c in zip(align, r, strict=False)) + "</tr>"
        for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def _html_page(m: _Model, max_items: int, charts: list[str]) -> str:
    inp = m.inp
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        f"<title>{_e(inp.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
        f"<h1>{_e(inp.title)}</h1>\n",
        f'<p class="warning"><b>Warning: {_e(PLUMBING_WARNING)}.</b></p>\n' if inp.plumbing_only else "",
        f'<p>Benchmark <b>{_e(inp.benchmark)}</b> · {len(inp.items)} prompts · VQA model <b>{_e(inp.vqa)}</b> · '
        f"reference <b>{_e(m.ref.label)}</b></p>\n",
        "<h2>Targets</h2>\n",
        _html_table(["label", "description", "images"],
                    [[_e(t.label), _e(t.description), str(len(t.images))] for t in inp.targets], align="llr"),
        "<h2>Settings</h2>\n",
        _html_table(["setting", "value"],
                    [[_e(k), _e(json.dumps(v, sort_keys=True, default=str) if not isinstance(v, str) else v)]
                     for k, v in sorted(inp.settings.items(), key=lambda kv: str(kv[0]))], align="ll"),
        "<h2>Summary</h2>\n",
        _html_summary(m),
    ]
    for metric in m.metrics:
        name = _metric_name(metric)
        header = ["category", "prompts", *(t.label for t in inp.targets)]
        rows = [[_e(r[0]), *r[1:]] for r in _slice_rows(m, metric, "per_category", "score_percent")]
        if m.others:
            header += [f"Δ {t.label} (pp)" for t in m.others]
            for row, key in zip(rows, [*m.categories(metric), None], strict=False):
                row += [_pp_html((m.delta(t, metric, "per_category", key) or (None,))[0]) for t in m.others]
        parts.append(f"<h3>{_e(name)} by category (%)</h3>\n")
        parts.append(_html_table(header, rows))
    if charts:
        parts.append('<h2>Charts</h2>\n<div class="charts">\n')
        parts += [f'<div><img src="{_e(p)}" alt="{_e(p)}"></div>\n' for p in charts]
        parts.append("</div>\n")
    if inp.search is not None:
        parts.append("<h2>Merge-weight search</h2>\n")
        parts.append("<p>Trials on the validation prompts, best validation score first.</p>\n")
        rows = [[_e(c) for c in r] for r in _search_rows(inp)]
        parts.append(_html_table(["rank", "trial", "method", "experts (id×weight)", "density", "validation %", "best"],
                                 rows, align="rrllrrl"))
        if inp.best_merge is not None:
            parts.append(f"<p>Best configuration: <code>{_e(json.dumps(inp.best_merge, sort_keys=True, default=str))}"
                         "</code></p>\n")
    parts.append(_html_items(m, max_items))
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def _html_summary(m: _Model) -> str:
    header = ["target"]
    for metric in m.metrics:
        header += [f"{_metric_name(metric)} %", f"{_metric_name(metric)} micro %"]
        if m.others:
            header.append(f"{_metric_name(metric)} Δ (pp)")
    rows = []
    for t in m.inp.targets:
        row = [_e(t.label)]
        for metric in m.metrics:
            s = _slice(t, metric, "per_category", None)
            row += [_pct(s.score_percent) if s else "-", _pct(s.micro_percent) if s else "-"]
            if m.others:
                d = m.delta(t, metric, "per_category", None) if t is not m.ref else None
                row.append(_pp_html(d[0]) if d else '<span class="muted">ref</span>' if t is m.ref else "-")
        rows.append(row)
    return _html_table(header, rows)


def _html_items(m: _Model, max_items: int) -> str:
    shown = m.ordered_items[:max_items]
    omitted = len(m.ordered_items) - len(shown)
    parts = ["<h2>Items</h2>\n"]
    if m.others:
        parts.append(f"<p>Ordered by the largest per-item score change of any target vs <b>{_e(m.ref.label)}</b> "
                     "(either sign, any metric) first, so the biggest wins and losses come first; "
                     "then benchmark order. "
                     "Questions: <span class=\"pos\">✓ pass</span>, <span class=\"neg\">✗ fail</span>, "
                     "<span class=\"muted\">– skipped: a parent question failed (DSG dependency rule)</span>.</p>\n")
    else:
        parts.append("<p>In benchmark order.</p>\n")
    if omitted:
        parts.append(f'<p class="omitted"><b>{omitted} of {len(m.ordered_items)} items not shown</b> '
                     f"(showing the first {len(shown)}); report.json and verdicts.jsonl have every item.</p>\n")
    for it in shown:
        parts.append(_html_item(m, it))
    return "".join(parts)


def _html_item(m: _Model, it: EvalItem) -> str:
    inp = m.inp
    badges = []
    for t in inp.targets:
        for metric in m.metrics:
            score = _item_score(t, metric, it.id)
            if score is None:
                continue
            text = f"{t.label} {_metric_name(metric)} {_pct(100.0 * score)}"
            d = m.item_delta(t, metric, it.id) if t is not m.ref else None
            cls = "" if d is None else (" pos" if d > 0 else " neg" if d < 0 else "")
            badges.append(f'<span class="badge{cls}">{_e(text)}{"" if d is None else " (" + _e(_pp(d)) + ")"}</span>')
    parts = [f'<div class="item" id="item-{_e(m.item_slug[it.id])}">\n',
             f'<div class="prompt">{_e(it.prompt)}</div>\n',
             f'<div class="muted">item {_e(it.id)} · category {_e(it.category)}'
             f'{" · skill " + _e(it.skill) if it.skill else ""}</div>\n',
             f"<div>{''.join(badges)}</div>\n"]
    for index in m.image_indexes(it.id):
        seed = inp.seeds.get((it.id, index))
        parts.append(f'<div class="muted">image {index}{"" if seed is None else f" · seed {seed}"}</div>\n')
        parts.append('<div class="grid">\n')
        for t in inp.targets:
            parts.append(f'<div class="cell"><div><b>{_e(t.label)}</b></div>\n')
            if (it.id, index) in t.images:
                path = m.image_path(t, it.id, index)
                parts.append(f'<img src="{_e(path)}" alt="{_e(t.label)}: image {index}" loading="lazy">\n')
            else:
                parts.append('<div class="noimg">no image</div>\n')
            for metric in m.metrics:
                verdicts = m.verdicts(t, metric, it, it.id, index)
                if not verdicts:
                    continue
                if len(m.metrics) > 1:
                    parts.append(f'<div class="muted">{_e(_metric_name(metric))}</div>\n')
                parts.append('<ul class="qs">\n')
                for q, _score, status, answer in verdicts:
                    cls, label = _VERDICT[status]
                    expected = f" (expected: {_e(q.answer)})" if q.choices else ""
                    shown = _e(answer) if answer else "—"
                    parts.append(f'<li class="q {cls}" data-question="{_e(q.id)}">'
                                 f'<span class="verdict">{_e(label)}</span>{_e(q.text)} '
                                 f'<span class="answer">→ {shown}{expected}</span></li>\n')
                parts.append("</ul>\n")
            parts.append("</div>\n")
        parts.append("</div>\n")
    parts.append("</div>\n")
    return "".join(parts)
