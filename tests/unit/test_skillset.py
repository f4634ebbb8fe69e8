"""SkillSet parsing: the shipped examples load; malformed files name the field and the line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from selma.app.skillset import SkillSetError, load_skillset, merge_job_spec, parse_skillset
from selma.v1 import common_pb2, evaluation_service_pb2, training_service_pb2

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = textwrap.dedent(
    """\
    apiVersion: selma.dev/v1alpha1
    kind: SkillSet
    metadata: {name: demo}
    spec:
      skills:
        - {name: counting, count: 4}
        - name: shapes
          count: 3
          rules: ["one shape per scene"]
          seedExamples: ["a red circle", "a blue square", "a green triangle"]
      prompts: {backend: {tinyTest: {}}, rougeLThreshold: 0.7}
      render:
        diffusion: {scheduler: dpm_solver_multistep, steps: 4}
      training:
        config: {baseModel: {source: "tiny://sd"}, preset: tiny, maxSteps: 5, lora: {rank: 4}}
        placement: {launcher: kubernetes, gpus: 1}
      merge: {method: ties, density: 0.5, weights: {counting: 0.7, shapes: 0.3}, modelName: demo-merged}
    """
)


@pytest.mark.parametrize("name", ["quickstart.yaml", "sd2.yaml", "sdxl.yaml"])
def test_shipped_examples_are_valid(name):
    ss = load_skillset(EXAMPLES / name)
    assert {s.name for s in ss.skills} == {"general", "paragraph", "real_user", "counting", "commonsense_defying"}
    assert ss.merge_method == common_pb2.MERGE_METHOD_MEAN_DELTA


def test_quickstart_runs_on_tiny_models_with_the_embedded_llm():
    ss = load_skillset(EXAMPLES / "quickstart.yaml")
    assert ss.training_config.base_model.source == "tiny://sd"
    assert ss.render.model.source == "tiny://sd"  # defaults to the base model
    assert ss.backend.WhichOneof("backend") == "embedded"
    assert ss.placement.launcher == common_pb2.LAUNCHER_KIND_LOCAL


def test_short_enum_names_and_specs():
    ss = parse_skillset(GOOD)
    assert ss.render.diffusion.scheduler == common_pb2.SCHEDULER_DPM_SOLVER_MULTISTEP
    assert ss.training_config.preset == training_service_pb2.TRAINING_PRESET_TINY
    assert ss.placement.launcher == common_pb2.LAUNCHER_KIND_KUBERNETES
    inline = ss.skills[1]
    assert not inline.builtin and list(inline.inline.seed_examples)[0] == "a red circle"
    spec = ss.prompt_spec(ss.skills[0])
    assert spec.skill_name == "counting" and spec.count == 4 and spec.rouge_l_threshold == pytest.approx(0.7)
    assert ss.prompt_spec(inline).skill.name == "shapes"
    merge = merge_job_spec(ss, {"counting": "expert-a", "shapes": "expert-b"})
    assert merge.model_name == "demo-merged" and merge.merge.method == common_pb2.MERGE_METHOD_TIES
    assert [(e.expert_id, round(e.weight, 3)) for e in merge.merge.experts] == [("expert-a", 0.7), ("expert-b", 0.3)]


@pytest.mark.parametrize(
    ("old", "new", "field", "line"),
    [
        ("kind: SkillSet", "kind: SkillSat", "kind", 2),
        ("metadata: {name: demo}", "metadata: {name: Demo_Run}", "metadata.name", 3),
        ("- {name: counting, count: 4}", "- {name: counting, count: 0}", "spec.skills[0].count", 6),
        ('seedExamples: ["a red circle", "a blue square", "a green triangle"]', 'seedExamples: ["a red circle"]', "spec.skills[1].seedExamples", 10),
        ("rougeLThreshold: 0.7", "rougeLThreshold: 1.5", "spec.prompts.rougeLThreshold", 11),
        ("scheduler: dpm_solver_multistep", "scheduler: warp", "spec.render.diffusion.scheduler", 13),
        ("lora: {rank: 4}", "lora: {rnak: 4}", "spec.training.config.lora.rnak", 15),
        ("weights: {counting: 0.7, shapes: 0.3}", "weights: {counting: 0.7, circles: 0.3}", "spec.merge.weights.circles", 17),
        ("method: ties", "method: average", "spec.merge.method", 17),
    ],
)
def test_malformed_skillset_names_field_and_line(old, new, field, line):
    assert old in GOOD
    with pytest.raises(SkillSetError) as ei:
        parse_skillset(GOOD.replace(old, new), source="bad.yaml")
    assert ei.value.field == field
    assert f"bad.yaml:{line}:" in str(ei.value), str(ei.value)


def test_unknown_enum_lists_the_choices():
    with pytest.raises(SkillSetError, match="ddim"):
        parse_skillset(GOOD.replace("scheduler: dpm_solver_multistep", "scheduler: warp"))


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(SkillSetError, match="does not exist"):
        load_skillset(tmp_path / "nope.yaml")
    with pytest.raises(SkillSetError, match="not valid YAML"):
        parse_skillset("spec: [unclosed")


def test_render_section_takes_shards_and_their_placement():
    old = "diffusion: {scheduler: dpm_solver_multistep, steps: 4}"
    text = GOOD.replace(old, old + "\n    shards: 3\n    placement: {launcher: kubernetes, gpus: 1}")
    assert text != GOOD
    ss = parse_skillset(text)
    assert ss.render_shards == 3 and ss.render_placement.gpus == 1 and ss.render.diffusion.steps == 4
    assert parse_skillset(GOOD).render_shards == 0
    with pytest.raises(SkillSetError, match="spec.render.shards"):
        parse_skillset(text.replace("shards: 3", "shards: many"))


def test_sdxl_example_trains_each_expert_on_8_gpus_with_the_papers_effective_batch():
    from selma_training.config import PRESETS
    from selma_training.distributed import resolve_distributed
    from selma_training.settings import TrainingSettings

    ss = load_skillset(EXAMPLES / "sdxl.yaml")
    d = ss.training_distributed
    assert (d.nodes, d.processes_per_node, ss.placement.gpus) == (2, 4, 4)
    spec = {"distributed": {"nodes": d.nodes, "processes_per_node": d.processes_per_node}}
    preset = PRESETS["sdxl"]
    assert preset["batch_size"] * preset["gradient_accumulation_steps"] == 32  # the paper's, split over the 8 processes
    settings = TrainingSettings(batch_policy_max_nodes=2)
    assert resolve_distributed(spec, {"gpus": ss.placement.gpus}, preset["gradient_accumulation_steps"], settings, "kubernetes") == (2, 4)


def test_training_distributed_is_checked_like_any_proto_section():
    bad = GOOD.replace("placement: {launcher: kubernetes, gpus: 1}", "placement: {launcher: kubernetes, gpus: 1}\n    distributed: {nodes: many}")
    with pytest.raises(SkillSetError) as e:
        parse_skillset(bad)
    assert "spec.training.distributed" in str(e.value)


def test_per_skill_training_fields_lay_over_the_shared_config():
    text = GOOD.replace("    placement: {launcher: kubernetes, gpus: 1}\n  merge",
                        "    placement: {launcher: kubernetes, gpus: 1}\n"
                        "    skills:\n"
                        "      counting: {lora: {rank: 16, alpha: 8, targetModules: [to_k, to_v]}, learningRate: 0.002, epochs: 3}\n"
                        "  merge")
    assert text != GOOD
    ss = parse_skillset(text)
    counting, shapes = ss.training_config_for("counting"), ss.training_config_for("shapes")
    assert (counting.lora.rank, counting.lora.alpha, list(counting.lora.target_modules)) == (16, 8.0, ["to_k", "to_v"])
    assert (counting.learning_rate, counting.epochs, counting.max_steps, counting.base_model.source) == (0.002, 3.0, 5, "tiny://sd")
    assert (shapes.lora.rank, list(shapes.lora.target_modules), shapes.learning_rate) == (4, [], 0.0)  # the shared config
    assert ss.training_config.lora.rank == 4  # laying over copies: the shared config is unchanged
    with pytest.raises(SkillSetError, match="spec.training.skills.painting"):
        parse_skillset(text.replace("      counting: {lora", "      painting: {lora"))
    with pytest.raises(SkillSetError, match="spec.training.skills.counting.learningRat"):
        parse_skillset(text.replace("learningRate", "learningRat"))


GATED = GOOD + (
    "  gate:\n"
    "    vqa: {shapesworldJudge: {}}\n"
    "    questionSource: vqa_backend\n"
    "    threshold: 0.75\n"
    "    candidatesPerPrompt: 4\n"
    "    targetKept: 40\n"
    "    maxCandidates: 200\n"
)


def test_gate_section_is_a_gate_settings_message():
    ss = parse_skillset(GATED)
    g = ss.gate
    assert g is not None and g.vqa.WhichOneof("backend") == "shapesworld_judge"
    assert g.question_source == evaluation_service_pb2.GATE_QUESTION_SOURCE_VQA_BACKEND
    assert (g.threshold, g.candidates_per_prompt, g.target_kept, g.max_candidates) == (0.75, 4, 40, 200)
    assert parse_skillset(GOOD).gate is None  # no section: no gate, rendering as before


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        ("threshold: 0.75", "threshold: 1.5", "spec.gate.threshold", "[0, 1]"),
        ("threshold: 0.75", "threshold: -0.1", "spec.gate.threshold", "[0, 1]"),
        ("candidatesPerPrompt: 4", "candidatesPerPrompt: 17", "spec.gate.candidatesPerPrompt", "1..16"),
        ("candidatesPerPrompt: 4", "candidatesPerPrompt: -1", "spec.gate.candidatesPerPrompt", "1..16"),
        ("maxCandidates: 200", "maxCandidates: 20", "spec.gate.maxCandidates", "target_kept (40)"),
        ("targetKept: 40", "targetKept: -3", "spec.gate.targetKept", ">= 0"),
        ("questionSource: vqa_backend", "questionSource: oracle", "spec.gate.questionSource", "generated, inline, vqa_backend"),
        ("threshold: 0.75", "treshold: 0.75", "spec.gate.treshold", "unknown field"),
    ],
)
def test_a_bad_gate_section_names_the_field_and_line(old, new, field, message):
    assert old in GATED
    text = GATED.replace(old, new)
    line = text.splitlines().index(next(s for s in text.splitlines() if new in s)) + 1
    with pytest.raises(SkillSetError) as ei:
        parse_skillset(text, source="bad.yaml")
    assert ei.value.field == field
    assert f"bad.yaml:{line}:" in str(ei.value) and message in str(ei.value), str(ei.value)


@pytest.mark.parametrize("path", [EXAMPLES / "sd2.yaml", EXAMPLES / "sdxl.yaml",
                                  EXAMPLES.parent / "testbeds/shapesworld/selma_shapesworld/data/skillset-gated.yaml"])
def test_shipped_gate_sections_pass_the_gate_services_own_rules(path, tmp_path):
    from selma.api import message_to_dict
    from selma_evaluation.gate import parse_gate_settings
    from selma_evaluation.settings import EvaluationSettings

    ss = load_skillset(path)
    assert ss.gate is not None
    # the cluster's operator lists the in-cluster vLLM endpoints the examples name (SSRF allow-lists)
    endpoints = ["http://vllm-vl.llm.svc.cluster.local:8000/v1", "http://vllm.llm.svc.cluster.local:8000/v1"]
    settings = EvaluationSettings(data_dir=tmp_path, hf_offline=True, eval_allowed_base_urls=endpoints, llm_allowed_base_urls=endpoints)
    cfg = parse_gate_settings(message_to_dict(ss.gate), settings)
    assert cfg.threshold == 1.0 and cfg.per_prompt in (4, 8) and cfg.max_candidates >= cfg.target_kept > 0
