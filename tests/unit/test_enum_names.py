"""selma.api's one enum-name helper: proto enum values ⇄ short lower-case names."""

from __future__ import annotations

import pytest

from selma.api import enum_name, enum_prefix, enum_proto_name, enum_value
from selma.errors import InvalidArgument
from selma.v1 import common_pb2, evaluation_service_pb2, serving_service_pb2, training_service_pb2

ENUMS = [
    common_pb2.Scheduler,
    common_pb2.SeedPolicy,
    common_pb2.MergeMethod,
    common_pb2.JobPhase,
    common_pb2.ArtifactKind,
    serving_service_pb2.AdapterFormat,
    training_service_pb2.LrSchedule,
    evaluation_service_pb2.EvaluationMetric,
]


def test_prefix_comes_from_the_unspecified_value():
    assert enum_prefix(common_pb2.Scheduler) == "SCHEDULER_"
    assert enum_prefix(common_pb2.MergeMethod.DESCRIPTOR) == "MERGE_METHOD_"
    assert enum_prefix(training_service_pb2.LrSchedule) == "LR_SCHEDULE_"


def test_every_spelling_of_a_value():
    for spelling in (common_pb2.SCHEDULER_DPM_SOLVER_MULTISTEP, "SCHEDULER_DPM_SOLVER_MULTISTEP", "dpm_solver_multistep", "DPM-Solver-Multistep", " dpm_solver_multistep "):
        assert enum_name(common_pb2.Scheduler, spelling) == "dpm_solver_multistep"
        assert enum_value(common_pb2.Scheduler, spelling) == common_pb2.SCHEDULER_DPM_SOLVER_MULTISTEP
        assert enum_proto_name(common_pb2.Scheduler, spelling) == "SCHEDULER_DPM_SOLVER_MULTISTEP"


def test_unspecified_in_any_form_is_empty_or_zero():
    for spelling in (None, "", 0, "SCHEDULER_UNSPECIFIED", "unspecified"):
        assert enum_name(common_pb2.Scheduler, spelling) == ""
        assert enum_value(common_pb2.Scheduler, spelling) == 0
        assert enum_proto_name(common_pb2.Scheduler, spelling) == "SCHEDULER_UNSPECIFIED"


@pytest.mark.parametrize("enum", ENUMS, ids=lambda e: e.DESCRIPTOR.name)
def test_round_trip_over_every_value(enum):
    for v in enum.DESCRIPTOR.values:
        short = enum_name(enum, v.number)
        assert short == ("" if v.number == 0 else v.name.removeprefix(enum_prefix(enum)).lower())
        assert enum_value(enum, short) == v.number and enum_proto_name(enum, short) == v.name


@pytest.mark.parametrize("bad", [99, -1, "bogus", "MERGE_METHOD_TIES", True, 1.5, b"ddim"])
def test_unknown_values_are_invalid_and_name_the_field_and_the_choices(bad):
    with pytest.raises(InvalidArgument) as e:
        enum_name(common_pb2.Scheduler, bad, field="spec.settings.diffusion.scheduler")
    assert e.value.field == "spec.settings.diffusion.scheduler"
    assert "ddim" in str(e.value) and "euler_ancestral" in str(e.value) and "unspecified" not in str(e.value)
    with pytest.raises(InvalidArgument) as e:
        enum_value(common_pb2.MergeMethod, bad if bad != "MERGE_METHOD_TIES" else "SCHEDULER_DDIM")
    assert e.value.field == "merge_method"  # default: the enum's prefix
