"""The local LLM's batching queue: concurrent jobs decoded together, each request's text independent of its companions,
a cancelled job leaving the batch while the others finish (tiny LM; the invariance also on SmolLM2)."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import REGISTRY

from selma.errors import Cancelled, InvalidArgument
from selma.llm.batching import DecodeRequest
from selma.llm.local import ModelRegistry
from selma.llm.specs import resolve_backend
from selma.models.llm import SMOLLM2_INSTALL_HINT, smollm2_available
from selma_prompts.generator import PromptGenerator
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import BUILTIN_SKILLS, SkillLibrary
from selma_prompts.spec import resolve_spec
from selma_prompts.templates import build_request

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def requests_for(seeds: list[int], skills: list[str]) -> list:
    """Requests of different lengths (skills and example counts differ) with the given seeds."""
    out = []
    for i, (seed, name) in enumerate(zip(seeds, skills, strict=True)):
        skill = BUILTIN_SKILLS[name]
        examples = list(skill.seed_examples)[: 1 + i % 3]
        out.append(build_request(i + 1, seed, skill, [f"seed-{j}" for j in range(len(examples))], examples, 5))
    return out


def concurrently(calls: dict[str, object]) -> dict[str, object]:
    """Run the zero-argument callables in threads at once; their results (or exceptions) by name."""
    results: dict[str, object] = {}
    start = threading.Barrier(len(calls))

    def run(name: str, call) -> None:  # noqa: ANN001
        start.wait()
        try:
            results[name] = call()
        except Exception as e:  # noqa: BLE001 - returned to the test
            results[name] = e

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def check_companion_invariance(backend) -> None:  # noqa: ANN001
    seeds = [11, 12, 13, 14, 15, 16]
    reqs = requests_for(seeds, ["general", "paragraph", "counting", "real_user", "commonsense_defying", "general"])
    solo = [backend.generate([r])[0].text for r in reqs]
    assert len(set(solo)) == len(solo)  # the seeds give different texts: the comparison below can fail
    assert [o.text for o in backend.generate(reqs)] == solo
    assert [o.text for o in backend.generate(reqs[::-1])][::-1] == solo
    # Three "jobs" submitting at once, so their rows share batches in whatever order they arrive.
    out = concurrently({k: (lambda k=k: [o.text for o in backend.generate(reqs[k::3])]) for k in range(3)})
    assert [out[i % 3][i // 3] for i in range(len(reqs))] == solo
    assert backend.lm.queue.max_rows_seen >= len(reqs)  # they really were decoded together


def test_a_request_gives_the_same_text_alone_and_batched_with_any_companions(tiny_models, tmp_path):
    settings = PromptSettings(data_dir=tmp_path, llm_local_max_batch=16, llm_local_max_wait_seconds=0.5)
    spec = resolve_backend({"local_causal_lm": {"model": {"source": str(tiny_models.lm)}, "sampling": {"max_tokens": 32}}}, settings)
    backend = ModelRegistry(settings).backend(spec)
    forwards = REGISTRY.get_sample_value("selma_llm_batch_rows_count") or 0.0
    check_companion_invariance(backend)
    assert REGISTRY.get_sample_value("selma_llm_batch_rows_count") - forwards == backend.lm.queue.steps  # one observation a forward
    # A different seed changes the text (each request samples from its own generator).
    (a,), (b,) = (backend.generate(requests_for([s], ["general"])) for s in (1, 2))
    assert a.text != b.text


@pytest.mark.skipif(not smollm2_available(), reason=f"SmolLM2 is not installed ({SMOLLM2_INSTALL_HINT})")
def test_smollm2_text_does_not_depend_on_batch_companions(tmp_path, tmp_path_factory):
    settings = PromptSettings(data_dir=tmp_path, model_cache_dir=tmp_path_factory.mktemp("smollm2-cache"),
                              llm_local_max_batch=16, llm_local_max_wait_seconds=0.5)
    backend = ModelRegistry(settings).backend(resolve_backend({"embedded": {"sampling": {"max_tokens": 16}}}, settings))
    check_companion_invariance(backend)


def test_a_cancelled_job_leaves_the_batch_and_the_others_finish(tiny_models, tmp_path):
    settings = PromptSettings(data_dir=tmp_path, llm_local_max_batch=8, llm_local_max_wait_seconds=0.5)
    spec = resolve_backend({"local_causal_lm": {"model": {"source": str(tiny_models.lm)}}}, settings)
    queue = ModelRegistry(settings).backend(spec).lm.queue
    # No end-of-sequence token: every row runs its full length, so the batch is still decoding at the cancel.
    def reqs(seeds: list[int], n: int) -> list[DecodeRequest]:
        return [DecodeRequest(input_ids=tuple(range(5 + s % 7, 20 + s % 5)), seed=s, max_new_tokens=n) for s in seeds]

    kept, doomed = reqs([1, 2, 3], 600), reqs([4, 5], 900)
    solo = queue.submit(kept)
    cancel = threading.Event()
    steps_before = queue.steps

    def cancel_once_both_decode():  # noqa: ANN202
        wait_until(lambda: queue.max_rows_seen == 5 and queue.steps > steps_before + 10)
        cancel.set()

    out = concurrently({
        "kept": lambda: queue.submit(kept),
        "doomed": lambda: queue.submit(doomed, cancel=cancel),
        "canceller": cancel_once_both_decode,
    })
    assert isinstance(out["doomed"], Cancelled)
    assert [r.tokens for r in out["kept"]] == [r.tokens for r in solo]
    assert all(len(r.tokens) == 600 and r.finish_reason == "length" for r in out["kept"])
    with pytest.raises(InvalidArgument, match="at least one prompt token"):
        queue.submit([DecodeRequest(input_ids=(), seed=1, max_new_tokens=4)])
    # The queue goes on serving.
    assert [r.tokens for r in queue.submit(kept[:1])] == [solo[0].tokens]


def test_concurrent_prompt_jobs_accept_the_prompts_each_accepts_alone(tiny_models, tmp_path):
    settings = PromptSettings(data_dir=tmp_path, llm_max_tokens=48, llm_local_batch_size=3, llm_local_max_wait_seconds=0.5)
    registry = ModelRegistry(settings)
    library = SkillLibrary()

    def job(skill: str, seed: int):  # noqa: ANN202
        spec = resolve_spec({"skill_name": skill, "count": 4, "seed": seed, "max_llm_requests": 6, "prompts_per_request": 4,
                             "rouge_l_threshold": 0.99, "backend": {"local_causal_lm": {"model": {"source": str(tiny_models.lm)}}}},
                            settings, library)
        state = PromptGenerator(spec, registry.backend(spec.backend)).run()
        return state.records, state.counters()

    jobs = {"a": ("counting", 1), "b": ("general", 2), "c": ("counting", 3)}
    alone = {k: job(*v) for k, v in jobs.items()}
    assert alone["a"][0] != alone["c"][0]
    together = concurrently({k: (lambda v=v: job(*v)) for k, v in jobs.items()})
    pair = concurrently({k: (lambda v=v: job(*v)) for k, v in jobs.items() if k != "b"})
    for k in jobs:
        assert together[k][0] == alone[k][0]
        assert together[k][1]["rejections"] == alone[k][1]["rejections"]
    assert pair["a"][0] == alone["a"][0] and pair["c"][0] == alone["c"][0]
