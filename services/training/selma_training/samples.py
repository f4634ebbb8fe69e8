"""A small synthetic captioned dataset (coloured shapes), published as an ``image_dataset``.

For demos, benchmarks and tests on the tiny models, where no render service output exists:
it follows the image_dataset contract (HF imagefolder: ``metadata.jsonl`` + ``images/``).
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, ImageDraw

from selma.artifacts import ArtifactKind, ArtifactStore, Manifest

_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def shapes_image(index: int, size: int, seed: int, *, width: int | None = None) -> tuple[bytes, str]:
    """PNG bytes and caption of shape ``index``: a coloured circle or square on a light background."""
    rng = np.random.default_rng([seed, index])
    w, h = width or size, size
    colour = list(_COLOURS)[index % len(_COLOURS)]
    shape = "circle" if (index // len(_COLOURS)) % 2 == 0 else "square"
    img = Image.new("RGB", (w, h), (235, 235, 230))
    draw = ImageDraw.Draw(img)
    r = int(size * rng.uniform(0.2, 0.35))
    cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=_COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), f"a {colour} {shape}"


def publish_shapes_dataset(
    store: ArtifactStore,
    count: int = 8,
    *,
    size: int = 64,
    seed: int = 0,
    run: str = "demo",
    skill: str = "shapes",
    captions: bool = True,
    width: int | None = None,
) -> Manifest:
    """Publish ``count`` shape images as an image_dataset artifact and return its manifest.

    ``captions=False`` writes empty captions (to exercise validation); ``width`` makes
    non-square images (to exercise resize and crop).
    """
    rows = []
    labels = {"selma.dev/run": run, "selma.dev/skill": skill}
    with store.writer(ArtifactKind.IMAGE_DATASET, parameters={"count": count, "seed": seed, "source": "shapes"}, labels=labels) as w:
        for i in range(count):
            png, text = shapes_image(i, size, seed, width=width)
            name = f"images/{i:06d}-0.png"
            w.put_bytes(name, png)
            rows.append({"file_name": name, "text": text if captions else "", "prompt_id": f"p{i:06d}", "prompt_index": i,
                         "image_index": 0, "seed": seed + i, "model": "synthetic", "scheduler": "", "steps": 0,
                         "guidance_scale": 0.0, "width": width or size, "height": size})
        w.put_bytes("metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        artifact_id = w.id
    return store.get(artifact_id)
