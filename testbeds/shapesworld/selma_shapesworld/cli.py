"""``selma shapesworld …``: the ShapesWorld base model from the command line.

* ``selma shapesworld pretrain --out DIR [--seed 0 --vae-steps N --unet-steps N --threads 2]``
  trains the base model from scratch (deterministic from the seed and thread count; resumable
  from ``--checkpoint-dir``, default ``DIR.ckpt``) and writes a diffusers pipeline to DIR.
  The published weights (``shapesworld://base``) were made with the defaults; see
  ``weights/base/shapesworld-base.json`` for the exact command, time and losses.
* ``selma shapesworld eval-base [--model shapesworld://base --n 96]`` renders captions of every
  scene kind with the model and prints the judge's accuracy per kind (ok and strict).

Heavy modules are imported inside the actions, so ``selma --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``selma shapesworld`` and its actions to the top-level subparsers."""
    p = sub.add_parser("shapesworld", help="ShapesWorld: pretrain and evaluate the small base model")
    actions = p.add_subparsers(dest="shapesworld_command", metavar="COMMAND", required=True)
    _add_pretrain(actions)
    _add_eval_base(actions)
    from selma_shapesworld.loop import register_loop

    register_loop(actions)  # table, heldout, gate, mix


def _add_pretrain(actions: argparse._SubParsersAction) -> None:
    from_defaults = _defaults()
    p = actions.add_parser(
        "pretrain",
        help="train the ShapesWorld base model from scratch (CPU, deterministic, resumable)",
        description="Train tokenizer, autoencoder, text encoder and UNet on ShapesWorld renders and save a "
        "StableDiffusionPipeline (safetensors) to --out. Same seed + same thread count + same CPU type and "
        "library versions = bit-identical weights; an interrupted run resumes from --checkpoint-dir.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output pipeline directory (replaced atomically)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--vae-steps", type=int, default=from_defaults["vae_steps"], help="autoencoder steps (default %(default)s)")
    p.add_argument("--unet-steps", type=int, default=from_defaults["unet_steps"], help="text encoder + UNet steps (default %(default)s)")
    p.add_argument("--decoder-steps", type=int, default=from_defaults["decoder_steps"],
                   help="decoder fine-tune steps after the UNet (default %(default)s)")
    p.add_argument("--vae-batch", type=int, default=from_defaults["vae_batch"], help="autoencoder batch size (default %(default)s)")
    p.add_argument("--unet-batch", type=int, default=from_defaults["unet_batch"], help="UNet batch size (default %(default)s)")
    p.add_argument("--vae-scenes", type=int, default=from_defaults["vae_scenes"], help="autoencoder training scenes (default %(default)s)")
    p.add_argument("--unet-scenes", type=int, default=from_defaults["unet_scenes"], help="UNet training scenes, encoded once (default %(default)s)")
    p.add_argument("--tokenizer-scenes", type=int, default=from_defaults["tokenizer_scenes_per_kind"],
                   help="tokenizer corpus: captions per scene kind (default %(default)s)")
    p.add_argument("--single-share", type=float, default=from_defaults["single_share"],
                   help="share of single-object scenes in the UNet's training scenes; the rest is split over the four skill kinds "
                   "(default %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=from_defaults["checkpoint_every"], help="steps between checkpoints (default %(default)s)")
    p.add_argument("--log-every", type=int, default=from_defaults["log_every"], help="steps between loss log lines (default %(default)s)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, metavar="DIR", help="resumable state (default: <out>.ckpt)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (default 2, as the published weights were made; part of what determines the weights)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep --checkpoint-dir after a finished run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=_pretrain)


def _defaults() -> dict:
    # The dataclass defaults without importing torch (keeps `selma --help` fast).
    import ast
    from importlib import resources

    src = (resources.files("selma_shapesworld") / "pretrain.py").read_text()
    tree = ast.parse(src)
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "PretrainConfig":
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.value is not None:
                    try:
                        out[item.target.id] = ast.literal_eval(item.value)
                    except ValueError:
                        pass
    return out


def _pretrain(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from selma.errors import InvalidArgument
    from selma_shapesworld.pretrain import PretrainConfig, pretrain

    if args.threads < 1:
        raise InvalidArgument("--threads must be >= 1", field="--threads")
    torch.set_num_threads(args.threads)
    cfg = PretrainConfig(
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        decoder_steps=args.decoder_steps,
        vae_batch=args.vae_batch,
        unet_batch=args.unet_batch,
        vae_scenes=args.vae_scenes,
        unet_scenes=args.unet_scenes,
        tokenizer_scenes_per_kind=args.tokenizer_scenes,
        single_share=args.single_share,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )
    ckpt = args.checkpoint_dir or args.out.with_name(args.out.name + ".ckpt")
    record = pretrain(args.out, cfg, checkpoint_dir=ckpt, progress=not args.no_progress and sys.stderr.isatty())
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    sys.stdout.write(json.dumps({"out": str(args.out), "seconds": record["seconds"], "final_losses": record["final_losses"]}, indent=2) + "\n")
    return 0


def _add_eval_base(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("eval-base", help="judge accuracy of a ShapesWorld model per scene kind")
    p.add_argument("--model", default="shapesworld://base", help="model reference (default shapesworld://base)")
    p.add_argument("--n", type=int, default=96, help="captions per kind (default 96)")
    p.add_argument("--kinds", default="single,count,relation,binding,multi", help="comma-separated scene kinds")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance", type=float, default=2.0,
                   help="classifier-free guidance scale (default 2)")
    p.add_argument("--seed", type=int, default=1234, help="caption and sampling seed (default 1234)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--save-images", type=Path, default=None, metavar="DIR", help="also write the images (PNG) here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_eval_base)


def _eval_base(args: argparse.Namespace) -> int:
    import torch

    from selma.config import SelmaSettings
    from selma.errors import InvalidArgument
    from selma.pipelines import ModelSpec, load_pipeline
    from selma_shapesworld.pretrain import evaluate

    if args.n < 1:
        raise InvalidArgument("--n must be >= 1", field="--n")
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(ModelSpec(args.model), SelmaSettings(), device="cpu")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    table = evaluate(pipe, kinds, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed, image_dir=args.save_images)
    if args.json:
        sys.stdout.write(json.dumps(table, indent=2) + "\n")
        return 0
    sys.stdout.write(f"{'kind':<10} {'n':>4} {'ok %':>7} {'strict %':>9}" + "\n")
    for kind, row in table.items():
        sys.stdout.write(f"{kind:<10} {row['n']:>4} {row['ok'] * 100:>7.1f} {row['strict'] * 100:>9.1f}" + "\n")
    return 0
