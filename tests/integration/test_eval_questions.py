"""Question generation for new prompts through the prompt service's LLM backends.

A scripted OpenAI-compatible server answers each step (facts → dependencies → yes/no questions,
multiple choice) for each prompt; the tests check the items built from the answers, how
malformed answers are handled, retries, and that real local models (tiny LM, SmolLM2) run the
pipeline to a clean end.
"""

from __future__ import annotations

import re
import threading

import pytest

from selma.errors import Cancelled, FailedPrecondition, InvalidArgument
from selma_evaluation.questions import (
    QUESTION_MAX_TOKENS,
    QUESTION_TEMPERATURE,
    backend_from_spec,
    for_metric,
    generate_questions,
    has_inline_questions,
    numbered_lines,
    parse_choice_questions,
    parse_dependencies,
    parse_tuples,
    parse_yes_no_questions,
    prompts_from_records,
    questions_from_records,
    try_generate_questions,
)
from selma_evaluation.settings import EvaluationSettings
from selma_evaluation.types import Question
from selma_prompts.fake_llm import openai_answer

pytestmark = pytest.mark.integration

APPLE = {
    "facts": (
        "1. entity | apple\n2. attribute (color) | the apple is red\n3. entity | table\n"
        "4. relation (spatial) | the apple is on the table\n"
    ),
    "dependencies": "1. 0\n2. 1\n3. 0\n4. 1, 3\n",
    "questions": "1. Is there an apple?\n2. Is the apple red?\n3. Is there a table?\n4. Is the apple on the table?\n",
    "choices": (
        "1. Is there an apple? | yes; no | yes\n"
        "2. What color is the apple? | red; green; yellow | red\n"
        "3. Is there a table? | yes; no | yes\n"
        "4. Where is the apple? | on the table; under the table; next to the table | on the table\n"
    ),
}
DOGS = {
    "facts": "1. entity | dogs\n2. count | there are two dogs\n",
    "dependencies": "1. 0\n2. 1\n",
    "questions": "1. Are there dogs?\n2. Are there two dogs?\n",
    "choices": "1. Are there dogs? | yes; no | yes\n2. How many dogs are there? | one; two; three | two\n",
}
HEADERS = {"Dependencies:": "dependencies", "Yes/no questions:": "questions", "Multiple-choice questions:": "choices"}


def request_text(body: dict) -> str:
    return body.get("prompt") or "\n".join(m.get("content", "") for m in body.get("messages", []))


def step_of(body: dict) -> tuple[str, str]:
    """(prompt, step) of a question-generation request, read from its text."""
    task = request_text(body).split("Now you:")[-1]
    prompt = re.search(r"Description: (.+)", task).group(1).strip()
    step = next((s for h, s in HEADERS.items() if h in task), "facts")
    return prompt, step


def scripted(script: dict[str, dict[str, str]]):
    """A responder answering every (prompt, step) from ``script``; completions continue after "1."."""

    def respond(path: str, body: dict):
        prompt, step = step_of(body)
        text = script[prompt][step]
        if "prompt" in body:  # /v1/completions: the request ends with "1."
            text = text.split("1.", 1)[1]
        return 200, openai_answer(path, text)

    return respond


@pytest.fixture
def settings(tmp_path) -> EvaluationSettings:
    return EvaluationSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), llm_allow_any_base_url=True)


def fake_backend(llm, settings, api: str = "OPEN_AI_API_CHAT_COMPLETIONS", **extra):
    body = {"base_url": llm.base_url, "model": "fake", "api": api, "max_retries": 0, **extra}
    return backend_from_spec({"openai_compatible": body}, settings)


@pytest.mark.parametrize("api", ["OPEN_AI_API_CHAT_COMPLETIONS", "OPEN_AI_API_COMPLETIONS"])
def test_facts_dependencies_and_questions_become_items(llm, settings, api):
    llm.responder = scripted({"a red apple on a table": APPLE, "two dogs": DOGS})
    backend = fake_backend(llm, settings, api)
    try:
        items = generate_questions([("p0", "a red apple on a table", "spatial"), ("p1", "two dogs", "counting")], backend, seed=3)
    finally:
        backend.close()
    # One facts request per prompt, then dependencies + yes/no + multiple choice per prompt.
    assert len(llm.requests) == 2 + 2 * 3
    assert [i.id for i in items] == ["p0", "p1"]
    # Both kinds of question in one item, yes/no first; ids unique within the item.
    assert [q.id for q in items[0].questions] == ["1", "2", "3", "4", "mc1", "mc2", "mc3", "mc4"]
    apple = for_metric(items[0], "dsg")
    assert (apple.prompt, apple.category) == ("a red apple on a table", "spatial")
    assert [(q.id, q.text, q.parents) for q in apple.questions] == [
        ("1", "Is there an apple?", ()),
        ("2", "Is the apple red?", ("1",)),
        ("3", "Is there a table?", ()),
        ("4", "Is the apple on the table?", ("1", "3")),
    ]
    assert [(q.category, q.detail) for q in apple.questions] == [
        ("entity", "whole"), ("attribute", "color"), ("entity", "whole"), ("relation", "spatial"),
    ]
    assert apple.questions[1].tuple == "attribute - color (the apple is red)"
    assert all(q.choices == () and q.answer == "yes" for q in apple.questions)
    dogs_count = items[1].question("2")
    assert (dogs_count.category, dogs_count.detail, dogs_count.parents) == ("attribute", "count", ("1",))
    tifa_apple = for_metric(items[0], "tifa")
    assert tifa_apple.question("mc2").choices == ("red", "green", "yellow") and tifa_apple.question("mc2").answer == "red"
    assert tifa_apple.question("mc4").answer == "on the table" and tifa_apple.question("mc4").tuple == apple.question("4").tuple
    assert all(q.parents == () for q in tifa_apple.questions)
    assert items[1].question("mc2").answer == "two" and items[1].category == "counting"


def test_requests_carry_the_prompt_the_facts_and_question_sampling_defaults(llm, settings):
    llm.responder = scripted({"two dogs": DOGS})
    backend = fake_backend(llm, settings)
    assert backend.spec.sampling.temperature == QUESTION_TEMPERATURE and backend.spec.sampling.max_tokens == QUESTION_MAX_TOKENS
    generate_questions([("p1", "two dogs", "")], backend, tifa=False)
    backend.close()
    assert len(llm.requests) == 3  # facts, dependencies, questions: no multiple choice
    facts_req = llm.requests[0]  # the facts round comes first; the next round's requests arrive in any order
    deps_req = next(r for r in llm.requests if step_of(r)[1] == "dependencies")
    assert facts_req["temperature"] == QUESTION_TEMPERATURE and facts_req["max_tokens"] == QUESTION_MAX_TOKENS
    assert "Description: two dogs" in request_text(facts_req)
    assert "2. count | there are two dogs" in request_text(deps_req).split("Now you:")[-1]
    # Seeds differ per request and are a function of (seed, item, step): the same run asks the same.
    seeds = [r["seed"] for r in llm.requests]
    assert len(set(seeds)) == 3
    explicit = fake_backend(llm, settings, sampling={"temperature": 0.9, "max_tokens": 64})
    assert (explicit.spec.sampling.temperature, explicit.spec.sampling.max_tokens) == (0.9, 64)
    explicit.close()


def test_tifa_off_gives_yes_no_questions_only(llm, settings):
    llm.responder = scripted({"two dogs": DOGS})
    backend = fake_backend(llm, settings)
    items = generate_questions([("p1", "two dogs", "")], backend, tifa=False)
    backend.close()
    assert [q.id for q in items[0].questions] == ["1", "2"] and not any(q.choices for q in items[0].questions)
    assert for_metric(items[0], "tifa").questions == ()


MESSY = {
    # Markdown, a table row, a line in no format, a fact that copies the template's example,
    # an unknown kind, a repeated number (the model starting over).
    "facts": (
        "Sure! Here are the facts:\n"
        "- **1.** entity | cat\n"
        "2) attribute: the cat is black\n"
        "| 3 | entity | sofa |\n"
        "4. relation | the cat sleeps on the sofa\n"
        "5. the cat looks happy\n"
        "6. entity | wall\n"
        "7. feeling | the cat is happy\n"
        "1. entity | dog\n"
    ),
    # Dangling (9), self (3), forward (4 for 2) and example-only (6) ids are dropped.
    "dependencies": "1. 0\n2. 1, 9, 4\n3. 3\n4. 1, 3, 6\n",
    # Question 1 is empty and question 3 copies the example (not about its fact): both are dropped,
    # and their children inherit their parents (none), so 2 and 4 end up with no parents.
    "questions": "1.   \n2. Is the cat black\n3. Is the wall made of brick?\n4. entity | x | Is the cat sleeping on the sofa?\n",
    "choices": (
        "1. Is there a cat? | yes; no | maybe\n"  # answer not among the choices
        "2. What color is the cat? | (a) black; (b) white; (c) orange | (a) black\n"
        "3. Is there a sofa? | yes | yes\n"  # a single choice
        "4. Where is the cat? | Choices: on the sofa, under the sofa | Answer: on the sofa\n"
    ),
}


def test_malformed_answers_are_repaired_or_dropped_by_the_rules(llm, settings):
    llm.responder = scripted({"a black cat sleeping on a sofa": MESSY})
    backend = fake_backend(llm, settings)
    item = generate_questions([("c", "a black cat sleeping on a sofa", "")], backend)[0]
    backend.close()
    dsg = for_metric(item, "dsg")
    assert [(q.id, q.text, q.parents) for q in dsg.questions] == [
        ("2", "Is the cat black?", ()),
        ("4", "Is the cat sleeping on the sofa?", ()),
    ]
    tifa = for_metric(item, "tifa")
    assert [(q.id, q.choices, q.answer) for q in tifa.questions] == [
        ("mc2", ("black", "white", "orange"), "black"),
        ("mc4", ("on the sofa", "under the sofa"), "on the sofa"),
    ]


def test_parsers_on_their_own():
    assert numbered_lines("intro\n1. a\n 2 - b\n#3: c\n2. again") == [("1", "a"), ("2", "b"), ("3", "c")]
    tuples = parse_tuples("1. entity | dog\n2. count | two dogs\n3. entity | wall", "two dogs")
    assert [t.id for t in tuples] == ["1", "2"]  # "wall" is not in the prompt
    assert tuples[1].category == "attribute" and tuples[1].kind == "count"
    assert parse_tuples("1. dogs | entity", "dogs")[0].kind == "entity"  # swapped columns
    assert parse_dependencies("2. 2, 1\n1. 2", tuples) == {"1": (), "2": ("1",)}
    assert parse_yes_no_questions("1. Question: are there dogs\n2. |", tuples) == {"1": "are there dogs?"}
    assert parse_choice_questions("2. How many dogs? | 1; 2; 2; two | Two", tuples) == {"2": ("How many dogs?", ("1", "2"), "2")}


def test_a_prompt_fixed_by_the_retry_keeps_its_place(llm, settings):
    answers = {"count": 0}

    def flaky(path, body):
        prompt, step = step_of(body)
        if prompt == "two dogs" and step == "facts":
            answers["count"] += 1
            if answers["count"] == 1:
                return 200, openai_answer(path, "I cannot help with that.")
        return scripted({"a red apple on a table": APPLE, "two dogs": DOGS})(path, body)

    llm.responder = flaky
    backend = fake_backend(llm, settings)
    items = generate_questions([("p1", "two dogs", ""), ("p0", "a red apple on a table", "")], backend)
    backend.close()
    assert [i.id for i in items] == ["p1", "p0"] and answers["count"] == 2
    # The retry uses other seeds than the first attempt.
    facts_seeds = [r["seed"] for r in llm.requests if step_of(r) == ("two dogs", "facts")]
    assert len(set(facts_seeds)) == 2


def test_a_prompt_that_never_yields_questions_fails_naming_it(llm, settings):
    garbage = {"facts": "1. entity | dogs\n", "dependencies": "1. 0", "questions": "1. ???", "choices": "1. nonsense"}
    llm.responder = scripted({"two dogs": garbage, "a red apple on a table": APPLE})
    backend = fake_backend(llm, settings)
    prompts = [("p0", "a red apple on a table", ""), ("p1", "two dogs", "")]
    with pytest.raises(FailedPrecondition, match=r"p1 \('two dogs'\): no yes/no question") as err:
        generate_questions(prompts, backend, retries=1)
    assert "p0" not in str(err.value)
    # The non-raising form returns the rest and says why the others have none.
    result = try_generate_questions(prompts, backend, retries=0)
    backend.close()
    assert [i.id for i in result.items] == ["p0"] and list(result.failures) == ["p1"]
    assert "no yes/no question" in result.failures["p1"]


def test_answers_only_with_unparseable_multiple_choice_fail_in_tifa_mode(llm, settings):
    llm.responder = scripted({"two dogs": {**DOGS, "choices": "1. Are there dogs? | yes; no | perhaps"}})
    backend = fake_backend(llm, settings)
    with pytest.raises(FailedPrecondition, match="no valid multiple-choice question"):
        generate_questions([("p1", "two dogs", "")], backend, retries=0)
    assert generate_questions([("p1", "two dogs", "")], backend, tifa=False)[0].questions
    backend.close()


def test_cancel_stops_before_the_next_round(llm, settings):
    cancel = threading.Event()
    cancel.set()
    llm.responder = scripted({"two dogs": DOGS})
    backend = fake_backend(llm, settings)
    with pytest.raises(Cancelled):
        generate_questions([("p1", "two dogs", "")], backend, cancel=cancel)
    backend.close()
    assert llm.requests == []


def test_bad_prompts_and_backends_are_invalid_arguments(llm, settings):
    backend = fake_backend(llm, settings)
    with pytest.raises(InvalidArgument, match=r"prompts\[1\]\.id"):
        generate_questions([("a", "x y", ""), ("a", "z", "")], backend)
    with pytest.raises(InvalidArgument, match="empty"):
        generate_questions([("a", "  ", "")], backend)
    backend.close()
    with pytest.raises(InvalidArgument, match=r"spec\.question_backend"):
        backend_from_spec({"no_such_backend": {}}, settings)
    with pytest.raises(InvalidArgument, match=r"spec\.question_backend\.tiny_test\.seed"):
        backend_from_spec({"tiny_test": {"seed": -1}}, settings)


RECORDS = [
    {
        "id": "p000000",
        "index": 0,
        "text": "a red apple on a table",
        "skill": "spatial",
        "questions": [
            {"id": "1", "text": "Is there an apple?", "category": "entity"},
            {"id": "2", "text": "Is the apple red?", "parents": ["1"], "category": "attribute"},
            {"id": "3", "text": "What color is the apple?", "choices": ["red", "green"], "answer": "Red"},
        ],
    },
    {
        "id": "p000001",
        "index": 1,
        "text": "two dogs",
        "skill": "counting",
        "questions": [{"id": 1, "text": "How many dogs?", "choices": ["1", "2"], "answer": "2"}],
    },
]


def test_inline_questions_from_prompt_set_records():
    assert has_inline_questions(RECORDS) and not has_inline_questions([{"id": "x", "text": "y"}])
    assert prompts_from_records([{"id": "x", "text": "y", "skill": "s"}]) == [("x", "y", "s")]
    items = questions_from_records(RECORDS)
    assert [i.id for i in items] == ["p000000", "p000001"]
    assert for_metric(items[0], "dsg").questions == (
        Question(id="1", text="Is there an apple?", category="entity"),
        Question(id="2", text="Is the apple red?", parents=("1",), category="attribute"),
    )
    assert items[0].category == "spatial" and items[0].skill == "spatial"
    assert items[0].question("3").answer == "red" and items[0].question("3").choices == ("red", "green")
    assert items[1].question("1").choices == ("1", "2") and for_metric(items[1], "dsg").questions == ()
    assert questions_from_records(RECORDS[:1], category="heldout")[0].category == "heldout"


@pytest.mark.parametrize(
    ("questions", "match"),
    [
        ([{"id": "1", "text": "Is it?", "parents": ["7"]}], "unknown parent '7'"),
        ([{"id": "1", "text": "Is it?", "parents": ["1"]}], "itself"),
        (
            [{"id": "1", "text": "Color?", "choices": ["a", "b"], "answer": "a"}, {"id": "2", "text": "B?", "parents": ["1"]}],
            "multiple-choice",
        ),
        ([{"id": "1", "text": "A?", "parents": ["2"]}, {"id": "2", "text": "B?", "parents": ["1"]}], "cycle"),
        ([{"id": "1", "text": "A?"}, {"id": "1", "text": "B?"}], "twice"),
        ([{"id": "1", "text": "  "}], "text"),
        ([{"id": "1", "text": "Color?", "choices": ["red", "blue"], "answer": "green"}], "not one of the choices"),
        ([{"id": "1", "text": "Color?", "choices": ["red"], "answer": "red"}], "two distinct"),
        ([{"id": "1", "text": "Is it?", "answer": "no"}], "yes/no question"),
        ([{"id": "1", "text": "Is it?", "score": 1}], "unknown field"),
        ([], "no questions"),
    ],
)
def test_bad_inline_questions_name_the_record(questions, match):
    with pytest.raises(InvalidArgument, match=match) as err:
        questions_from_records([{"id": "p9", "text": "a thing", "questions": questions}])
    assert "p9" in str(err.value)


def test_duplicate_inline_records_are_rejected():
    with pytest.raises(InvalidArgument, match="twice"):
        questions_from_records([RECORDS[1], RECORDS[1]])


@pytest.mark.slow
def test_tiny_lm_backend_runs_the_pipeline_and_fails_cleanly(settings, tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    settings = settings.model_copy(update={"model_cache_dir": tmp_path_factory.mktemp("tiny-lm-cache")})
    backend = backend_from_spec({"tiny_test": {}}, settings)
    with pytest.raises(FailedPrecondition, match="tiny-lm-seed0") as err:
        generate_questions([("p0", "a red apple on a table", ""), ("p1", "two dogs", "")], backend)
    assert "p0" in str(err.value) and "p1" in str(err.value)


@pytest.mark.slow
def test_embedded_smollm2_writes_some_parseable_questions(settings, tmp_path_factory):
    from selma.models.llm import SMOLLM2_INSTALL_HINT, smollm2_available

    if not smollm2_available():
        pytest.skip(f"SmolLM2 is not installed ({SMOLLM2_INSTALL_HINT})")
    import torch

    torch.set_num_threads(1)
    settings = settings.model_copy(update={"model_cache_dir": tmp_path_factory.mktemp("smollm2-cache")})
    # Greedy and short: a 135M model is weak (it copies the worked example), so only check that
    # the pipeline runs end to end and that something it wrote survives the parsers' rules.
    backend = backend_from_spec({"embedded": {"sampling": {"temperature": 0, "max_tokens": 96}}}, settings)
    prompts = [("p0", "a red apple on a table", ""), ("p1", "two dogs", "")]
    result = try_generate_questions(prompts, backend, tifa=False, retries=0)
    assert set(result.failures) | {i.id for i in result.items} == {"p0", "p1"}
    assert result.items and all(item.questions for item in result.items)
    for item in result.items:
        for q in item.questions:
            assert q.text.endswith("?") and all(p in {x.id for x in item.questions} for p in q.parents)
