"""Durable, incremental state of a prompt-generation job, so a killed job resumes without loss or duplicates.

Layout under ``prompts/state/<job id>/`` in the service's storage::

    chunk-000000.jsonl   accepted prompt records, in acceptance order (one chunk per save)
    chunk-000001.jsonl
    state.json           the commit point: which chunks count, the counters, the next request

Saving appends only the records accepted since the last save, as a new chunk, and then
replaces ``state.json`` (one atomic object write).  A save killed half-way leaves an orphan
chunk that ``state.json`` does not list; the next save overwrites it under the same name.
So the stored state is always the state after some complete round of LLM requests, and the
total I/O stays linear in the number of prompts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from selma.errors import FailedPrecondition, NotFound
from selma.storage import Storage
from selma_prompts.generator import GenerationState

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_PREFIX = "prompts/state"


class StateStore:
    """Loads and saves one job's :class:`GenerationState` plus a small metadata dict."""

    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage = storage
        self.prefix = f"{STATE_PREFIX}/{job_id}"
        self._chunks: list[dict[str, Any]] = []
        self._saved = 0

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def load(self) -> tuple[dict[str, Any], GenerationState] | None:
        """(metadata, state) as last saved, or None when nothing was saved."""
        try:
            raw = self.storage.get_bytes(self._key("state.json"))
        except NotFound:
            return None
        doc = json.loads(raw)
        if doc.get("version") != STATE_VERSION:
            raise FailedPrecondition(f"{self.storage.uri_for(self._key('state.json'))} has state version {doc.get('version')}; expected {STATE_VERSION}")
        records: list[dict[str, Any]] = []
        for chunk in doc["chunks"]:
            try:
                data = self.storage.get_bytes(self._key(chunk["name"]))
            except NotFound:
                raise FailedPrecondition(
                    f"saved prompts {self.storage.uri_for(self._key(chunk['name']))} are missing; delete {self.prefix}/ to start over"
                ) from None
            lines = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
            if len(lines) != chunk["count"]:
                raise FailedPrecondition(f"saved prompts {chunk['name']} hold {len(lines)} records, expected {chunk['count']}")
            records.extend(lines)
        self._chunks = list(doc["chunks"])
        self._saved = len(records)
        return doc.get("meta", {}), GenerationState.from_parts(doc["counters"], records)

    def save(self, state: GenerationState, meta: dict[str, Any]) -> None:
        """Persist ``state``: new records as a chunk, then the commit point."""
        new = state.records[self._saved :]
        chunks = list(self._chunks)
        if new:
            name = f"chunk-{len(chunks):06d}.jsonl"
            body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in new).encode("utf-8")
            self.storage.put_bytes(self._key(name), body, content_type="application/jsonl")
            chunks.append({"name": name, "count": len(new)})
        doc = {"version": STATE_VERSION, "chunks": chunks, "counters": state.counters(), "meta": meta}
        self.storage.put_bytes(self._key("state.json"), json.dumps(doc, sort_keys=True).encode(), content_type="application/json")
        self._chunks = chunks
        self._saved = len(state.records)

    def delete(self) -> None:
        """Remove the state (after the prompt set is published)."""
        try:
            self.storage.delete_prefix(f"{self.prefix}/")
        except NotFound:
            pass
