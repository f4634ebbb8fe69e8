"""``selma train --config URI``: the trainer entrypoint of Kubernetes Jobs and local subprocesses.

Thin on purpose: settings from ``SELMA_*`` variables, logging, SIGTERM → checkpoint and exit,
then :func:`selma_training.trainer.run_job`.  A job document asking for several trainer processes
makes this process their torchrun agent (:mod:`selma_training.distributed`); each process it
starts runs this command again as one rank.  Exit codes: 0 done, 2 bad input (a
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
    from selma_training.config import TrainingJob
    from selma_training.distributed import World
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
    from selma_training.distributed import current_world
    from selma_training.settings import TrainingSettings

    settings = TrainingSettings()
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()  # finish the current step, checkpoint, exit 143

    signal.signal(signal.SIGTERM, on_signal)
    world = current_world()
    job = _job(args, settings)
    if world is None and job.world_size > 1:
        return _agent(args, settings, job, stop)
    metrics_server = None
    # one /metrics per pod: a distributed node's first process serves it
    if settings.metrics_port and (world is None or world.local_rank == 0):
        from selma.metrics import MetricsServer

        try:
            metrics_server = MetricsServer(settings.host, settings.metrics_port)
            log.info("trainer metrics on %s", metrics_server.url)
        except OSError as e:  # metrics are best effort: training must not die of a taken port
            log.warning("no trainer metrics: cannot serve on %s:%d: %s", settings.host, settings.metrics_port, e)
    try:
        return _run(job, settings, stop, world)
    finally:
        if metrics_server is not None:
            metrics_server.stop()


def _job(args: argparse.Namespace, settings: TrainingSettings) -> TrainingJob:
    from selma_training.trainer import load_job_document, standalone_job

    if args.dataset:
        job = standalone_job(args.config, args.dataset, args.run, args.skill, settings)
    else:
        job = load_job_document(args.config, settings)
    if args.device:
        job = job.model_copy(update={"device": args.device})
    return job


def _agent(args: argparse.Namespace, settings: TrainingSettings, job: TrainingJob, stop: threading.Event) -> int:
    """A distributed job: this process starts the node's trainer processes (torchrun) and waits for them."""
    from selma.batch.worker import exit_with_parent
    from selma_training.distributed import TorchrunEnv, agent_argv, run_agent

    if settings.batch_parent_pid:
        exit_with_parent(settings.batch_parent_pid, stop)  # the kernel's SIGTERM reaches torchrun, which passes it on
    worker_args = ["train", "--config", args.config, *(["--device", args.device] if args.device else [])]
    argv = agent_argv(job.nodes, job.processes_per_node, worker_args, node_rank=max(settings.batch_completion_index, 0), env=TorchrunEnv())
    return run_agent(argv)


def _run(job: TrainingJob, settings: TrainingSettings, stop: threading.Event, world: World | None) -> int:
    import os

    from selma.batch.worker import exit_with_parent
    from selma_training.trainer import TrainingInterrupted, run_job

    if world is not None:
        exit_with_parent(os.getppid(), stop)  # a rank dies with its torchrun agent
    elif settings.batch_parent_pid:
        exit_with_parent(settings.batch_parent_pid, stop)
    try:
        run_job(job, settings, should_stop=stop.is_set, world=world)
    except TrainingInterrupted:
        return EXIT_INTERRUPTED
    return 0
