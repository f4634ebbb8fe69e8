"""``selma demo``: the whole SELMA loop on embedded defaults, in one command.

It starts the local stack (the four services as processes, ``file://`` storage under
``--dir``, the local training launcher, tiny offline models, the bundled small LLM), runs
the quickstart SkillSet through the gRPC services exactly as ``selma run`` does, generates
an image with the merged model, prints where everything is, and stops the stack.

``SELMA_DEMO_MAX_COUNT`` / ``SELMA_DEMO_MAX_STEPS`` cap the prompts per skill and the training
steps (CI uses them to keep the same command short); unset, the SkillSet is run as written.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from selma.app.local_stack import LocalStack, sigterm_interrupts
from selma.app.runner import Reporter, RunDriver, RunLock, RunState
from selma.app.skillset import load_skillset
from selma.client import SERVICE_NAMES, SERVICES, SelmaClient
from selma.errors import InvalidArgument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="start the local stack, run the quickstart SkillSet, generate an image, stop")
    p.add_argument("--dir", default=".selma/demo", help="working directory: storage, logs (default .selma/demo; models live in the shared per-user cache)")
    p.add_argument("--skillset", default="examples/quickstart.yaml", help="SkillSet to run (default examples/quickstart.yaml)")
    p.add_argument("--prompt", default="two red apples next to a blue cup", help="prompt for the final image")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of live progress bars")
    p.set_defaults(func=run_demo)


def _cap(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidArgument(f"{name} must be a positive integer; got {value!r}", field=name)
    return int(value)


def run_demo(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)  # long paths and URLs stay on one line in logs
    skillset = load_skillset(args.skillset)
    max_count, max_steps = _cap("SELMA_DEMO_MAX_COUNT"), _cap("SELMA_DEMO_MAX_STEPS")
    for skill in skillset.skills:
        if max_count:
            skill.count = min(skill.count, max_count)
    if max_steps and skillset.training_config.max_steps > max_steps:
        skillset.training_config.max_steps = max_steps
        skillset.training_config.checkpoint_every = min(skillset.training_config.checkpoint_every or max_steps, max_steps)

    root = Path(args.dir).resolve()
    stack = LocalStack(root)
    sigterm_interrupts()  # a SIGTERM stops the stack (in the finally below) as Ctrl-C does
    from selma.app.models_cli import ensure_smollm2
    from selma.config import SelmaSettings

    ensure_smollm2(SelmaSettings(data_dir=root).resolved_model_cache_dir, console)  # once per user, with a live line
    console.print(f"starting the local stack in {root} (the first start builds the tiny models into the shared model cache)")
    try:
        endpoints = stack.start()  # inside the try: a SIGTERM while the services start stops what started
        for name in SERVICES:
            sp = stack.processes[name]
            console.print(f"  {SERVICE_NAMES[name]:<26} grpc {sp.address}  metrics {sp.metrics_url}", highlight=False)
        runs_dir = root / "runs"
        with RunLock(runs_dir / f"{skillset.name}.lock"), SelmaClient(endpoints) as client:
            state = RunState.open(runs_dir, skillset)
            with Reporter(console, live=False if args.plain else None) as reporter:
                result = RunDriver(client, skillset, state, reporter).run_interruptible()
            image = next(iter(client.generate([args.prompt], model_name=result["model_name"], seed=0)))
        out = root / f"{result['model_name']}.png"
        out.write_bytes(image.image.png)
        console.print()
        console.print(f"merged model [bold]{result['model_name']}[/bold] = {result['merged_model']}", highlight=False)
        for skill, expert in result["experts"].items():
            console.print(f"  expert {skill:<22} {expert}", highlight=False)
        console.print(f"image         {out}  ({args.prompt!r}, seed {image.image.seed})", highlight=False)
        console.print(f"artifacts     {root / 'storage' / 'artifacts'}   (selma artifacts list --storage {(root / 'storage').as_uri()})", highlight=False)
        console.print(f"run state     {runs_dir / (skillset.name + '.json')}", highlight=False)
        console.print(f"service logs  {root / 'logs'}", highlight=False)
        console.print(f"next: `selma up --dir {root}` then `selma generate \"...\" --model {result['model_name']} --dir {root}`", highlight=False)
    finally:
        stack.stop()
    return 0
