"""The text sent to the LLM: the skill's rules and in-context examples as a numbered list to continue.

SELMA asks a completion model to continue a list whose first entries are the examples; the
model writes item ``k+1`` onward.  The same content is rendered three ways:

* ``completion_prompt``: the instruction, then the examples ``1.``…``k.`` and a dangling
  ``k+1.`` (OpenAI ``/v1/completions``, local models without a chat template);
* ``system`` + ``user``: a chat turn that asks to continue the list from ``k+1`` (chat APIs);
* a local chat model gets the chat turn with its answer pre-filled with ``k+1.``, which keeps a
  small model on the list instead of chatting about it.
"""

from __future__ import annotations

from selma.llm.backend import LlmRequest
from selma_prompts.skills import Skill

SYSTEM_PROMPT = (
    "You write image descriptions used to train text-to-image models. Every description is concrete, "
    "visual and different from the others, and you answer with a numbered list only."
)


def instruction(skill: Skill, examples: list[str], n_prompts: int) -> str:
    """Rules and examples as numbered lists (shared by every rendering)."""
    lines = [f"Write {n_prompts} new image descriptions for a text-to-image model, following these rules:"]
    lines += [f"{i}. {rule}" for i, rule in enumerate(skill.rules, 1)]
    lines += ["", "Image descriptions written this way:"]
    lines += [f"{i}. {text}" for i, text in enumerate(examples, 1)]
    return "\n".join(lines)


def build_request(index: int, seed: int, skill: Skill, example_ids: list[str], examples: list[str], n_prompts: int) -> LlmRequest:
    """The request for one LLM call with the given in-context examples."""
    body = instruction(skill, examples, n_prompts)
    first = len(examples) + 1
    user = (
        f"{body}\n\nContinue this list with {n_prompts} new descriptions, numbered {first} to {first + n_prompts - 1}, "
        "one per line. Do not repeat the examples and write nothing but the list."
    )
    return LlmRequest(
        index=index,
        seed=seed,
        example_ids=tuple(example_ids),
        completion_prompt=f"{body}\n{first}.",
        system=SYSTEM_PROMPT,
        user=user,
        first_number=first,
        n_prompts=n_prompts,
    )
