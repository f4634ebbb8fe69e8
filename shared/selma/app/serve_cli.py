"""``selma serve NAME``: run one service in the foreground (the container entrypoint of each Deployment).

``selma serve training`` hosts the TrainingService and, beside it in the same process and sharing
its batch launchers, the EvaluationService (one Deployment by default); ``--only`` leaves the
evaluation out, for a chart that runs ``selma serve evaluation`` as its own Deployment.
"""

from __future__ import annotations

import argparse
import importlib

from selma.errors import FailedPrecondition

SERVICES = ("prompts", "render", "training", "serving", "evaluation")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one selma service (settings from SELMA_* variables)")
    p.add_argument("service", choices=SERVICES, help="which service")
    p.add_argument("--only", action="store_true", help="training: do not host the EvaluationService beside it")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if args.service in ("training", "evaluation"):
        return _serve_batch_services(args.service, only=args.only)
    try:
        module = importlib.import_module(f"selma_{args.service}.server")
    except ModuleNotFoundError as e:
        if e.name != f"selma_{args.service}.server":
            raise
        module = None
    main = getattr(module, "main", None)
    if main is None:
        raise FailedPrecondition(f"the {args.service} service has no server entry point in this build")
    return int(main() or 0)


def _serve_batch_services(name: str, *, only: bool) -> int:
    """Training (with evaluation beside it unless ``only``) or evaluation alone."""
    from selma.logs import configure_logging
    from selma.server import serve_hosted
    from selma_evaluation import server as evaluation
    from selma_evaluation.settings import EvaluationSettings

    eval_settings = EvaluationSettings()
    if name == "evaluation":
        configure_logging(eval_settings.log_level, eval_settings.log_format)
        serve_hosted(eval_settings, [evaluation.hosted(eval_settings)], name="evaluation")
        return 0
    from selma_training import server as training
    from selma_training.settings import TrainingSettings

    settings = TrainingSettings()
    configure_logging(settings.log_level, settings.log_format)
    hosted = [training.hosted(settings)]
    if not only:
        hosted.append(evaluation.hosted(eval_settings, launchers=hosted[0].core.launchers))
    serve_hosted(settings, hosted, name="training")
    return 0
