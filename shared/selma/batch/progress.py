"""The trainer's progress object: a small JSON document in storage the service reads.

The trainer (in a Kubernetes pod or a local subprocess) replaces
``<work>/progress.json`` atomically at most every ``interval`` seconds, and always on phase
changes, checkpoints, warnings and at the end.  The service reads it whenever its launcher
wakes up (a Job watch event or timeout, a subprocess poll) and turns it into job progress,
stats, warnings and Prometheus gauges.  Same mechanism for every launcher, nothing to expose
from the pod.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from selma.errors import NotFound, SelmaError
from selma.storage import Storage

log = logging.getLogger(__name__)


class ProgressWriter:
    """Accumulates progress fields and writes them, throttled, to ``key``."""

    def __init__(self, storage: Storage, key: str, interval: float = 2.0) -> None:
        self.storage = storage
        self.key = key
        self.interval = interval
        self.doc: dict[str, Any] = {"warnings": []}
        self._last = 0.0

    def update(self, *, force: bool = False, **fields: Any) -> None:
        self.doc.update(fields)
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self.flush()

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.doc.setdefault("warnings", []).append(message)
        self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        self.doc["updated_at"] = datetime.now(timezone.utc).isoformat()
        try:
            self.storage.put_bytes(self.key, json.dumps(self.doc).encode(), content_type="application/json")
        except SelmaError as e:  # progress is best effort; training must not die of it
            log.warning("could not write progress to %s: %s", self.key, e)


def read_progress(storage: Storage, key: str) -> dict[str, Any] | None:
    """The latest progress document, or None if the trainer has not written one yet."""
    try:
        return json.loads(storage.get_bytes(key))
    except NotFound:
        return None
    except (SelmaError, ValueError) as e:
        log.warning("unreadable progress %s: %s", key, e)
        return None
