"""Benchmark: the quickstart's prompt stage (five skills' jobs on the embedded SmolLM2) through the batching queue,
against the way it ran before the queue (jobs one after another, each in fixed rounds of 8 on ``generate``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prompts_stage_batched.py [--skillset examples/quickstart.yaml]
        [--repeats 3] [--warmup 1] [--round-size 8] [--max-batch 32] [--cache-dir DIR]

* **batched**: the five jobs run at once in threads (as ``selma run`` drives them and the prompt service runs
  them, up to ``prompts_max_concurrent_jobs``), each asking only for the prompts it still misses; their requests
  share one decode loop (``selma.llm.batching``).
* **serial (before)**: the jobs run one after another (one model lock, two job slots); every round is
  ``--round-size`` requests whatever is missing, sent as one Hugging Face ``generate`` call seeded once
  per round: the loop and ``LocalLmBackend`` as they were before the queue.

Both sides use the same SmolLM2 weights (loaded twice: the queue switches its copy's attention to the
packed per-row kernel).  The shared harness rotates the order per block and prints paired speed-ups.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from harness import compare  # noqa: E402

from selma.api import message_to_dict  # noqa: E402
from selma.app.skillset import load_skillset  # noqa: E402
from selma.llm.backend import LlmBackend, LlmRequest, LlmResponse  # noqa: E402
from selma.llm.local import ModelRegistry, _eos_ids  # noqa: E402
from selma.models.llm import load_smollm2  # noqa: E402
from selma_prompts.generator import GenerationState, PromptGenerator  # noqa: E402
from selma_prompts.settings import PromptSettings  # noqa: E402
from selma_prompts.skills import SkillLibrary  # noqa: E402
from selma_prompts.spec import GenerationSpec, resolve_spec  # noqa: E402


class FixedRoundGenerate(LlmBackend):
    """The local backend as it was before the batching queue: one ``generate`` per round of ``round_size`` rows."""

    kind = "embedded"
    model_name = "SmolLM2-135M-Instruct (fixed rounds)"

    def __init__(self, model: Any, tok: Any, queue_backend: Any, round_size: int) -> None:
        self.model, self.tok, self.render = model, tok, queue_backend.render
        self.sampling = queue_backend.sampling
        self.round_size = round_size
        self.lock = threading.Lock()

    def generate(self, requests: list[LlmRequest], *, cancel: Any = None) -> list[LlmResponse]:
        texts = [self.render(r) for r in requests]
        max_new = self.sampling.max_tokens
        with self.lock:
            torch.manual_seed(requests[0].seed)
            self.tok.truncation_side = "left"
            enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=8192 - max_new, add_special_tokens=False)
            with torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=self.sampling.temperature,
                                          top_p=self.sampling.top_p, pad_token_id=self.tok.pad_token_id)
        eos = _eos_ids(self.model, self.tok)
        responses = []
        for row in out[: len(requests), enc["input_ids"].shape[1]:]:
            gen = row.tolist()
            n = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
            responses.append(LlmResponse(text=self.tok.decode(gen[:n], skip_special_tokens=True), starts_mid_item=True,
                                         finish_reason="stop" if n < len(gen) or gen[-1] in eos else "length", completion_tokens=n))
        return responses


class FixedRounds(PromptGenerator):
    """The loop as it was before: every round is ``round_size`` requests, even when fewer prompts are missing."""

    def _requests(self, n: int) -> list[LlmRequest]:
        return super()._requests(min(self.backend.round_size, self.spec.budget - (self.state.next_request - 1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skillset", default="examples/quickstart.yaml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--round-size", type=int, default=8, help="llm_local_batch_size: requests per job round")
    p.add_argument("--max-batch", type=int, default=32, help="llm_local_max_batch: rows the queue decodes at once")
    p.add_argument("--cache-dir", default="", help="model cache holding the de-quantised SmolLM2 (default: selma's)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    ss = load_skillset(args.skillset)
    data = tempfile.mkdtemp(prefix="selma-bench-")
    overrides: dict[str, Any] = {"data_dir": data, "llm_local_batch_size": args.round_size, "llm_local_max_batch": args.max_batch}
    if args.cache_dir:
        overrides["model_cache_dir"] = args.cache_dir
    settings = PromptSettings(**overrides)
    library = SkillLibrary()
    specs: list[GenerationSpec] = [resolve_spec(message_to_dict(ss.prompt_spec(s)), settings, library) for s in ss.skills]
    registry = ModelRegistry(settings)
    t0 = time.perf_counter()
    queued = registry.backend(specs[0].backend)
    plain = load_smollm2(settings.resolved_model_cache_dir)
    plain.tokenizer.padding_side = "left"
    print(f"two SmolLM2 loads: {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}; "
          f"{len(specs)} jobs: {', '.join(f'{s.skill.name} x{s.count}' for s in specs)}")
    serial_backend = FixedRoundGenerate(plain.model, plain.tokenizer, queued, args.round_size)
    last: dict[str, list[GenerationState]] = {}

    def serial() -> None:
        last["serial (before)"] = [FixedRounds(s, serial_backend).run() for s in specs]

    def batched() -> None:
        states: list[GenerationState | None] = [None] * len(specs)

        def job(i: int) -> None:
            states[i] = PromptGenerator(specs[i], registry.backend(specs[i].backend)).run()

        threads = [threading.Thread(target=job, args=(i,)) for i in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last["batched (queue)"] = [s for s in states if s is not None]

    cmp = compare({"serial (before)": serial, "batched (queue)": batched}, baseline="serial (before)", repeats=args.repeats,
                  warmup=args.warmup, title=f"quickstart prompt stage ({args.skillset}): {len(specs)} jobs, seconds per stage")
    for side, states in last.items():
        requests = sum(s.llm_requests for s in states)
        accepted = sum(len(s.records) for s in states)
        tokens = sum(s.completion_tokens for s in states)
        cmp.notes.append(f"{side}, last block: {accepted} prompts accepted in {requests} requests, {tokens} completion tokens")
    cmp.notes.append(f"queue: round size {args.round_size} (capped by what a job misses), max batch {args.max_batch}, "
                     f"largest decode batch {queued.lm.queue.max_rows_seen}")
    cmp.print(unit="s", per="stage", speedup=True)


if __name__ == "__main__":
    main()
