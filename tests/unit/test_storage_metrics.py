"""Storage failures are counted for alerting; a missing object is a normal answer and is not."""

from __future__ import annotations

import pytest

from selma.errors import NotFound, Unavailable
from selma.metrics import STORAGE_ERRORS
from selma.storage import FileStorage, open_storage


def _count(backend: str, code: str) -> float:
    return STORAGE_ERRORS.labels(backend, code)._value.get()


def test_unreachable_s3_endpoint_is_counted(make_settings):
    storage = open_storage(make_settings(storage_uri="s3://bucket/x", s3_endpoint="http://127.0.0.1:1", storage_retries=0))
    before = _count("s3", "UNAVAILABLE")
    with pytest.raises(Unavailable):
        storage.get_bytes("a")
    assert _count("s3", "UNAVAILABLE") == before + 1


def test_missing_object_is_not_a_storage_error(tmp_path):
    storage = FileStorage(tmp_path)
    before = {code: _count("file", code) for code in ("NOT_FOUND", "UNAVAILABLE")}
    with pytest.raises(NotFound):
        storage.get_bytes("nope")
    assert {code: _count("file", code) for code in before} == before
