"""Serving overhead of merged experts, side by side in one process (never a pass/fail test).

Prints per-image latency of (the shared harness: one process, rotated order, paired ratios per block):
  * the base model vs a fused merged model (target ratio <= 1.02: fusing leaves no LoRA overhead);
  * N unfused adapters (diffusers load_lora_weights + set_adapters, SELMA's inference path) vs fused;
  * a new per-request mix (merge + fuse into a UNet copy) relative to one image.

    .venv/bin/python benchmarks/serving_merge_overhead.py [--base DIR] [--experts 3] [--rank 8] [--steps 20] [--repeats 7]

Without --base it builds the offline tiny SD pipeline in a temporary directory.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from harness import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="diffusers pipeline directory (default: build the tiny SD model)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = the CI setting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' scheduler-config deprecation notes
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()

    from diffusers import AutoPipelineForText2Image

    from selma.models.tiny import build_tiny
    from selma.pipelines import make_scheduler
    from selma_serving.core import ServingCore
    from selma_serving.engine import fused_copy
    from selma_serving.lora import DIFFUSERS_FILE
    from selma_serving.merge import ExpertWeight, MergeParams
    from selma_serving.settings import ServingSettings
    from selma_serving.testing import make_expert

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = args.base or str(build_tiny(tmp_path / "tiny").sd)
        settings = ServingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), serving_base_model=base)
        core = ServingCore(settings)
        core.start()
        experts = [make_expert(core.store, base, seed=i + 1, rank=args.rank, skill=f"s{i}") for i in range(args.experts)]
        params = MergeParams(experts=tuple(ExpertWeight(e.id) for e in experts))
        engine = core.engine

        t0 = time.perf_counter()
        fused_unet, _, _ = engine.mix_unet(params)
        first_mix = time.perf_counter() - t0

        unfused = AutoPipelineForText2Image.from_pretrained(base, use_safetensors=True)
        unfused.set_progress_bar_config(disable=True)
        names = []
        for i, e in enumerate(experts):
            d = core.store.download(e.id, tmp_path / f"e{i}")
            unfused.load_lora_weights(str(d), weight_name=DIFFUSERS_FILE, adapter_name=f"e{i}")
            names.append(f"e{i}")
        unfused.set_adapters(names, adapter_weights=[1 / len(names)] * len(names))

        def unfused_view():
            unfused.scheduler = make_scheduler(unfused, "ddim")  # same sampler as the other variants
            return unfused

        def image(pipe) -> float:
            gen = torch.Generator().manual_seed(0)
            t = time.perf_counter()
            pipe(prompt="a red cube", num_inference_steps=args.steps, generator=gen, output_type="pil")
            return time.perf_counter() - t

        variants = {
            "base": lambda: image(engine.pipeline_view(engine.base_unet, "ddim")),
            "fused merged": lambda: image(engine.pipeline_view(fused_unet, "ddim")),
            f"unfused {args.experts} adapters": lambda: image(unfused_view()),
        }
        print(f"base model: {base}; {args.experts} experts rank {args.rank}; {args.steps} steps")
        compare(variants, baseline="base", repeats=args.repeats, title="per image: fused merged and unfused adapters vs base (target fused/base <= 1.02)",
                builds={"first per-request mix (merge + fuse)": first_mix}).print()
        unfused_vs_fused = {k: variants[k] for k in ("fused merged", f"unfused {args.experts} adapters")}
        compare(unfused_vs_fused, baseline="fused merged", repeats=args.repeats, title="per image: unfused adapters vs fused").print()

        counter = iter(range(1, 10**6))

        def new_mix() -> None:  # different weights every call, so the merge cache misses
            w = 1.0 + next(counter)
            engine.mix_unet(MergeParams(experts=tuple(ExpertWeight(e.id, w / (i + 2)) for i, e in enumerate(experts))))

        # fuse-only cost (no merge): the deltas of an existing merge, applied to a UNet copy
        deltas = {n: torch.zeros_like(engine.base_unet.get_submodule(n).weight) for n in core.experts.get(experts[0].id).modules}

        def fuse_only() -> None:
            fused_copy(engine.base_unet, deltas=deltas)

        compare({"one base image": variants["base"], "new per-request mix (merge + fuse)": new_mix,
                 "fuse into a UNet copy alone": fuse_only},
                baseline="one base image", repeats=args.repeats, title="cost of a new per-request mix relative to one image").print()
        core.shutdown()


if __name__ == "__main__":
    main()
