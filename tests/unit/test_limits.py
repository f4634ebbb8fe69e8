"""Request limits (selma.limits), short error messages (selma.errors), the placement policy
(selma.batch.kube.check_policy) and the training maxima: pure checks, no servers."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from selma.batch.kube import build_job, check_policy, validate_placement
from selma.batch.launchers import LaunchRequest
from selma.batch.settings import BatchSettings, parse_quantity
from selma.config import SelmaSettings
from selma.errors import MAX_MESSAGE_CHARS, InvalidArgument, NotFound, PermissionDenied, quote
from selma.limits import Limits
from selma.specs import expert_weights
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as spb
from selma.v1 import training_service_pb2 as tpb

MB = 1024 * 1024


def test_a_huge_value_in_any_error_message_is_cut_to_a_bounded_length():
    huge = "x" * (10 * MB)
    e = NotFound(f"no artifact {huge!r} in this store", field="artifact.id")
    text = str(e)
    assert len(text) <= MAX_MESSAGE_CHARS < 1024
    assert text.startswith("artifact.id: no artifact 'xxx") and text.endswith("in this store")
    cut = int(re.search(r"…\[(\d+) characters cut\]…", text).group(1))  # one note, saying how much was cut
    assert text.count("characters cut") == 1 and cut == len(f"no artifact {huge!r} in this store") - (len(text) - len("artifact.id: ")) + len(f" …[{cut} characters cut]… ")
    assert quote(huge) == repr("x" * 64) + f"… ({10 * MB} characters)"
    assert quote("short") == "'short'"


@pytest.mark.parametrize(
    ("message", "field", "setting"),
    [
        (spb.GenerateRequest(prompts=["a cat", "p" * 5000]), "prompts[1]", "SELMA_MAX_PROMPT_CHARS=4096"),
        (spb.GenerateRequest(prompts=["a cat"], model_name="m" * 2000), "model_name", "SELMA_MAX_ID_CHARS=1024"),
        (spb.GenerateRequest(prompts=["a"] * 10001), "prompts", "SELMA_MAX_REPEATED_ITEMS=10000"),
        (spb.StartMergeRequest(idempotency_key="k", spec=spb.MergeJobSpec(merge=common_pb2.MergeSpec(
            experts=[common_pb2.ExpertWeight(expert_id="e" * 5000)]))), "spec.merge.experts[0].expert_id", "SELMA_MAX_ID_CHARS"),
        (tpb.StartExpertTrainingRequest(idempotency_key="k", spec=tpb.ExpertTrainingSpec(labels={"k": "v" * 2000})),
         "spec.labels['k']", "SELMA_MAX_ID_CHARS"),
    ],
)
def test_every_string_and_repeated_field_is_bounded_naming_the_field_and_the_setting(message, field, setting):
    limits = Limits.from_settings(SelmaSettings())
    with pytest.raises(InvalidArgument) as e:
        limits.check_message(message)
    assert e.value.field == field and setting in str(e.value) and len(str(e.value)) < 1024


def test_requests_within_the_limits_pass_and_the_limits_follow_the_settings():
    ok = spb.GenerateRequest(prompts=["two red apples"] * 16, model_name="quickstart", diffusion=common_pb2.DiffusionSettings(negative_prompt="blur"))
    Limits.from_settings(SelmaSettings()).check_message(ok)
    tight = Limits.from_settings(SelmaSettings(max_prompt_chars=16, max_repeated_items=16))
    with pytest.raises(InvalidArgument, match="SELMA_MAX_PROMPT_CHARS=16"):
        tight.check_message(spb.GenerateRequest(prompts=["seventeen chars!!"]))
    with pytest.raises(InvalidArgument, match="SELMA_MAX_REPEATED_ITEMS=16"):
        tight.check_message(spb.GenerateRequest(prompts=["a"] * 17))


@pytest.mark.parametrize("weight", [1e30, 1e308, -1e30, 100.5])
def test_merge_weights_beyond_the_bound_are_refused_naming_the_setting(weight):
    with pytest.raises(InvalidArgument, match="SELMA_SERVING_MAX_MERGE_WEIGHT=100"):
        expert_weights([0.5, weight], max_abs=100.0, setting="serving_max_merge_weight")
    assert expert_weights([0.5, -100.0], max_abs=100.0, setting="serving_max_merge_weight") == [0.5, -100.0]


# --- the placement policy ------------------------------------------------------------------------


def test_quantities_parse_to_base_units():
    assert parse_quantity("500m") == Decimal("0.5") and parse_quantity("16Gi") == 16 * 2**30
    assert parse_quantity("1Ti") == 2**40 and parse_quantity("1e3") == 1000 and parse_quantity("2E") == 2 * 10**18
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("lots")
    with pytest.raises(ValueError):
        BatchSettings(batch_policy_max_memory="a lot")


TOLERATE_ALL = {"operator": "TOLERATION_OPERATOR_EXISTS"}
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "TOLERATION_OPERATOR_EXISTS", "effect": "TAINT_EFFECT_NO_SCHEDULE"}


@pytest.mark.parametrize(
    ("placement", "error", "field", "setting"),
    [
        ({"tolerations": [TOLERATE_ALL]}, PermissionDenied, "spec.placement.tolerations[0]", "SELMA_BATCH_POLICY_TOLERATIONS"),
        ({"tolerations": [GPU_TAINT]}, PermissionDenied, "spec.placement.tolerations[0]", "SELMA_BATCH_POLICY_TOLERATIONS"),
        ({"priority_class_name": "system-cluster-critical"}, PermissionDenied, "spec.placement.priority_class_name",
         "SELMA_BATCH_POLICY_PRIORITY_CLASSES"),
        ({"runtime_class_name": "nvidia"}, PermissionDenied, "spec.placement.runtime_class_name", "SELMA_BATCH_POLICY_RUNTIME_CLASSES"),
        ({"node_selector": {"kubernetes.io/hostname": "control-plane"}}, PermissionDenied, "spec.placement.node_selector",
         "SELMA_BATCH_POLICY_NODE_SELECTORS"),
        ({"affinity": {"nodeAffinity": {}}}, PermissionDenied, "spec.placement.affinity", "SELMA_BATCH_POLICY_ALLOW_AFFINITY"),
        ({"gpus": 1, "gpu_resource_name": "example.com/fpga"}, PermissionDenied, "spec.placement.gpu_resource_name",
         "SELMA_BATCH_POLICY_GPU_RESOURCE_NAMES"),
        ({"gpus": 8}, InvalidArgument, "spec.placement.gpus", "SELMA_BATCH_POLICY_MAX_GPUS=1"),
        ({"resources": {"memory_limit": "1Ti"}}, InvalidArgument, "spec.placement.resources.memory_limit", "SELMA_BATCH_POLICY_MAX_MEMORY=64Gi"),
        ({"resources": {"shm_size": "100Gi"}}, InvalidArgument, "spec.placement.resources.shm_size", "SELMA_BATCH_POLICY_MAX_MEMORY"),
        ({"resources": {"cpu_request": "64"}}, InvalidArgument, "spec.placement.resources.cpu_request", "SELMA_BATCH_POLICY_MAX_CPU=16"),
        ({"active_deadline": "31536000s"}, InvalidArgument, "spec.placement.active_deadline", "SELMA_BATCH_POLICY_MAX_ACTIVE_DEADLINE_SECONDS"),
    ],
)
def test_the_default_policy_refuses_what_the_operator_did_not_allow(placement, error, field, setting):
    validate_placement(placement)  # well-formed: only the policy refuses it
    with pytest.raises(error) as e:
        check_policy(placement, BatchSettings())
    assert e.value.field == field and setting in str(e.value)


def test_an_operator_policy_allows_exactly_what_it_lists():
    policy = BatchSettings(
        batch_policy_priority_classes=["batch-low"],
        batch_policy_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                  {"key": "spot", "operator": "Equal", "value": "true"}],
        batch_policy_node_selectors={"nvidia.com/gpu.product": ["NVIDIA-L40S"], "pool": []},
        batch_policy_max_gpus=4, batch_policy_max_memory="256Gi",
    )
    check_policy({"priority_class_name": "batch-low", "gpus": 4, "tolerations": [GPU_TAINT,
                  {"key": "spot", "operator": "TOLERATION_OPERATOR_EQUAL", "value": "true", "effect": "TAINT_EFFECT_NO_EXECUTE"}],
                  "node_selector": {"nvidia.com/gpu.product": "NVIDIA-L40S", "pool": "anything"},
                  "resources": {"memory_limit": "256Gi"}}, policy)
    refused = [
        {"tolerations": [TOLERATE_ALL]},  # every taint: more than any allowed toleration covers
        {"tolerations": [{"key": "nvidia.com/gpu", "operator": "TOLERATION_OPERATOR_EXISTS"}]},  # every effect, only NoSchedule allowed
        {"tolerations": [{"key": "spot", "operator": "TOLERATION_OPERATOR_EXISTS"}]},  # any value, only "true" allowed
        {"priority_class_name": "system-cluster-critical"},
        {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100"}},
        {"gpus": 5},
        {"resources": {"memory_request": "1Ti"}},
    ]
    for placement in refused:
        with pytest.raises((PermissionDenied, InvalidArgument)):
            check_policy(placement, policy)


def test_jobs_without_a_queue_get_the_policy_default_queue():
    req = LaunchRequest(job_id="expert-training-0123", idempotency_key="k", run="r", skill="s", config_uri="s3://b/c.json",
                        expert_id="e", placement={})
    assert "kueue.x-k8s.io/queue-name" not in build_job(req, BatchSettings())["metadata"]["labels"]
    labels = build_job(req, BatchSettings(batch_policy_default_queue="team-a"))["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
    req.placement["queue_name"] = "gpu"
    assert build_job(req, BatchSettings(batch_policy_default_queue="team-a"))["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"


@pytest.mark.parametrize(
    ("settings_msg", "field", "setting"),
    [
        ({"diffusion": {"negative_prompt": "n" * 5000}}, "settings.diffusion.negative_prompt", "SELMA_MAX_PROMPT_CHARS=4096"),
        ({"images_per_prompt": 17}, "settings.images_per_prompt", "SELMA_RENDER_MAX_IMAGES_PER_PROMPT=16"),
        ({"batch_size": 257}, "settings.batch_size", "SELMA_RENDER_MAX_BATCH_SIZE=256"),
        ({"diffusion": {"steps": 151}}, "settings.diffusion.steps", "SELMA_RENDER_MAX_STEPS=150"),
        ({"diffusion": {"width": 4096}}, "settings.diffusion.width", "SELMA_RENDER_MAX_RESOLUTION=2048"),
    ],
)
def test_render_settings_over_the_service_limits_name_the_setting(settings_msg, field, setting):
    from selma.api import dict_to_message
    from selma.v1 import render_service_pb2
    from selma_render.settings import RenderSettings
    from selma_render.spec import parse_render_settings

    msg = dict_to_message({"model": {"source": "tiny://sd"}, **settings_msg}, render_service_pb2.RenderSettings)
    with pytest.raises(InvalidArgument) as e:
        parse_render_settings(msg, RenderSettings())
    assert e.value.field == field and setting in str(e.value)


def test_every_limit_in_the_readme_is_a_setting_with_that_default():
    from pathlib import Path

    from selma_evaluation.settings import EvaluationSettings
    from selma_prompts.settings import PromptSettings
    from selma_render.settings import RenderSettings
    from selma_serving.settings import ServingSettings
    from selma_training.settings import TrainingSettings

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("### Limits", 1)[1].split("\n## ", 1)[0]
    fields = {}
    for cls in (EvaluationSettings, PromptSettings, RenderSettings, ServingSettings, TrainingSettings):
        for name, info in cls.model_fields.items():
            fields[f"SELMA_{name.upper()}"] = info
    rows = [line for line in section.splitlines() if line.startswith("| `SELMA_")]
    assert len(rows) >= 20
    for row in rows:
        names = re.findall(r"`(SELMA_[A-Z_]+)`", row.split("|")[1])
        assert names and all(n in fields for n in names), row
        first = fields[names[0]]
        default = first.default if first.default_factory is None else first.default_factory()
        shown = row.split("|")[2].split(",")[0].strip()
        if isinstance(default, int) and not isinstance(default, bool) and "MiB" not in shown:
            assert shown == str(default), (names[0], shown, default)


def test_a_quantity_only_the_launcher_pattern_accepts_is_a_clear_error_not_a_crash():
    placement = {"resources": {"memory_limit": "5K"}}
    validate_placement(placement)  # the launcher's own pattern lets it through
    with pytest.raises(InvalidArgument) as e:
        check_policy(placement, BatchSettings())
    assert e.value.field == "spec.placement.resources.memory_limit"
