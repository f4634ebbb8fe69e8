"""``selma train --config URI``: the trainer entrypoint of Kubernetes Jobs and local subprocesses.

Thin on purpose: settings from ``SELMA_*`` variables, logging, SIGTERM → checkpoint and exit,
then :func:`selma_training.trainer.run_job_document`.  Exit codes: 0 done, 2 bad input (a
domain error: retrying cannot help; the Job's podFailurePolicy fails fast on it), 143 stopped
by SIGTERM after saving a checkpoint (pre-emption; the retry resumes), 1 anything else.

With a metrics port configured (``SELMA_METRICS_PORT`` > 0; Kubernetes Jobs set it, local
trainers do not) the trainer serves ``selma_trainer_*`` on ``http://SELMA_HOST:port/metrics``
until it exits.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selma_training.settings import TrainingSettings

EXIT_INTERRUPTED = 143
log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``selma train`` to the ``selma`` parser."""
    p = subparsers.add_parser("train", help="train one LoRA expert from a stored training job document")
    p.add_argument("--config", required=True, help="job document: s3://… or file://… URI, a local JSON/YAML file, or a training_config artifact id")
    p.add_argument("--device", default="", help="override the device (cpu, cuda, cuda:N)")
    p.add_argument("--dataset", default="", help="with a bare config file (preset + fields, JSON/YAML): the image_dataset artifact id")
    p.add_argument("--run", default="local", help="with a bare config file: the run name (default local)")
    p.add_argument("--skill", default="skill", help="with a bare config file: the skill name (default skill)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from selma.logs import configure_logging
    from selma_training.settings import TrainingSettings

    settings = TrainingSettings()
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()  # finish the current step, checkpoint, exit 143

    signal.signal(signal.SIGTERM, on_signal)
    metrics_server = None
    if settings.metrics_port:
        from selma.metrics import MetricsServer

        try:
            metrics_server = MetricsServer(settings.host, settings.metrics_port)
            log.info("trainer metrics on %s", metrics_server.url)
        except OSError as e:  # metrics are best effort: training must not die of a taken port
            log.warning("no trainer metrics: cannot serve on %s:%d: %s", settings.host, settings.metrics_port, e)
    try:
        return _run(args, settings, stop)
    finally:
        if metrics_server is not None:
            metrics_server.stop()


def _run(args: argparse.Namespace, settings: TrainingSettings, stop: threading.Event) -> int:
    from selma.batch.worker import exit_with_parent
    from selma_training.trainer import TrainingInterrupted, load_job_document, run_job, standalone_job

    if settings.batch_parent_pid:
        exit_with_parent(settings.batch_parent_pid, stop)
    if args.dataset:
        job = standalone_job(args.config, args.dataset, args.run, args.skill, settings)
    else:
        job = load_job_document(args.config, settings)
    if args.device:
        job = job.model_copy(update={"device": args.device})
    try:
        run_job(job, settings, should_stop=stop.is_set)
    except TrainingInterrupted:
        return EXIT_INTERRUPTED
    return 0
