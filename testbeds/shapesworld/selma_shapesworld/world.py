"""The ShapesWorld world: vocabulary, seeded scenes, renders, captions, questions and their meaning.

Vocabulary: shapes circle, square and (upward) triangle; five flat colours on a light
background (:data:`COLOURS`, :data:`BACKGROUND`); two sizes (small: side 8–11 px, large: 16–20 px
at 64 px, scaled with the image); counts 1–4; relations left of / right of / above / below,
decided on bounding-box centres with a margin (6 px at 64 px).  Objects never overlap or touch
(at least 3 px apart at 64 px) and lie fully inside the image.  Renders are pixel-exact: no
anti-aliasing, so a judge can be exact on ground truth.

Scene kinds (the skills the SELMA loop trains): ``single`` ("a red circle"), ``count`` ("three
blue squares"), ``relation`` ("a red circle to the left of a blue square"), ``binding`` (two
objects, different shapes and different colours: "a red circle and a blue square") and
``multi`` (three objects of different shapes, "a red circle, a green triangle and a blue
square", or two of different shapes sharing a colour, "a red circle and a red square").
Objects named in one caption always have different shapes, so "the circle" in a question is
never ambiguous.

The caption grammar (:func:`caption` writes it, :func:`parse_caption` reads it)::

    caption  := count | object | object REL object | object " and " object
              | object ", " object " and " object
    object   := "a " [SIZE " "] COLOUR " " SHAPE
    count    := ("two"|"three"|"four") " " [SIZE " "] COLOUR " " SHAPE "s"
    REL      := "to the left of" | "to the right of" | "above" | "below"

The question grammar (:func:`questions_for_caption` writes DSG-style questions in it,
:func:`parse_question` reads it, :func:`evaluate` gives its meaning on a list of objects —
the judge calls the same function on what it detected)::

    "Is there a DESC?"                       at least one object matches DESC
    "Is there one DESC?" / "Are there N DESC(s)?"   exactly N objects match (N one..four or 1..4)
    "Is the DESC ATTR?"                      some object matching DESC has ATTR
    "Are the DESCs ATTR?"                    at least two objects matching DESC have ATTR
    "Is the DESC REL the DESC?"              some pair of matching objects is in that relation
    "What colour|shape|size is the DESC?" / "How many DESCs are there?"   (open questions)
    DESC := [SIZE] [COLOUR] (SHAPE | "object")      ATTR := SIZE | COLOUR | "a SHAPE"
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from selma.errors import InvalidArgument
from selma_evaluation.types import EvalItem, Question

SHAPES = ("circle", "square", "triangle")
# Flat colours chosen far apart from each other and from the background, so that nearest-palette
# segmentation is exact on renders, and blends of a colour with the background (blurred edges)
# stay closer to one of the two than to any third colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 170),
}
BACKGROUND = (245, 245, 240)
SIZES = ("small", "large")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_COUNT = 4
# relation key -> caption/question phrase
RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
OPPOSITE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
KINDS = ("single", "count", "relation", "binding", "multi")
# The pretraining mix: skewed towards single objects (as real text-to-image data is towards simple
# captions), so that a base model trained on it is weak at counting, relations and binding.
DEFAULT_MIX: dict[str, float] = {"single": 0.80, "count": 0.05, "relation": 0.05, "binding": 0.05, "multi": 0.05}
DEFAULT_SIZE = 64
MIN_SIZE, MAX_SIZE = 32, 1024

_FIELD = "caption"
_QFIELD = "question"
_WORD_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Pixel sizes of the world at one image size (64 px reference values scaled with it)."""

    size: int
    small: tuple[int, int]  # inclusive side range of small objects
    large: tuple[int, int]  # inclusive side range of large objects
    gap: int  # minimum free pixels between two objects' bounding boxes
    margin: float  # minimum centre offset for a relation to hold
    border: int  # free pixels along the image edge

    @property
    def size_threshold(self) -> float:
        """Sides above this are large (midway between the two ranges)."""
        return (self.small[1] + self.large[0]) / 2

    @property
    def max_area(self) -> int:
        """Pixel area of the largest possible single object (a large square)."""
        return self.large[1] ** 2


def geometry(size: int = DEFAULT_SIZE) -> Geometry:
    """The :class:`Geometry` of ``size``×``size`` images; InvalidArgument outside 32..1024."""
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidArgument(f"ShapesWorld image size must be an integer in {MIN_SIZE}..{MAX_SIZE}; got {size!r}", field="size")
    f = size / 64
    return Geometry(
        size=size,
        small=(round(8 * f), round(11 * f)),
        large=(round(16 * f), round(20 * f)),
        gap=max(2, round(3 * f)),
        margin=6 * f,
        border=max(1, round(f)),
    )


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """One object: its attributes, bounding-box centre (pixel-index coordinates) and side in pixels."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    extent: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive pixel indices."""
        x0 = round(self.cx - (self.extent - 1) / 2)
        y0 = round(self.cy - (self.extent - 1) / 2)
        return x0, y0, x0 + self.extent - 1, y0 + self.extent - 1


@dataclass(frozen=True)
class Scene:
    """A scene: its objects, the relation its caption states (subject index, key, object index), its kind."""

    objects: tuple[Obj, ...]
    relation: tuple[int, str, int] | None
    kind: str
    image_size: int = DEFAULT_SIZE


def relation_holds(rel: str, a: Any, b: Any, margin: float) -> bool:
    """Whether ``a`` is ``rel`` ``b`` (``left_of`` …), by centres: the offset along the axis is at least ``margin``."""
    if rel == "left_of":
        return b.cx - a.cx >= margin
    if rel == "right_of":
        return a.cx - b.cx >= margin
    if rel == "above":
        return b.cy - a.cy >= margin
    if rel == "below":
        return a.cy - b.cy >= margin
    raise InvalidArgument(f"unknown relation {rel!r}; valid: {', '.join(RELATIONS)}", field="relation")


def _sample_extent(rng: np.random.Generator, size_class: str, g: Geometry) -> int:
    lo, hi = g.small if size_class == "small" else g.large
    return int(rng.integers(lo, hi + 1))


def _place(rng: np.random.Generator, extents: Sequence[int], g: Geometry, tries: int = 200) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of these sides, inside the image and ``gap`` apart; None if it fails."""
    boxes: list[tuple[int, int, int]] = []
    for e in extents:
        for _ in range(tries):
            x0 = int(rng.integers(g.border, g.size - g.border - e + 1))
            y0 = int(rng.integers(g.border, g.size - g.border - e + 1))
            # Boxes grown by the gap must not intersect (Chebyshev separation of the boxes).
            if all(
                x0 + e + g.gap <= bx or bx + be + g.gap <= x0 or y0 + e + g.gap <= by or by + be + g.gap <= y0
                for bx, by, be in boxes
            ):
                boxes.append((x0, y0, e))
                break
        else:
            return None
    return [(x, y) for x, y, _ in boxes]


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(
    rng: np.random.Generator,
    kind: str,
    *,
    size: int = DEFAULT_SIZE,
    count: int | None = None,
    n_objects: int | None = None,
    relation: str | None = None,
) -> Scene:
    """A random scene of ``kind``, drawn from ``rng`` only (same generator state → same scene).

    ``count`` (2–4) fixes the number of a ``count`` scene, ``n_objects`` (2 or 3) the objects of a
    ``multi`` scene, ``relation`` (a key of :data:`RELATIONS`) the relation of a ``relation`` scene.
    """
    if kind not in KINDS:
        raise InvalidArgument(f"unknown scene kind {kind!r}; valid: {', '.join(KINDS)}", field="kind")
    g = geometry(size)
    if count is not None and not 2 <= count <= MAX_COUNT:
        raise InvalidArgument(f"count must be in 2..{MAX_COUNT}; got {count}", field="count")
    if n_objects is not None and n_objects not in (2, 3):
        raise InvalidArgument(f"n_objects must be 2 or 3; got {n_objects}", field="n_objects")
    if relation is not None and relation not in RELATIONS:
        raise InvalidArgument(f"unknown relation {relation!r}; valid: {', '.join(RELATIONS)}", field="relation")
    colours = tuple(COLOURS)
    rel: tuple[int, str, int] | None = None
    if kind == "single":
        attrs = [(_choice(rng, SHAPES), _choice(rng, colours), _choice(rng, SIZES))]
    elif kind == "count":
        n = count if count is not None else int(rng.integers(2, MAX_COUNT + 1))
        attrs = [(_choice(rng, SHAPES), _choice(rng, colours), _choice(rng, SIZES))] * n
    else:
        if kind == "multi":
            n = n_objects if n_objects is not None else int(rng.integers(2, 4))
        else:
            n = 2
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
        if kind == "binding":
            cols = [colours[i] for i in rng.permutation(len(colours))[:2]]
        elif kind == "multi" and n == 2:
            cols = [_choice(rng, colours)] * 2  # two colours that differ would make it a binding scene
        else:
            cols = [_choice(rng, colours) for _ in range(n)]
        attrs = [(s, c, _choice(rng, SIZES)) for s, c in zip(shapes, cols, strict=True)]
        if kind == "relation":
            rel = (0, relation if relation is not None else _choice(rng, tuple(RELATIONS)), 1)
    return _placed(rng, attrs, rel, kind, g, what=f"a {kind} scene")


def _placed(rng: np.random.Generator, attrs: Sequence[tuple[str, str, str]], rel: tuple[int, str, int] | None, kind: str, g: Geometry,
            *, alike: bool = False, what: str = "") -> Scene:
    """Objects of ``attrs`` (shape, colour, size class) placed apart, the relation ``rel`` holding clearly.

    ``alike``: every object gets the first one's side (a count's objects).  Draws from ``rng`` in a
    fixed order, so the same generator state gives the same scene.
    """
    for _ in range(1000):
        extents = [_sample_extent(rng, a[2], g) for a in attrs]
        if alike:
            extents = [extents[0]] * len(extents)
        corners = _place(rng, extents, g)
        if corners is None:
            continue
        objects = tuple(
            Obj(shape=s, colour=c, size=z, cx=x + (e - 1) / 2, cy=y + (e - 1) / 2, extent=e)
            for (s, c, z), (x, y), e in zip(attrs, corners, extents, strict=True)
        )
        if rel is not None and not _clear_relation(objects[rel[0]], rel[1], objects[rel[2]], g.margin):
            continue
        return Scene(objects=objects, relation=rel, kind=kind, image_size=g.size)
    raise RuntimeError(f"could not place {what} at {g.size} px")  # not reached at 32 px and above


def scene_for_caption(text: str, rng: np.random.Generator, *, size: int = DEFAULT_SIZE) -> Scene:
    """A random scene that ``text`` describes exactly: its ground truth (the oracle's training image).

    The objects are the caption's (shape, colour, and its size word or else a size drawn from
    ``rng``; a count's objects share one size), placed as :func:`sample_scene` places them, with a
    stated relation holding clearly (its axis dominating).  Nothing else is in the scene, so the
    judge's strict check passes on its render.  InvalidArgument (field ``caption``) for text
    outside the grammar; same generator state → same scene.
    """
    spec = parse_caption(text)
    g = geometry(size)
    attrs: list[tuple[str, str, str]] = []
    for o in spec.objects:
        size_class = o.size or _choice(rng, SIZES)
        attrs += [(o.shape, o.colour, size_class)] * o.count
    # a count's objects share one size word: keep them alike
    return _placed(rng, attrs, spec.relation, spec.kind, g, alike=spec.kind == "count", what=f"the scene of {text!r}")


def _clear_relation(a: Obj, rel: str, b: Obj, margin: float) -> bool:
    """The relation holds and its axis dominates, so the caption describes the picture unambiguously."""
    if not relation_holds(rel, a, b, margin):
        return False
    dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
    return dx >= dy if rel in ("left_of", "right_of") else dy >= dx


# --------------------------------------------------------------------------- rendering


def object_mask(obj: Obj) -> np.ndarray:
    """The object's pixels inside its bounding box (bool, extent × extent)."""
    e = obj.extent
    c = (e - 1) / 2
    ys, xs = np.mgrid[0:e, 0:e].astype(np.float64)
    if obj.shape == "square":
        return np.ones((e, e), dtype=bool)
    if obj.shape == "circle":
        return (xs - c) ** 2 + (ys - c) ** 2 <= (e / 2) ** 2
    if obj.shape == "triangle":
        # Apex on top, base on the bottom row; half-width grows linearly to e/2 on the last row.
        return np.abs(xs - c) <= (ys + 1) / 2
    raise InvalidArgument(f"unknown shape {obj.shape!r}; valid: {', '.join(SHAPES)}", field="shape")


def render_array(scene: Scene) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 array at ``scene.image_size``."""
    s = scene.image_size
    img = np.empty((s, s, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        img[y0 : y1 + 1, x0 : x1 + 1][object_mask(obj)] = COLOURS[obj.colour]
    return img


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """The scene as an RGB image, flat colours, no anti-aliasing.

    ``size`` other than the scene's own is reached by nearest-neighbour resizing (still flat).
    """
    img = Image.fromarray(render_array(scene), mode="RGB")
    if size is not None and size != scene.image_size:
        geometry(size)  # validates
        img = img.resize((size, size), Image.Resampling.NEAREST)
    return img


# --------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class ObjectSpec:
    """One object phrase of a caption; ``size`` None when the caption does not say."""

    shape: str
    colour: str
    size: str | None = None
    count: int = 1


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: its object phrases, the relation between phrases 0 and 1, its kind."""

    objects: tuple[ObjectSpec, ...]
    relation: tuple[int, str, int] | None
    kind: str


def _phrase(o: ObjectSpec) -> str:
    size = f"{o.size} " if o.size else ""
    if o.count == 1:
        return f"a {size}{o.colour} {o.shape}"
    return f"{NUMBER_WORDS[o.count]} {size}{o.colour} {o.shape}s"


def format_caption(spec: CaptionSpec) -> str:
    """The caption of a :class:`CaptionSpec` (the grammar written out)."""
    phrases = [_phrase(o) for o in spec.objects]
    if spec.relation is not None:
        i, rel, j = spec.relation
        return f"{phrases[i]} {RELATIONS[rel]} {phrases[j]}"
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_spec(scene: Scene, sizes: bool = False) -> CaptionSpec:
    """The :class:`CaptionSpec` a scene's caption states (sizes only when ``sizes``)."""
    objs = scene.objects
    if scene.kind == "count":
        o = objs[0]
        specs: tuple[ObjectSpec, ...] = (ObjectSpec(o.shape, o.colour, o.size if sizes else None, len(objs)),)
    else:
        specs = tuple(ObjectSpec(o.shape, o.colour, o.size if sizes else None) for o in objs)
    return CaptionSpec(objects=specs, relation=scene.relation, kind=scene.kind)


def caption(scene: Scene, sizes: bool = False) -> str:
    """The scene's caption in the grammar: "a red circle", "three blue squares", … (size words when ``sizes``)."""
    return format_caption(scene_spec(scene, sizes))


def _normalise(text: str, field: str) -> str:
    if not isinstance(text, str):
        raise InvalidArgument(f"expected text, got {type(text).__name__}", field=field)
    t = " ".join(text.lower().replace(",", " , ").split()).rstrip("?.! ").strip()
    return t.replace(" ,", ",")


_EXAMPLES = "e.g. 'a red circle', 'three blue squares', 'a red circle to the left of a blue square', 'a red circle and a blue square'"


def _parse_phrase(phrase: str, text: str) -> ObjectSpec:
    words = phrase.split()
    if not words:
        raise InvalidArgument(f"caption {text!r}: an object phrase is empty; {_EXAMPLES}", field=_FIELD)
    if words[0] == "a":
        count = 1
    elif words[0] in _WORD_NUMBERS and _WORD_NUMBERS[words[0]] >= 2:
        count = _WORD_NUMBERS[words[0]]
    else:
        raise InvalidArgument(
            f"caption {text!r}: object phrase {phrase!r} must start with 'a' or a number two..four; {_EXAMPLES}", field=_FIELD
        )
    rest = words[1:]
    size = None
    if rest and rest[0] in SIZES:
        size, rest = rest[0], rest[1:]
    if len(rest) != 2:
        raise InvalidArgument(
            f"caption {text!r}: object phrase {phrase!r} must be '{words[0]} [small|large] COLOUR SHAPE'; {_EXAMPLES}", field=_FIELD
        )
    colour, noun = rest
    if colour not in COLOURS:
        raise InvalidArgument(f"caption {text!r}: unknown colour {colour!r}; valid: {', '.join(COLOURS)}", field=_FIELD)
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    if shape not in SHAPES or (count > 1) != (noun != shape):
        want = "plural" if count > 1 else "singular"
        raise InvalidArgument(
            f"caption {text!r}: {noun!r} is not a {want} shape; valid shapes: {', '.join(SHAPES)}", field=_FIELD
        )
    return ObjectSpec(shape=shape, colour=colour, size=size, count=count)


def parse_caption(text: str) -> CaptionSpec:
    """The grammar inverted: what ``text`` asks for.  InvalidArgument (field ``caption``) for text outside it.

    Case, surrounding spaces and a final full stop are ignored.  Objects named in one caption must
    have different shapes; a count phrase stands alone.
    """
    t = _normalise(text, _FIELD)
    if not t:
        raise InvalidArgument(f"caption is empty; {_EXAMPLES}", field=_FIELD)
    relation = None
    rel_hits = [(key, phrase) for key, phrase in RELATIONS.items() if f" {phrase} " in f" {t} "]
    if rel_hits:
        # "to the left of" contains no other phrase, so at most one key matches a valid caption.
        key, phrase = rel_hits[0]
        parts = f" {t} ".split(f" {phrase} ")
        if len(rel_hits) > 1 or len(parts) != 2:
            raise InvalidArgument(f"caption {text!r}: state exactly one relation; {_EXAMPLES}", field=_FIELD)
        phrases = [p.strip() for p in parts]
        relation = (0, key, 1)
    else:
        head, sep, last = t.rpartition(" and ")
        phrases = [p.strip() for p in head.split(",")] + [last.strip()] if sep else [t]
        if "," in last:
            raise InvalidArgument(f"caption {text!r}: join the last two objects with 'and'; {_EXAMPLES}", field=_FIELD)
    if len(phrases) > 3:
        raise InvalidArgument(f"caption {text!r}: at most three objects; {_EXAMPLES}", field=_FIELD)
    objects = tuple(_parse_phrase(p, text) for p in phrases)
    if len(objects) > 1 and any(o.count > 1 for o in objects):
        raise InvalidArgument(f"caption {text!r}: a count ('two …') cannot be combined with other objects", field=_FIELD)
    shapes = [o.shape for o in objects]
    if len(set(shapes)) != len(shapes):
        raise InvalidArgument(
            f"caption {text!r}: each object needs a different shape (questions say 'the circle'); got {', '.join(shapes)}",
            field=_FIELD,
        )
    if relation is not None:
        kind = "relation"
    elif objects[0].count > 1:
        kind = "count"
    elif len(objects) == 1:
        kind = "single"
    elif len(objects) == 2 and objects[0].colour != objects[1].colour:
        kind = "binding"
    else:
        kind = "multi"
    return CaptionSpec(objects=objects, relation=relation, kind=kind)


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Desc:
    """An object description in a question; None = any."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def text(self, plural: bool = False) -> str:
        noun = self.shape or "object"
        return " ".join(w for w in (self.size, self.colour, noun + ("s" if plural else "")) if w)

    def matches(self, o: Any) -> bool:
        return (
            (self.shape is None or o.shape == self.shape)
            and (self.colour is None or o.colour == self.colour)
            and (self.size is None or o.size == self.size)
        )


@dataclass(frozen=True)
class QuestionSpec:
    """A parsed question.

    ``kind``: ``exists``, ``count`` (``number``), ``attribute`` (``attr``: a Desc of the asked
    attribute; ``plural``), ``relation`` (``relation``, ``other``), ``what`` (``asked``: colour,
    shape, size or count).
    """

    kind: str
    desc: Desc
    plural: bool = False
    number: int = 0
    attr: Desc | None = None
    relation: str = ""
    other: Desc | None = None
    asked: str = ""

    @property
    def detail(self) -> str:
        """The question type reports group by: shape, colour, size, count, spatial (or what_*)."""
        if self.kind == "exists":
            return "shape"
        if self.kind == "count":
            return "count"
        if self.kind == "relation":
            return "spatial"
        if self.kind == "what":
            return f"what_{self.asked}"
        a = self.attr
        assert a is not None
        return "colour" if a.colour else "size" if a.size else "shape"


_NUM = r"(one|two|three|four|[1-4])"
_DESC = r"((?:(?:small|large) )?(?:(?:red|green|blue|yellow|purple) )?(?:circle|square|triangle|object)s?)"
_REL = "|".join(re.escape(p) for p in RELATIONS.values())
_Q_PATTERNS = [
    ("exists", re.compile(rf"is there an? {_DESC}")),
    ("count", re.compile(rf"(is|are) there (?:exactly )?{_NUM} {_DESC}")),
    ("relation", re.compile(rf"(?:is|are) the {_DESC} ({_REL}) the {_DESC}")),
    ("attribute", re.compile(rf"(is|are) the {_DESC} (small|large|red|green|blue|yellow|purple|an? (?:circle|square|triangle)|(?:circle|square|triangle)s)")),
    ("what", re.compile(rf"what (colou?r|shape|size) (?:is|are) the {_DESC}")),
    ("how_many", re.compile(rf"how many {_DESC} are there")),
]


def _parse_desc(s: str) -> tuple[Desc, bool]:
    words = s.split()
    noun = words[-1]
    plural = noun.endswith("s")
    noun = noun[:-1] if plural else noun
    size = next((w for w in words[:-1] if w in SIZES), None)
    colour = next((w for w in words[:-1] if w in COLOURS), None)
    return Desc(shape=None if noun == "object" else noun, colour=colour, size=size), plural


def parse_question(text: str) -> QuestionSpec:
    """A question of the question grammar (module docstring), parsed; InvalidArgument (field ``question``) otherwise."""
    t = _normalise(text, _QFIELD)
    for kind, pattern in _Q_PATTERNS:
        m = pattern.fullmatch(t)
        if not m:
            continue
        if kind == "exists":
            desc, plural = _parse_desc(m.group(1))
            if plural:
                break
            return QuestionSpec(kind="exists", desc=desc)
        if kind == "count":
            n = int(m.group(2)) if m.group(2).isdigit() else _WORD_NUMBERS[m.group(2)]
            desc, plural = _parse_desc(m.group(3))
            if plural != (n > 1) or (m.group(1) == "are") != plural:
                break
            return QuestionSpec(kind="count", desc=desc, plural=plural, number=n)
        if kind == "relation":
            a, _ = _parse_desc(m.group(1))
            b, _ = _parse_desc(m.group(3))
            rel = next(k for k, p in RELATIONS.items() if p == m.group(2))
            return QuestionSpec(kind="relation", desc=a, relation=rel, other=b)
        if kind == "attribute":
            desc, plural = _parse_desc(m.group(2))
            if (m.group(1) == "are") != plural:
                break
            word = m.group(3).split()[-1]
            if word in SIZES:
                attr = Desc(size=word)
            elif word in COLOURS:
                attr = Desc(colour=word)
            else:
                attr = Desc(shape=word[:-1] if word.endswith("s") else word)
            return QuestionSpec(kind="attribute", desc=desc, plural=plural, attr=attr)
        if kind == "what":
            desc, plural = _parse_desc(m.group(2))
            asked = "colour" if m.group(1).startswith("colo") else m.group(1)
            return QuestionSpec(kind="what", desc=desc, plural=plural, asked=asked)
        desc, _ = _parse_desc(m.group(1))
        return QuestionSpec(kind="what", desc=desc, plural=True, asked="count")
    raise InvalidArgument(
        f"question {text!r} is not in the ShapesWorld question grammar; use questions such as 'Is there a circle?', "
        "'Is the circle red?', 'Are there three blue squares?', 'Is the red circle to the left of the blue square?' "
        "(selma_shapesworld.world.questions_for_caption writes them)",
        field=_QFIELD,
    )


def evaluate(q: QuestionSpec, objects: Sequence[Any], margin: float, uncertain: Sequence[Any] = ()) -> bool | str:
    """The meaning of a question on objects with ``shape``, ``colour``, ``size``, ``cx``, ``cy``.

    Yes/no questions give a bool; open (``what``) questions the answer word.  ``uncertain`` are
    blobs the caller could not resolve into objects (merged objects; they have a ``colour``): a
    count over a description whose colour such a blob shares cannot be confirmed, so it is False.
    """
    matching = [o for o in objects if q.desc.matches(o)]
    if q.kind == "exists":
        return bool(matching)
    if q.kind == "count":
        if any(q.desc.colour is None or u.colour == q.desc.colour for u in uncertain):
            return False
        return len(matching) == q.number
    if q.kind == "attribute":
        assert q.attr is not None
        having = [o for o in matching if q.attr.matches(o)]
        return len(having) >= (2 if q.plural else 1)
    if q.kind == "relation":
        assert q.other is not None
        others = [o for o in objects if q.other.matches(o)]
        return any(a is not b and relation_holds(q.relation, a, b, margin) for a in matching for b in others)
    # open questions: about the largest matching object (counts: about all of them)
    if q.asked == "count":
        return NUMBER_WORDS.get(len(matching), str(len(matching))) if matching else "zero"
    if not matching:
        return "none"
    best = max(matching, key=lambda o: getattr(o, "area", None) or o.extent * o.extent)
    return str(getattr(best, q.asked))


def ask(scene: Scene, question: str) -> bool | str:
    """The ground-truth answer to a question about a scene (True/False for yes/no questions)."""
    return evaluate(parse_question(question), scene.objects, geometry(scene.image_size).margin)


def _tuple(kind: str, *args: str) -> str:
    return f"{kind} ({', '.join(args)})"


def questions_for_caption(text: str) -> tuple[Question, ...]:
    """DSG-style yes/no questions for a caption, in the question grammar, with dependencies.

    Per object phrase: existence "Is there a circle?" (entity/shape) → colour "Is the circle
    red?" (attribute/colour) and, when the caption gives one, size "Is the circle large?"
    (attribute/size), both depending on the existence question; for a count, "Are there three
    blue squares?" (count/count, depends on existence).  A relation "Is the red circle to the
    left of the blue square?" (relation/spatial) depends on both objects' existence and attribute
    questions.  Ids are "1", "2", … in order; every expected answer is "yes".
    """
    spec = parse_caption(text)
    questions: list[Question] = []

    def add(qtext: str, parents: Sequence[str], category: str, detail: str, tup: str) -> str:
        qid = str(len(questions) + 1)
        questions.append(Question(id=qid, text=qtext, parents=tuple(parents), category=category, detail=detail, tuple=tup))
        return qid

    per_object: list[list[str]] = []
    for o in spec.objects:
        plural = o.count > 1
        be, noun = ("Are", f"{o.shape}s") if plural else ("Is", o.shape)
        ex = add(f"Is there a {o.shape}?", (), "entity", "shape", _tuple("entity - whole", o.shape))
        ids = [ex]
        ids.append(add(f"{be} the {noun} {o.colour}?", (ex,), "attribute", "colour", _tuple("attribute - color", o.shape, o.colour)))
        if o.size:
            ids.append(add(f"{be} the {noun} {o.size}?", (ex,), "attribute", "size", _tuple("attribute - size", o.shape, o.size)))
        if plural:
            d = Desc(o.shape, o.colour, o.size)
            add(f"Are there {NUMBER_WORDS[o.count]} {d.text(plural=True)}?", (ex,), "count", "count",
                _tuple("other - count", o.shape, f"=={o.count}"))  # fmt: skip
        per_object.append(ids)
    if spec.relation is not None:
        i, rel, j = spec.relation
        a, b = spec.objects[i], spec.objects[j]
        da, db = Desc(a.shape, a.colour, a.size), Desc(b.shape, b.colour, b.size)
        add(f"Is the {da.text()} {RELATIONS[rel]} the {db.text()}?", per_object[i] + per_object[j], "relation", "spatial",
            _tuple("relation - spatial", a.shape, b.shape, RELATIONS[rel]))  # fmt: skip
    return tuple(questions)


def eval_item(text: str, item_id: str, category: str = "", skill: str = "") -> EvalItem:
    """An :class:`EvalItem` for a caption with :func:`questions_for_caption`; category defaults to its kind."""
    kind = parse_caption(text).kind
    return EvalItem(id=item_id, prompt=text, category=category or kind, questions=questions_for_caption(text), skill=skill or kind)


def probe_questions(scene: Scene, rng: np.random.Generator, sizes: bool = True) -> list[str]:
    """Questions to test a judge on a scene: the caption's own (all true) and perturbed ones, mostly false.

    Perturbations: a shape that is absent, a colour the shape does not have, the other size, a
    count one off (both ways) and the flipped relation.  Their true answers come from :func:`ask`.
    """
    spec = scene_spec(scene, sizes)
    out = [q.text for q in questions_for_caption(format_caption(spec))]
    present_shapes = {o.shape for o in scene.objects}
    absent = [s for s in SHAPES if s not in present_shapes]
    if absent:
        out.append(f"Is there a {_choice(rng, absent)}?")
    for o in spec.objects:
        wrong = _choice(rng, [c for c in COLOURS if c != o.colour])
        out.append(f"Are the {o.shape}s {wrong}?" if o.count > 1 else f"Is the {o.shape} {wrong}?")
        true_size = o.size or next(x.size for x in scene.objects if x.shape == o.shape)
        other_size = "small" if true_size == "large" else "large"
        out.append(f"Are the {o.shape}s {other_size}?" if o.count > 1 else f"Is the {o.shape} {other_size}?")
        d = Desc(o.shape, o.colour)
        for n in (o.count - 1, o.count + 1):
            if 1 <= n <= MAX_COUNT:
                verb = "Is" if n == 1 else "Are"
                out.append(f"{verb} there {NUMBER_WORDS[n]} {d.text(plural=n > 1)}?")
    if spec.relation is not None:
        i, rel, j = spec.relation
        a, b = spec.objects[i], spec.objects[j]
        out.append(f"Is the {a.colour} {a.shape} {RELATIONS[OPPOSITE[rel]]} the {b.colour} {b.shape}?")
        out.append(f"Is the {b.colour} {b.shape} {RELATIONS[rel]} the {a.colour} {a.shape}?")
    return out


# --------------------------------------------------------------------------- ground truth and datasets


def scene_graph(scene: Scene) -> dict[str, Any]:
    """The scene's ground truth as JSON-ready data: objects with attributes and boxes, the stated relation,
    and every pairwise relation that holds."""
    g = geometry(scene.image_size)
    objs = scene.objects
    relations = [
        {"subject": i, "predicate": rel, "object": j}
        for i in range(len(objs))
        for j in range(len(objs))
        if i != j
        for rel in RELATIONS
        if relation_holds(rel, objs[i], objs[j], g.margin)
    ]
    return {
        "kind": scene.kind,
        "image_size": scene.image_size,
        "objects": [
            {"id": i, "shape": o.shape, "colour": o.colour, "size": o.size, "cx": o.cx, "cy": o.cy, "extent": o.extent,
             "bbox": list(o.bbox)}  # fmt: skip
            for i, o in enumerate(objs)
        ],
        "relation": None if scene.relation is None
        else {"subject": scene.relation[0], "predicate": scene.relation[1], "object": scene.relation[2]},
        "relations": relations,
    }


def _check_mix(mix: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    unknown = sorted(set(mix) - set(KINDS))
    if unknown:
        raise InvalidArgument(f"unknown scene kind(s) {', '.join(unknown)} in mix; valid: {', '.join(KINDS)}", field="mix")
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    if any(v < 0 for v in mix.values()) or not kinds:
        raise InvalidArgument("mix weights must be >= 0 with at least one positive", field="mix")
    w = np.array([float(mix[k]) for k in kinds])
    return kinds, w / w.sum()


def dataset(
    seed: int, n: int, mix: Mapping[str, float] | None = None, *, size: int = DEFAULT_SIZE, size_words: float = 0.0
) -> list[tuple[Scene, str]]:
    """``n`` (scene, caption) pairs, deterministic from ``seed``; kinds drawn with ``mix`` weights
    (default :data:`DEFAULT_MIX`, skewed to single objects); a caption names sizes with probability ``size_words``."""
    if n < 0:
        raise InvalidArgument(f"n must be >= 0; got {n}", field="n")
    kinds, p = _check_mix(DEFAULT_MIX if mix is None else mix)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=p))]
        scene = sample_scene(rng, kind, size=size)
        out.append((scene, caption(scene, sizes=bool(rng.random() < size_words))))
    return out
