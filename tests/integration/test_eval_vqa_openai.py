"""The openai_compatible VQA backend against a scripted vision chat server on 127.0.0.1.

The server is the prompt service's scripted OpenAI-compatible server (the ``llm`` fixture)
with a responder that decodes the image from the request and answers from its pixels.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from selma.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from selma_evaluation.settings import EvaluationSettings
from selma_evaluation.vqa import VqaQuery, build_vqa, is_yes
from selma_prompts.fake_llm import openai_answer

COLORS = {(255, 0, 0): "red", (0, 0, 255): "blue", (0, 128, 0): "green", (255, 255, 0): "yellow"}
KEY = "sk-test-0123456789-secret"


def _settings(tmp_path: Path, **kw: Any) -> EvaluationSettings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path / "data",
        storage_uri=(tmp_path / "storage").as_uri(),
        eval_vqa_retry_backoff_seconds=0.01,
        eval_vqa_retry_max_backoff_seconds=0.05,
        eval_allow_any_base_url=True,  # the fake endpoint's port is picked per test
    )
    values.update(kw)
    return EvaluationSettings(**values)


def _backend(llm, **kw: Any) -> dict[str, Any]:
    return {"openai_compatible": {"base_url": llm.base_url, "model": "qwen2-vl", **kw}}


def _image(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (16, 12), color)


def _parts(body: dict[str, Any]) -> tuple[Image.Image, str]:
    """The image and the text of a vision chat request (asserting the expected shape)."""
    (message,) = body["messages"]
    assert message["role"] == "user"
    image_part, text_part = message["content"]
    assert image_part["type"] == "image_url" and text_part["type"] == "text"
    url = image_part["image_url"]["url"]
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :]))), text_part["text"]


def vision_responder(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """Answers from the image: "yes, <color>" to yes/no questions, "<color>" otherwise."""
    image, text = _parts(body)
    color = COLORS[image.convert("RGB").getpixel((0, 0))]
    answer = f"Yes, it is {color}." if "yes or no" in text else color
    return 200, openai_answer(path, answer)


def test_requests_carry_the_image_and_question_and_answers_come_back_in_order(llm, tmp_path: Path) -> None:
    llm.responder = vision_responder
    vqa = build_vqa(_backend(llm), _settings(tmp_path))
    try:
        assert vqa.name == "openai:qwen2-vl"
        colors = list(COLORS)
        queries = [
            VqaQuery(_image(colors[0]), "Is there a red square?"),
            VqaQuery(_image(colors[1]), "What color is the square?", ("red", "blue", "green")),
            VqaQuery(_image(colors[2]), "What color is it?"),
            VqaQuery(_image(colors[3]), "Does the square look yellow?"),
        ]
        answers = vqa.answer(queries)
    finally:
        vqa.close()
    assert answers == ["Yes, it is red.", "blue", "green", "Yes, it is yellow."]
    assert is_yes(answers[0]) and not is_yes(answers[1])
    by_text = {_parts(b)[1]: b for b in llm.requests}
    yes_no = by_text["Is there a red square?\nAnswer with yes or no only."]
    assert by_text["What color is the square?\nOptions: red, blue, green.\nAnswer with one of the options only."]
    assert by_text["What color is it?\nAnswer in a few words."]
    # Lossless: the server sees exactly our pixels.
    assert _parts(yes_no)[0].convert("RGB").tobytes() == queries[0].image.tobytes()
    assert yes_no["model"] == "qwen2-vl" and yes_no["temperature"] == 0.0 and yes_no["n"] == 1
    assert all("authorization" not in {k.lower() for k in h} for h in llm.headers)


def test_a_429_is_retried_and_then_answered(llm, tmp_path: Path) -> None:
    llm.responder = vision_responder
    llm.fail_next = [(429, {"error": {"message": "slow down"}}), (503, {"error": {"message": "overloaded"}})]
    vqa = build_vqa(_backend(llm, max_concurrency=1), _settings(tmp_path))
    try:
        assert vqa.answer([VqaQuery(_image((0, 0, 255)), "What color is it?")]) == ["blue"]
    finally:
        vqa.close()
    assert len(llm.requests) == 3


def test_retries_are_bounded_then_unavailable(llm, tmp_path: Path) -> None:
    llm.responder = vision_responder
    llm.fail_next = [(500, {"error": {"message": "boom"}})] * 10
    vqa = build_vqa(_backend(llm, max_retries=2), _settings(tmp_path))
    try:
        with pytest.raises(Unavailable) as e:
            vqa.answer([VqaQuery(_image((255, 0, 0)), "Is it red?")])
    finally:
        vqa.close()
    assert len(llm.requests) == 3 and "3 time(s)" in str(e.value) and "HTTP 500" in str(e.value)


def test_an_unreachable_endpoint_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = {"openai_compatible": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "max_retries": 1}}
    vqa = build_vqa(backend, _settings(tmp_path))
    try:
        with pytest.raises(Unavailable, match="cannot reach the endpoint"):
            vqa.answer([VqaQuery(_image((255, 0, 0)), "Is it red?")])
    finally:
        vqa.close()


def test_a_refused_credential_is_permission_denied_at_once_and_the_key_never_logged(llm, tmp_path: Path, caplog) -> None:
    llm.fail_next = [(401, {"error": {"message": "invalid api key"}})]
    s = _settings(tmp_path, eval_openai_api_key=KEY, eval_vqa_openai_base_url=llm.base_url)
    vqa = build_vqa(_backend(llm), s)
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(PermissionDenied) as e:
            vqa.answer([VqaQuery(_image((255, 0, 0)), "Is it red?")])
    finally:
        vqa.close()
    assert len(llm.requests) == 1
    assert llm.headers[0].get("Authorization") == f"Bearer {KEY}"
    assert e.value.field == "spec.vqa.openai_compatible.api_key"
    assert KEY not in str(e.value) and KEY not in caplog.text and KEY not in repr(vqa.body(VqaQuery(_image((0, 0, 0)), "q")))


def test_other_client_errors_are_invalid_arguments(llm, tmp_path: Path) -> None:
    llm.fail_next = [(400, {"error": {"message": "model does not support images"}})]
    vqa = build_vqa(_backend(llm), _settings(tmp_path))
    try:
        with pytest.raises(InvalidArgument, match="does not support images"):
            vqa.answer([VqaQuery(_image((255, 0, 0)), "Is it red?")])
    finally:
        vqa.close()
    with pytest.raises(FailedPrecondition):
        vqa.answer([VqaQuery(_image((255, 0, 0)), "Is it red?")])


def test_answers_keep_query_order_when_the_first_request_finishes_last(llm, tmp_path: Path) -> None:
    n = 6
    others_answered = threading.Event()
    lock = threading.Lock()
    finished: list[str] = []

    def responder(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        _, text = _parts(body)
        question = text.split("\n")[0]
        if question == "question 0?":
            # Hold the first query until every other one has been answered.
            assert others_answered.wait(10), "the other requests were not sent concurrently"
        with lock:
            finished.append(question)
            if len(finished) == n - 1:
                others_answered.set()
        return 200, openai_answer(path, f"answer to {question}")

    llm.responder = responder
    vqa = build_vqa(_backend(llm, max_concurrency=n), _settings(tmp_path))
    try:
        answers = vqa.answer([VqaQuery(_image((0, 128, 0)), f"question {i}?") for i in range(n)])
    finally:
        vqa.close()
    assert finished[-1] == "question 0?"
    assert answers == [f"answer to question {i}?" for i in range(n)]
