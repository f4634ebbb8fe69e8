"""ShapesWorld world: seeded scenes, pixel-exact renders, the caption grammar and DSG-style questions."""

from __future__ import annotations

import io
import json
from itertools import combinations

import numpy as np
import pytest
from scipy import ndimage

from selma.errors import InvalidArgument
from selma_evaluation.dsg import question_scores
from selma_shapesworld import world as W

UNIFORM = {k: 1.0 for k in W.KINDS}


def _png(scene: W.Scene) -> bytes:
    buf = io.BytesIO()
    W.render(scene).save(buf, format="PNG")
    return buf.getvalue()


def _scenes(kind: str, n: int, seed: int = 0, size: int = 64) -> list[W.Scene]:
    rng = np.random.default_rng(seed)
    return [W.sample_scene(rng, kind, size=size) for _ in range(n)]


def test_same_seed_gives_identical_scenes_captions_and_png_bytes():
    a = W.dataset(7, 60, UNIFORM, size_words=0.5)
    b = W.dataset(7, 60, UNIFORM, size_words=0.5)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [c for _, c in a] == [c for _, c in b]
    assert [_png(s) for s, _ in a] == [_png(s) for s, _ in b]
    c = W.dataset(8, 60, UNIFORM, size_words=0.5)
    assert [s for s, _ in c] != [s for s, _ in a]
    assert [x for _, x in c] != [x for _, x in a]


def test_sample_scene_depends_only_on_the_generator_state():
    for kind in W.KINDS:
        assert W.sample_scene(np.random.default_rng(3), kind) == W.sample_scene(np.random.default_rng(3), kind)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_objects_are_inside_apart_and_render_flat(size):
    g = W.geometry(size)
    palette = {W.BACKGROUND, *W.COLOURS.values()}
    for kind in W.KINDS:
        for scene in _scenes(kind, 60 if size == 64 else 20, seed=size, size=size):
            assert scene.image_size == size
            for o in scene.objects:
                x0, y0, x1, y1 = o.bbox
                assert g.border <= x0 and x1 <= size - 1 - g.border and g.border <= y0 and y1 <= size - 1 - g.border
                lo, hi = g.small if o.size == "small" else g.large
                assert lo <= o.extent <= hi
            for a, b in combinations(scene.objects, 2):
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                # separated by at least `gap` free pixels along x or along y
                assert max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1) > g.gap
            px = np.asarray(W.render(scene))
            assert px.shape == (size, size, 3)
            assert {tuple(int(v) for v in p) for p in px.reshape(-1, 3)} <= palette  # no anti-aliasing
            for colour, rgb in W.COLOURS.items():
                _, n = ndimage.label((px == rgb).all(axis=-1))
                assert n == sum(o.colour == colour for o in scene.objects)  # nothing touches or overlaps


def test_rendered_objects_fill_exactly_their_boxes():
    for scene in _scenes("multi", 30):
        px = np.asarray(W.render(scene))
        for o in scene.objects:
            ys, xs = np.nonzero((px == W.COLOURS[o.colour]).all(axis=-1) & _box_mask(o, scene.image_size))
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == o.bbox
            assert (xs.min() + xs.max()) / 2 == o.cx and (ys.min() + ys.max()) / 2 == o.cy


def _box_mask(o: W.Obj, size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    x0, y0, x1, y1 = o.bbox
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def test_scene_kinds_follow_their_rules():
    g = W.geometry(64)
    for s in _scenes("single", 50):
        assert len(s.objects) == 1 and s.relation is None
    counts = set()
    for s in _scenes("count", 100):
        counts.add(len(s.objects))
        assert len({(o.shape, o.colour, o.size) for o in s.objects}) == 1
    assert counts == {2, 3, 4}
    for s in _scenes("binding", 100):
        a, b = s.objects
        assert a.shape != b.shape and a.colour != b.colour
    ns = set()
    for s in _scenes("multi", 100):
        ns.add(len(s.objects))
        assert len({o.shape for o in s.objects}) == len(s.objects)
        if len(s.objects) == 2:
            assert s.objects[0].colour == s.objects[1].colour
    assert ns == {2, 3}
    rels = set()
    for s in _scenes("relation", 200):
        assert s.relation is not None
        i, rel, j = s.relation
        a, b = s.objects[i], s.objects[j]
        rels.add(rel)
        assert a.shape != b.shape
        assert W.relation_holds(rel, a, b, g.margin) and not W.relation_holds(W.OPPOSITE[rel], a, b, g.margin)
        dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
        assert (dx >= dy) if rel in ("left_of", "right_of") else (dy >= dx)
    assert rels == set(W.RELATIONS)


def test_sample_scene_options_and_bad_input():
    rng = np.random.default_rng(0)
    assert len(W.sample_scene(rng, "count", count=4).objects) == 4
    assert len(W.sample_scene(rng, "multi", n_objects=3).objects) == 3
    assert W.sample_scene(rng, "relation", relation="above").relation == (0, "above", 1)
    for kwargs, field in [
        ({"kind": "crowd"}, "kind"),
        ({"kind": "count", "count": 5}, "count"),
        ({"kind": "multi", "n_objects": 4}, "n_objects"),
        ({"kind": "relation", "relation": "near"}, "relation"),
        ({"kind": "single", "size": 16}, "size"),
    ]:
        with pytest.raises(InvalidArgument) as e:
            W.sample_scene(rng, **kwargs)
        assert e.value.field == field


def test_captions_use_the_grammar():
    spec = W.CaptionSpec((W.ObjectSpec("square", "blue", None, 3),), None, "count")
    assert W.format_caption(spec) == "three blue squares"
    spec = W.CaptionSpec((W.ObjectSpec("circle", "red", "large"), W.ObjectSpec("square", "blue")), (0, "left_of", 1), "relation")
    assert W.format_caption(spec) == "a large red circle to the left of a blue square"
    spec = W.CaptionSpec(tuple(W.ObjectSpec(s, c) for s, c in [("circle", "red"), ("triangle", "green"), ("square", "blue")]), None, "multi")
    assert W.format_caption(spec) == "a red circle, a green triangle and a blue square"


@pytest.mark.parametrize("kind", W.KINDS)
@pytest.mark.parametrize("sizes", [False, True])
def test_caption_parse_round_trip(kind, sizes):
    for scene in _scenes(kind, 80, seed=11):
        text = W.caption(scene, sizes=sizes)
        spec = W.parse_caption(text)
        assert spec == W.scene_spec(scene, sizes)
        assert spec.kind == kind
        assert W.format_caption(spec) == text
        assert W.parse_caption("  " + text.upper() + ". ") == spec  # case, spaces and a full stop do not matter


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("a pink circle", "unknown colour"),
        ("a red hexagon", "not a singular shape"),
        ("two red circle", "not a plural shape"),
        ("one red circle", "must start with"),
        ("five red circles", "must start with"),
        ("a red circle and a blue circle", "different shape"),
        ("a red circle to the left of", "object phrase"),
        ("three red circles and a blue square", "cannot be combined"),
        ("a red circle above a blue square below a green triangle", "exactly one relation"),
        ("a big red circle", "must be"),
        ("a red circle, a blue square, a green triangle and a red square", "at most three objects"),
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text, fragment):
    with pytest.raises(InvalidArgument) as e:
        W.parse_caption(text)
    assert e.value.field == "caption"
    assert fragment in str(e.value)


def _check_graph(questions):
    ids = [q.id for q in questions]
    assert len(set(ids)) == len(ids)
    seen: set[str] = set()
    for q in questions:
        # parents exist and come earlier: the graph is acyclic
        assert set(q.parents) <= seen, (q, seen)
        seen.add(q.id)


@pytest.mark.parametrize("kind", W.KINDS)
def test_questions_form_a_dependency_graph_and_hold_on_the_scene(kind):
    for scene in _scenes(kind, 40, seed=5):
        for sizes in (False, True):
            text = W.caption(scene, sizes=sizes)
            qs = W.questions_for_caption(text)
            _check_graph(qs)
            by_id = {q.id: q for q in qs}
            for q in qs:
                assert q.answer == "yes" and not q.choices
                assert (q.category, q.detail) in {
                    ("entity", "shape"), ("attribute", "colour"), ("attribute", "size"), ("count", "count"), ("relation", "spatial"),
                }
                assert W.parse_question(q.text).detail == q.detail  # questions are in the question grammar
                assert W.ask(scene, q.text) is True
                if q.category != "entity":
                    assert any(by_id[p].category == "entity" for p in q.parents)
            n_objects = len(W.parse_caption(text).objects)
            assert sum(q.category == "entity" for q in qs) == n_objects
            assert sum(q.detail == "size" for q in qs) == (n_objects if sizes else 0)
            assert sum(q.category == "count" for q in qs) == (1 if kind == "count" else 0)
            assert sum(q.category == "relation" for q in qs) == (1 if kind == "relation" else 0)


def test_question_texts_and_dependencies():
    qs = W.questions_for_caption("a red circle to the left of a large blue square")
    assert [(q.id, q.text, q.parents) for q in qs] == [
        ("1", "Is there a circle?", ()),
        ("2", "Is the circle red?", ("1",)),
        ("3", "Is there a square?", ()),
        ("4", "Is the square blue?", ("3",)),
        ("5", "Is the square large?", ("3",)),
        ("6", "Is the red circle to the left of the large blue square?", ("1", "2", "3", "4", "5")),
    ]
    qs = W.questions_for_caption("three blue squares")
    assert [(q.text, q.parents, q.detail) for q in qs] == [
        ("Is there a square?", (), "shape"),
        ("Are the squares blue?", ("1",), "colour"),
        ("Are there three blue squares?", ("1",), "count"),
    ]


def test_eval_item_scores_with_the_dsg_dependency_rule():
    item = W.eval_item("a red circle to the left of a blue square", "sw_1")
    assert item.category == "relation" and item.skill == "relation"
    all_yes = question_scores(item, {q.id: True for q in item.questions})
    assert set(all_yes.values()) == {1.0}
    no_circle = question_scores(item, {q.id: q.id != "1" for q in item.questions})
    assert no_circle == {"1": 0.0, "2": 0.0, "3": 1.0, "4": 1.0, "5": 0.0}


def test_probe_questions_mix_true_and_false_of_every_type():
    rng = np.random.default_rng(1)
    truths: dict[tuple[str, bool], int] = {}
    for kind in W.KINDS:
        for scene in _scenes(kind, 20, seed=2):
            for text in W.probe_questions(scene, rng):
                key = (W.parse_question(text).detail, bool(W.ask(scene, text)))
                truths[key] = truths.get(key, 0) + 1
    for detail in ("shape", "colour", "size", "count", "spatial"):
        assert truths.get((detail, True)) and truths.get((detail, False)), detail


def test_parse_question_covers_the_grammar_and_rejects_the_rest():
    q = W.parse_question("Are there 3 blue squares?")
    assert (q.kind, q.number, q.desc) == ("count", 3, W.Desc("square", "blue"))
    q = W.parse_question("Is there one small red circle?")
    assert (q.kind, q.number, q.desc) == ("count", 1, W.Desc("circle", "red", "small"))
    q = W.parse_question("Is the red object a triangle?")
    assert (q.kind, q.desc, q.attr) == ("attribute", W.Desc(None, "red"), W.Desc(shape="triangle"))
    q = W.parse_question("Is the green triangle below the red circle?")
    assert (q.kind, q.relation, q.other) == ("relation", "below", W.Desc("circle", "red"))
    assert W.parse_question("What color is the circle?").asked == "colour"
    assert W.parse_question("How many red squares are there?").asked == "count"
    for bad in ("Is there a dog?", "Is the circle happy?", "Are there five circles?", "Is there two circles?", "Are there one circle?", "Is the squares blue?", "Describe the image."):
        with pytest.raises(InvalidArgument) as e:
            W.parse_question(bad)
        assert e.value.field == "question"


def test_ground_truth_answers():
    scene = W.Scene(
        objects=(
            W.Obj("circle", "red", "small", 10.5, 30.5, 10),
            W.Obj("square", "blue", "large", 40.5, 30.5, 18),
            W.Obj("square", "blue", "small", 40.0, 55.0, 9),
        ),
        relation=None,
        kind="multi",
    )
    assert W.ask(scene, "Is the red circle to the left of the blue square?") is True
    assert W.ask(scene, "Is the red circle to the right of the blue square?") is False
    assert W.ask(scene, "Is the blue square below the red circle?") is True  # the small one is
    assert W.ask(scene, "Are there two blue squares?") is True
    assert W.ask(scene, "Are there two squares?") is True
    assert W.ask(scene, "Is there one large square?") is True
    assert W.ask(scene, "Are the squares blue?") is True
    assert W.ask(scene, "Is the circle large?") is False
    assert W.ask(scene, "What colour is the square?") == "blue"
    assert W.ask(scene, "How many squares are there?") == "two"


def test_scene_graph_is_json_ground_truth():
    for kind in W.KINDS:
        for scene in _scenes(kind, 10, seed=4):
            g = json.loads(json.dumps(W.scene_graph(scene)))
            assert g["kind"] == kind and len(g["objects"]) == len(scene.objects)
            assert g["objects"][0]["bbox"] == list(scene.objects[0].bbox)
            if scene.relation:
                stated = {"subject": 0, "predicate": scene.relation[1], "object": 1}
                assert g["relation"] == stated and stated in g["relations"]


def test_dataset_default_mix_is_skewed_to_single_objects():
    data = W.dataset(0, 1000)
    share = sum(s.kind == "single" for s, _ in data) / len(data)
    assert 0.75 < share < 0.85
    assert {s.kind for s, _ in data} == set(W.KINDS)
    assert all(W.parse_caption(c).kind == s.kind for s, c in data)
    only = W.dataset(0, 20, {"count": 1})
    assert {s.kind for s, _ in only} == {"count"}
    with pytest.raises(InvalidArgument):
        W.dataset(0, 5, {"crowd": 1})
    with pytest.raises(InvalidArgument):
        W.dataset(0, 5, {"single": 0})
