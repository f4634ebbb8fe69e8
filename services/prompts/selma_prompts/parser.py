"""Parse an LLM's numbered-list continuation into candidate prompts.

The LLM is shown examples ``1.`` to ``3.`` and asked to continue the list.  Real outputs are
messy, so this parser accepts:

* any numbering style: ``4.``, ``4)``, ``(4)``, ``4:``, ``#4``, ``**4.**``, ``4 -``, ``Prompt 4:``,
  bullets before the number, and numbering gaps or restarts (the number itself is not trusted);
* several items run together on one line (``4. A cat 5. A dog``) when the inline numbers count up;
* an item whose text starts on the line after its number, or wraps onto following lines;
* blank lines between items, and stray prose before, between or after them ("Sure! Here are…",
  "I hope this helps", headings ending in ``:``), which is dropped;
* Markdown emphasis and quotes around an item;
* a completion that starts mid-item (the completions API is prompted with a trailing ``4.``);
* output cut off by ``max_tokens``: the last, incomplete item is dropped.

Duplicates are kept: the diversity filter rejects a repeat as a ROUGE-L 1.0 match of its first
copy, which keeps that decision (and its lineage) in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A numbered line: optional bullet/emphasis/label, a number, a delimiter, then the text.
_ITEM_RE = re.compile(
    r"""^\s*
    (?:[-*•>+]\s+)?                                   # a bullet before the number
    (?:\*\*|__)?                                       # bold around the number
    (?:(?:prompt|description|caption|item|example|image)\s*)?   # "Prompt 4:"
    (?:\#\s*)?[(\[]?
    (?P<num>\d{1,4})
    \s*(?:[.)\]:]|\s-|\s–|\s—)                        # 4.  4)  (4)  [4]  4:  4 -
    (?:\*\*|__)?
    (?!\d)                                             # not a decimal such as 2.5
    \s*(?P<text>.*)$""",
    re.IGNORECASE | re.VERBOSE,
)
# A number inside a line that may start a further item: "... a cat. 5. A dog".
_INLINE_RE = re.compile(r"(?<!\S)(\d{1,4})[.)]\s+(?=\S)")
# Lines that are the model talking, not a description.
_PROSE_RE = re.compile(
    r"""^(?:here\b|sure\b|okay\b|ok\b|note\b|notes?:|i\s|i'|these\b|this\slist\b|let\sme\b|certainly\b|of\scourse\b|
    hope\b|feel\sfree\b|please\b|remember\b|in\ssummary\b|the\s(?:above|rules|examples)\b|rules?:|examples?:|
    \(?\s*note\b|continu)""",
    re.IGNORECASE | re.VERBOSE,
)
_QUOTES = "\"'“”‘’`"


@dataclass
class ParsedList:
    """Candidates parsed from one completion, in order, and what was thrown away."""

    items: list[str] = field(default_factory=list)
    empty_items: int = 0  # numbered entries with no text
    prose_lines: int = 0  # non-item lines dropped
    truncated_item: str | None = None  # the incomplete last item dropped after a max_tokens cut


def clean_item(text: str) -> str:
    """Normalise one item: collapse whitespace, strip Markdown emphasis and surrounding quotes."""
    text = " ".join(text.split())
    for _ in range(3):  # nested wrappers, e.g. **"text"**
        before = text
        for mark in ("**", "__"):
            if text.startswith(mark) and text.endswith(mark) and len(text) > 2 * len(mark):
                text = text[len(mark) : -len(mark)].strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
        if text == before:
            break
    return text


def _split_inline(number: int, text: str) -> list[str]:
    """Split ``text`` at inline numbers that continue the count from ``number``."""
    parts: list[str] = []
    start = 0
    expected = number + 1
    for m in _INLINE_RE.finditer(text):
        if int(m.group(1)) != expected or m.start() == 0:
            continue
        parts.append(text[start : m.start()])
        start = m.end()
        expected += 1
    parts.append(text[start:])
    return parts


def parse_numbered_list(text: str, *, starts_mid_item: bool = False, truncated: bool = False, first_number: int = 4) -> ParsedList:
    """Parse ``text`` (an LLM's continuation of a numbered list) into candidate prompts.

    ``starts_mid_item``: the text continues an item whose number was in the prompt (``…\\n4.``),
    so any text before the first numbered line is that item (numbered ``first_number``).
    ``truncated``: generation stopped at the token limit, so the last item is incomplete
    unless the text ends with a line break.
    """
    out = ParsedList()
    items: list[list[str]] = []  # each item: its text fragments
    current: list[str] | None = None
    blank_since_item = False
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for i, line in enumerate(lines):
        stripped = line.strip()
        if i == 0 and starts_mid_item and stripped and not _ITEM_RE.match(line):
            pieces = _split_inline(first_number, stripped)
            for piece in pieces[:-1]:
                items.append([piece])
            current = [pieces[-1]]
            items.append(current)
            continue
        if not stripped:
            blank_since_item = True
            continue
        m = _ITEM_RE.match(line)
        if m and m.group("text").strip() and _PROSE_RE.match(m.group("text").strip()) and int(m.group("num")) > 100:
            m = None  # "2024: here is..." is prose, not item 2024
        if m:
            pieces = _split_inline(int(m.group("num")), m.group("text").strip())
            for piece in pieces[:-1]:
                items.append([piece])
            current = [pieces[-1]]
            items.append(current)
            blank_since_item = False
            continue
        # An unnumbered line: the continuation of an item, or prose.
        if current is not None and _PROSE_RE.match(stripped) is None and not stripped.endswith(":"):
            if not blank_since_item or not "".join(current).strip():
                current.append(stripped)
                blank_since_item = False
                continue
        out.prose_lines += 1
        current = None
    if truncated and current is not None and items and items[-1] is current and not text.endswith("\n"):
        out.truncated_item = clean_item(" ".join(items.pop()))
    for fragments in items:
        item = clean_item(" ".join(fragments))
        if item:
            out.items.append(item)
        else:
            out.empty_items += 1
    return out
