"""``selma.api.check_request``: what the wire lets through and the API refuses (issue #18 item 4).

proto3 lets a client send any number where an enum goes and any (seconds, nanos) as a Duration or
Timestamp; the server boundary refuses both with INVALID_ARGUMENT naming the field's path, before a
handler (and json_format, which used to raise ValueError/OverflowError on them) sees the request.
"""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from selma.api import DURATION_MAX_SECONDS, TIMESTAMP_MAX_SECONDS, TIMESTAMP_MIN_SECONDS, check_request
from selma.errors import ErrorCode, InvalidArgument
from selma.v1 import common_pb2, render_service_pb2, training_service_pb2


def refused(msg) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as e:
        check_request(msg)
    assert e.value.code == ErrorCode.INVALID_ARGUMENT
    return e.value


def test_an_unknown_nested_enum_number_is_refused_naming_its_path_and_the_choices():
    req = render_service_pb2.StartDatasetRenderRequest(idempotency_key="k")
    req.spec.prompt_set.kind = 99
    err = refused(req)
    assert err.field == "spec.prompt_set.kind"
    assert "99" in str(err) and "prompt_set" in err.message  # one of the choices, in the enum's short names
    req.spec.prompt_set.kind = common_pb2.ARTIFACT_KIND_PROMPT_SET
    check_request(req)


def test_an_unknown_number_in_a_repeated_enum_names_its_index():
    req = render_service_pb2.ListDatasetRendersRequest()
    req.filter.phases.extend([common_pb2.JOB_PHASE_RUNNING, -5])
    assert refused(req).field == "filter.phases[1]"


@pytest.mark.parametrize("seconds, nanos", [
    (0, 0), (DURATION_MAX_SECONDS, 999_999_999), (-DURATION_MAX_SECONDS, -999_999_999), (1, 5), (-1, -5), (0, -3),
])
def test_durations_in_range_pass_and_json_format_accepts_them(seconds, nanos):
    req = render_service_pb2.WatchDatasetRenderRequest(job_id="j")
    req.min_interval.seconds, req.min_interval.nanos = seconds, nanos
    check_request(req)
    json_format.MessageToDict(req)  # what the handlers do with specs; it must not raise on what passed


@pytest.mark.parametrize("seconds, nanos", [
    (DURATION_MAX_SECONDS + 1, 0), (-DURATION_MAX_SECONDS - 1, 0), (2**63 - 1, 0), (0, 1_000_000_000), (0, -(2**31)),
    (1, -1), (-1, 1),
])
def test_durations_out_of_range_are_refused_naming_the_field(seconds, nanos):
    req = training_service_pb2.WatchExpertTrainingRequest(job_id="j")
    req.min_interval.seconds, req.min_interval.nanos = seconds, nanos
    with pytest.raises((ValueError, OverflowError, json_format.Error)):
        json_format.MessageToDict(req)  # the INTERNAL this replaces
    err = refused(req)
    assert err.field == "min_interval" and f"seconds={seconds}" in err.message


def test_a_duration_deep_in_a_training_spec_is_refused_naming_its_path():
    req = training_service_pb2.StartExpertTrainingRequest(idempotency_key="k")
    placement = next(f for f in req.spec.DESCRIPTOR.fields if f.message_type and f.message_type.full_name == "selma.v1.Placement")
    getattr(req.spec, placement.name).active_deadline.seconds = -(10**13)
    assert refused(req).field == f"spec.{placement.name}.active_deadline"


@pytest.mark.parametrize("seconds, nanos, ok", [
    (TIMESTAMP_MIN_SECONDS, 0, True), (TIMESTAMP_MAX_SECONDS, 999_999_999, True), (0, 0, True),
    (TIMESTAMP_MIN_SECONDS - 1, 0, False), (TIMESTAMP_MAX_SECONDS + 1, 0, False), (0, -1, False), (0, 10**9, False),
])
def test_timestamps_are_checked_against_their_documented_range(seconds, nanos, ok):
    # no request of this API holds a Timestamp today; the rule still covers one that will
    status = common_pb2.JobStatus(job_id="j")
    status.created_at.seconds, status.created_at.nanos = seconds, nanos
    if ok:
        check_request(status)
        json_format.MessageToDict(status)
    else:
        assert refused(status).field == "created_at"

