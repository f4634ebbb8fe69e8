"""The job kinds and the names of their five RPCs: one table for the servers and the client SDK.

Each kind of long-running work has ``Start<Noun>``, ``Get<Noun>``, ``Watch<Noun>``,
``Cancel<Noun>`` and ``List<Noun>s``, with ``<Method>Request``/``<Method>Response`` messages in
its service's module.  The servers implement them with :class:`selma.job_rpcs.JobRpcs`; the
client calls them through :class:`selma.client.JobClient`.  (Kept apart from ``job_rpcs`` so the
client does not import the server side.)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.protobuf.message import Message

from selma.v1 import (
    evaluation_service_pb2,
    prompt_service_pb2,
    render_service_pb2,
    serving_service_pb2,
    training_service_pb2,
)

VERBS = ("start", "get", "watch", "cancel", "list")


@dataclass(frozen=True)
class JobKind:
    """One kind of job: the API service that serves it, the noun its RPCs share, its protobuf module."""

    service: str
    noun: str
    module: ModuleType

    @property
    def start(self) -> str:
        return f"Start{self.noun}"

    @property
    def get(self) -> str:
        return f"Get{self.noun}"

    @property
    def watch(self) -> str:
        return f"Watch{self.noun}"

    @property
    def cancel(self) -> str:
        return f"Cancel{self.noun}"

    @property
    def list(self) -> str:
        return f"List{self.noun}s"

    def method(self, verb: str) -> str:
        """The RPC name for one of :data:`VERBS`."""
        return getattr(self, verb)

    def request(self, verb: str, **fields: Any) -> Message:
        return getattr(self.module, f"{self.method(verb)}Request")(**fields)

    def response(self, verb: str, **fields: Any) -> Message:
        return getattr(self.module, f"{self.method(verb)}Response")(**fields)


# By the name the client SDK and the CLI use for the kind.
JOB_KINDS = {
    "prompts": JobKind("prompts", "PromptGeneration", prompt_service_pb2),
    "render": JobKind("render", "DatasetRender", render_service_pb2),
    "training": JobKind("training", "ExpertTraining", training_service_pb2),
    "merge": JobKind("serving", "Merge", serving_service_pb2),
    "evaluation": JobKind("evaluation", "Evaluation", evaluation_service_pb2),
    "gate": JobKind("evaluation", "Gate", evaluation_service_pb2),
}
