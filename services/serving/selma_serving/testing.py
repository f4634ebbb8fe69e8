"""Tiny expert artifacts for tests and benchmarks: a seeded random LoRA on a tiny UNet, published
exactly as the training service publishes experts (diffusers + kohya files, expert.json)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from selma.artifacts import ArtifactKind, ArtifactStore, Manifest
from selma.lora_format import expert_scale_fields, fold_scale

DEFAULT_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def make_expert(
    store: ArtifactStore,
    base_model: str,
    *,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    skill: str = "skill",
    run: str = "run",
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    scale: float = 0.25,
) -> Manifest:
    """Publish an expert whose LoRA A and B are seeded Gaussians (B nonzero, unlike a fresh LoRA)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    alpha = float(rank if alpha is None else alpha)
    unet = UNet2DConditionModel.from_pretrained(str(Path(base_model) / "unet"), use_safetensors=True)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    # the scale is folded into the up matrices, as the trainer publishes it (selma.lora_format)
    peft_sd = {k: (fold_scale(v, alpha, rank) if ".lora_B." in k else v) for k, v in get_peft_model_state_dict(unet).items()}
    info = {
        "base_model": {"source": str(base_model), "revision": "", "variant": ""},
        **expert_scale_fields(rank, alpha),
        "target_modules": list(target_modules),
        "steps": 0,
        "skill": skill,
        "run": run,
        "final_loss": 0.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(peft_sd), safe_serialization=True)
        save_file(convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()}), str(Path(tmp) / "pytorch_lora_weights_kohya.safetensors"))
        (Path(tmp) / "expert.json").write_text(json.dumps(info, indent=2))
        (Path(tmp) / "training_config.json").write_text(json.dumps({"rank": rank, "alpha": alpha, "seed": seed}))
        with store.writer(
            ArtifactKind.EXPERT,
            key=f"test-expert/{run}/{skill}/{seed}/{rank}/{alpha}",
            parameters=info,
            labels={"selma.dev/run": run, "selma.dev/skill": skill},
        ) as w:
            w.put_dir(tmp)
    assert w.manifest is not None
    return w.manifest
