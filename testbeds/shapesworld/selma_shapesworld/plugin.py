"""ShapesWorld as a selma plugin (entry point ``selma.plugins: shapesworld``): what it adds to the core.

* the ``shapesworld_grammar`` LLM backend (the caption grammar, :mod:`selma_shapesworld.grammar`);
* the ``shapesworld_judge`` VQA backend (the programmatic judge, :mod:`selma_shapesworld.judge`),
  ``--vqa shapesworld`` on the command line;
* the ``shapesworld://`` model scheme (``shapesworld://base``: the pretrained base pipeline shipped as package data);
* the ``selma shapesworld`` commands.

Nothing heavy is imported here: each piece is imported when it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from selma.errors import InvalidArgument, NotFound
from selma.plugins import LlmBackendPlugin, Registry, VqaBackendPlugin

SCHEME = "shapesworld"
MODELS = ("base",)


def _no_options(body: Mapping[str, Any], fld: str) -> None:
    if body:
        raise InvalidArgument(f"unknown field(s) {sorted(body)}; allowed: []", field=fld)


def _grammar(_spec: Any) -> Any:
    from selma_shapesworld.grammar import GrammarBackend

    return GrammarBackend()


def _judge(batch_size: int) -> Any:
    from selma_shapesworld.judge import ShapesWorldJudgeVqa  # numpy/scipy only

    return ShapesWorldJudgeVqa(batch_size=batch_size)


def _questions(text: str) -> list[dict[str, Any]]:
    """The caption's DSG questions from the world's question grammar (the gate's GATE_QUESTION_SOURCE_VQA_BACKEND)."""
    from selma_shapesworld.loop import question_dicts

    return question_dicts(text)


def model_path(source: str) -> Path:
    """``shapesworld://base``: the ShapesWorld base pipeline shipped as package data (``selma shapesworld pretrain`` reproduces it)."""
    name = source.removeprefix(f"{SCHEME}://")
    if name not in MODELS:
        raise InvalidArgument(f"unknown ShapesWorld model {name!r}; use shapesworld://base", field="model.source")
    path = Path(str(resources.files("selma_shapesworld") / "weights" / name))
    if not (path / "model_index.json").is_file():
        raise NotFound(f"the ShapesWorld {name} weights are missing from {path}; run `selma shapesworld pretrain --out {path}`", field="model.source")
    return path


def _commands(subparsers: Any) -> None:
    from selma_shapesworld.cli import register

    register(subparsers)


def register(registry: Registry) -> None:
    """Add ShapesWorld's backends, model scheme and commands to ``registry``."""
    registry.add_llm_backend(LlmBackendPlugin(kind="shapesworld_grammar", model_name="shapesworld-grammar", check=_no_options, build=_grammar))
    registry.add_vqa_backend(VqaBackendPlugin(kind="shapesworld_judge", check=_no_options, build=_judge, cli_name="shapesworld",
                                              questions=_questions))
    registry.add_model_scheme(SCHEME, model_path)
    registry.add_commands(_commands)
