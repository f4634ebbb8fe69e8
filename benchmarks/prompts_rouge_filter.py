"""Benchmark: the exact fast ROUGE-L diversity filter vs the rouge-score baseline.

Both run SELMA's incremental filter over the same synthetic prompts (many near-duplicates:
word swaps, drops and insertions of earlier prompts): a prompt is kept unless its ROUGE-L F
against some kept prompt exceeds 0.8.  The baseline is how SELMA/Self-Instruct do it with
rouge-score: tokenize once with the scorer's tokenizer, then ``rouge_scorer._score_lcs`` (a
pure-Python LCS table) against every kept prompt.  The kept sets must be identical.

    .venv/bin/python benchmarks/prompts_rouge_filter.py [--sizes 1000 5000 20000] [--baseline-limit 180]

Both sides run through the shared harness (rotated order, paired speed-ups per block; the
first, untimed filter call that checks the kept sets are identical is the warm-up).
The baseline always runs up to 5,000 prompts (the size the ≥50× target is set at); above that
it is skipped when its extrapolated time (from the previous size, scaling with n²) exceeds
--baseline-limit seconds, and the script says so.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from harness import compare  # noqa: E402
from rouge_score import rouge_scorer, tokenizers  # noqa: E402

from selma_prompts.rouge import diverse_subset  # noqa: E402

SUBJECTS = "cat dog horse child woman man robot bird fox bear owl chef farmer pilot dancer knight dragon whale".split()
ADJ = "red small old shiny wooden striped tiny giant golden rusty fluffy glass paper neon frozen ancient".split()
OBJ = "table chair lamp kite boat umbrella guitar teapot ladder clock bicycle basket mirror book candle bridge".split()
PLACE = "beach kitchen forest rooftop library desert market garden station harbor attic meadow castle subway".split()
VERB = "holding sitting near standing behind jumping over painting reading under carrying watching".split()


def corpus(n: int, seed: int = 0, dup_rate: float = 0.45) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < dup_rate:
            toks = rng.choice(out).split()
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(toks))
                op = rng.random()
                if op < 0.4:
                    toks[i] = rng.choice(ADJ + OBJ)
                elif op < 0.7 and len(toks) > 4:
                    del toks[i]
                else:
                    toks.insert(i, rng.choice(ADJ))
            out.append(" ".join(toks))
        else:
            n_obj = rng.randint(1, 3)
            parts = [f"A {rng.choice(ADJ)} {rng.choice(SUBJECTS)} {rng.choice(VERB)}"]
            parts += [f"{rng.choice(['a', 'two', 'three'])} {rng.choice(ADJ)} {rng.choice(OBJ)}" for _ in range(n_obj)]
            parts.append(f"in a {rng.choice(ADJ)} {rng.choice(PLACE)}")
            out.append(" ".join(parts) + rng.choice([".", "", ", at night.", ", oil painting.", ", watercolor."]))
    return out


def baseline(texts: list[str], threshold: float) -> list[int]:
    tok = tokenizers.DefaultTokenizer(use_stemmer=False)
    kept_tokens: list[list[str]] = []
    kept: list[int] = []
    for i, t in enumerate(texts):
        cand = tok.tokenize(t)
        if any(rouge_scorer._score_lcs(ref, cand).fmeasure > threshold for ref in kept_tokens):
            continue
        kept_tokens.append(cand)
        kept.append(i)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-limit", type=float, default=180.0, help="skip the baseline when it would take longer (s)")
    args = p.parse_args()
    last: tuple[int, float] | None = None
    for n in args.sizes:
        texts = corpus(n)
        estimate = last[1] * (n / last[0]) ** 2 if last else 0.0
        fast = diverse_subset(texts, args.threshold)
        if last and n > 5000 and estimate > args.baseline_limit:
            t0 = time.perf_counter()
            diverse_subset(texts, args.threshold)
            print(f"== n={n}: fast filter {time.perf_counter() - t0:.3f} s, kept {len(fast)}; rouge-score skipped "
                  f"(estimated {estimate:.0f} s > --baseline-limit {args.baseline_limit:.0f} s)")
            continue
        ref = baseline(texts, args.threshold)
        assert fast == ref, f"kept sets differ at n={n}: {len(fast)} vs {len(ref)}"
        def slow(t: list[str] = texts) -> None:
            baseline(t, args.threshold)

        def ours(t: list[str] = texts) -> None:
            diverse_subset(t, args.threshold)

        cmp = compare({"rouge-score": slow, "selma fast filter": ours},
                      baseline="rouge-score", repeats=args.repeats, warmup=0, title=f"ROUGE-L filter, {n} prompts, {len(fast)} kept (identical kept sets)")
        cmp.print(unit="s", per="filter", speedup=True)
        last = (n, statistics.median(cmp.times["rouge-score"]))

if __name__ == "__main__":
    main()
