"""Benchmark: prompts per second from the embedded LLM (SmolLM2-135M-Instruct), one request at a time
(as SELMA's script calls its LLM) vs batched rounds (llm_local_batch_size).

    .venv/bin/python benchmarks/prompts_llm_throughput.py [--count 16] [--batch-sizes 1 4 8] [--max-tokens 160]

Each configuration runs the full loop (sampling, generate, parse, ROUGE-L filter) until
``--count`` prompts are accepted, with the model already loaded; torch uses one thread
unless OMP_NUM_THREADS says otherwise.  The shared harness runs the batch sizes (warm-up
excluded, rotated order, paired speed-ups per block); notes give requests, tokens/s and the
acceptance rate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from harness import compare  # noqa: E402

from selma.llm.local import ModelRegistry  # noqa: E402
from selma_prompts.generator import PromptGenerator  # noqa: E402
from selma_prompts.settings import PromptSettings  # noqa: E402
from selma_prompts.skills import SkillLibrary  # noqa: E402
from selma_prompts.spec import resolve_spec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=16)
    p.add_argument("--skill", default="counting")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--prompts-per-request", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default="", help="model cache (the de-quantised SmolLM2); default a temp dir")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cache = args.cache_dir or tempfile.mkdtemp(prefix="selma-bench-")
    t0 = time.perf_counter()
    base = PromptSettings(data_dir=cache, model_cache_dir=cache)
    registry = ModelRegistry(base)
    spec_dict = {
        "skill_name": args.skill,
        "count": args.count,
        "prompts_per_request": args.prompts_per_request,
        "backend": {"embedded": {"sampling": {"max_tokens": args.max_tokens}}},
    }
    spec = resolve_spec(spec_dict, base, SkillLibrary())
    registry.causal_lm(spec.backend)
    print(f"SmolLM2 load (incl. any de-quantisation): {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    stats: dict[int, list[str]] = {}

    def run(bs: int) -> float:
        settings = base.model_copy(update={"llm_local_batch_size": bs})
        backend = _backend(registry, settings, spec)
        t0 = time.perf_counter()
        state = PromptGenerator(spec, backend).run()
        dt = time.perf_counter() - t0
        n = len(state.records)
        stats.setdefault(bs, []).append(f"{n} prompts, {state.llm_requests} requests, {state.completion_tokens / dt:.1f} tokens/s, "
                                        f"{100 * n / max(n + state.rejected, 1):.0f}% accepted")
        return dt / max(n, 1)  # seconds per accepted prompt

    sides = {f"batch {bs}": (lambda bs=bs: run(bs)) for bs in args.batch_sizes}
    cmp = compare(sides, baseline=f"batch {args.batch_sizes[0]}", repeats=args.repeats,
                  title=f"seconds per accepted prompt, {args.count} prompts per run, skill {args.skill}")
    for bs, lines in stats.items():
        cmp.notes.append(f"batch {bs}: last run {lines[-1]}")
    cmp.print(unit="s", per="prompt", speedup=True)

def _backend(registry: ModelRegistry, settings: PromptSettings, spec):  # noqa: ANN001, ANN202
    from selma.llm.local import LocalLmBackend

    lm = registry.causal_lm(spec.backend)
    return LocalLmBackend(spec.backend.kind, spec.backend.model_name, lm, spec.backend.sampling,
                          use_chat_template=None, batch_size=settings.llm_local_batch_size)


if __name__ == "__main__":
    main()
