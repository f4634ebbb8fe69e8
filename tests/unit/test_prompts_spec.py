"""Skills, request validation (INVALID_ARGUMENT naming the field) and credential resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma.errors import InvalidArgument
from selma_prompts.settings import PromptSettings
from selma_prompts.skills import BUILTIN_SKILLS, SkillLibrary, load_skill_file, make_skill
from selma_prompts.spec import default_budget, resolve_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "skills"
OPENAI = {"openai_compatible": {"base_url": "http://127.0.0.1:9/v1", "model": "m"}}


@pytest.fixture
def settings(tmp_path: Path) -> PromptSettings:
    return PromptSettings(data_dir=tmp_path, prompts_max_count=1000, llm_default_backend="tiny_test", llm_allow_any_base_url=True)


def spec(settings: PromptSettings, **fields):
    return resolve_spec({"skill_name": "counting", "count": 10, **fields}, settings, SkillLibrary())


def field_of(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.field


def test_builtin_skills_are_the_five_selma_skills_and_valid():
    assert sorted(BUILTIN_SKILLS) == ["commonsense_defying", "counting", "general", "paragraph", "real_user"]
    for skill in BUILTIN_SKILLS.values():
        assert make_skill(skill.to_dict()) == skill
        assert len(skill.seed_examples) >= 3 and skill.rules
    library = SkillLibrary()
    assert library.get("whoops").name == "commonsense_defying"
    assert library.get("CountBench").name == "counting"
    assert library.get("localized-narratives").name == "paragraph"


def test_user_skills_load_from_yaml_files_and_directories():
    library = SkillLibrary([EXAMPLES])
    assert {"spatial", "text_rendering"} <= set(library.names())
    assert library.get("spatial").seed_examples[0].startswith("A red mug")
    assert [s.name for s in load_skill_file(EXAMPLES / "text_rendering.yaml")] == ["text_rendering"]


@pytest.mark.parametrize(
    ("skill", "field"),
    [
        ({"name": "x", "rules": ["r"], "seed_examples": ["a", "b"]}, "spec.skill.seed_examples"),
        ({"name": "x", "rules": [], "seed_examples": ["a", "b", "c"]}, "spec.skill.rules"),
        ({"name": "x", "seed_examples": ["a", "b", "c"]}, "spec.skill.rules"),
        ({"name": "x", "rules": ["  "], "seed_examples": ["a", "b", "c"]}, "spec.skill.rules[0]"),
        ({"name": "x", "rules": ["r"], "seed_examples": ["a", "", "c"]}, "spec.skill.seed_examples[1]"),
        ({"name": "Bad Name", "rules": ["r"], "seed_examples": ["a", "b", "c"]}, "spec.skill.name"),
    ],
)
def test_bad_inline_skills_name_the_field(settings, skill, field):
    with pytest.raises(InvalidArgument) as e:
        resolve_spec({"skill": skill, "count": 1}, settings, SkillLibrary())
    assert field_of(e) == field


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"rouge_l_threshold": 1.5}, "spec.rouge_l_threshold"),
        ({"rouge_l_threshold": -0.1}, "spec.rouge_l_threshold"),
        ({"rouge_l_threshold": float("nan")}, "spec.rouge_l_threshold"),
        ({"count": 0}, "spec.count"),
        ({"count": -3}, "spec.count"),
        ({"count": 1001}, "spec.count"),
        ({"skill_name": "juggling"}, "spec.skill_name"),
        ({"backend": {"quantum_llm": {}}}, "spec.backend"),
        ({"backend": {"embedded": {}, "tiny_test": {}}}, "spec.backend"),
        ({"backend": {"openai_compatible": {"model": "m"}}}, "spec.backend.openai_compatible.base_url"),
        ({"backend": {"openai_compatible": {"base_url": "ftp://x/v1", "model": "m"}}}, "spec.backend.openai_compatible.base_url"),
        ({"backend": {"openai_compatible": {"base_url": "http://u:p@h/v1", "model": "m"}}}, "spec.backend.openai_compatible.base_url"),
        ({"backend": {"openai_compatible": {"base_url": "http://h/v1"}}}, "spec.backend.openai_compatible.model"),
        ({"backend": {"openai_compatible": {**OPENAI["openai_compatible"], "extra_body": {"api_key": "sk"}}}}, "spec.backend.openai_compatible.extra_body"),
        ({"backend": {"openai_compatible": {**OPENAI["openai_compatible"], "extra_body": {"messages": []}}}}, "spec.backend.openai_compatible.extra_body"),
        ({"backend": {"openai_compatible": {**OPENAI["openai_compatible"], "api_key": {"name": "nope"}}}}, "spec.backend.openai_compatible.api_key.name"),
        ({"backend": {"openai_compatible": {**OPENAI["openai_compatible"], "max_retries": 11}}}, "spec.backend.openai_compatible.max_retries"),
        ({"backend": {"openai_compatible": {**OPENAI["openai_compatible"], "sampling": {"temperature": 3}}}}, "spec.backend.openai_compatible.sampling.temperature"),
        ({"backend": {"local_causal_lm": {}}}, "spec.backend.local_causal_lm.model.source"),
        ({"backend": {"embedded": {"device": {"device": "tpu"}}}}, "spec.backend.embedded.device.device"),
        ({"examples_per_request": 21}, "spec.examples_per_request"),
        ({"prompts_per_request": 101}, "spec.prompts_per_request"),
        ({"embedding_filter": {"max_cosine_similarity": 1.2}}, "spec.embedding_filter.max_cosine_similarity"),
        ({"run": "Not A Label"}, "spec.run"),
        ({"colour": "red"}, "spec"),
    ],
)
def test_invalid_specs_name_the_field(settings, fields, field):
    with pytest.raises(InvalidArgument) as e:
        spec(settings, **fields)
    assert field_of(e) == field, str(e.value)


def test_defaults_are_resolved(settings):
    s = spec(settings)
    assert (s.threshold, s.examples_per_request, s.prompts_per_request, s.seed) == (0.8, 3, 20, 0)
    assert s.budget == default_budget(10, 20) == 15
    assert s.backend.backend_model == "tiny_test:tiny-lm-seed0"
    s = spec(settings, rouge_l_threshold=1.0, max_llm_requests=7, seed="42", backend=OPENAI)
    assert (s.threshold, s.budget, s.seed) == (1.0, 7, 42)
    assert (s.backend.api, s.backend.max_concurrency, s.backend.max_retries, s.backend.request_timeout) == ("chat", 4, 3, 60.0)
    s = spec(settings, backend={"openai_compatible": {**OPENAI["openai_compatible"], "api": "OPEN_AI_API_COMPLETIONS", "request_timeout": "2.5s"}})
    assert (s.backend.api, s.backend.request_timeout) == ("completions", 2.5)
    assert s.embedding is None
    assert spec(settings, embedding_filter={}).embedding.max_cosine_similarity == 0.9


def test_preview_caps_the_count(settings):
    s = resolve_spec({"skill_name": "general", "count": 10_000}, settings, SkillLibrary(), max_count=50, preview=True)
    assert s.count == 50


def test_api_keys_resolve_from_settings_mounted_secrets_and_env(tmp_path, monkeypatch):
    (tmp_path / "secrets" / "vllm").mkdir(parents=True)
    (tmp_path / "secrets" / "vllm" / "api-key").write_text("from-file\n")
    (tmp_path / "secrets" / "vllm" / "other").write_text("other-file")
    monkeypatch.setenv("SELMA_LLM_SECRET_OLLAMA_KEY", "from-env")
    s = PromptSettings(
        data_dir=tmp_path,
        llm_openai_api_key="default-key",
        llm_api_keys={"openai": "from-settings"},
        llm_secrets_dir=tmp_path / "secrets",
    )
    assert s.api_key().get_secret_value() == "default-key"
    assert s.api_key("openai").get_secret_value() == "from-settings"
    assert s.api_key("vllm").get_secret_value() == "from-file"
    assert s.api_key("vllm", "other").get_secret_value() == "other-file"
    assert s.api_key("ollama", "key").get_secret_value() == "from-env"
    with pytest.raises(InvalidArgument) as e:
        s.api_key("s3")  # only the three documented places are searched
    assert "from" not in str(e.value)
    with pytest.raises(InvalidArgument):
        s.api_key("../etc")
    assert PromptSettings(data_dir=tmp_path).api_key() is None
    assert "default-key" not in repr(s) and "from-settings" not in str(s.safe_dump())
