"""Test helper process: starts an upload that never finishes, so a test can SIGKILL it mid-way.

Usage: ``python _storage_writer.py object <key> <ready_bytes>`` or
``python _storage_writer.py artifact <artifact-id> <ready_bytes>``.  Settings come from
``SELMA_*`` variables, as in a service's ``main()``.  After ``ready_bytes`` of the slow
stream have been handed to storage, it prints ``ready`` and stalls until killed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from selma.artifacts import ArtifactStore
from selma.config import SelmaSettings
from selma.storage import open_storage

CHUNK = b"k" * (1024 * 1024)


def stalling_stream(ready_bytes: int) -> Iterator[bytes]:
    sent = 0
    while sent < ready_bytes:
        yield CHUNK
        sent += len(CHUNK)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:  # stall without ending the stream; the test kills us
        time.sleep(0.1)


def main() -> None:
    mode, target, ready = sys.argv[1], sys.argv[2], int(sys.argv[3])
    storage = open_storage(SelmaSettings())
    if mode == "object":
        storage.put_stream(target, stalling_stream(ready))
    elif mode == "artifact":
        store = ArtifactStore(storage)
        with store.writer("image_dataset", id=target, checkpoint_every=1000) as writer:
            writer.put_bytes("done.txt", b"uploaded and checkpointed")
            writer.checkpoint()
            writer.put_bytes("unrecorded.txt", b"uploaded after the last checkpoint")
            writer.put_stream("big.bin", stalling_stream(ready))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
