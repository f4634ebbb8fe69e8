"""``selma render …``: render-service tools that work straight on the artifact store.

``selma render reproduce DATASET_ID FILE_NAME`` re-renders one image of a published image dataset
exactly as the job did (same seed, same batch composition) and says whether the bytes match.
Settings (storage, device, model cache) come from the same ``SELMA_*`` variables as the service.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help="render-service tools (reproduce one dataset image)")
    cmds = p.add_subparsers(dest="render_command", metavar="COMMAND", required=True)
    r = cmds.add_parser("reproduce", help="re-render one image of an image dataset and compare it with the stored file")
    r.add_argument("dataset_id", help="image_dataset artifact id")
    r.add_argument("file_name", help="image path inside the dataset, e.g. images/000012-1.png")
    r.add_argument("--out", type=Path, help="also write the re-rendered PNG here")
    r.set_defaults(func=_reproduce)


def _reproduce(args: argparse.Namespace) -> int:
    from selma.artifacts import ArtifactStore
    from selma.storage import open_storage
    from selma_render.dataset import reproduce_image
    from selma_render.renderer import Renderer
    from selma_render.settings import RenderSettings

    settings = RenderSettings()
    result = reproduce_image(ArtifactStore(open_storage(settings)), Renderer(settings), args.dataset_id, args.file_name)
    if args.out:
        args.out.write_bytes(result.rendered)
    verdict = "identical to the stored file" if result.identical else "DIFFERENT from the stored file"
    sys.stdout.write(f"{result.file_name} (seed {result.seed}): re-rendered image is {verdict}\n")
    return 0 if result.identical else 1
