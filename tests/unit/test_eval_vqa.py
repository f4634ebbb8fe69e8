"""VQA backends: answer reading, spec validation, the tiny test model, and real transformers models (tiny, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selma.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from selma_evaluation.settings import EvaluationSettings
from selma_evaluation.vqa import (
    OpenAiVqaSpec,
    TinyTestVqa,
    TransformersVqaSpec,
    VqaQuery,
    blip2_prompt,
    build_vqa,
    cached_models,
    clear_cache,
    detect_family,
    instruction_prompt,
    is_yes,
    is_yes_no_question,
    parse_backend,
    resolve_backend,
)


def _settings(tmp_path: Path, **kw) -> EvaluationSettings:
    values = dict(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), device="cpu", precision="auto", hf_offline=True,
                  eval_allow_any_base_url=True)
    values.update(kw)
    return EvaluationSettings(**values)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Different sizes on purpose: processors resize, answers must not depend on batch neighbours.
    return [Image.fromarray(rng.integers(0, 255, (24 + 5 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# reading answers, prompts


@pytest.mark.parametrize("answer", ["yes", "Yes.", " YES! ", "yes, there is", "Yes there are two", "\nyes\n", "'yes'"])
def test_is_yes_accepts_answers_whose_first_word_is_yes(answer: str) -> None:
    assert is_yes(answer)


@pytest.mark.parametrize("answer", ["no", "No.", "", "  ", "yeah", "yesterday", "not yes", "y", "true", "maybe yes", "2"])
def test_is_yes_rejects_everything_else(answer: str) -> None:
    assert not is_yes(answer)


def test_yes_no_questions_are_recognised_by_their_opening_or_options() -> None:
    img = Image.new("RGB", (8, 8))
    assert is_yes_no_question(VqaQuery(img, "Is there a cat?"))
    assert is_yes_no_question(VqaQuery(img, "  does the dog sit?"))
    assert is_yes_no_question(VqaQuery(img, "What is it?", choices=("Yes", "no")))
    assert not is_yes_no_question(VqaQuery(img, "What color is the cat?"))
    assert not is_yes_no_question(VqaQuery(img, "Is it red or blue?", choices=("red", "blue")))


def test_prompts_show_choices_and_ask_for_short_answers() -> None:
    img = Image.new("RGB", (8, 8))
    assert blip2_prompt(VqaQuery(img, "What animal is this?")) == "Question: What animal is this? Answer:"
    assert blip2_prompt(VqaQuery(img, "What animal?", ("cat", "dog"))) == "Question: What animal? Options: cat, dog Answer:"
    assert "Options: cat, dog." in instruction_prompt(VqaQuery(img, "What animal?", ("cat", "dog")))
    assert instruction_prompt(VqaQuery(img, "Is there a cat?")).endswith("Answer with yes or no only.")
    assert instruction_prompt(VqaQuery(img, "What color is it?")).endswith("Answer in a few words.")


# ---------------------------------------------------------------------------------------------
# spec validation


def test_empty_backend_is_the_default_transformers_model(tmp_path: Path) -> None:
    s = _settings(tmp_path, eval_vqa_model="org/vqa", eval_vqa_batch_size=7)
    assert parse_backend({}, s) == TransformersVqaSpec(source="org/vqa", batch_size=7)
    assert parse_backend(None, s) == parse_backend({}, s)
    assert resolve_backend({}, s) == {"transformers": {"model": {"source": "org/vqa"}, "batch_size": 7}}


def test_transformers_spec_takes_device_precision_and_batch_size(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    spec = parse_backend(
        {"transformers": {"model": {"source": "/m", "revision": "v1"}, "device": {"device": "CPU", "precision": "PRECISION_BF16"}, "batch_size": 3}}, s
    )
    assert spec == TransformersVqaSpec(source="/m", revision="v1", device="cpu", precision="bf16", batch_size=3)
    resolved = resolve_backend({"transformers": {"model": {"source": "/m"}, "device": {"precision": "PRECISION_BF16"}}}, s)
    assert parse_backend(resolved, s) == TransformersVqaSpec(source="/m", precision="bf16", batch_size=s.eval_vqa_batch_size)


@pytest.mark.parametrize(
    ("backend", "field"),
    [
        ({"transformers": {}, "tiny_test": {}}, "spec.vqa"),
        ({"mplug": {}}, "spec.vqa"),
        ({"transformers": {"batch_size": 999}}, "spec.vqa.transformers.batch_size"),
        ({"transformers": {"batch_size": "x"}}, "spec.vqa.transformers.batch_size"),
        ({"transformers": {"device": {"device": "tpu"}}}, "spec.vqa.transformers.device.device"),
        ({"transformers": {"device": {"precision": "PRECISION_FP8"}}}, "spec.vqa.transformers.device.precision"),
        ({"transformers": {"model": {"source": "tiny://sd"}}}, "spec.vqa.transformers.model.source"),
        ({"transformers": {"model": {"source": "x", "variant": "fp16"}}}, "spec.vqa.transformers.model"),
        ({"tiny_test": {"seed": "abc"}}, "spec.vqa.tiny_test.seed"),
        ({"tiny_test": {"temperature": 1}}, "spec.vqa.tiny_test"),
        ({"openai_compatible": {"model": "m"}}, "spec.vqa.openai_compatible.base_url"),
        ({"openai_compatible": {"base_url": "http://h/v1"}}, "spec.vqa.openai_compatible.model"),
        ({"openai_compatible": {"base_url": "ftp://h/v1", "model": "m"}}, "spec.vqa.openai_compatible.base_url"),
        ({"openai_compatible": {"base_url": "http://u:p@h/v1", "model": "m"}}, "spec.vqa.openai_compatible.base_url"),
        ({"openai_compatible": {"base_url": "http://h/v1", "model": "m", "api": "OPEN_AI_API_COMPLETIONS"}}, "spec.vqa.openai_compatible.api"),
        ({"openai_compatible": {"base_url": "http://h/v1", "model": "m", "max_retries": 11}}, "spec.vqa.openai_compatible.max_retries"),
        ({"openai_compatible": {"base_url": "http://h/v1", "model": "m", "extra_body": {"api_key": "x"}}}, "spec.vqa.openai_compatible.extra_body"),
        ({"openai_compatible": {"base_url": "http://h/v1", "model": "m", "extra_body": {"messages": []}}}, "spec.vqa.openai_compatible.extra_body"),
        ({"openai_compatible": {"base_url": "http://h/v1", "model": "m", "api_key": {"name": "nope"}}}, "spec.vqa.openai_compatible.api_key.name"),
    ],
)
def test_bad_backends_are_invalid_arguments_naming_the_field(tmp_path: Path, backend: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_backend(backend, _settings(tmp_path))
    assert e.value.field == field


def test_openai_spec_defaults_come_from_settings_and_are_greedy(tmp_path: Path) -> None:
    s = _settings(tmp_path, eval_vqa_openai_base_url="http://vllm:8000/v1/", eval_vqa_openai_model="qwen", eval_vqa_concurrency=5)
    spec = parse_backend({"openai_compatible": {"request_timeout": "2.5s"}}, s)
    assert isinstance(spec, OpenAiVqaSpec)
    assert (spec.base_url, spec.model, spec.max_concurrency, spec.request_timeout, spec.temperature) == ("http://vllm:8000/v1", "qwen", 5, 2.5, 0.0)
    assert spec.max_retries == s.eval_vqa_max_retries and spec.max_tokens == s.eval_vqa_max_new_tokens
    assert parse_backend(resolve_backend({"openai_compatible": {"request_timeout": "2.5s"}}, s), s) == spec


def test_by_default_a_request_cannot_pick_the_endpoint_the_service_calls(tmp_path: Path) -> None:
    strict = _settings(tmp_path, eval_allow_any_base_url=False, eval_vqa_openai_base_url="http://vllm:8000/v1",
                       eval_allowed_base_urls=["https://api.example/v1"])
    for url in ("http://vllm:8000/v1", "https://api.example/v1/"):
        assert parse_backend({"openai_compatible": {"base_url": url, "model": "m"}}, strict).base_url == url.rstrip("/")
    with pytest.raises(PermissionDenied, match="SELMA_EVAL_ALLOWED_BASE_URLS") as e:
        parse_backend({"openai_compatible": {"base_url": "http://169.254.169.254/v1", "model": "m"}}, strict)
    assert e.value.field == "spec.vqa.openai_compatible.base_url"
    assert EvaluationSettings().eval_allow_any_base_url is False  # the service default


def test_api_keys_resolve_like_the_prompt_service_and_only_go_to_configured_endpoints(tmp_path: Path, monkeypatch) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "vision").mkdir(parents=True)
    (secrets / "vision" / "api-key").write_text("sk-file\n")
    monkeypatch.setenv("SELMA_EVAL_SECRET_ENVKEY", "sk-env")
    s = _settings(
        tmp_path,
        eval_openai_api_key="sk-default",
        eval_api_keys={"named": "sk-named"},
        eval_secrets_dir=secrets,
        eval_vqa_openai_base_url="http://vllm:8000/v1",
        eval_allowed_base_urls=["https://api.example/v1"],
    )
    assert s.api_key().get_secret_value() == "sk-default"
    assert s.api_key("named").get_secret_value() == "sk-named"
    assert s.api_key("vision").get_secret_value() == "sk-file"
    assert s.api_key("envkey").get_secret_value() == "sk-env"
    assert "sk-" not in repr(s) and "sk-" not in json.dumps(s.safe_dump())
    parse_backend({"openai_compatible": {"model": "m"}}, s)
    parse_backend({"openai_compatible": {"base_url": "https://api.example/v1", "model": "m", "api_key": {"name": "named"}}}, s)
    with pytest.raises(PermissionDenied) as e:
        parse_backend({"openai_compatible": {"base_url": "http://attacker/v1", "model": "m"}}, s)
    assert e.value.field == "spec.vqa.openai_compatible.base_url"
    # Where the operator allows any endpoint (a single-user install), one without a credential may be called.
    parse_backend({"openai_compatible": {"base_url": "http://other/v1", "model": "m"}}, _settings(tmp_path))


# ---------------------------------------------------------------------------------------------
# tiny_test


def test_tiny_test_answers_are_deterministic_functions_of_seed_image_and_question(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    vqa = build_vqa({"tiny_test": {"seed": "3"}}, s)
    assert isinstance(vqa, TinyTestVqa) and vqa.name == "tiny-test" and vqa.batch_size == s.eval_vqa_batch_size
    imgs = _images(6)
    yes_no = [VqaQuery(img, f"Is there a cat number {i}?") for i, img in enumerate(imgs)] * 4
    mc = [VqaQuery(img, "What animal is it?", ("cat", "dog", "owl")) for img in imgs]
    first = vqa.answer(yes_no + mc)
    assert first == build_vqa({"tiny_test": {"seed": 3}}, s).answer(yes_no + mc)
    assert set(first[: len(yes_no)]) == {"yes", "no"}
    assert all(a in ("cat", "dog", "owl") for a in first[len(yes_no) :])
    # The image is read by its pixels, not by object identity or encoding.
    copies = [VqaQuery(q.image.copy(), q.question, q.choices) for q in mc]
    assert vqa.answer(copies) == first[len(yes_no) :]
    other_seeds = [build_vqa({"tiny_test": {"seed": k}}, s).answer(yes_no) for k in range(4)]
    assert any(o != first[: len(yes_no)] for o in other_seeds)
    assert vqa.answer([]) == []
    vqa.close()


# ---------------------------------------------------------------------------------------------
# transformers: a tiny random BLIP VQA model saved with save_pretrained, loaded by path


_WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] yes no is there a the red blue cat dog on in of two one what color ? . , how many".split()



def _save_widened(model, processor, path: Path, seed: int) -> None:
    """Save a random model with wide weights: the default init (std 0.02) makes every input give the
    same answer; wide weights make answers depend on image and question, so batching and ordering
    bugs would show."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)

def build_tiny_blip_vqa(path: Path, seed: int = 0) -> Path:
    """A random-init BlipForQuestionAnswering with a BERT word-piece tokenizer, all offline."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(_WORDS)}, bos_token="[DEC]", do_lower_case=True)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    config = BlipConfig(
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
        text_config={
            "vocab_size": len(_WORDS),
            "hidden_size": 32,
            "encoder_hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "bos_token_id": tok.bos_token_id,
            "sep_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.sep_token_id,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config).eval()
    _save_widened(model, processor, path, seed)
    return path


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_blip_vqa(tmp_path_factory.mktemp("tiny-blip-vqa"))


_QUESTIONS = [
    "is there a cat?",
    "what color is the dog on the red one?",
    "how many?",
    "is the blue dog in a cat?",
    "is there a red cat on the dog?",
    "what?",
    "how many two cats are there on the blue dog in the red one?",
]


@pytest.mark.slow
def test_tiny_blip_vqa_answers_batches_like_single_queries_and_deterministically(tmp_path: Path, tiny_blip: Path) -> None:
    s = _settings(tmp_path)
    imgs = _images(len(_QUESTIONS) + 3)
    # Every question on several images, interleaved: batches of 4 hold equal-length questions.
    queries = [VqaQuery(imgs[(i + k) % len(imgs)], q) for k in range(4) for i, q in enumerate(_QUESTIONS)]
    one = build_vqa({"transformers": {"model": {"source": str(tiny_blip)}, "batch_size": 1}}, s)
    four = build_vqa({"transformers": {"model": {"source": str(tiny_blip)}, "batch_size": 4}}, s)
    try:
        assert one.name == f"transformers:{tiny_blip}" and one.family == "blip_vqa"
        assert (one.batch_size, four.batch_size) == (1, 4)
        assert one.lm is four.lm, "one process loads a model once"
        assert one.prompts(queries[:1]) == ["is there a cat?"]
        singles = one.answer(queries)
        batched = four.answer(queries)
        assert len(batched) == len(queries) and all(isinstance(a, str) for a in batched)
        assert batched == singles
        assert len(set(batched)) > 1, "the tiny model must be input-sensitive for this test to mean anything"
        assert four.answer(queries) == batched
        assert four.answer(list(reversed(queries))) == list(reversed(batched))
        assert all(0 < len(a.split()) <= s.eval_vqa_max_new_tokens for a in batched)
    finally:
        one.close()
        four.close()
    assert not cached_models()


@pytest.mark.slow
def test_tiny_blip_vqa_answers_equal_the_models_own_generate_on_each_question_alone(tmp_path: Path, tiny_blip: Path) -> None:
    """Finding: transformers' BLIP VQA answers a padded question differently (its decoder sees the padding).

    So batched answers must come from batches of equal-length questions; they then equal what
    ``BlipForQuestionAnswering.generate`` gives for each question alone.
    """
    import torch
    from transformers import AutoProcessor, BlipForQuestionAnswering

    model = BlipForQuestionAnswering.from_pretrained(tiny_blip, use_safetensors=True).eval()
    proc = AutoProcessor.from_pretrained(tiny_blip)
    imgs = _images(len(_QUESTIONS))
    with torch.inference_mode():
        alone = [
            proc.batch_decode(model.generate(**proc(images=[i], text=[q], return_tensors="pt"), max_new_tokens=16), skip_special_tokens=True)[0]
            for i, q in zip(imgs, _QUESTIONS, strict=True)
        ]
        padded = proc.batch_decode(
            model.generate(**proc(images=imgs, text=_QUESTIONS, return_tensors="pt", padding=True), max_new_tokens=16), skip_special_tokens=True
        )
    if padded != alone:
        print("transformers' batched BLIP VQA generate differs from one-by-one answers under padding (expected with transformers 5.x)")
    vqa = build_vqa({"transformers": {"model": {"source": str(tiny_blip)}, "batch_size": 8}}, _settings(tmp_path, eval_vqa_max_new_tokens=16))
    try:
        assert vqa.answer([VqaQuery(i, q) for i, q in zip(imgs, _QUESTIONS, strict=True)]) == [a.strip() for a in alone]
    finally:
        vqa.close()


@pytest.mark.slow
def test_default_backend_and_file_uri_load_the_same_model_once_and_close_frees_it(tmp_path: Path, tiny_blip: Path) -> None:
    s = _settings(tmp_path, eval_vqa_model=str(tiny_blip), eval_vqa_batch_size=3)
    queries = [VqaQuery(img, q) for img, q in zip(_images(3, seed=1), _QUESTIONS, strict=False)]
    a = build_vqa({}, s)
    b = build_vqa({"transformers": {"model": {"source": str(tiny_blip)}}}, s)
    assert a.lm is b.lm and len(cached_models()) == 1 and a.batch_size == 3
    mirrored = build_vqa({"transformers": {"model": {"source": tiny_blip.as_uri()}}}, s)
    assert Path(mirrored.lm.model.name_or_path).is_relative_to(s.resolved_model_cache_dir / "mirror")
    expected = a.answer(queries)
    assert mirrored.answer(queries) == expected
    a.close()
    a.close()  # idempotent: does not release b's reference
    assert b.answer(queries)
    with pytest.raises(FailedPrecondition):
        a.answer(queries)
    b.close()
    mirrored.close()
    assert not cached_models()
    c = build_vqa({}, s)  # loads again after the last close, same answers
    assert c.answer(queries) == expected
    clear_cache()
    assert not cached_models()


def test_missing_models_are_not_found_and_other_architectures_invalid(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    for source in (str(tmp_path / "nope"), "./nope-relative", "no-such-org/no-such-vqa-model"):
        with pytest.raises(NotFound) as e:
            build_vqa({"transformers": {"model": {"source": source}}}, s)
        assert source in str(e.value) and e.value.field == "spec.vqa.transformers.model.source"
    with pytest.raises(NotFound):
        build_vqa({"transformers": {"model": {"source": (tmp_path / "empty").as_uri()}}}, s)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(InvalidArgument) as e:
        build_vqa({"transformers": {"model": {"source": str(bert)}}}, s)
    assert "BertModel" in str(e.value) and "BlipForQuestionAnswering" in str(e.value) and "PaliGemma" in str(e.value)
    assert not cached_models()


def test_families_are_detected_from_the_config() -> None:
    from transformers import Blip2Config, BlipConfig, InstructBlipConfig, LlavaConfig, PaliGemmaConfig, Qwen2VLConfig

    assert detect_family(BlipConfig(architectures=["BlipForQuestionAnswering"])) == "blip_vqa"
    assert detect_family(Blip2Config(architectures=["Blip2ForConditionalGeneration"])) == "blip2"
    assert detect_family(InstructBlipConfig()) == "blip2"
    for cfg in (LlavaConfig(), PaliGemmaConfig(), Qwen2VLConfig()):
        assert detect_family(cfg) == "chat"
    with pytest.raises(InvalidArgument):
        detect_family(BlipConfig(architectures=["BlipForConditionalGeneration"]))  # a captioner, not VQA


# ---------------------------------------------------------------------------------------------
# transformers: a tiny random LLaVA (image-text-to-text, decoder-only, chat template)

_LLAVA_WORDS = "<pad> <unk> <s> </s> <image> USER ASSISTANT : yes no is there a the red blue cat dog on in of two one what color ? . , how many answer with only or".split()
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_tiny_llava(path: Path, seed: int = 0, *, chat_template: bool = True) -> Path:
    """A random-init LlavaForConditionalGeneration (CLIP vision tower, Llama LM) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(_LLAVA_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"}
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_TEMPLATE if chat_template else None,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        text_config=LlamaConfig(
            vocab_size=len(_LLAVA_WORDS), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),  # fmt: skip
        image_token_index=vocab["<image>"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _save_widened(model, processor, path, seed)
    return path


@pytest.mark.slow
def test_tiny_llava_answers_through_its_chat_template_in_batches_like_alone(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    path = build_tiny_llava(tmp_path / "llava")
    s = _settings(tmp_path, eval_vqa_max_new_tokens=6)
    imgs = _images(5)
    queries = [VqaQuery(img, q) for img, q in zip(imgs, _QUESTIONS, strict=False)]
    queries.append(VqaQuery(imgs[0], "what color is the cat?", ("red", "blue")))
    one = build_vqa({"transformers": {"model": {"source": str(path)}, "batch_size": 1}}, s)
    three = build_vqa({"transformers": {"model": {"source": str(path)}, "batch_size": 3}}, s)
    try:
        assert one.family == "chat"
        prompts = one.prompts(queries)
        assert prompts[0] == "USER: <image> is there a cat?\nAnswer with yes or no only. ASSISTANT :"
        assert "Options: red, blue." in prompts[-1]
        batched = three.answer(queries)
        assert batched == one.answer(queries)
        assert len(batched) == len(queries) and len(set(batched)) > 1
        assert three.answer(queries) == batched
    finally:
        one.close()
        three.close()


@pytest.mark.slow
def test_image_text_to_text_models_without_a_chat_template_get_a_plain_prompt_with_the_image_token(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    path = build_tiny_llava(tmp_path / "llava-plain", chat_template=False)
    vqa = build_vqa({"transformers": {"model": {"source": str(path)}}}, _settings(tmp_path, eval_vqa_max_new_tokens=4))
    try:
        queries = [VqaQuery(img, "is there a cat?") for img in _images(2)]
        assert vqa.prompts(queries) == ["<image>\nQuestion: is there a cat? Answer:"] * 2
        answers = vqa.answer(queries)
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    finally:
        vqa.close()


# ---------------------------------------------------------------------------------------------
# transformers: a tiny random BLIP-2 (Q-Former + OPT decoder), TIFA's prompt format

_BLIP2_WORDS = "<pad> <unk> <s> </s> <image> Question : Answer Options yes no is there a the red blue cat dog on in of two one what color ? . , how many".split()


def build_tiny_blip2(path: Path, seed: int = 0) -> Path:
    """A random-init Blip2ForConditionalGeneration with an OPT language model and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    vocab = {w: i for i, w in enumerate(_BLIP2_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok, num_query_tokens=4)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(_BLIP2_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=32
        ),
        text_config=OPTConfig(
            vocab_size=len(_BLIP2_WORDS), hidden_size=32, ffn_dim=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
            word_embed_proj_dim=32, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        ),  # fmt: skip
        num_query_tokens=4,
        image_token_index=vocab["<image>"],
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    _save_widened(model, processor, path, seed)
    return path


@pytest.mark.slow
def test_tiny_blip2_answers_tifa_style_prompts_without_echoing_them(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    path = build_tiny_blip2(tmp_path / "blip2")
    s = _settings(tmp_path, eval_vqa_max_new_tokens=5)
    imgs = _images(4)
    queries = [VqaQuery(img, q) for img, q in zip(imgs, _QUESTIONS, strict=False)]
    queries[1] = VqaQuery(imgs[1], _QUESTIONS[1], ("red", "blue"))
    one = build_vqa({"transformers": {"model": {"source": str(path)}, "batch_size": 1}}, s)
    four = build_vqa({"transformers": {"model": {"source": str(path)}, "batch_size": 4}}, s)
    try:
        assert one.family == "blip2"
        assert one.prompts(queries)[1] == "Question: what color is the dog on the red one? Options: red, blue Answer:"
        batched = four.answer(queries)
        assert batched == one.answer(queries)
        assert len(set(batched)) > 1
        # Only generated tokens come back: at most max_new_tokens words, never the prompt.
        assert all(len(a.split()) <= 5 for a in batched), batched
        assert not any("Answer" in a and "Question" in a for a in batched), batched
    finally:
        one.close()
        four.close()


def test_the_model_cache_loads_once_under_concurrent_builds_and_frees_after_the_last_user() -> None:
    import threading

    from selma_evaluation import vqa as vqa_module

    loads: list[int] = []
    release = threading.Event()

    def load():
        release.wait(10)
        loads.append(1)
        return vqa_module.LoadedVqa(family="blip_vqa", model=object(), processor=object(), device="cpu", dtype="fp32")

    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(vqa_module._acquire("k-test", load))) for _ in range(4)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(10)
    assert len(loads) == 1 and len(got) == 4 and all(g is got[0] for g in got)
    assert cached_models() == {"k-test": 4}
    for _ in range(3):
        vqa_module._release("k-test")
    assert cached_models() == {"k-test": 1}
    vqa_module._release("k-test")
    assert cached_models() == {}
