"""``selma prompts``: generate a prompt set locally, without a server, and list the skills.

    selma prompts skills
    selma prompts generate --skill counting --count 20 --backend embedded --out counting.jsonl
    selma prompts generate --skill whoops --count 500 --backend openai \\
        --base-url http://localhost:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct --key demo/whoops

Without ``--key`` the loop runs in memory and writes JSONL records to ``--out`` (or stdout).
With ``--key`` it runs as a resumable job against the configured storage (``SELMA_STORAGE_URI``
or ``--storage``): interrupt it and run the same command again to continue; the prompt set
is published as a ``prompt_set`` artifact whose id is printed.  API keys come from the
service settings (``SELMA_LLM_OPENAI_API_KEY``, or ``--api-key-secret NAME``), never from
the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from selma.cli_options import add_output_options, print_rows
from selma.errors import InvalidArgument

log = logging.getLogger(__name__)

_BACKENDS = {"embedded": "embedded", "tiny": "tiny_test", "openai": "openai_compatible", "local": "local_causal_lm"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompts", help="generate skill-specific prompt sets locally (the PromptService loop, no server)")
    psub = p.add_subparsers(dest="prompts_command", metavar="ACTION", required=True)

    sk = psub.add_parser("skills", help="list the built-in and configured skills")
    sk.add_argument("--skill-file", action="append", default=[], help="also load skills from this YAML file (repeatable)")
    add_output_options(sk)
    sk.set_defaults(func=_skills)

    g = psub.add_parser("generate", help="run the SELMA prompt loop for one skill")
    g.add_argument("--skill", required=True, help="skill name (see `selma prompts skills`), or one defined in --skill-file")
    g.add_argument("--skill-file", action="append", default=[], help="load skills from this YAML file (repeatable)")
    g.add_argument("--count", type=int, required=True, help="prompts to accept")
    g.add_argument("--backend", choices=sorted(_BACKENDS), default=None, help="LLM backend (default: the settings' default)")
    g.add_argument("--base-url", default="", help="openai: base URL up to and including /v1")
    g.add_argument("--model", default="", help="openai: model name; local: model path or hub id")
    g.add_argument("--api", choices=("chat", "completions"), default="", help="openai: which API (default chat)")
    g.add_argument("--api-key-secret", default="", help="openai: name of a configured secret holding the API key")
    g.add_argument("--device", default="", help="local/embedded: cpu, cuda, cuda:N")
    g.add_argument("--threshold", type=float, default=0.0, help="ROUGE-L rejection threshold (default 0.8)")
    g.add_argument("--embedding-filter", type=float, nargs="?", const=0.9, default=None, metavar="COS",
                   help="also reject candidates whose embedding cosine similarity exceeds COS (default 0.9)")
    g.add_argument("--seed", type=int, default=0, help="seed for in-context sampling and the LLM")
    g.add_argument("--examples-per-request", type=int, default=0, help="in-context examples per request (default 3)")
    g.add_argument("--prompts-per-request", type=int, default=0, help="prompts asked for per request (default 20)")
    g.add_argument("--max-requests", type=int, default=0, help="LLM request budget (default 10*count/per-request + 10)")
    g.add_argument("--max-tokens", type=int, default=0, help="max tokens per LLM request")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--key", default="", help="idempotency key: run as a resumable job and publish a prompt_set artifact")
    g.add_argument("--run", default="", help="pipeline run label for the artifact")
    g.add_argument("--storage", default="", help="artifact root URI for --key (default SELMA_STORAGE_URI or .selma/storage)")
    g.add_argument("--out", default="", help="write the JSONL records here (default stdout)")
    g.set_defaults(func=_generate)


def _settings(args: argparse.Namespace) -> Any:
    from selma_prompts.settings import PromptSettings

    # In-process generation on the user's own machine: the endpoint the user names is theirs to pick
    # (the allow-list guards the service from remote callers).
    overrides: dict[str, Any] = {"llm_allow_any_base_url": True}
    if getattr(args, "storage", ""):
        overrides["storage_uri"] = args.storage
    settings = PromptSettings(**overrides)
    if args.skill_file:
        settings = settings.model_copy(update={"prompts_skill_paths": [*settings.prompts_skill_paths, *args.skill_file]})
    return settings


def _skills(args: argparse.Namespace) -> int:
    from selma_prompts.skills import SkillLibrary

    skills = SkillLibrary(_settings(args).prompts_skill_paths).all()
    rows = [(s.name, s.description, len(s.rules), len(s.seed_examples)) for s in skills]
    print_rows(args, ("name", "description", "rules", "seeds"), rows, title="skills", records=[s.to_dict() for s in skills])
    return 0


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The PromptGenerationSpec dict (proto field names) the flags describe."""
    sampling: dict[str, Any] = {}
    if args.max_tokens:
        sampling["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.top_p is not None:
        sampling["top_p"] = args.top_p
    backend: dict[str, Any] = {}
    if args.backend:
        kind = _BACKENDS[args.backend]
        body: dict[str, Any] = {}
        if kind == "openai_compatible":
            body = {"base_url": args.base_url, "model": args.model}
            if args.api:
                body["api"] = {"chat": "OPEN_AI_API_CHAT_COMPLETIONS", "completions": "OPEN_AI_API_COMPLETIONS"}[args.api]
            if args.api_key_secret:
                body["api_key"] = {"name": args.api_key_secret}
        elif kind == "local_causal_lm":
            body = {"model": {"source": args.model}}
        if kind in ("local_causal_lm", "embedded") and args.device:
            body["device"] = {"device": args.device}
        if sampling and kind != "tiny_test":
            body["sampling"] = sampling
        backend = {kind: body}
    elif args.base_url or args.model:
        raise InvalidArgument("--base-url and --model need --backend openai or --backend local", field="--backend")
    spec: dict[str, Any] = {"skill_name": args.skill, "count": args.count, "seed": args.seed}
    for key, value in (
        ("rouge_l_threshold", args.threshold),
        ("examples_per_request", args.examples_per_request),
        ("prompts_per_request", args.prompts_per_request),
        ("max_llm_requests", args.max_requests),
        ("run", args.run),
    ):
        if value:
            spec[key] = value
    if backend:
        spec["backend"] = backend
    if args.embedding_filter is not None:
        spec["embedding_filter"] = {"max_cosine_similarity": args.embedding_filter}
    return spec


def _write(records: list[dict[str, Any]], out: str) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(data)
        log.info("wrote %d prompts to %s", len(records), out)
    else:
        sys.stdout.write(data)


def speed_hint(spec: Any) -> str:
    """Why generation with a local model on a CPU is slow, and the flags that make it faster ("" otherwise)."""
    backend = spec.backend
    if backend.kind not in ("embedded", "local_causal_lm") or backend.device.startswith("cuda"):
        return ""
    model = "the embedded SmolLM2-135M" if backend.kind == "embedded" else f"the local model {backend.model}"
    return (
        f"note: {model} runs on this machine's CPU{'' if backend.device else ' (unless a GPU is found)'}: accepting {spec.count} prompts "
        f"takes up to {spec.budget} LLM requests of {spec.prompts_per_request} prompts each, one after another, which can take "
        "minutes per request on a busy machine. Faster: a served LLM (--backend openai --base-url URL --model NAME), "
        "a GPU (--device cuda), or a smaller budget (--max-requests N)"
    )


def _generate(args: argparse.Namespace) -> int:
    from selma.artifacts import ArtifactStore
    from selma.jobs import job_id_for
    from selma.llm.embedding import EmbeddingPool
    from selma.llm.local import ModelRegistry
    from selma.storage import open_storage
    from selma_prompts.generator import PromptGenerator
    from selma_prompts.job import JOB_KIND, PROMPTS_FILE, PromptJobRunner
    from selma_prompts.skills import SkillLibrary
    from selma_prompts.spec import resolve_spec

    settings = _settings(args)
    library = SkillLibrary(settings.prompts_skill_paths)
    registry = ModelRegistry(settings)
    spec_dict = spec_from_args(args)
    hint = speed_hint(resolve_spec(spec_dict, settings, library))
    if hint:
        sys.stderr.write(hint + "\n")

    def progress(done: int, total: int, message: str, stats: dict[str, Any]) -> None:
        log.info("%s", message)

    if args.key:
        storage = open_storage(settings)
        runner = PromptJobRunner(settings, storage, registry, library)
        outcome = runner.run(args.key, spec_dict, state_id=job_id_for(JOB_KIND, args.key), progress=progress)
        log.info("%s", outcome.message)
        records = [json.loads(line) for line in ArtifactStore(storage).read_bytes(outcome.manifest, PROMPTS_FILE).decode().splitlines()]
        if args.out:
            _write(records, args.out)
        sys.stdout.write(f"{outcome.manifest.id}\n")
        return 0

    spec = resolve_spec(spec_dict, settings, library)
    backend = registry.backend(spec.backend)
    embedder = None
    if spec.embedding is not None:
        model, lock = registry.embedding_model(spec.embedding.model_source, spec.embedding.device)
        embedder = EmbeddingPool(model, lock=lock)
    gen = PromptGenerator(
        spec,
        backend,
        embedder=embedder,
        max_prompt_chars=settings.prompts_max_prompt_chars,
        on_round=lambda st, rep: log.info("request %d/%d: %d/%d accepted", st.next_request - 1, spec.budget, len(st.records), spec.count),
    )
    try:
        state = gen.run()
    finally:
        backend.close()
    log.info("stopped (%s): %d prompts accepted in %d requests, rejections %s", state.stop_reason, len(state.records), state.llm_requests, state.rejections)
    _write(state.records, args.out)
    return 0
