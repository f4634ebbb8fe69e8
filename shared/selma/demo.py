"""``selma demo``: the end-to-end job on embedded defaults (local storage, tiny offline models).

It builds the tiny models, then drives every stage that exists through the same code the
services use and publishes each stage's output as an artifact with lineage, finally printing
the lineage from the last artifact back to the prompts.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from selma.artifacts import ArtifactKind, ArtifactStore
from selma.config import SelmaSettings
from selma.storage import open_storage

log = logging.getLogger(__name__)

DEMO_PROMPTS = (
    "two red apples on a wooden table",
    "a blue bicycle leaning against a yellow wall",
    "three white birds flying above a green field",
    "a cat sitting to the left of a black umbrella",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on embedded defaults (tiny offline models)")
    p.add_argument("--dir", default=".selma/demo", help="working directory (storage, models); default .selma/demo")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for models and images (default 0)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    import torch

    from selma.models.tiny import build_tiny
    from selma.pipelines import ModelSpec, PipelineCache

    console = Console()
    root = Path(args.dir).resolve()
    settings = SelmaSettings(data_dir=root, storage_uri=(root / "storage").as_uri())
    store = ArtifactStore(open_storage(settings))
    run = f"demo-{args.seed}"
    labels = {"selma.dev/run": run, "selma.dev/skill": "general"}

    with console.status("building tiny offline models"):
        tiny = build_tiny(root / "models", seed=args.seed)
    console.print(f"tiny models in {tiny.root}")

    records = [{"id": f"p{i:06d}", "index": i, "text": t, "skill": "general"} for i, t in enumerate(DEMO_PROMPTS)]
    with store.writer(ArtifactKind.PROMPT_SET, key=f"{run}/prompts", parameters={"skill": "general", "count": len(records), "backend": "fixed"}, labels=labels) as w:
        w.put_bytes("prompts.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    prompt_set = w.manifest

    pipe = PipelineCache(settings).get(ModelSpec(str(tiny.sd)), device="cpu")
    meta = []
    with store.writer(
        ArtifactKind.IMAGE_DATASET,
        key=f"{run}/images",
        parents=[prompt_set.id],
        parameters={"model": str(tiny.sd), "steps": args.steps, "seed": args.seed},
        labels=labels,
    ) as w, Progress(console=console, transient=True) as bar:
        task = bar.add_task("rendering", total=len(records))
        for r in records:
            seed = args.seed * 1_000_003 + r["index"]
            image = pipe(r["text"], num_inference_steps=args.steps, generator=torch.Generator().manual_seed(seed)).images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            name = f"images/{r['index']:06d}-0.png"
            w.put_bytes(name, buf.getvalue())
            meta.append({"file_name": name, "text": r["text"], "prompt_id": r["id"], "prompt_index": r["index"], "image_index": 0, "seed": seed, "model": str(tiny.sd), "steps": args.steps})
            bar.advance(task)
        w.put_bytes("metadata.jsonl", "".join(json.dumps(m) + "\n" for m in meta).encode())
    dataset = w.manifest

    table = Table(title=f"lineage of {dataset.id}")
    for col in ("artifact", "kind", "files", "parents"):
        table.add_column(col)
    for m in store.lineage(dataset.id):
        table.add_row(m.id, m.kind.value, str(len(m.files)), ", ".join(m.parents))
    console.print(table)
    console.print(f"images: {root / 'storage' / 'artifacts' / dataset.id / 'files' / 'images'}")
    return 0
