"""``selma render …``: render-service tools that work straight on the artifact store, and the shard worker.

``selma render reproduce DATASET_ID FILE_NAME`` re-renders one image of a published image dataset
exactly as the job did (same seed, same batch composition) and says whether the bytes match.
``selma render shard --config URI [--shard N]`` renders one shard of a sharded dataset render (the
render service launches it: a local worker process, or a pod of an Indexed Job whose completion index
is the shard).  Settings (storage, device, model cache) come from the same ``SELMA_*`` variables as the service.
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
    s = cmds.add_parser("shard", help="render one shard of a sharded dataset render (run by the render service's launcher)")
    s.add_argument("--config", required=True, help="URI of the render's work document (render/<job id>/work.json in the artifact storage)")
    s.add_argument("--shard", type=int, help="shard index; default: the Indexed Job's completion index (SELMA_BATCH_COMPLETION_INDEX)")
    s.set_defaults(func=_shard)


def _shard(args: argparse.Namespace) -> int:
    import logging
    import threading

    from selma.batch.launchers import EXIT_BAD_INPUT
    from selma.batch.worker import exit_with_parent
    from selma.errors import FailedPrecondition, InvalidArgument, NotFound
    from selma.logs import configure_logging
    from selma_render.settings import RenderSettings
    from selma_render.shards import render_shard

    settings = RenderSettings()
    configure_logging(settings.log_level, settings.log_format)
    log = logging.getLogger("selma_render.shard")
    if settings.batch_parent_pid:
        stop = threading.Event()
        exit_with_parent(settings.batch_parent_pid, stop)  # SIGTERM when the service dies; the journal keeps whole batches
        if stop.is_set():
            return 143
    index = args.shard if args.shard is not None else settings.batch_completion_index
    if index < 0:
        log.error("no shard index: pass --shard N, or run in an Indexed Job (SELMA_BATCH_COMPLETION_INDEX)")
        return EXIT_BAD_INPUT
    metrics_server = None
    if settings.metrics_port:  # worker pods: selma_render_* on the port the PodMonitor scrapes (local workers get 0)
        from selma.metrics import MetricsServer

        try:
            metrics_server = MetricsServer(settings.host, settings.metrics_port)
        except OSError as e:  # metrics are best effort: rendering must not die of a taken port
            log.warning("no shard metrics: cannot serve on %s:%d: %s", settings.host, settings.metrics_port, e)
    try:
        render_shard(settings, args.config, index)
    except (InvalidArgument, FailedPrecondition, NotFound) as e:
        log.error("error: shard %d cannot run: %s", index, e)
        return EXIT_BAD_INPUT
    finally:
        if metrics_server is not None:
            metrics_server.stop()
    return 0


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
