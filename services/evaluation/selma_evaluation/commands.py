"""``selma eval run | status | list | cancel | report | execute``: evaluations from the command line.

    selma eval run --benchmark dsg-1k --categories countbench --max-prompts 50 \\
        --target base --target selma=model:quickstart --vqa transformers:Salesforce/blip-vqa-base
    selma eval run --benchmark prompt-set --prompt-set <held-out set> --metric dsg --metric tifa \\
        --target base --search-experts quickstart/counting,quickstart/spatial --search-weights 0.25,0.5,1 \\
        --validation-prompt-set <validation set> --register quickstart-best
    selma eval report <eval_report id> --out report/        # then open report/index.html

``run`` starts the job on the training service (through ``selma up``'s endpoints file,
``--endpoints`` or ``SELMA_ENDPOINTS``), follows it with a progress bar and prints the score
tables.  The idempotency key defaults to a digest of the spec, so running the same command
again attaches to the same job (or resumes it after a failure) instead of starting over.
``execute`` is the worker entrypoint that the launcher runs (a local process or a Kubernetes Job).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from selma import plugins
from selma.api import enum_name
from selma.cli_options import add_output_options, add_store_options, parse_expert_weights, print_rows, storage_uri
from selma.errors import InvalidArgument
from selma.specs import density

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 143
_METHODS = ("mean_delta", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def add_commands(esub: argparse._SubParsersAction) -> None:
    """Add run/status/list/cancel/report/execute to the ``selma eval`` subparsers."""
    r = esub.add_parser("run", help="evaluate models on DSG-1k or held-out prompts (renders, answers, scores, publishes a report)")
    r.add_argument("--spec", default="", help="an EvaluationSpec as YAML/JSON (proto-JSON field names); other spec flags are then ignored")
    r.add_argument("--benchmark", choices=("dsg-1k", "prompt-set"), default="dsg-1k", help="DSG-1k or held-out prompt sets (default dsg-1k)")
    r.add_argument("--prompt-set", action="append", default=[], help="prompt_set artifact id of held-out test prompts (repeatable)")
    r.add_argument("--categories", default="", help="comma-separated DSG-1k categories, or skills of the prompt sets")
    r.add_argument("--max-prompts", type=int, default=0, help="evaluate the first N prompts only (0 = all)")
    r.add_argument("--target", action="append", default=[],
                   help="LABEL (base model), LABEL=model:NAME (registered model) or LABEL=experts:ID=W,ID=W (per-request mix; ID,ID for 1/N each); "
                        "repeatable; default 'base'")
    r.add_argument("--method", choices=_METHODS, default="mean_delta", help="merge method of experts targets (default mean_delta)")
    r.add_argument("--metric", action="append", choices=("dsg", "tifa"), default=[], help="metric (repeatable; default dsg)")
    r.add_argument("--vqa", default="", help="tiny[:SEED] | transformers:ID_OR_PATH | openai:MODEL@BASE_URL | a plugin's name, e.g. shapesworld (default: the service's eval_vqa_model)")
    r.add_argument("--vqa-batch-size", type=int, default=0, help="questions per VQA forward pass (transformers)")
    r.add_argument("--question-backend", default="", help="LLM for questions about prompt-set prompts: embedded | tiny | openai:MODEL@BASE_URL (default: the prompt service default)")
    r.add_argument("--images-per-prompt", type=int, default=0, help="images per prompt (default 1)")
    r.add_argument("--seed", type=int, default=None, help="base seed; every target renders an item with the same seeds (default 0)")
    r.add_argument("--steps", type=int, default=0, help="denoising steps (0 = the model default)")
    r.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    r.add_argument("--width", type=int, default=0)
    r.add_argument("--height", type=int, default=0)
    r.add_argument("--search-experts", default="", help="comma-separated expert ids (or run/skill) for a merge-weight search")
    r.add_argument("--search-methods", default="", help=f"comma-separated methods to try ({', '.join(_METHODS)}; default mean_delta)")
    r.add_argument("--search-densities", default="", help="comma-separated densities for ties/dare/magnitude_prune (default 0.5)")
    r.add_argument("--search-weights", default="", help="comma-separated candidate weights per expert (default: 1/N only)")
    r.add_argument("--search-strategy", choices=("grid", "random"), default="grid")
    r.add_argument("--max-trials", type=int, default=0, help="upper bound on search trials (0 = service default)")
    r.add_argument("--objective", choices=("dsg", "tifa"), default="dsg", help="what the search maximises (default dsg)")
    r.add_argument("--validation-prompt-set", action="append", default=[], help="prompt_set id of held-out VALIDATION prompts (repeatable)")
    r.add_argument("--register", default="", help="register the search's best merge on ServingService under this name")
    r.add_argument("--run", default="", help="pipeline run this evaluation belongs to (labels the report)")
    r.add_argument("--title", default="", help="title of the report page")
    r.add_argument("--launcher", choices=("local", "kubernetes"), default="", help="where the batch work runs (default: the service's)")
    r.add_argument("--gpus", type=int, default=0, help="GPUs for a Kubernetes evaluation Job")
    r.add_argument("--key", default="", help="idempotency key (default: derived from the spec, so a re-run attaches)")
    r.add_argument("--detach", action="store_true", help="start and return without waiting")
    r.add_argument("--out", default="", help="download the finished report into this directory")
    r.add_argument("--storage", default="", metavar="URI", help="artifact root for --out (default: the storage the report was published in)")
    add_output_options(r)
    _common(r)
    r.set_defaults(func=_run)

    s = esub.add_parser("status", help="show an evaluation job")
    s.add_argument("job_id")
    add_output_options(s)
    _common(s)
    s.set_defaults(func=_status)

    ls = esub.add_parser("list", help="list evaluation jobs")
    ls.add_argument("--run", default="", help="only evaluations of this pipeline run")
    add_output_options(ls)
    _common(ls)
    ls.set_defaults(func=_list)

    c = esub.add_parser("cancel", help="cancel an evaluation job (its stored work is kept for a re-start)")
    c.add_argument("job_id")
    c.add_argument("--reason", default="")
    _common(c)
    c.set_defaults(func=_cancel)

    rep = esub.add_parser("report", help="print an evaluation report's tables; --out downloads it (index.html, charts, images)")
    rep.add_argument("report_id", help="eval_report artifact id (the job's output)")
    rep.add_argument("--out", default="", help="download every file of the report into this directory")
    add_store_options(rep)
    rep.set_defaults(func=_report)

    g = esub.add_parser("gate-report", help="a gated dataset's numbers: candidates, kept, pass rate and best-of-K pass rates per skill",
                        description="Read a gate job's kept image_dataset (its gate.jsonl: every candidate's score) and print, per skill, "
                        "the candidates scored, images kept, pass rate, and for each K the prompts with at least one passing "
                        "image among their first K candidates.")
    g.add_argument("dataset_id", nargs="+", help="kept image_dataset artifact id(s) (the gate jobs' outputs)")
    g.add_argument("--k", default="1,2,4,8", metavar="K,K", help="candidate counts to report pass rates at (default 1,2,4,8)")
    add_output_options(g)
    add_store_options(g)
    g.set_defaults(func=_gate_report)

    x = esub.add_parser("execute", help="run one evaluation job document (the worker the launcher starts)")
    x.add_argument("--config", required=True, help="job document URI (s3://… or file://…) or path")
    x.set_defaults(func=_execute)


def _common(p: argparse.ArgumentParser) -> None:
    from selma.client import add_client_arguments

    p.add_argument("--endpoints", default="", help="endpoints file (default <dir>/endpoints.json or SELMA_ENDPOINTS)")
    add_client_arguments(p)
    add_store_options(p, storage=False)


# ----------------------------------------------------------------------------------------------
# building a spec from flags


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in _csv(text)]
    except ValueError:
        raise InvalidArgument(f"{flag} must be comma-separated numbers; got {text!r}", field=flag) from None


def _method(name: str) -> str:
    if name.lower() not in _METHODS:
        raise InvalidArgument(f"unknown merge method {name!r}; use one of {', '.join(_METHODS)}", field="method")
    return "MERGE_METHOD_" + name.upper()


def parse_target(text: str, method: str = "mean_delta") -> dict[str, Any]:
    """``LABEL`` | ``LABEL=model:NAME`` | ``LABEL=experts:ID=W,ID=W`` (or ``ID,ID``: 1/N each) → proto-JSON EvaluationTarget."""
    label, sep, rest = text.partition("=")
    label = label.strip()
    if not label:
        raise InvalidArgument(f"--target {text!r} needs a label", field="target")
    if not sep:
        return {"label": label}
    kind, _, value = rest.partition(":")
    if kind == "model" and value:
        return {"label": label, "model_name": value}
    if kind == "experts" and value:
        # the CLI's one expert-weight grammar (selma.cli_options): ID=W,ID=W, or ID,ID for 1/N each
        pairs = parse_expert_weights(value, "--target")
        experts = [{"expert_id": eid} | ({"weight": w} if w is not None else {}) for eid, w in pairs]
        return {"label": label, "experts": {"method": _method(method), "experts": experts}}
    raise InvalidArgument(f"--target {text!r} must be LABEL, LABEL=model:NAME or LABEL=experts:ID=W,ID=W", field="target")


def _backend(text: str, what: str) -> dict[str, Any]:
    if not text:
        return {}
    kind, _, rest = text.partition(":")
    if what == "vqa":
        if kind == "tiny":
            if rest and not rest.lstrip("-").isdigit():
                raise InvalidArgument(f"--vqa {text!r}: the tiny model's seed must be an integer", field="vqa")
            return {"tiny_test": {"seed": int(rest)} if rest else {}}
        if kind == "transformers" and rest:
            return {"transformers": {"model": {"source": rest}}}
        plugin = next((p for p in plugins.registry().vqa_backends.values() if p.cli_name and p.cli_name == kind), None)
        if plugin is not None and not rest:  # a VQA backend a plugin added, by its short name
            return {plugin.kind: {}}
    else:
        if kind == "embedded":
            return {"embedded": {}}
        if kind == "tiny":
            return {"tiny_test": {}}
    if kind == "openai" and "@" in rest:
        model, _, url = rest.partition("@")
        return {"openai_compatible": {"base_url": url, "model": model, "api": "OPEN_AI_API_CHAT_COMPLETIONS"}}
    raise InvalidArgument(f"--{what.replace('_', '-')} {text!r} is not understood; see --help", field=what)


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The proto-JSON EvaluationSpec the flags describe (or the --spec file)."""
    if args.spec:
        import yaml

        try:
            spec = yaml.safe_load(Path(args.spec).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidArgument(f"no spec file {args.spec}", field="spec") from None
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"cannot read spec file {args.spec}: {e}", field="spec") from None
        except yaml.YAMLError as e:
            raise InvalidArgument(f"{args.spec} is not YAML/JSON: {e}", field="spec") from None
        if not isinstance(spec, dict):
            raise InvalidArgument(f"{args.spec} must hold a mapping (an EvaluationSpec)", field="spec")
        return spec
    spec: dict[str, Any] = {
        "benchmark": "EVALUATION_BENCHMARK_DSG_1K" if args.benchmark == "dsg-1k" else "EVALUATION_BENCHMARK_PROMPT_SET",
        "targets": [parse_target(t, args.method) for t in (args.target or ["base"])],
        "metrics": ["EVALUATION_METRIC_" + m.upper() for m in (args.metric or ["dsg"])],
    }
    # only what was given goes into the spec, so flags and an equivalent spec file share a key
    if args.images_per_prompt:
        spec["images_per_prompt"] = args.images_per_prompt
    if args.seed is not None:
        spec["base_seed"] = args.seed
    sets = [{"id": p} for p in args.prompt_set]
    if sets:
        spec["prompt_set"] = sets[0]
        if sets[1:]:
            spec["prompt_sets"] = sets[1:]
    if args.categories:
        spec["categories"] = _csv(args.categories)
    if args.max_prompts:
        spec["max_prompts"] = args.max_prompts
    diffusion: dict[str, Any] = {k: v for k, v in (("steps", args.steps), ("width", args.width), ("height", args.height)) if v}
    if args.guidance is not None:
        diffusion["guidance_scale"] = args.guidance
    if diffusion:
        spec["diffusion"] = diffusion
    vqa = _backend(args.vqa, "vqa")
    if vqa and args.vqa_batch_size and "transformers" in vqa:
        vqa["transformers"]["batch_size"] = args.vqa_batch_size
    if vqa:
        spec["vqa"] = vqa
    qb = _backend(args.question_backend, "question_backend")
    if qb:
        spec["question_backend"] = qb
    search_flags = {"--search-methods": args.search_methods, "--search-densities": args.search_densities,
                    "--search-weights": args.search_weights, "--max-trials": args.max_trials,
                    "--validation-prompt-set": args.validation_prompt_set, "--register": args.register}
    given = [flag for flag, value in search_flags.items() if value]
    if given and not args.search_experts:
        raise InvalidArgument(f"{', '.join(given)} configure a merge-weight search: add --search-experts ID,ID,...", field=given[0])
    if args.search_experts:
        search: dict[str, Any] = {
            "expert_ids": _csv(args.search_experts),
            "methods": [_method(m) for m in _csv(args.search_methods)] or ["MERGE_METHOD_MEAN_DELTA"],
            "strategy": "MERGE_SEARCH_STRATEGY_" + args.search_strategy.upper(),
            "objective": "EVALUATION_METRIC_" + args.objective.upper(),
        }
        if args.search_densities:
            # refused here by the service's own rule (selma.specs.density), before anything is sent
            search["densities"] = [density(d, "--search-densities") for d in _floats(args.search_densities, "--search-densities")]
        if args.search_weights:
            search["weight_values"] = _floats(args.search_weights, "--search-weights")
        if args.max_trials:
            search["max_trials"] = args.max_trials
        vsets = [{"id": p} for p in args.validation_prompt_set]
        if vsets:
            search["validation_prompt_set"] = vsets[0]
            if vsets[1:]:
                search["validation_prompt_sets"] = vsets[1:]
        if args.register:
            search["register_model_name"] = args.register
        spec["merge_search"] = search
        if not args.target:
            spec["targets"] = [{"label": "base"}]
    if args.run:
        spec["run"] = args.run
    if args.title:
        spec["labels"] = {"title": args.title}
    placement: dict[str, Any] = {}
    if args.launcher:
        placement["launcher"] = "LAUNCHER_KIND_" + args.launcher.upper()
    if args.gpus:
        placement["gpus"] = args.gpus
    if placement:
        spec["placement"] = placement
    return spec


# ----------------------------------------------------------------------------------------------
# client commands


def _client(args: argparse.Namespace) -> Any:
    from selma.client import SelmaClient

    return SelmaClient.for_cli(args, timeout=60.0)


def _rpc(fn: Any, *a: Any, **kw: Any) -> Any:
    import grpc

    from selma.errors import RunFailed

    try:
        return fn(*a, **kw)
    except grpc.RpcError as e:
        raise RunFailed(f"{e.code().name}: {e.details()}") from None


def _run(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from selma.api import message_to_dict
    from selma.v1 import evaluation_service_pb2 as pb

    spec = spec_from_args(args)
    try:
        # strict, unlike selma.api.dict_to_message: a misspelt field or enum value in a spec file
        # must be an error, not silently dropped (a dropped `targets` or `metrics` changes the job)
        msg = json_format.ParseDict(spec, pb.EvaluationSpec())
    except (json_format.ParseError, TypeError, ValueError) as e:  # a typo in a spec file, a string where a number goes
        raise InvalidArgument(f"the spec is not a valid EvaluationSpec: {e}", field="spec") from None
    key = args.key or "eval/" + hashlib.sha256(json.dumps(message_to_dict(msg), sort_keys=True).encode()).hexdigest()[:16]
    with _client(args) as client:
        stub = client.stub("evaluation")
        resp = _rpc(stub.StartEvaluation, pb.StartEvaluationRequest(idempotency_key=key, spec=msg), timeout=120)
        job = resp.job
        sys.stderr.write(f"evaluation {job.status.job_id} ({'started' if resp.created else 'attached'}, key {key})\n")
        if args.detach:
            sys.stdout.write(job.status.job_id + "\n")
            return 0
        job = _follow(stub, job.status.job_id, plain=args.plain)
    return _finish(args, job)


def _follow(stub: Any, job_id: str, *, plain: bool = False) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from selma.v1 import evaluation_service_pb2 as pb

    last = None
    if plain:  # a line per change of phase or message, no live bar (logs, CI); a failed call is the CLI's one-line error
        from selma.v1 import common_pb2

        said = None
        for resp in stub.WatchEvaluation(pb.WatchEvaluationRequest(job_id=job_id)):
            st, last = resp.job.status, resp.job
            if (st.phase, st.message) != said:
                said = (st.phase, st.message)
                count = f" {st.progress.done}/{st.progress.total}" if st.progress.total else ""
                sys.stderr.write(f"{enum_name(common_pb2.JobPhase, st.phase)}{count} {st.message}".rstrip() + "\n")
        return last or _rpc(stub.GetEvaluation, pb.GetEvaluationRequest(job_id=job_id), timeout=60).job
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task("evaluating", total=None)
        for update in _rpc(lambda: list_stream(stub.WatchEvaluation(pb.WatchEvaluationRequest(job_id=job_id)), bar, task)):
            last = update
    return last or _rpc(stub.GetEvaluation, pb.GetEvaluationRequest(job_id=job_id), timeout=60).job


def list_stream(stream: Any, bar: Any, task: Any) -> list[Any]:
    jobs = []
    for resp in stream:
        st = resp.job.status
        total = st.progress.total or None
        bar.update(task, completed=st.progress.done, total=total, description=(st.message or "evaluating")[:70])
        jobs.append(resp.job)
    return jobs[-1:]


def _finish(args: argparse.Namespace, job: Any) -> int:
    from selma.api import message_to_dict
    from selma.v1 import common_pb2

    as_json = getattr(args, "json", False)
    if as_json:
        sys.stdout.write(json.dumps(message_to_dict(job), indent=2) + "\n")
    else:
        sys.stdout.write(score_table(job) + plumbing_note(job) + "\n")
        if job.stats.trials:
            sys.stdout.write("\nmerge search (validation prompts):\n" + search_table(job) + "\n")
    if job.status.phase != common_pb2.JOB_PHASE_SUCCEEDED:
        from selma.errors import RunFailed

        raise RunFailed(f"evaluation {job.status.job_id} ended {common_pb2.JobPhase.Name(job.status.phase)}: {job.status.message}")
    # with --json everything below is in the JSON already: keep stdout parseable
    info = sys.stderr if as_json else sys.stdout
    info.write(f"report: {job.status.output.id}\n  {job.stats.report_html_uri}\n")
    if job.stats.registered_model_name:
        info.write(f"best merge registered as {job.stats.registered_model_name}\n")
    if getattr(args, "out", ""):
        _download(args, job.status.output.id, args.out, artifact_uri=job.status.output.uri, stream=info)
    return 0


def plumbing_note(job: Any) -> str:
    """A warning line under the scores when the VQA backend answers pseudo-randomly (tiny_test), else ""."""
    from selma_evaluation.report import PLUMBING_WARNING

    return f"\nwarning: {PLUMBING_WARNING}" if job.spec.vqa.HasField("tiny_test") else ""


def score_table(job: Any) -> str:
    """Plain-text table of a job's scores: one row per slice, one column per target and metric."""
    from selma.v1 import evaluation_service_pb2 as pb

    rows = list(job.stats.scores)
    if not rows:
        return "(no scores yet)"
    cols: list[tuple[str, int]] = []
    for r in rows:
        if (r.target_label, r.metric) not in cols:
            cols.append((r.target_label, r.metric))
    slices: list[str] = []
    cell: dict[tuple[str, str, int], float] = {}
    for r in rows:
        name = r.skill or r.category or "overall"
        if name not in slices:
            slices.append(name)
        cell[(name, r.target_label, r.metric)] = r.score_percent
    slices = sorted(s for s in slices if s != "overall") + ["overall"]
    heads = ["slice"] + [f"{t} {enum_name(pb.EvaluationMetric, m).upper()}" for t, m in cols]
    body = [[s] + [f"{cell[(s, t, m)]:.1f}" if (s, t, m) in cell else "-" for t, m in cols] for s in slices]
    widths = [max(len(r[i]) for r in [heads, *body]) for i in range(len(heads))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))  # noqa: E731
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths]), *[fmt(r) for r in body]])


def search_table(job: Any, limit: int = 10) -> str:
    """The best ``limit`` merge-search trials, best first: method, density, weights, validation score."""
    from selma.v1 import common_pb2

    trials = sorted(job.stats.trials, key=lambda t: (-t.validation_score_percent, t.index))
    lines = []
    for rank, t in enumerate(trials[:limit]):
        method = enum_name(common_pb2.MergeMethod, t.merge.method)
        density = f" density {t.merge.density:g}" if t.merge.density else ""
        weights = ", ".join(f"{e.expert_id}×{e.weight:g}" for e in t.merge.experts)
        lines.append(f"{'*' if rank == 0 else ' '} trial {t.index:3d}  {t.validation_score_percent:5.1f}  {method}{density}  {weights}")
    if len(trials) > limit:
        lines.append(f"  ... {len(trials) - limit} more trials in the report")
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    from selma.api import message_to_dict
    from selma.v1 import common_pb2
    from selma.v1 import evaluation_service_pb2 as pb

    with _client(args) as client:
        job = _rpc(client.stub("evaluation").GetEvaluation, pb.GetEvaluationRequest(job_id=args.job_id), timeout=60).job
    if args.json:
        sys.stdout.write(json.dumps(message_to_dict(job), indent=2) + "\n")
        return 0
    st = job.status
    count = f"{st.progress.done}/{st.progress.total}" if st.progress.total else "-"
    if args.plain:
        print_rows(args, ("job", "phase", "progress", "message"), [(st.job_id, enum_name(common_pb2.JobPhase, st.phase), count, st.message)])
        sys.stdout.write(score_table(job) + "\n")
        return 0
    sys.stdout.write(f"{st.job_id}  {enum_name(common_pb2.JobPhase, st.phase).upper()}  {count}  {st.message}\n")
    sys.stdout.write(score_table(job) + plumbing_note(job) + "\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    from selma.api import message_to_dict
    from selma.v1 import common_pb2
    from selma.v1 import evaluation_service_pb2 as pb

    jobs = []
    with _client(args) as client:
        token = ""
        while True:
            resp = _rpc(client.stub("evaluation").ListEvaluations,
                        pb.ListEvaluationsRequest(filter=common_pb2.JobFilter(run=args.run), page_token=token), timeout=60)
            jobs += list(resp.jobs)
            token = resp.next_page_token
            if not token:
                break
    rows = [(j.status.job_id, enum_name(common_pb2.JobPhase, j.status.phase).upper(), j.status.idempotency_key, j.status.output.id) for j in jobs]
    print_rows(args, ("job", "phase", "key", "report"), rows, title="evaluations", records=[message_to_dict(j) for j in jobs])
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from selma.v1 import common_pb2
    from selma.v1 import evaluation_service_pb2 as pb

    with _client(args) as client:
        job = _rpc(client.stub("evaluation").CancelEvaluation, pb.CancelEvaluationRequest(job_id=args.job_id, reason=args.reason), timeout=60).job
    sys.stdout.write(f"{job.status.job_id}  {enum_name(common_pb2.JobPhase, job.status.phase).upper()}\n")
    return 0


def _store(args: argparse.Namespace, artifact_uri: str = "", artifact_id: str = "") -> Any:
    """The artifact store: --storage, else the root of ``artifact_uri`` (``<root>/artifacts/<id>``,
    as the service reported it), else SELMA_STORAGE_URI, else ``<dir>/storage``."""
    from selma.artifacts import ARTIFACTS_PREFIX, ArtifactStore
    from selma.config import SelmaSettings
    from selma.storage import open_storage

    settings = SelmaSettings()
    suffix = f"/{ARTIFACTS_PREFIX}/{artifact_id}"
    if getattr(args, "storage", ""):
        uri = storage_uri(args, settings)  # a file:// root that does not exist is NOT_FOUND naming it
    elif artifact_id and artifact_uri.endswith(suffix):
        uri = artifact_uri[: -len(suffix)]
    else:
        uri = None if settings.storage_uri else (Path(args.dir) / "storage").resolve().as_uri()
    return ArtifactStore(open_storage(settings, uri))


def _download(args: argparse.Namespace, report_id: str, out: str, *, artifact_uri: str = "", stream: Any = None) -> None:
    store = _store(args, artifact_uri, report_id)
    dest = store.download(report_id, out)
    (stream or sys.stdout).write(f"report files in {dest} (open {Path(dest) / 'index.html'})\n")


def _report(args: argparse.Namespace) -> int:
    from selma.artifacts import ArtifactKind

    store = _store(args)
    manifest = store.get(args.report_id)
    if manifest.kind != ArtifactKind.EVAL_REPORT.value:
        raise InvalidArgument(f"{args.report_id} is a {manifest.kind} artifact, not an eval_report", field="report_id")
    sys.stdout.write(store.read_bytes(manifest, "tables.md").decode())
    if args.out:
        _download(args, manifest.id, args.out)
    return 0


def _gate_report(args: argparse.Namespace) -> int:
    from selma.artifacts import ArtifactKind
    from selma_evaluation.gate import pass_at_k

    try:
        ks = sorted({int(k) for k in _csv(args.k)})
    except ValueError:
        raise InvalidArgument(f"--k takes whole numbers like 1,2,4,8; got {args.k!r}", field="--k") from None
    if not ks or ks[0] < 1:
        raise InvalidArgument(f"--k takes candidate counts >= 1; got {args.k!r}", field="--k")
    store = _store(args)
    rows, records = [], []
    for aid in args.dataset_id:
        m = store.get(aid)
        if m.kind != ArtifactKind.IMAGE_DATASET.value or "gate.jsonl" not in {f.path for f in m.files}:
            raise InvalidArgument(f"{aid} is not a gated image_dataset (a gate job's output, with gate.jsonl)", field="dataset_id")
        cands = [json.loads(x) for x in store.read_bytes(m, "gate.jsonl").decode().splitlines() if x.strip()]
        p = m.parameters
        n = int(p.get("prompts_total") or 0)
        at = pass_at_k(cands, ks, n)
        rec = {"dataset": aid, "skill": p.get("skill", ""), "prompts": n, "candidates": len(cands), "kept": int(p.get("kept") or 0),
               "pass_rate_percent": round(float(p.get("pass_rate_percent") or 0.0), 1),
               "pass_at_k_percent": {str(k): round(100.0 * v / n, 1) if n else 0.0 for k, v in at.items()},
               "prompts_passing_at_k": {str(k): v for k, v in at.items()}}
        records.append(rec)
        rows.append((rec["skill"], n, rec["candidates"], rec["kept"], f"{rec['pass_rate_percent']:.1f}",
                     *(f"{rec['pass_at_k_percent'][str(k)]:.1f} ({at[k]})" for k in ks)))
    print_rows(args, ("skill", "prompts", "candidates", "kept", "pass %", *(f"pass@{k} % (prompts)" for k in ks)), rows,
               title="gate: per skill", records=records)
    return 0


# ----------------------------------------------------------------------------------------------
# the worker


def _execute(args: argparse.Namespace) -> int:
    from selma.batch.worker import exit_with_parent
    from selma.logs import configure_logging
    from selma_evaluation.runner import EvaluationInterrupted, load_job_document, run_job_document
    from selma_evaluation.settings import EvaluationSettings

    settings = EvaluationSettings()
    configure_logging(settings.log_level, settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())  # finish the current batch, keep the work, exit 143
    if settings.batch_parent_pid:
        exit_with_parent(settings.batch_parent_pid, stop)
    doc = load_job_document(args.config, settings)
    try:
        manifest = run_job_document(doc, settings, should_stop=stop.is_set)
    except EvaluationInterrupted:
        log.info("evaluation %s interrupted; its work so far is kept", doc.job_id)
        return EXIT_INTERRUPTED
    log.info("evaluation %s published report %s", doc.job_id, manifest["id"])
    return 0
