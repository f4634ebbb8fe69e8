"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def llm():
    """A fresh scripted OpenAI-compatible server on 127.0.0.1 per test (tests script faults on it)."""
    from selma_prompts.fake_llm import FakeLlmServer

    with FakeLlmServer() as server:
        yield server
