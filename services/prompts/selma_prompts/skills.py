"""Skills: what a prompt set teaches, as rules for the LLM plus seed examples (SELMA §1).

A skill is a name, a one-line description, a numbered list of rules and at least three seed
prompts in the target style; the seeds start the in-context pool.  Five skills are built in,
one per SELMA source dataset (written for selma, in the style of each dataset, not copied):

==================  ==========================  ==================================================
name                SELMA dataset               style
==================  ==========================  ==================================================
general             COCO                        one plain sentence about an everyday scene
paragraph           Localized Narratives        2-3 sentences narrating a photo region by region
real_user           DiffusionDB                 a subject plus comma-separated style keywords
counting            CountBench                  counts of objects, never more than three
commonsense_defying Whoops                      a clear scene that breaks common sense
==================  ==========================  ==================================================

The SELMA dataset names (``coco``, ``localized_narratives``, ``diffusiondb``, ``countbench``,
``whoops``) are accepted as aliases.  More skills load from YAML files (see
``examples/skills/``): one mapping with ``name``, ``description``, ``rules`` and
``seed_examples``, or a mapping ``skills:`` holding a list of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from selma.errors import InvalidArgument

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MIN_SEEDS = 3
MAX_RULES = 20
MAX_SEEDS = 1000
MAX_TEXT_CHARS = 2000

# Rule shared by the SELMA skills: say which visual skill each description exercises.
_SKILL_LIST = (
    "Each description exercises one of these abilities: spatial relations, counting, animals, people, "
    "objects, places, activities, colors, attributes, food, materials or shapes; vary which one."
)
_DIVERSE_OBJECTS = "Draw on a wide range of everyday objects, and do not reuse the subjects of the examples."


class Skill(BaseModel):
    """A validated skill definition (mirrors ``selma.v1.Skill``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    rules: tuple[str, ...]
    seed_examples: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "rules": list(self.rules),
            "seed_examples": list(self.seed_examples),
        }


def make_skill(data: Mapping[str, Any], *, field: str = "skill") -> Skill:
    """Validate a skill given as a mapping (inline request, YAML); InvalidArgument names the bad field.

    Rules and seeds are stripped; blank entries are errors rather than silently dropped, so a
    user sees a typo instead of a skill with fewer rules than they wrote.
    """
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"a skill must be a mapping with name, rules and seed_examples; got {type(data).__name__}", field=field)
    unknown = set(data) - {"name", "description", "rules", "seed_examples"}
    if unknown:
        raise InvalidArgument(
            f"unknown skill keys {sorted(unknown)}; a skill has name, description, rules and seed_examples", field=field
        )
    name = data.get("name", "")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"skill name {name!r} is not valid: use 1-63 characters of lower_snake_case starting with a letter, e.g. 'counting'",
            field=f"{field}.name",
        )
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise InvalidArgument("description must be a string", field=f"{field}.description")
    rules = _texts(data.get("rules"), field=f"{field}.rules", what="rule")
    if not rules:
        raise InvalidArgument("a skill needs at least one non-empty rule for the LLM", field=f"{field}.rules")
    if len(rules) > MAX_RULES:
        raise InvalidArgument(f"at most {MAX_RULES} rules; got {len(rules)}", field=f"{field}.rules")
    seeds = _texts(data.get("seed_examples"), field=f"{field}.seed_examples", what="seed example")
    if len(seeds) < MIN_SEEDS:
        raise InvalidArgument(
            f"a skill needs at least {MIN_SEEDS} seed examples (they seed the in-context pool); got {len(seeds)}",
            field=f"{field}.seed_examples",
        )
    if len(seeds) > MAX_SEEDS:
        raise InvalidArgument(f"at most {MAX_SEEDS} seed examples; got {len(seeds)}", field=f"{field}.seed_examples")
    return Skill(name=name, description=description.strip(), rules=rules, seed_examples=seeds)


def _texts(value: Any, *, field: str, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidArgument(f"{field.rsplit('.', 1)[-1]} must be a list of strings", field=field)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise InvalidArgument(f"{what} {i + 1} is empty; remove it or write it out", field=f"{field}[{i}]")
        text = " ".join(item.split())
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"{what} {i + 1} is longer than {MAX_TEXT_CHARS} characters", field=f"{field}[{i}]")
        out.append(text)
    return tuple(out)


BUILTIN_SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill(
            name="general",
            description="Everyday scenes in one plain sentence, like COCO captions.",
            rules=(
                _SKILL_LIST,
                "Write one plain sentence of fewer than 30 words, as a person would caption a photo.",
                _DIVERSE_OBJECTS,
                "Vary the sentence structure and the setting from one description to the next.",
            ),
            seed_examples=(
                "A brown dog lying on a striped rug next to a pair of muddy sneakers.",
                "Two cyclists waiting at a red light on a wet city street.",
                "A wooden kitchen table with a bowl of oranges and a glass of milk.",
            ),
        ),
        Skill(
            name="paragraph",
            description="Paragraph-length narrations of a photo, region by region, like Localized Narratives.",
            rules=(
                _SKILL_LIST,
                "Write two or three sentences, fewer than 50 words in all, as if describing a photo aloud to someone.",
                "Say where things are: in front, behind, on the left, on the right, at the top or bottom of the picture.",
                _DIVERSE_OBJECTS,
            ),
            seed_examples=(
                "In this picture we can see a small fishing boat tied to a pier. Behind it there are pine trees "
                "and a white house, and at the top the sky is cloudy.",
                "This image shows a bakery counter. On the left there are loaves of bread in baskets, and on the "
                "right a woman in an apron is holding a tray of croissants.",
                "Here a boy is sitting on a bench and reading a comic book. Beside him there is a red backpack, "
                "and in the background we can see a fountain and some pigeons.",
            ),
        ),
        Skill(
            name="real_user",
            description="Prompts the way people type them into image generators, like DiffusionDB.",
            rules=(
                _SKILL_LIST,
                "Start with the subject, then add comma-separated details about medium, style, lighting, color or mood.",
                "Describe the image in detail, in fewer than 50 words.",
                _DIVERSE_OBJECTS,
            ),
            seed_examples=(
                "a lighthouse on a rocky cliff at sunset, dramatic clouds, oil painting, warm colors, highly detailed",
                "portrait of an old fisherman with a grey beard, soft window light, 85mm photograph, sharp focus",
                "cozy reading nook with a cat asleep on a pile of books, watercolor illustration, pastel palette",
            ),
        ),
        Skill(
            name="counting",
            description="Scenes that state how many of each object there are, at most three, like CountBench.",
            rules=(
                "Each description states how many of some object are in the scene, with the words one, two or three.",
                "Never count more than three of any object.",
                "Write one sentence of fewer than 30 words.",
                _DIVERSE_OBJECTS,
            ),
            seed_examples=(
                "Three red apples on a white plate.",
                "Two children flying one kite in a grassy park.",
                "A desk with one laptop and two coffee mugs.",
            ),
        ),
        Skill(
            name="commonsense_defying",
            description="Clear, concrete scenes that break common sense, like Whoops.",
            rules=(
                _SKILL_LIST,
                "Each description combines things in a way that defies common sense, yet is easy to picture.",
                "Write one sentence of fewer than 30 words.",
                _DIVERSE_OBJECTS,
            ),
            seed_examples=(
                "A penguin sunbathing on a beach chair in the middle of a sandy desert.",
                "A snowman standing next to a roaring campfire without melting.",
                "A small child lifting a car over his head with one hand.",
            ),
        ),
    )
}

# SELMA's dataset names for the built-in skills.
ALIASES: dict[str, str] = {
    "coco": "general",
    "localized_narratives": "paragraph",
    "localized_narrative": "paragraph",
    "diffusiondb": "real_user",
    "countbench": "counting",
    "whoops": "commonsense_defying",
}


def load_skill_file(path: str | Path) -> list[Skill]:
    """Skills defined in one YAML file (one skill, or ``skills: [...]``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InvalidArgument(f"cannot read skill file {path}: {e.strerror}", field="skill_file") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"skill file {path} is not valid YAML: {e}", field="skill_file") from None
    items = data.get("skills") if isinstance(data, Mapping) and "skills" in data else [data]
    if not isinstance(items, list):
        raise InvalidArgument(f"{path}: 'skills' must be a list of skills", field="skill_file")
    return [make_skill(item, field=f"{path.name}: skills[{i}]" if len(items) > 1 else path.name) for i, item in enumerate(items)]


class SkillLibrary:
    """The built-in skills plus user skills from YAML files and directories, looked up by name."""

    def __init__(self, paths: Iterable[str | Path] = ()) -> None:
        self._skills: dict[str, Skill] = dict(BUILTIN_SKILLS)
        for p in paths:
            p = Path(p)
            files = sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p]
            for f in files:
                for skill in load_skill_file(f):
                    if skill.name in self._skills:
                        log.warning("skill %r from %s replaces the one defined earlier", skill.name, f)
                    self._skills[skill.name] = skill

    def get(self, name: str, *, field: str = "skill_name") -> Skill:
        """The skill called ``name`` (or a SELMA dataset alias); InvalidArgument listing the names otherwise."""
        key = (name or "").strip().lower().replace("-", "_")
        skill = self._skills.get(key) or self._skills.get(ALIASES.get(key, ""))
        if skill is None:
            raise InvalidArgument(f"unknown skill {name!r}; use one of {', '.join(self.names())}, or give the skill inline", field=field)
        return skill

    def names(self) -> list[str]:
        return sorted(self._skills)

    def all(self) -> list[Skill]:
        return [self._skills[n] for n in self.names()]
