"""The fast ROUGE-L filter makes exactly rouge-score's decisions, ties at the threshold included."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer

from selma_prompts.rouge import RougeLPool, TokenCoder, diverse_subset, rouge_tokens

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_f(candidate: str, reference: str) -> float:
    return SCORER.score(reference, candidate)["rougeL"].fmeasure


def reference_subset(texts: list[str], threshold: float) -> list[int]:
    """SELMA's filter with rouge-score: keep a text unless its max F against the kept ones exceeds threshold."""
    kept: list[int] = []
    for i, t in enumerate(texts):
        if any(reference_f(t, texts[j]) > threshold for j in kept):
            continue
        kept.append(i)
    return kept


def near_duplicate_corpus(n: int, seed: int = 0) -> list[str]:
    """Prompts from a small vocabulary, a third of them edits (swap, drop, insert) of earlier ones."""
    rng = random.Random(seed)
    words = "a the red blue big small cat dog bird on under near table chair tree two three with and of in".split()
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.35:
            toks = rng.choice(out).split()
            for _ in range(rng.randint(1, 2)):
                op = rng.random()
                i = rng.randrange(len(toks)) if toks else 0
                if op < 0.4 and toks:
                    toks[i] = rng.choice(words)
                elif op < 0.7 and len(toks) > 1:
                    del toks[i]
                else:
                    toks.insert(i, rng.choice(words))
            out.append(" ".join(toks))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))).capitalize() + rng.choice([".", "!", ""]))
    return out


def test_scores_are_bit_identical_to_rouge_score():
    texts = near_duplicate_corpus(150) + ["", "!!! ???", "Ünïcode café — 3 cats", "A", "a a a a"]
    pool = RougeLPool(texts)
    for cand in texts[::3] + ["A red cat on the table.", ""]:
        got = pool.scores(cand)
        want = np.array([reference_f(cand, ref) for ref in texts])
        assert np.array_equal(got, want), cand


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8])
def test_kept_set_matches_rouge_score_on_a_near_duplicate_corpus(threshold):
    texts = near_duplicate_corpus(220, seed=int(threshold * 10))
    assert diverse_subset(texts, threshold) == reference_subset(texts, threshold)


def test_exact_threshold_ties_decide_like_rouge_score():
    # 4 of 6 tokens shared, candidate fully contained: P=1, R=2/3, F = 0.8 exactly in floating point.
    exact = ("a b c d", "a b c d e f")
    # 4 of 5 tokens shared both ways: algebraically 0.8, but rouge_score's 2PR/(P+R) rounds to 0.8000000000000002.
    above = ("p q r s x", "p q r s e")
    assert reference_f(*exact) == 0.8
    assert reference_f(*above) > 0.8
    assert 2 * 4 / (5 + 5) == 0.8  # the shortcut formula would call the second one a tie too
    for cand, ref in (exact, above):
        _, f = RougeLPool([ref]).best(cand)
        assert f == reference_f(cand, ref)
    texts = [exact[1], exact[0], above[1], above[0]]
    assert diverse_subset(texts, 0.8) == reference_subset(texts, 0.8) == [0, 1, 2]


def test_many_constructed_ties_across_lengths():
    rng = random.Random(3)
    texts = []
    for la in range(2, 16):
        for lb in range(2, 16):
            for lcs in range(1, min(la, lb) + 1):
                base = [f"w{i}" for i in range(lcs)]
                a = base + [f"x{la}{lb}{i}" for i in range(la - lcs)]
                b = base + [f"y{la}{lb}{i}" for i in range(lb - lcs)]
                rng.shuffle(a[lcs:])
                texts.append((" ".join(a), " ".join(b)))
    for a, b in texts:
        _, f = RougeLPool([b]).best(a)
        assert f == reference_f(a, b)
        assert (f > 0.8) == (reference_f(a, b) > 0.8)


def test_empty_token_lists_score_zero_like_rouge_score():
    pool = RougeLPool(["", "a cat"])
    assert pool.scores("!!!").tolist() == [0.0, 0.0]
    assert pool.scores("a cat").tolist() == [0.0, 1.0]
    assert RougeLPool().best("anything") == (-1, 0.0)
    assert rouge_tokens("It's 3 o'clock!") == ["it", "s", "3", "o", "clock"]


def test_token_codes_skip_surrogates_and_stay_distinct():
    coder = TokenCoder()
    coder._next = 0xD7FE  # just below the surrogate block
    s = coder.encode(["a", "b", "c", "a"])
    assert [ord(c) for c in s] == [0xD7FE, 0xD7FF, 0xE000, 0xD7FE]
    pool = RougeLPool()
    pool._coder = coder
    pool.add("b c")
    assert pool.best("a b c")[1] == reference_f("a b c", "b c")
