"""An exact, fast ROUGE-L diversity filter: the decisions of ``rouge-score``, at C speed.

SELMA (like Self-Instruct) rejects a candidate prompt when its ROUGE-L F-measure against any
prompt already in the pool exceeds a threshold.  ``rouge_score.rouge_scorer.RougeScorer(
["rougeL"], use_stemmer=False)`` computes the LCS in a pure-Python table, ~50 µs a pair, so a
pool of n prompts costs O(n²) Python operations (minutes at 5,000 prompts).

This module gives the same answers much faster:

1. Tokens come from ``rouge_score.tokenize.tokenize(text, None)``, the very function the
   scorer's default tokenizer calls without a stemmer, so tokenization is identical.
2. Each distinct token is mapped to one Unicode code point, so a prompt becomes a short
   string whose characters are its tokens; equal tokens ⇔ equal characters, hence the LCS of
   the strings is the LCS of the token lists.
3. ``rapidfuzz.process.cdist`` with ``LCSseq.similarity`` computes the integer LCS length of
   one candidate against the whole pool with a bit-parallel algorithm in C++.
4. The F-measure is then computed exactly as ``rouge_score`` does, with the same float
   operations in the same order (precision = lcs/len(candidate), recall = lcs/len(reference),
   ``2 * precision * recall / (precision + recall)``, 0 when either token list is empty), so a
   score sitting exactly on the threshold decides the same way.  The algebraically equal
   ``2·lcs/(la+lb)`` does *not*: it rounds differently for some lengths.
"""

from __future__ import annotations

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as _rouge_tokenize

from selma.errors import ResourceExhausted
from selma.specs import DEFAULT_ROUGE_L_THRESHOLD

DEFAULT_THRESHOLD = DEFAULT_ROUGE_L_THRESHOLD  # one default for the service, the SkillSet and the CLI (selma.specs)
_SURROGATES = range(0xD800, 0xE000)
_MAX_CODE = 0x10FFFF


def rouge_tokens(text: str) -> list[str]:
    """ROUGE tokens of ``text`` exactly as ``RougeScorer(["rougeL"], use_stemmer=False)`` makes them."""
    return _rouge_tokenize.tokenize(text, None)


def rouge_l_f(candidate_len: int, reference_lens: np.ndarray, lcs: np.ndarray) -> np.ndarray:
    """ROUGE-L F-measures from LCS lengths, bit-identical to ``rouge_score``'s ``_score_lcs``.

    ``candidate_len`` is the candidate's token count (rouge_score's ``prediction``);
    ``reference_lens`` and ``lcs`` are per pool prompt (its ``target``).
    """
    lcs = lcs.astype(np.float64, copy=False)
    if candidate_len == 0:
        return np.zeros(lcs.shape, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / candidate_len
        recall = lcs / reference_lens
        total = precision + recall
        # rouge_score: 2 * precision * recall / (precision + recall), evaluated left to right.
        f = 2 * precision * recall / total
    # Empty references, and pairs with no common token, score 0 as in rouge_score.
    return np.where((reference_lens > 0) & (total > 0), f, 0.0)


class TokenCoder:
    """Maps each distinct ROUGE token to its own code point (skipping surrogates)."""

    def __init__(self) -> None:
        self._codes: dict[str, str] = {}
        self._next = 1

    def encode(self, tokens: list[str]) -> str:
        codes = self._codes
        out = []
        for tok in tokens:
            c = codes.get(tok)
            if c is None:
                if self._next in _SURROGATES:
                    self._next = _SURROGATES.stop
                if self._next > _MAX_CODE:
                    raise ResourceExhausted("the prompt pool has more than a million distinct words; split the job")
                c = codes[tok] = chr(self._next)
                self._next += 1
            out.append(c)
        return "".join(out)

    def __len__(self) -> int:
        return len(self._codes)


class RougeLPool:
    """A growing pool of prompts that answers "how close is this candidate to anything in it?".

    ``best(text)`` returns the index of the pool prompt with the highest ROUGE-L F against
    ``text`` (the first one on ties, like ``argmax``) and that F; ``add(text)`` grows the pool.
    """

    def __init__(self, texts: list[str] | tuple[str, ...] = ()) -> None:
        self._coder = TokenCoder()
        self._strings: list[str] = []
        self._lens = np.zeros(64, dtype=np.int64)
        for t in texts:
            self.add(t)

    def __len__(self) -> int:
        return len(self._strings)

    def encode(self, text: str) -> str:
        """The candidate as a code-point string (one character per ROUGE token)."""
        return self._coder.encode(rouge_tokens(text))

    def add(self, text: str, encoded: str | None = None) -> int:
        """Add a prompt (pass ``encoded`` from :meth:`encode` to skip re-tokenising); returns its index."""
        s = self.encode(text) if encoded is None else encoded
        n = len(self._strings)
        if n == len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros(n, dtype=np.int64)])
        self._lens[n] = len(s)
        self._strings.append(s)
        return n

    def scores(self, text: str, encoded: str | None = None) -> np.ndarray:
        """ROUGE-L F of the candidate against every pool prompt, in pool order."""
        s = self.encode(text) if encoded is None else encoded
        n = len(self._strings)
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        if not s:
            return np.zeros(n, dtype=np.float64)
        lcs = process.cdist([s], self._strings, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
        return rouge_l_f(len(s), self._lens[:n], lcs)

    def best(self, text: str, encoded: str | None = None) -> tuple[int, float]:
        """(index, F) of the closest pool prompt; (-1, 0.0) for an empty pool."""
        f = self.scores(text, encoded)
        if f.size == 0:
            return -1, 0.0
        i = int(np.argmax(f))
        return i, float(f[i])


def diverse_subset(texts: list[str], threshold: float = DEFAULT_THRESHOLD, pool: list[str] | tuple[str, ...] = ()) -> list[int]:
    """Indices of ``texts`` kept by the incremental filter: each text is compared with ``pool``
    plus every text kept before it and kept unless its maximum ROUGE-L F exceeds ``threshold``."""
    p = RougeLPool(pool)
    kept = []
    for i, t in enumerate(texts):
        enc = p.encode(t)
        _, f = p.best(t, enc)
        if f > threshold:
            continue
        p.add(t, enc)
        kept.append(i)
    return kept
