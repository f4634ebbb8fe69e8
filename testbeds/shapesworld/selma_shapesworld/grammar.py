"""The ShapesWorld caption grammar as a prompt-loop "LLM" backend (``shapesworld_grammar``).

The prompt service's loop (selma_prompts.generator) sends each request a skill's rules and a few
in-context examples drawn from the pool and expects a numbered list of new descriptions.  In
ShapesWorld the "LLM" is the world's own grammar: :class:`GrammarBackend` reads the request's
examples back out of its text, parses each with :func:`selma_shapesworld.world.parse_caption`,
and writes ``n_prompts`` new captions of the same scene kinds (a "three blue squares" example
begets counts, a relation example relations, …), drawn from a generator seeded by the request
seed only — so the same request always gets the same answer, and the prompt loop stays
deterministic and resumable as with any seeded LLM.  ROUGE-L filtering then works as usual.

Size words ("a small red circle") appear with about the frequency the examples use them, but
at least :data:`MIN_SIZE_WORDS` of the time, which keeps the caption space of small kinds
(counts: 45 captions without sizes) large enough for a few hundred distinct prompts.

This module imports the prompt service's backend interface; the world itself does not.
"""

from __future__ import annotations

import re
import threading

import numpy as np

from selma.errors import InvalidArgument
from selma.llm.backend import LlmBackend, LlmRequest, LlmResponse
from selma_shapesworld.world import caption, parse_caption, sample_scene

KIND = "shapesworld_grammar"
MODEL_NAME = "shapesworld-grammar"
MIN_SIZE_WORDS = 0.25
# The examples block written by selma_prompts.templates.instruction: a header line, then "k. text".
_EXAMPLES_HEADER = "Image descriptions written this way:"
_ITEM = re.compile(r"^\s*(\d+)\.\s+(.*\S)\s*$")


def request_examples(req: LlmRequest) -> list[str]:
    """The in-context examples of a prompt-loop request, in order (read from its completion prompt)."""
    text = req.completion_prompt
    head, sep, tail = text.rpartition(_EXAMPLES_HEADER)
    if not sep:
        return []
    out = []
    for line in tail.splitlines():
        m = _ITEM.match(line)
        if m:
            out.append(m.group(2))
    return out


def grammar_captions(examples: list[str], n: int, seed: int) -> list[str]:
    """``n`` captions of the scene kinds of ``examples`` (ShapesWorld captions), deterministic from ``seed``.

    Examples outside the grammar are ignored; InvalidArgument when none is in it (the skill's
    seed examples must be ShapesWorld captions for this backend).
    """
    specs = []
    for e in examples:
        try:
            specs.append(parse_caption(e))
        except InvalidArgument:
            continue
    if not specs:
        raise InvalidArgument(
            "the shapesworld_grammar backend writes captions of the kind of its in-context examples, but none of them is a "
            f"ShapesWorld caption ({examples[:3]!r}); give the skill ShapesWorld seed examples such as 'three blue squares'",
            field="spec.backend.shapesworld_grammar",
        )
    with_sizes = sum(1 for s in specs if any(o.size for o in s.objects)) / len(specs)
    p_sizes = max(MIN_SIZE_WORDS, with_sizes)
    rng = np.random.default_rng([0x5E1A, seed])
    out = []
    for _ in range(n):
        spec = specs[int(rng.integers(len(specs)))]
        kwargs = {}
        if spec.kind == "multi":
            kwargs["n_objects"] = len(spec.objects) if rng.random() < 0.5 else int(rng.integers(2, 4))
        scene = sample_scene(rng, spec.kind, **kwargs)
        out.append(caption(scene, sizes=bool(rng.random() < p_sizes)))
    return out


class GrammarBackend(LlmBackend):
    """Answers prompt-loop requests with new captions from the ShapesWorld grammar (see the module docstring)."""

    kind = KIND
    model_name = MODEL_NAME
    round_size = 8

    def generate(self, requests: list[LlmRequest], *, cancel: threading.Event | None = None) -> list[LlmResponse]:
        out = []
        for req in requests:
            caps = grammar_captions(request_examples(req), req.n_prompts, req.seed)
            text = "\n".join(f"{req.first_number + i}. {c}" for i, c in enumerate(caps))
            out.append(LlmResponse(text=text, finish_reason="stop", starts_mid_item=False, completion_tokens=sum(len(c.split()) for c in caps)))
        return out
