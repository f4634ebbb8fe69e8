"""Plugins: packages that extend selma without the core or the services naming them (testbeds such as ShapesWorld).

A plugin is a Python entry point in the group ``selma.plugins`` naming a callable ``register(registry)``
that adds, to the one :class:`Registry` of the process:

* **LLM backends** (a ``selma.v1.LlmBackend`` oneof kind the core does not know): ``check(body, field)``
  validates the request's options, ``build(spec)`` returns a :class:`selma.llm.backend.LlmBackend`;
* **VQA backends** (a ``selma.v1.VqaBackend`` kind): ``check(body, field)`` and ``build(batch_size)``
  returning an evaluation ``VqaModel``;
* **model URI schemes** (``shapesworld://base``): ``resolve(source)`` returns the local directory of a
  diffusers pipeline (raising NotFound/InvalidArgument naming ``model.source``);
* **CLI commands**: ``add(subparsers)`` adds a ``selma`` subcommand tree.

Entry points are read once, on first use; :func:`registry` is thread-safe.  Tests may register into
a fresh :class:`Registry` with :func:`use_registry`.
"""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "selma.plugins"


@dataclass(frozen=True)
class LlmBackendPlugin:
    """An LLM backend kind: validation of its options and how to build it (no model loaded at check time)."""

    kind: str
    model_name: str
    check: Callable[[Mapping[str, Any], str], None]
    build: Callable[[Any], Any]


@dataclass(frozen=True)
class VqaBackendPlugin:
    """A VQA backend kind: validation of its options and how to build it."""

    kind: str
    check: Callable[[Mapping[str, Any], str], None]
    build: Callable[[int], Any]
    cli_name: str = ""  # the short name `selma eval run --vqa NAME` accepts, if any
    # DSG-style questions the backend writes itself for a prompt (a world with a question grammar), in the
    # inline prompt-set record form ({"id", "text", "parents", ...}); None = the backend writes none
    questions: Callable[[str], list[dict[str, Any]]] | None = None


@dataclass
class Registry:
    """What the loaded plugins added."""

    llm_backends: dict[str, LlmBackendPlugin] = field(default_factory=dict)
    vqa_backends: dict[str, VqaBackendPlugin] = field(default_factory=dict)
    model_schemes: dict[str, Callable[[str], Path]] = field(default_factory=dict)
    commands: list[Callable[[argparse._SubParsersAction], None]] = field(default_factory=list)

    def add_llm_backend(self, plugin: LlmBackendPlugin) -> None:
        self.llm_backends[plugin.kind] = plugin

    def add_vqa_backend(self, plugin: VqaBackendPlugin) -> None:
        self.vqa_backends[plugin.kind] = plugin

    def add_model_scheme(self, scheme: str, resolve: Callable[[str], Path]) -> None:
        """``scheme`` without ``://`` (e.g. "shapesworld")."""
        self.model_schemes[scheme] = resolve

    def add_commands(self, add: Callable[[argparse._SubParsersAction], None]) -> None:
        self.commands.append(add)

    def model_scheme(self, source: str) -> Callable[[str], Path] | None:
        """The resolver of ``source``'s scheme if a plugin registered it."""
        scheme, sep, _ = source.partition("://")
        return self.model_schemes.get(scheme) if sep else None


_lock = threading.Lock()
_registry: Registry | None = None


def _load() -> Registry:
    from importlib.metadata import entry_points

    reg = Registry()
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # an optional plugin whose dependencies are missing is skipped, not fatal
            log.warning("selma plugin %s could not be loaded: %s", ep.name, e)
            continue
        register(reg)
    return reg


def registry() -> Registry:
    """The process's registry, loading the ``selma.plugins`` entry points on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _load()
        return _registry


@contextmanager
def use_registry(reg: Registry) -> Iterator[Registry]:
    """Make ``reg`` the process's registry for the duration (tests)."""
    global _registry
    with _lock:
        saved, _registry = _registry, reg
    try:
        yield reg
    finally:
        with _lock:
            _registry = saved
