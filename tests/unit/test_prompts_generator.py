"""The SELMA loop against scripted in-process backends: sampling, filtering, stopping, determinism."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from selma.llm.backend import LlmBackend, LlmRequest, LlmResponse
from selma.llm.embedding import EmbeddingPool, load_embedding_model
from selma_prompts.generator import STOP_BUDGET, STOP_TARGET, GenerationState, PromptGenerator
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import SkillLibrary
from selma_prompts.spec import resolve_spec

WORDS = "apple bicycle cactus drum eagle fork guitar hammer igloo jar kettle lemon magnet needle onion parrot quilt".split()


class ScriptedBackend(LlmBackend):
    """Answers each request with ``answer(request)``; records every request."""

    kind = "scripted"
    model_name = "script"

    def __init__(self, answer, round_size: int = 1) -> None:
        self.answer = answer
        self.round_size = round_size
        self.requests: list[LlmRequest] = []

    def generate(self, requests, *, cancel=None):
        self.requests.extend(requests)
        return [LlmResponse(text=self.answer(r), starts_mid_item=False) for r in requests]


def varied(req: LlmRequest) -> str:
    """Distinct prompts derived from the request number (deterministic)."""
    i = req.index
    return "\n".join(
        f"{req.first_number + j}. One {WORDS[(i + j) % len(WORDS)]} beside two {WORDS[(3 * i + 5 * j + 1) % len(WORDS)]}s near a {WORDS[(7 * i + j) % len(WORDS)]} {i}-{j}."
        for j in range(req.n_prompts)
    )


@pytest.fixture
def settings(tmp_path: Path) -> PromptSettings:
    return PromptSettings(data_dir=tmp_path, llm_default_backend="tiny_test")


def make_spec(settings, **fields):
    return resolve_spec({"skill_name": "counting", "count": 12, "prompts_per_request": 4, **fields}, settings, SkillLibrary())


def test_each_request_carries_rules_and_examples_sampled_from_the_growing_pool(settings):
    spec = make_spec(settings)
    backend = ScriptedBackend(varied)
    state = PromptGenerator(spec, backend).run()
    assert state.stop_reason == STOP_TARGET and len(state.records) == 12
    pool_so_far = {f"seed-{i}" for i in range(3)}
    accepted_by_request: dict[int, list[str]] = {}
    for rec in state.records:
        accepted_by_request.setdefault(rec["llm_request_index"], []).append(rec["id"])
    for req in backend.requests:
        assert len(req.example_ids) == 3 and len(set(req.example_ids)) == 3
        assert set(req.example_ids) <= pool_so_far
        for rule in spec.skill.rules:
            assert rule in req.user and rule in req.completion_prompt
        examples = re.findall(r"^\d+\. (.+)$", req.completion_prompt.split("written this way:")[1], flags=re.M)
        assert len(examples) == 3
        pool_so_far |= set(accepted_by_request.get(req.index, []))
    # Later requests drew on accepted prompts, not just the seeds.
    assert any(not i.startswith("seed-") for r in backend.requests for i in r.example_ids)
    # Lineage: ids are index-based, nearest prompts come from the pool at acceptance time.
    assert [r["id"] for r in state.records] == [f"p{i:06d}" for i in range(12)]
    seen = {f"seed-{i}" for i in range(3)}
    for rec in state.records:
        assert rec["nearest_prompt_id"] in seen and 0 <= rec["nearest_rouge_l"] <= 0.8
        assert rec["backend_model"] == "scripted:script"
        seen.add(rec["id"])


def test_same_seed_same_prompt_set_and_other_seed_other_sampling(settings):
    runs = [PromptGenerator(make_spec(settings, seed=s), ScriptedBackend(varied)).run().records for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert [r["in_context_example_ids"] for r in runs[0]] != [r["in_context_example_ids"] for r in runs[2]]


def test_resuming_from_a_saved_state_gives_the_uninterrupted_result(settings):
    spec = make_spec(settings, count=20)
    full = PromptGenerator(spec, ScriptedBackend(varied, round_size=2)).run()
    saved: list[GenerationState] = []

    class Stop(Exception):
        pass

    def on_round(st, report):
        if st.next_request == 5:
            saved.append(GenerationState.from_parts(st.counters(), [dict(r) for r in st.records]))
            raise Stop

    with pytest.raises(Stop):
        PromptGenerator(spec, ScriptedBackend(varied, round_size=2), on_round=on_round).run()
    resumed = PromptGenerator(spec, ScriptedBackend(varied, round_size=2), state=saved[0]).run()
    assert resumed.records == full.records
    assert resumed.llm_requests == full.llm_requests


def test_stops_exactly_at_count(settings):
    state = PromptGenerator(make_spec(settings, count=5, prompts_per_request=20), ScriptedBackend(varied)).run()
    assert len(state.records) == 5 and state.llm_requests == 1


def test_an_llm_repeating_the_pool_stops_at_the_request_budget(settings):
    def parrot(req: LlmRequest) -> str:
        seeds = make_spec(settings).skill.seed_examples
        return "\n".join(f"{i + 4}. {s.upper()}" for i, s in enumerate(seeds))

    spec = make_spec(settings, max_llm_requests=6)
    backend = ScriptedBackend(parrot, round_size=4)
    state = PromptGenerator(spec, backend).run()
    assert state.stop_reason == STOP_BUDGET
    assert len(backend.requests) == 6 and state.llm_requests == 6
    assert state.records == [] and state.rejections["rouge_l"] == 18


def test_rejection_reasons(settings):
    long_text = "a very long description " * 60
    answer = "\n".join(
        [
            "4. One apple beside two forks on a wooden table.",
            "5. One apple beside two forks on a wooden table!",  # exact token repeat of 4
            "6. ???",  # no ROUGE tokens
            f"7. {long_text}",
            "8. Never count more than three of any object.",  # echoes a rule
            "9.",
        ]
    )
    rejected: list[dict] = []
    spec = make_spec(settings, count=2, max_llm_requests=1)
    state = PromptGenerator(spec, ScriptedBackend(lambda r: answer), rejected_sink=rejected).run()
    assert [r["text"] for r in state.records] == ["One apple beside two forks on a wooden table."]
    assert state.rejections == {"rouge_l": 2, "embedding": 0, "empty": 2, "too_long": 1}
    by_reason = {(r["reason"], r["nearest_prompt_id"]) for r in rejected}
    assert ("rouge_l", "p000000") in by_reason and ("rouge_l", "rule-2") in by_reason
    # An empty answer counts as one EMPTY rejection.
    state = PromptGenerator(make_spec(settings, max_llm_requests=2), ScriptedBackend(lambda r: "")).run()
    assert state.rejections["empty"] == 2


def test_exact_repeats_are_rejected_even_at_threshold_one(settings):
    answer = "4. One owl on a branch.\n5. one owl, on a branch\n6. One owl on a branch at night."
    state = PromptGenerator(make_spec(settings, rouge_l_threshold=1.0, max_llm_requests=1), ScriptedBackend(lambda r: answer)).run()
    assert [r["text"] for r in state.records] == ["One owl on a branch.", "One owl on a branch at night."]


def test_cancellation_is_checked_between_rounds(settings):
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("cancelled")

    gen = PromptGenerator(make_spec(settings, count=100), ScriptedBackend(varied), check_cancelled=check)
    with pytest.raises(RuntimeError):
        gen.run()
    assert gen.state.next_request == 3 and len(gen.state.records) > 0


@pytest.mark.slow
def test_embedding_filter_rejects_paraphrases_rouge_misses(settings):
    model = load_embedding_model("", device="cpu")
    answer = "4. A puppy asleep on the sofa.\n5. A small dog sleeping on a couch.\n6. A lighthouse on a rocky coast at dusk."
    spec = make_spec(settings, count=3, max_llm_requests=1, embedding_filter={"max_cosine_similarity": 0.6})
    rejected: list[dict] = []
    state = PromptGenerator(spec, ScriptedBackend(lambda r: answer), embedder=EmbeddingPool(model, lock=threading.Lock()), rejected_sink=rejected).run()
    assert [r["text"] for r in state.records] == ["A puppy asleep on the sofa.", "A lighthouse on a rocky coast at dusk."]
    assert rejected[0]["reason"] == "embedding" and rejected[0]["nearest_prompt_id"] == "p000000" and rejected[0]["score"] > 0.6
    assert all(0 <= r["nearest_cosine_similarity"] <= 1 for r in state.records)


def test_round_sizes_follow_what_is_still_missing(settings):
    """A round asks for one request per missing prompt, never more than the backend's round size or the budget."""

    def every_other(req: LlmRequest) -> str:  # even requests give one new prompt, odd ones repeat a seed example
        if req.index % 2:
            return f"{req.first_number}. {make_spec(settings).skill.seed_examples[0]}"
        return f"{req.first_number}. One {WORDS[req.index % len(WORDS)]} beside {req.index} small {WORDS[(3 * req.index) % len(WORDS)]}s."

    sizes: list[int] = []
    spec = make_spec(settings, count=6, prompts_per_request=1)
    state = PromptGenerator(spec, ScriptedBackend(every_other, round_size=8), on_round=lambda st, rep: sizes.append(len(rep.requests))).run()
    assert state.stop_reason == STOP_TARGET and len(state.records) == 6
    assert sizes == [6, 3, 2, 1]  # 6 missing; 3 accepted of 6; 1 of 3 → 2 missing; 1 of 2; the last one
    capped: list[int] = []
    PromptGenerator(make_spec(settings, count=20, prompts_per_request=1, max_llm_requests=11), ScriptedBackend(every_other, round_size=8),
                    on_round=lambda st, rep: capped.append(len(rep.requests))).run()
    assert capped == [8, 3]  # the round size, then what is left of the budget
