"""The ShapesWorld judge: a programmatic VQA model for images of the ShapesWorld world.

:func:`detect` finds the objects of an image:

1. every pixel is read as a blend of the background and one palette colour (what blur and soft
   edges produce) and takes that colour where it is at least half of the blend, else the
   background; pixels far from every such blend (smears of other colours) take none; a 3×3
   majority vote then removes single-pixel noise;
2. connected components per colour (4-connectivity); components below a minimum area are noise;
3. each component's shape comes from its geometry: the upward triangle by its row-width profile
   (narrow top, wide base), otherwise square or circle by which ideal shape fits the component
   better (rounded squares still fit a square best); size from the bounding-box side;
4. a component that cannot be one object — elongated, too large, not convex, or not fitting its
   shape's template (two touching objects of one colour merge into one component) — is kept but
   marked ``confident=False``: it never counts as an object, and counts or captions involving
   its colour are answered "no", so a merge does not silently pass as a wrong count.

:func:`answer` answers questions of the question grammar of :mod:`selma_shapesworld.world` with
"yes"/"no" (open questions with a word), from the text of the question only, like any VQA
backend; the meaning of each question is :func:`selma_shapesworld.world.evaluate`, the same
function that gives the ground truth.  :func:`verify` checks a whole caption (strict: nothing
else in the image) — the data-quality gate.  :class:`ShapesWorldJudgeVqa` is the
``shapesworld_judge`` backend of :func:`selma_evaluation.vqa.build_vqa`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from selma.errors import InvalidArgument
from selma_evaluation.vqa import VqaModel, VqaQuery
from selma_shapesworld.world import (
    BACKGROUND,
    COLOURS,
    NUMBER_WORDS,
    Desc,
    Geometry,
    Obj,
    QuestionSpec,
    evaluate,
    geometry,
    object_mask,
    parse_caption,
    parse_question,
)

_PALETTE_NAMES = ("background", *COLOURS)
_BG = np.array(BACKGROUND, dtype=np.float32)
_DIRS = np.array(list(COLOURS.values()), dtype=np.float32) - _BG  # background → colour, (K, 3)
_DIRS_SQ = (_DIRS**2).sum(axis=1)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
# Limits for a component to count as one object (see _read_component).
_MAX_ASPECT = 1.4
_MIN_SOLIDITY = 0.85
_MIN_TEMPLATE_IOU = 0.7


@dataclass(frozen=True)
class Detected:
    """One connected component of one colour, read as an object.

    ``cx``/``cy``: bounding-box centre (pixel indices, as :class:`selma_shapesworld.world.Obj`);
    ``confident`` False: the component does not look like one object (merged objects, a smear);
    ``reason`` says why.
    """

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    area: int
    confident: bool
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    reason: str = ""


class Judge:
    """The judge with its tolerances (defaults calibrated on ground-truth and perturbed renders).

    ``max_colour_distance``: RGB distance from every background→colour blend beyond which a
    pixel has no colour (the palette colours are at least 160 apart);
    ``min_area``: components smaller than this many pixels at 64 px (scaled by area) are noise;
    ``relation_margin``: centre offset for relations in pixels at 64 px (default: the world's 6).
    """

    def __init__(
        self, max_colour_distance: float = 80.0, min_area: float = 12.0, relation_margin: float | None = None, smooth: bool = True
    ) -> None:
        self.max_colour_distance = float(max_colour_distance)
        self.smooth = smooth
        self.min_area = float(min_area)
        self.relation_margin = relation_margin

    # ------------------------------------------------------------------ detection

    def _geometry(self, image: Image.Image) -> Geometry:
        if not isinstance(image, Image.Image):
            raise InvalidArgument(f"expected a PIL image, got {type(image).__name__}", field="image")
        try:
            return geometry(min(image.size))
        except InvalidArgument:
            raise InvalidArgument(f"ShapesWorld images are 32..1024 px; got {image.width}x{image.height}", field="image") from None

    def _margin(self, g: Geometry) -> float:
        return g.margin if self.relation_margin is None else self.relation_margin * g.size / 64

    def segment(self, image: Image.Image) -> np.ndarray:
        """Per-pixel palette index (0 = background, 1.. = :data:`COLOURS` in order), -1 = no colour.

        Every pixel is read as a blend of the background and one colour (what blur and
        anti-aliasing produce at an edge): for each colour, the blend fraction ``t`` is the
        projection onto the background→colour segment and the residual the distance from it.
        The colour with the smallest residual wins where ``t >= 0.5`` (so edges fall on the
        50 % contour, where they are in the render); below that the pixel is background, and a
        pixel farther than ``max_colour_distance`` from every segment has no colour.  Nearest
        palette colour alone would read the midpoint of blue and the background as purple.
        """
        px = np.asarray(image.convert("RGB"), dtype=np.float32) - _BG
        t = np.clip(np.tensordot(px, _DIRS, axes=([2], [1])) / _DIRS_SQ, 0.0, 1.0)  # (H, W, K)
        resid = ((px[:, :, None, :] - t[..., None] * _DIRS[None, None]) ** 2).sum(axis=-1)
        best = resid.argmin(axis=-1)
        t_best = np.take_along_axis(t, best[..., None], axis=-1)[..., 0]
        labels = np.where(t_best >= 0.5, best + 1, 0)
        labels[resid.min(axis=-1) > self.max_colour_distance**2] = -1
        if self.smooth:
            labels = _majority(labels)
        return labels

    def detect(self, image: Image.Image) -> list[Detected]:
        """The objects in an image, confident ones and flagged blobs, in colour then scan order."""
        g = self._geometry(image)
        labels = self.segment(image)
        min_area = self.min_area * (g.size / 64) ** 2
        out: list[Detected] = []
        for index, colour in enumerate(_PALETTE_NAMES[1:], start=1):
            comps, n = ndimage.label(labels == index, structure=_FOUR_CONNECTED)
            if n == 0:
                continue
            for k, sl in enumerate(ndimage.find_objects(comps), start=1):
                mask = comps[sl] == k
                area = int(mask.sum())
                if area < min_area:
                    continue
                out.append(_read_component(mask, area, colour, sl[1].start, sl[0].start, g))
        return out

    # ------------------------------------------------------------------ questions

    def evaluate(self, image: Image.Image, question: str | QuestionSpec, detections: Sequence[Detected] | None = None) -> bool | str:
        """The answer to a question as :func:`selma_shapesworld.world.evaluate` gives it (bool, or a word)."""
        g = self._geometry(image)
        q = parse_question(question) if isinstance(question, str) else question
        dets = self.detect(image) if detections is None else detections
        confident = [d for d in dets if d.confident]
        uncertain = [d for d in dets if not d.confident]
        return evaluate(q, confident, self._margin(g), uncertain)

    def answer(self, image: Image.Image, question: str, choices: Sequence[str] = (), detections: Sequence[Detected] | None = None) -> str:
        """"yes"/"no" for a yes/no question, a word for an open one ("red", "three"); with ``choices``,
        the choice that holds (the computed answer when none does).  InvalidArgument outside the grammar."""
        result = self.evaluate(image, question, detections)
        text = ("yes" if result else "no") if isinstance(result, bool) else result
        if choices:
            for c in choices:
                if _same_answer(c, text):
                    return c
        return text

    # ------------------------------------------------------------------ captions

    def failures(self, image: Image.Image, caption: str, strict: bool = False) -> list[str]:
        """Why the image does not show the caption ([] = it does).  ``strict``: nothing else may be in it."""
        g = self._geometry(image)
        spec = parse_caption(caption)
        dets = self.detect(image)
        confident = [d for d in dets if d.confident]
        uncertain = [d for d in dets if not d.confident]
        problems: list[str] = []
        colours = {o.colour for o in spec.objects}
        for u in uncertain:
            if strict or u.colour in colours:
                problems.append(f"unresolved {u.colour} blob at ({u.cx:g}, {u.cy:g}): {u.reason}")
        for o in spec.objects:
            d = Desc(o.shape, o.colour, o.size)
            n = sum(1 for x in confident if d.matches(x))
            want_exact = o.count > 1 or strict
            if (n != o.count) if want_exact else (n < 1):
                problems.append(f"{d.text(plural=o.count > 1)}: want {o.count}, found {n}")
        if spec.relation is not None:
            i, rel, j = spec.relation
            a, b = spec.objects[i], spec.objects[j]
            q = QuestionSpec(kind="relation", desc=Desc(a.shape, a.colour, a.size), relation=rel,
                             other=Desc(b.shape, b.colour, b.size))  # fmt: skip
            if not evaluate(q, confident, self._margin(g)):
                problems.append(f"relation {rel} does not hold")
        if strict:
            want = sum(o.count for o in spec.objects)
            if len(confident) != want:
                problems.append(f"{len(confident)} objects in the image, the caption names {want}")
        return problems

    def verify(self, image: Image.Image, caption: str, strict: bool = False) -> bool:
        """Whether every constraint of the caption holds in the image (strict: and nothing else is there)."""
        return not self.failures(image, caption, strict)


def _majority(labels: np.ndarray) -> np.ndarray:
    """Relabel specks: a pixel that shares its label with at most two of its 8 neighbours (or has
    no colour) takes the label at least 5 of its 3×3 neighbourhood have.

    Noise flips single pixels, which break components and convexity; pixels on an object's
    outline and the tip of a triangle share their label with 3+ neighbours and stay as they are,
    so clean renders are read pixel-exactly.
    """
    onehot = np.stack([labels == k for k in range(-1, len(_PALETTE_NAMES))]).astype(np.float32)
    votes = np.rint(ndimage.uniform_filter(onehot, size=(1, 3, 3), mode="nearest") * 9).astype(np.int32)
    own = np.take_along_axis(votes, (labels + 1)[None], axis=0)[0] - 1  # same-label neighbours
    winner = votes.argmax(axis=0) - 1
    change = ((own <= 2) | (labels == -1)) & (votes.max(axis=0) >= 5)
    return np.where(change, winner, labels)


def _same_answer(choice: str, answer: str) -> bool:
    c = choice.strip().lower().rstrip(".")
    if c == answer:
        return True
    digits = {str(n): w for n, w in NUMBER_WORDS.items()}
    return digits.get(c) == answer or (c == "color" and answer == "colour")


def _read_component(mask: np.ndarray, area: int, colour: str, x0: int, y0: int, g: Geometry) -> Detected:
    """Classify one component (``mask``: its bounding box) and decide whether it is one object."""
    h, w = mask.shape
    side = max(h, w)
    cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
    widths = mask.sum(axis=1).astype(np.float64)
    third = max(1, h // 3)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    if top < 0.75 * bottom:  # the upward triangle: narrow top, wide base (a circle or square: equal)
        shape = "triangle"
    elif _template_iou(mask, "square") >= _template_iou(mask, "circle"):
        # Rounded corners (blur, a generator's soft edges) still fit a square better than a circle.
        shape = "square"
    else:
        shape = "circle"
    size = "large" if side > g.size_threshold else "small"
    # One object fits its shape's template, is convex and about as wide as tall.  Calibrated on
    # clean and blurred+noisy renders (all single objects pass) against pairs of touching objects
    # of one colour (about 1 in 500 passes: a small object touching a large one's side).
    reasons = []
    aspect = side / min(h, w)
    if aspect > _MAX_ASPECT:
        reasons.append(f"elongated ({w}x{h})")
    if area > 1.2 * g.max_area:
        reasons.append(f"area {area} above one object's {g.max_area}")
    solidity = _solidity(mask, area)
    if solidity < _MIN_SOLIDITY:
        reasons.append(f"not convex (solidity {solidity:.2f})")
    fit = _template_iou(mask, shape)
    if fit < _MIN_TEMPLATE_IOU:
        reasons.append(f"does not fit a {shape} (IoU {fit:.2f})")
    return Detected(shape=shape, colour=colour, size=size, cx=cx, cy=cy, area=area, confident=not reasons,
                    bbox=(x0, y0, x0 + w - 1, y0 + h - 1), reason="; ".join(reasons))  # fmt: skip


def _solidity(mask: np.ndarray, area: int) -> float:
    """Pixels over the pixel count of the convex hull of the pixel centres (Pick: area + perimeter/2 + 1), ~1 if convex."""
    ys, xs = np.nonzero(mask)
    try:
        hull = ConvexHull(np.stack([xs, ys], axis=1).astype(np.float64))
    except QhullError:  # all pixels on one line: convex
        return 1.0
    return float(area / (hull.volume + hull.area / 2 + 1))  # in 2-D, volume is the area and area the perimeter


def _template_iou(mask: np.ndarray, shape: str) -> float:
    """IoU of the component with the ideal ``shape`` of its larger side, placed as it best fits.

    Centred (either rounding) for circles and squares; a triangle sits on its base, since blur
    eats its apex first.
    """
    h, w = mask.shape
    e = max(h, w)
    template = object_mask(Obj(shape=shape, colour="red", size="small", cx=(e - 1) / 2, cy=(e - 1) / 2, extent=e))
    dys = {e - h} if shape == "triangle" else {(e - h) // 2, e - h - (e - h) // 2}
    best = 0.0
    for dy in dys:
        for dx in {(e - w) // 2, e - w - (e - w) // 2}:
            placed = np.zeros((e, e), dtype=bool)
            placed[dy : dy + h, dx : dx + w] = mask
            best = max(best, _iou(placed, template))
    return best


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


_DEFAULT = Judge()


def detect(image: Image.Image) -> list[Detected]:
    """:meth:`Judge.detect` with the default tolerances."""
    return _DEFAULT.detect(image)


def answer(image: Image.Image, question: str, choices: Sequence[str] = ()) -> str:
    """:meth:`Judge.answer` with the default tolerances: "yes" or "no" for yes/no questions."""
    return _DEFAULT.answer(image, question, choices)


def verify(image: Image.Image, caption: str, strict: bool = False) -> bool:
    """:meth:`Judge.verify` with the default tolerances."""
    return _DEFAULT.verify(image, caption, strict)


def _image_key(image: Image.Image) -> bytes:
    h = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.digest()


class ShapesWorldJudgeVqa(VqaModel):
    """The judge as a VQA backend: yes/no answers to the ShapesWorld question grammar.

    Each distinct image of a call is segmented once.  A question outside the grammar is an
    InvalidArgument naming it (rather than a guess that would silently distort a score).
    """

    name = "shapesworld-judge"

    def __init__(self, judge: Judge | None = None, batch_size: int = 64) -> None:
        self.judge = judge or Judge()
        self.batch_size = batch_size

    def answer(self, queries: Sequence[VqaQuery]) -> list[str]:
        cache: dict[bytes, list[Detected]] = {}
        out = []
        for q in queries:
            key = _image_key(q.image)
            if key not in cache:
                cache[key] = self.judge.detect(q.image)
            out.append(self.judge.answer(q.image, q.question, q.choices, detections=cache[key]))
        return out
