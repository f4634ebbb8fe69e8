"""One rule per field family, applied the same way whichever door a value comes through.

For each family, the same bad value is sent through gRPC, through a SkillSet file and through the
CLI; each must be refused with the rule's own message (from :mod:`selma.specs`), naming the field once.
"""

from __future__ import annotations

import math
import textwrap

import grpc
import pytest

from selma.app.cli import main as selma_main
from selma.app.skillset import SkillSetError, parse_skillset
from selma.errors import InvalidArgument
from selma.specs import density, expert_weights, rouge_l_threshold
from selma.v1 import common_pb2
from selma.v1 import prompt_service_pb2 as ppb
from selma.v1 import prompt_service_pb2_grpc as ppb_grpc
from selma.v1 import serving_service_pb2 as spb
from selma.v1 import serving_service_pb2_grpc as spb_grpc


def rule_message(rule, value) -> str:
    with pytest.raises(InvalidArgument) as e:
        rule(value, "x")
    return e.value.message


def skillset(prompts: str = "", merge: str = "") -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: selma.dev/v1alpha1
        kind: SkillSet
        metadata: {{name: rules}}
        spec:
          skills: [counting, spatial]
          prompts: {{backend: {{tiny_test: {{}}}}{prompts}}}
          training: {{config: {{preset: TRAINING_PRESET_TINY, baseModel: {{source: "tiny://sd"}}}}}}
          merge: {{method: mean_delta{merge}}}
        """
    )


def cli_error(capsys) -> str:
    """The CLI's one error line (server logs of in-process services may share stderr)."""
    return next((line for line in capsys.readouterr().err.splitlines() if line.startswith("selma: error:")), "")


def assert_refused_once(text: str, message: str, field: str) -> None:
    assert message in text, text
    assert text.count(field) == 1, f"{field!r} named {text.count(field)} times in {text!r}"


# --- rouge_l_threshold: (0, 1], 0 = the default 0.8 -----------------------------------------------------

THRESHOLDS = [1.5, -0.25, math.nan]


def test_the_rouge_rule_accepts_the_default_and_fractions():
    assert rouge_l_threshold(0) == rouge_l_threshold(None) == 0.8
    assert rouge_l_threshold(0.5) == 0.5 and rouge_l_threshold(1) == 1.0
    with pytest.raises(InvalidArgument):
        rouge_l_threshold(True)  # a YAML `true` is no threshold


@pytest.fixture(scope="module")
def prompt_stub(tmp_path_factory):
    from selma_prompts.server import build_server
    from selma_prompts.settings import PromptSettings

    root = tmp_path_factory.mktemp("rules-prompts")
    settings = PromptSettings(data_dir=root / "data", storage_uri=(root / "storage").as_uri(), llm_default_backend="tiny_test",
                              prompts_preload_default_backend=False, log_level="WARNING")
    server = build_server(settings).start()
    with grpc.insecure_channel(server.address) as channel:
        yield ppb_grpc.PromptServiceStub(channel)
    server.stop(0)


@pytest.mark.parametrize("value", THRESHOLDS)
def test_a_bad_rouge_threshold_is_refused_alike_through_grpc_skillset_and_cli(value, prompt_stub, tmp_path, capsys):
    message = rule_message(rouge_l_threshold, value)
    # gRPC
    spec = ppb.PromptGenerationSpec(skill_name="counting", count=3, rouge_l_threshold=value)
    with pytest.raises(grpc.RpcError) as e:
        prompt_stub.StartPromptGeneration(ppb.StartPromptGenerationRequest(idempotency_key=f"rules/{value}", spec=spec))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_refused_once(e.value.details(), message, "rouge_l_threshold")
    # SkillSet file
    yaml_value = ".nan" if math.isnan(value) else value
    with pytest.raises(SkillSetError) as s:
        parse_skillset(skillset(prompts=f", rougeLThreshold: {yaml_value}"))
    assert_refused_once(str(s.value), message, "rougeLThreshold")
    # CLI (selma prompts generate runs the loop locally; the spec is refused before any model loads)
    capsys.readouterr()
    code = selma_main(["prompts", "generate", "--skill", "counting", "--count", "2", "--backend", "tiny",
                       "--threshold", str(value), "--out", str(tmp_path / "cli.jsonl")])
    assert code == 2
    assert_refused_once(cli_error(capsys), message, "rouge_l_threshold")


# --- expert weights: every expert has a weight or none has ---------------------------------------------


@pytest.fixture(scope="module")
def serving(tiny_models, tmp_path_factory):
    from selma_serving.server import build_server
    from selma_serving.settings import ServingSettings
    from selma_serving.testing import make_expert

    root = tmp_path_factory.mktemp("rules-serving")
    settings = ServingSettings(data_dir=root / "data", storage_uri=(root / "storage").as_uri(), serving_base_model=str(tiny_models.sd),
                               log_level="WARNING")
    server = build_server(settings).start()
    server.core.engine.load_base()
    experts = [make_expert(server.core.store, str(tiny_models.sd), seed=s, rank=4, skill=f"s{s}", run="rules") for s in (1, 2)]
    with grpc.insecure_channel(server.address) as channel:
        yield spb_grpc.ServingServiceStub(channel), experts
    server.stop(0)
    server.core.shutdown()


@pytest.mark.slow
def test_partial_expert_weights_are_refused_alike_through_grpc_skillset_and_cli(serving, capsys):
    message = rule_message(expert_weights, [0.7, None])
    stub, (a, b) = serving
    # gRPC: a per-request mix with one weight set
    mix = common_pb2.MergeSpec(experts=[common_pb2.ExpertWeight(expert_id=a.id, weight=0.7), common_pb2.ExpertWeight(expert_id=b.id)])
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(spb.GenerateRequest(prompts=["a cat"], experts=mix), timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_refused_once(e.value.details(), message, "experts.weight")
    # SkillSet file: a weight for one of the two skills
    with pytest.raises(SkillSetError) as s:
        parse_skillset(skillset(merge=", weights: {counting: 0.7}"))
    assert_refused_once(str(s.value), message, "spec.merge.weights")
    # CLI: `selma eval run --target LABEL=experts:ID=W,ID` is refused before anything is sent
    capsys.readouterr()
    code = selma_main(["eval", "run", "--target", f"mix=experts:{a.id}=0.7,{b.id}", "--endpoints", "/nonexistent/endpoints.json"])
    assert code == 2
    assert_refused_once(cli_error(capsys), message, "target")


# --- merge density: (0, 1], 0 = the service default ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("value", [1.5, -0.5])
def test_a_bad_merge_density_is_refused_alike_through_grpc_skillset_and_cli(value, serving, capsys):
    message = rule_message(density, value)
    stub, (a, b) = serving
    mix = common_pb2.MergeSpec(method=common_pb2.MERGE_METHOD_TIES, density=value,
                               experts=[common_pb2.ExpertWeight(expert_id=a.id), common_pb2.ExpertWeight(expert_id=b.id)])
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(spb.GenerateRequest(prompts=["a cat"], experts=mix), timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_refused_once(e.value.details(), message, "density")
    with pytest.raises(SkillSetError) as s:
        parse_skillset(skillset(merge=f", density: {value}"))
    assert_refused_once(str(s.value), message, "spec.merge.density")
    capsys.readouterr()
    code = selma_main(["eval", "run", "--target", "base", "--search-experts", f"{a.id},{b.id}", "--search-methods", "ties",
                       "--search-densities", str(value), "--endpoints", "/nonexistent/endpoints.json"])
    assert code == 2
    assert_refused_once(cli_error(capsys), message, "--search-densities")
