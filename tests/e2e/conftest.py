"""Fixtures for the end-to-end tests: the scripted OpenAI-compatible LLM server."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def llm():
    """A deterministic OpenAI-compatible server on 127.0.0.1 (numbered lists continuing the prompt)."""
    from selma_prompts.fake_llm import FakeLlmServer

    with FakeLlmServer() as server:
        yield server
