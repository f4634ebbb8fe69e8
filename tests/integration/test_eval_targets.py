"""#23 item 9: an evaluation whose model or experts target does not exist is refused before a job
starts, NOT_FOUND naming the target, by asking the serving service's API (a real gRPC server here)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from selma.errors import NotFound
from selma.v1 import serving_service_pb2 as spb
from selma.v1 import serving_service_pb2_grpc as spb_grpc
from selma_evaluation.core import EvaluationCore
from selma_evaluation.settings import EvaluationSettings


class Serving(spb_grpc.ServingServiceServicer):
    """What the check asks: the models served and the experts that exist."""

    def ListModels(self, request, context):  # noqa: N802
        return spb.ListModelsResponse(models=[spb.ModelInfo(model_name="base"), spb.ModelInfo(model_name="quickstart")])

    def ListExperts(self, request, context):  # noqa: N802
        return spb.ListExpertsResponse(experts=[spb.ExpertInfo(expert_id="expert-counting-1", run="quickstart", skill="counting")])


@pytest.fixture(scope="module")
def serving_address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    spb_grpc.add_ServingServiceServicer_to_server(Serving(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def core(tmp_path, serving_address):
    settings = EvaluationSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), eval_serving_endpoint=serving_address)
    core = EvaluationCore(settings)
    yield core
    core.shutdown(wait=False)


def spec(*targets):
    return {"benchmark": "EVALUATION_BENCHMARK_DSG_1K", "categories": ["countbench"], "max_prompts": 1,
            "vqa": {"tiny_test": {}}, "targets": [{"label": "base"}, *targets]}


def test_targets_that_exist_on_the_serving_service_are_accepted(core):
    targets = ({"label": "m", "model_name": "quickstart"},
               {"label": "mix", "experts": {"experts": [{"expert_id": "expert-counting-1"}, {"expert_id": "quickstart/counting"}]}})
    _, _, doc = core.start("eval/ok", spec(*targets), validate_only=True)
    assert doc.serving_endpoint


@pytest.mark.parametrize(
    "target, named, field",
    [
        ({"label": "selma", "model_name": "quickstrat"}, "quickstrat", "spec.targets[1].model_name"),
        ({"label": "mix", "experts": {"experts": [{"expert_id": "quickstart/countnig"}]}}, "quickstart/countnig",
         "spec.targets[1].experts.experts[0].expert_id"),
        ({"label": "mix", "experts": {"experts": [{"expert_id": "expert-nosuch-1"}]}}, "expert-nosuch-1",
         "spec.targets[1].experts.experts[0].expert_id"),
    ],
)
def test_an_unknown_model_or_expert_target_is_not_found_before_any_job_starts(core, serving_address, target, named, field):
    with pytest.raises(NotFound) as e:
        core.start("eval/typo", spec(target))
    assert named in str(e.value) and serving_address in str(e.value) and e.value.field == field
    assert core.list()[0] == []  # no job was created


def test_a_search_over_an_unknown_expert_is_not_found(core):
    s = spec() | {"merge_search": {"expert_ids": ["expert-counting-1", "quickstart/nosuch"], "validation_prompt_set": {"id": "prompt-set-x"}}}
    with pytest.raises(NotFound) as e:
        core.start("eval/search", s)
    assert "quickstart/nosuch" in str(e.value)
