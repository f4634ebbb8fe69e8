"""ShapesWorld judge: accuracy per question type on clean and perturbed renders, and images/s.

For every scene kind, seeded scenes are rendered and asked the caption's own questions (true)
and perturbed ones (absent shape, wrong colour, wrong size, count ±1, flipped relation; mostly
false) from ``selma_shapesworld.world.probe_questions``; the truth is the scene's ground truth.
Perturbed renders: a Gaussian blur, then Gaussian pixel noise, as a stand-in for generated
images: mild (blur radius 0.7, σ = 8/255: the judge's calibration target) and strong (1.0, 16/255).  Also reports verify() (the caption gate,
strict and not) and detection speed.  Not a pass/fail test.

    .venv/bin/python benchmarks/shapesworld_judge_accuracy.py [--scenes 300] [--size 64] [--seed 0] [--levels 0:0,8:0.7,16:1.0]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from PIL import Image, ImageFilter

from selma_shapesworld import judge as J
from selma_shapesworld import world as W


def perturb(image: Image.Image, rng: np.random.Generator, sigma: float = 8.0, blur: float = 0.7) -> Image.Image:
    """Slight blur, then Gaussian pixel noise of ``sigma`` (0..255 scale)."""
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    px = np.asarray(image, dtype=np.float64) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.rint(px), 0, 255).astype(np.uint8), mode="RGB")


def run(scenes: int, size: int, seed: int, sigma: float, blur: float) -> None:
    judge = J.Judge()
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng(seed + 1)
    right: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    gate: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    detect_s = 0.0
    images = 0
    for kind in W.KINDS:
        for _ in range(scenes):
            scene = W.sample_scene(rng, kind, size=size)
            image = W.render(scene)
            if sigma or blur:
                image = perturb(image, noise_rng, sigma, blur)
            t0 = time.perf_counter()
            dets = judge.detect(image)
            detect_s += time.perf_counter() - t0
            images += 1
            for text in W.probe_questions(scene, rng):
                q = W.parse_question(text)
                truth = W.ask(scene, text)
                got = judge.evaluate(image, q, dets)
                key = f"{q.detail}/{'yes' if truth else 'no'}"
                right[key][0] += got == truth
                right[key][1] += 1
            cap = W.caption(scene, sizes=bool(rng.random() < 0.5))
            gate[kind][0] += judge.verify(image, cap)
            gate[kind][1] += judge.verify(image, cap, strict=True)
            gate[kind][2] += 1
    label = f"perturbed (blur radius {blur:g}, noise sigma {sigma:g}/255)" if sigma or blur else "clean"
    print(f"\n== {label}: {scenes} scenes per kind at {size} px ==")
    print(f"{'question type/truth':<22}{'correct':>10}{'total':>8}{'accuracy':>10}")
    for key in sorted(right):
        ok, n = right[key]
        print(f"{key:<22}{ok:>10}{n:>8}{100 * ok / n:>9.2f}%")
    ok = sum(v[0] for v in right.values())
    n = sum(v[1] for v in right.values())
    print(f"{'all':<22}{ok:>10}{n:>8}{100 * ok / n:>9.2f}%")
    print("verify() on the scene's own caption (should accept all):")
    for kind, (loose, strict, n) in gate.items():
        print(f"  {kind:<10} ok {100 * loose / n:6.2f}%  strict {100 * strict / n:6.2f}%")
    print(f"detect: {images / detect_s:.0f} images/s ({1000 * detect_s / images:.2f} ms/image)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenes", type=int, default=300, help="scenes per kind")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--levels", default="0:0,8:0.7,16:1.0",
        help="perturbations as sigma:blur pairs (noise std on the 0..255 scale : blur radius in px); 0:0 = clean",
    )
    args = ap.parse_args()
    for level in args.levels.split(","):
        sigma, blur = (float(x) for x in level.split(":"))
        run(args.scenes, args.size, args.seed, sigma, blur)


if __name__ == "__main__":
    main()
