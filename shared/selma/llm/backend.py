"""The LLM layer's vocabulary: a request, a response, a backend, and the validated backend spec.

Every backend answers a *round* of :class:`LlmRequest` at once and returns one
:class:`LlmResponse` per request, in request order.  A round is as many requests as the backend
runs together (HTTP concurrency, or a local generate batch).  Used by the prompt service (SELMA's
in-context loop) and by evaluation (DSG/TIFA question generation).
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from selma.errors import Unavailable


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters with defaults applied."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class BackendSpec:
    """The LLM to call.  Fields not used by ``kind`` keep their defaults.

    ``api_key_name``/``api_key_key`` name a credential (resolved by the settings when the
    backend is built); the secret itself is never part of a spec.
    """

    kind: str
    sampling: Sampling = field(default_factory=Sampling)
    # openai_compatible
    base_url: str = ""
    model: str = ""
    api: str = "chat"
    api_key_name: str = ""
    api_key_key: str = ""
    request_timeout: float = 60.0
    max_concurrency: int = 4
    max_retries: int = 3
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    # local_causal_lm / embedded
    device: str = ""
    precision: str = ""
    use_chat_template: bool | None = None
    # tiny_test
    tiny_seed: int = 0
    # a kind a plugin added (selma.plugins): the name it reports
    plugin_model_name: str = ""

    @property
    def model_name(self) -> str:
        """The model as reported in lineage (no URL, no credential)."""
        if self.kind == "embedded":
            return "SmolLM2-135M-Instruct"
        if self.kind == "tiny_test":
            return f"tiny-lm-seed{self.tiny_seed}"
        return self.plugin_model_name or self.model

    @property
    def backend_model(self) -> str:
        return f"{self.kind}:{self.model_name}"


@dataclass(frozen=True)
class LlmRequest:
    """One LLM call of the loop: the rendered prompt plus what the parser needs to know."""

    index: int  # 1-based request number within the job
    seed: int  # per-request seed sent to backends that accept one
    example_ids: tuple[str, ...]
    completion_prompt: str
    system: str
    user: str
    first_number: int  # number of the first item the LLM is to write
    n_prompts: int


class LlmUnavailable(Unavailable):
    """The LLM failed after all retries; accepted prompts are kept and the job can resume."""


@dataclass
class LlmResponse:
    """One completion: its text, why it ended, and usage where the backend reports it."""

    text: str
    finish_reason: str = "stop"  # "length" = cut by max_tokens
    starts_mid_item: bool = False  # the prompt ended with the next item's number
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0


class LlmBackend(ABC):
    """A language model the loop can call."""

    kind: str
    model_name: str
    round_size: int = 1

    @property
    def backend_model(self) -> str:
        return f"{self.kind}:{self.model_name}"

    @abstractmethod
    def generate(self, requests: list[LlmRequest], *, cancel: threading.Event | None = None) -> list[LlmResponse]:
        """Complete every request (in order); raise LlmUnavailable when retries are exhausted."""

    def close(self) -> None:  # noqa: B027 - optional hook; local models have nothing to release
        """Release connections (models stay cached in the registry)."""


def request_seed(seed: int, index: int) -> int:
    """A per-request seed from the job seed and the request number (stable across processes)."""
    digest = hashlib.sha256(f"selma-prompts:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class RetryableError(Exception):
    def __init__(self, error_class: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.retry_after = retry_after
