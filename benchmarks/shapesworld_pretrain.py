"""Training-step speed of the ShapesWorld base model vs. the pixel-space probe config.

Measures, in one process, one optimisation step (text encoder + UNet forward, backward, AdamW)
of:

* ``latent-64px``: the chosen config (``selma_shapesworld.model.UNET``) on 16x16x4 latents of
  64 px images (the autoencoder runs once, before training, so it is not in the step);
* ``pixel-32px``: the probe's config (``/work/shared/shapesworld-probe.md``): the same widths in
  pixel space on 32x32x3 images, attention at 16 and 8;

both with the same text encoder, batch 32, fp32, and prints steps/s side by side with the ratio.
Not a pass/fail test.  Run: ``.venv/bin/python benchmarks/shapesworld_pretrain.py [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selma_shapesworld import model as M
from selma_shapesworld import world

PROBE_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=16,
    cross_attention_dim=64,
)


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
    rows = {}
    # Interleave the two configs twice so that load from other processes hits both alike.
    for _ in range(2):
        for name, cfg in (("latent-64px", None), ("pixel-32px", PROBE_UNET)):
            rows.setdefault(name, []).extend(step_times(cfg, tokenizer, args.batch, args.steps // 2, args.warmup))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"threads {args.threads}, batch {args.batch}, {args.steps} timed steps each (median)")
    print(f"{'config':<13} {'params':>9} {'s/step':>8} {'steps/s':>8}")
    for name, cfg in (("latent-64px", None), ("pixel-32px", PROBE_UNET)):
        n = M.n_params(M.build_unet(0, cfg))
        print(f"{name:<13} {n:>9,} {med[name]:>8.3f} {1 / med[name]:>8.2f}")
    print(f"ratio latent/pixel steps/s: {med['pixel-32px'] / med['latent-64px']:.2f}x")


if __name__ == "__main__":
    main()
