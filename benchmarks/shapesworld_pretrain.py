"""Training-step speed of the ShapesWorld base model's UNet vs. the alternatives at 64 px.

Measures, in one process, one optimisation step (text encoder + UNet forward, backward, AdamW)
of:

* ``latent-32``: the chosen config (``selma_shapesworld.model.UNET``) on 32x32x4 latents of 64 px
  images (a factor-2 autoencoder; it runs before the step, so it is not in the step);
* ``latent-16``: the first shipped config, on 16x16x4 latents (factor 4): 3-4x faster, but
  small shapes spanned 2-3 latent pixels and the model drew blobs (judge: 21 % on single objects);
* ``pixel-64``: no autoencoder, the same UNet widths in pixel space at 64x64x3;

all with the same text encoder, batch 32, fp32, and prints s/step side by side with the ratios
to the chosen config.  Not a pass/fail test.
Run: ``.venv/bin/python benchmarks/shapesworld_pretrain.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selma_shapesworld import model as M
from selma_shapesworld import world

CONFIGS: dict[str, dict | None] = {
    "latent-32": None,
    "latent-16": dict(sample_size=16),
    "pixel-64": dict(sample_size=64, in_channels=3, out_channels=3),
}


def step_times(unet_config: dict, tokenizer, batch: int, steps: int, warmup: int) -> list[float]:
    text_encoder = M.build_text_encoder(tokenizer, 0)
    unet = M.build_unet(0, unet_config)
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ids = tokenizer(["a red circle to the left of a blue square"] * batch, padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    times = []
    for i in range(warmup + steps):
        t = torch.randint(0, 1000, (batch,), generator=g)
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(unet(x, t, text_encoder(ids)[0]).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = M.train_tokenizer([c for _, c in world.dataset(0, 500, mix={k: 1.0 for k in world.KINDS})])
    rows: dict[str, list[float]] = {}
    # Interleave the configs twice so that load from other processes hits all alike.
    for _ in range(2):
        for name, cfg in CONFIGS.items():
            rows.setdefault(name, []).extend(step_times(cfg, tokenizer, args.batch, args.steps // 2, args.warmup))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"threads {args.threads}, batch {args.batch}, {args.steps} timed steps each (median)")
    print(f"{'config':<10} {'params':>9} {'s/step':>8} {'vs latent-32':>13}")
    for name, cfg in CONFIGS.items():
        n = M.n_params(M.build_unet(0, cfg))
        print(f"{name:<10} {n:>9,} {med[name]:>8.3f} {med[name] / med['latent-32']:>12.2f}x")


if __name__ == "__main__":
    main()
