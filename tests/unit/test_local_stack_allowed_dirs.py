"""`selma up` hands its services SELMA_MODEL_ALLOWED_DIRS: --allow-model-dir, the base model's own directory, the caller's."""

from __future__ import annotations

import argparse

from selma import plugins
from selma.app.local_stack import LocalStack, register
from selma.config import SelmaSettings


def allowed(stack: LocalStack) -> list[str]:
    env = stack.env_for("render", 1, 2)
    value = env.get("SELMA_MODEL_ALLOWED_DIRS", "")
    SelmaSettings(model_allowed_dirs=value)  # what the service will parse
    return [d for d in value.split(",") if d]


def test_the_embedded_stack_allows_no_local_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SELMA_MODEL_ALLOWED_DIRS", raising=False)
    assert allowed(LocalStack(tmp_path / "stack")) == []
    assert allowed(LocalStack(tmp_path / "stack", base_model="stabilityai/stable-diffusion-2")) == []


def test_allow_model_dir_options_and_a_local_base_model_are_allowed_and_merged_with_the_callers(tmp_path, monkeypatch):
    monkeypatch.setenv("SELMA_MODEL_ALLOWED_DIRS", "/srv/models")
    (tmp_path / "mine").mkdir()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["up", "--allow-model-dir", str(tmp_path / "mine"), "--allow-model-dir", str(tmp_path / "more")])
    stack = LocalStack(tmp_path / "stack", base_model=str(tmp_path / "base"), allow_model_dirs=tuple(args.allow_model_dir))
    assert allowed(stack) == ["/srv/models", str((tmp_path / "mine").resolve()), str((tmp_path / "more").resolve()),
                              str((tmp_path / "base").resolve())]


def test_a_plugin_scheme_base_model_allows_the_directory_it_resolves_to(tmp_path, monkeypatch):
    monkeypatch.delenv("SELMA_MODEL_ALLOWED_DIRS", raising=False)
    reg = plugins.Registry()
    reg.add_model_scheme("bundled", lambda source: tmp_path / "weights" / source.removeprefix("bundled://"))
    with plugins.use_registry(reg):
        assert allowed(LocalStack(tmp_path / "stack", base_model="bundled://base")) == [str((tmp_path / "weights" / "base").resolve())]


def test_extra_env_dirs_are_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("SELMA_MODEL_ALLOWED_DIRS", raising=False)
    stack = LocalStack(tmp_path / "stack", extra_env={"SELMA_MODEL_ALLOWED_DIRS": "/a,/b"}, allow_model_dirs=("/c",))
    assert allowed(stack) == ["/a", "/b", "/c"]


def test_the_single_user_stack_lets_its_user_name_any_llm_or_vqa_endpoint_unless_they_say_otherwise(tmp_path, monkeypatch):
    """`selma up` is one user's loopback stack: a SkillSet may point prompts and evaluation at the user's own
    vLLM/Ollama; the services' own default (and the chart) keeps the allow-list."""
    from selma_evaluation.settings import EvaluationSettings
    from selma_prompts.settings import PromptSettings

    for var in ("SELMA_LLM_ALLOW_ANY_BASE_URL", "SELMA_EVAL_ALLOW_ANY_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    stack = LocalStack(tmp_path / "stack")
    prompts, training = stack.env_for("prompts", 1, 2), stack.env_for("training", 3, 4)
    assert "SELMA_LLM_ALLOW_ANY_BASE_URL" not in stack.env_for("serving", 5, 6)
    monkeypatch.setattr("os.environ", prompts)
    assert PromptSettings().llm_allow_any_base_url is True
    monkeypatch.setattr("os.environ", training)
    assert EvaluationSettings().eval_allow_any_base_url is True and EvaluationSettings().llm_allow_any_base_url is True
    monkeypatch.undo()
    monkeypatch.setenv("SELMA_LLM_ALLOW_ANY_BASE_URL", "false")  # the user's own setting wins
    assert stack.env_for("prompts", 1, 2)["SELMA_LLM_ALLOW_ANY_BASE_URL"] == "false"
