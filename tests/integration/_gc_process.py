"""Test helper process: collects garbage and stalls right after its N-th storage deletion, so a
test can SIGKILL it there (between an artifact's manifest and its files, or between artifacts).

Usage: ``python _gc_process.py <deletions>``.  Settings come from ``SELMA_*`` variables, as in a
service's ``main()``.  After the N-th deletion it prints ``ready`` and stalls until killed.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

from selma.artifacts import ArtifactStore
from selma.config import SelmaSettings
from selma.retention import collect_garbage
from selma.storage import open_storage


class StallingStorage:
    """Delegates to the real storage; stalls after ``n`` deletions (object or prefix)."""

    def __init__(self, inner, n: int) -> None:  # noqa: ANN001
        self._inner, self._left = inner, n

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._inner, name)

    def _counted(self) -> None:
        self._left -= 1
        if self._left == 0:
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            while True:  # the test kills us here
                time.sleep(0.1)

    def delete(self, key: str) -> None:
        self._inner.delete(key)
        self._counted()

    def delete_prefix(self, prefix: str) -> int:
        n = self._inner.delete_prefix(prefix)
        self._counted()
        return n


def main() -> None:
    storage = StallingStorage(open_storage(SelmaSettings()), int(sys.argv[1]))
    collect_garbage(ArtifactStore(storage), grace=timedelta(0))  # type: ignore[arg-type]
    sys.stdout.write("finished\n")


if __name__ == "__main__":
    main()
