"""A new user's first hour: CLI failures are one line naming the address, `selma lineage` takes the
names users see elsewhere, an unreachable endpoint fails bounded, and s3:// never targets AWS implicitly."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from selma.app.cli import main
from selma.app.local_stack import LocalStack
from selma.app.runner import Reporter, RunDriver, RunState
from selma.app.skillset import load_skillset
from selma.client import Endpoints, SelmaClient
from selma.errors import InvalidArgument, RunFailed
from selma.jobs import EXPERT_TRAINING_KIND, job_id_for
from selma.storage import S3Storage, open_storage
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc
from selma.v1 import training_service_pb2 as training_pb
from selma.v1 import training_service_pb2_grpc as training_grpc

REPO = Path(__file__).resolve().parents[2]
MERGED, EXPERT, PROMPTS = "merged-quickstart-1", "expert-run1-spatial-1", "prompt-set-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeServing(pb_grpc.ServingServiceServicer):
    """Just what `selma lineage` needs: ListModels, ListExperts, GetLineage."""

    manifests = {
        MERGED: common_pb2.ArtifactManifest(id=MERGED, kind=common_pb2.ARTIFACT_KIND_MERGED_MODEL, parent_ids=[EXPERT]),
        EXPERT: common_pb2.ArtifactManifest(id=EXPERT, kind=common_pb2.ARTIFACT_KIND_EXPERT, skill="spatial", parent_ids=[PROMPTS]),
        PROMPTS: common_pb2.ArtifactManifest(id=PROMPTS, kind=common_pb2.ARTIFACT_KIND_PROMPT_SET),
    }

    def ListModels(self, request, context):  # noqa: N802
        return pb.ListModelsResponse(models=[pb.ModelInfo(model_name="base"), pb.ModelInfo(model_name="quickstart", artifact=common_pb2.ArtifactRef(id=MERGED))])

    def ListExperts(self, request, context):  # noqa: N802
        if (request.run, request.skill) == ("run1", "spatial"):
            return pb.ListExpertsResponse(experts=[pb.ExpertInfo(expert_id=EXPERT, run="run1", skill="spatial")])
        return pb.ListExpertsResponse()

    def GetLineage(self, request, context):  # noqa: N802
        aid = request.artifact.id
        if aid not in self.manifests:
            context.abort(grpc.StatusCode.NOT_FOUND, f"artifact {aid} does not exist")
        out, todo = [], [aid]
        while todo:
            m = self.manifests[todo.pop(0)]
            out.append(m)
            todo.extend(m.parent_ids)
        return pb.GetLineageResponse(artifacts=out)


class FakeTraining(training_grpc.TrainingServiceServicer):
    """Just what `<run>/<skill>` needs: the run's training job, whose output is the expert it recorded."""

    def GetExpertTraining(self, request, context):  # noqa: N802
        if request.job_id != job_id_for(EXPERT_TRAINING_KIND, "run1/spatial/training"):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id}")
        status = common_pb2.JobStatus(job_id=request.job_id, phase=common_pb2.JOB_PHASE_SUCCEEDED, output=common_pb2.ArtifactRef(id=EXPERT))
        return training_pb.GetExpertTrainingResponse(job=training_pb.ExpertTrainingJob(status=status))


@pytest.fixture(scope="module")
def serving_endpoints(tmp_path_factory):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ServingServiceServicer_to_server(FakeServing(), server)
    training_grpc.add_TrainingServiceServicer_to_server(FakeTraining(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    path = tmp_path_factory.mktemp("ep") / "endpoints.json"
    Endpoints(serving=f"127.0.0.1:{port}", training=f"127.0.0.1:{port}").save(path)
    yield str(path), f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("name,expected", [("quickstart", MERGED), ("run1/spatial", EXPERT), (MERGED, MERGED)])
def test_lineage_accepts_a_model_name_an_expert_reference_or_an_id(serving_endpoints, capsys, name, expected):
    path, _ = serving_endpoints
    assert main(["lineage", name, "--endpoints", path]) == 0
    out = capsys.readouterr().out
    assert expected in out and PROMPTS in out and "missing" not in out


def test_lineage_of_an_unknown_name_is_one_line_naming_the_address(serving_endpoints, capsys):
    path, address = serving_endpoints
    assert main(["lineage", "no-such-thing", "--endpoints", path]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert address in err and "NOT_FOUND" in err and "selma lineage" in err


def test_an_unreachable_endpoint_is_one_line_naming_it_and_debug_gives_the_traceback(tmp_path, capsys):
    address = f"127.0.0.1:{_free_port()}"
    path = tmp_path / "endpoints.json"
    Endpoints(serving=address).save(path)
    assert main(["lineage", MERGED, "--endpoints", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert address in err and "UNAVAILABLE" in err and "selma up" in err
    assert main(["--debug", "lineage", MERGED, "--endpoints", str(path)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_selma_run_against_a_wrong_endpoint_fails_bounded_naming_the_address(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    (tmp_path / "endpoints.json").write_text(json.dumps({n: address for n in ("prompts", "render", "training", "serving")}))
    proc = subprocess.run(
        [sys.executable, "-m", "selma.app.cli", "run", str(REPO / "examples" / "quickstart.yaml"), "--dir", str(tmp_path), "--plain", "--wait", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert address in proc.stdout  # the wait named where it waits
    assert address in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_service_that_stays_away_fails_the_run_after_the_bounded_outage(tmp_path):
    address = f"127.0.0.1:{_free_port()}"
    skillset = load_skillset(str(REPO / "examples" / "quickstart.yaml"))
    state = RunState.open(tmp_path / "runs", skillset)
    notes: list[str] = []
    reporter = Reporter.__new__(Reporter)
    reporter.note = notes.append  # type: ignore[method-assign]
    with SelmaClient(Endpoints(prompts=address, render=address, training=address, serving=address), timeout=2) as client:
        driver = RunDriver(client, skillset, state, reporter, retry_seconds=0.05, max_outage=0.5)
        done: list[BaseException] = []
        skill = skillset.skills[0]

        def drive() -> None:
            try:
                driver.drive("prompts", skill.name, skillset.prompt_spec(skill))
            except BaseException as e:  # noqa: BLE001 - checked below
                done.append(e)

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        t.join(120)
        driver.stop()
    assert done, "the run kept retrying an unreachable service"
    assert isinstance(done[0], RunFailed), done[0]
    assert address in str(done[0]) and "unreachable" in str(done[0])
    assert notes and all(address in n for n in notes)


def test_s3_storage_without_an_endpoint_fails_at_once_naming_the_setting(make_settings):
    with pytest.raises(InvalidArgument) as e:
        open_storage(make_settings(storage_uri="s3://bucket/prefix"))
    assert "SELMA_S3_ENDPOINT" in str(e.value) and "s3.amazonaws.com" in str(e.value)
    aws = open_storage(make_settings(storage_uri="s3://bucket/prefix", s3_endpoint="s3.amazonaws.com"))
    assert isinstance(aws, S3Storage) and aws.endpoint == "s3.amazonaws.com"


def test_selma_up_with_s3_storage_and_no_endpoint_fails_before_starting_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SELMA_S3_ENDPOINT", raising=False)

    def no_spawn(self, *a, **kw):
        raise AssertionError("selma up started a service with an s3:// storage and no SELMA_S3_ENDPOINT")

    monkeypatch.setattr(LocalStack, "_spawn", no_spawn)
    assert main(["up", "--dir", str(tmp_path / "d"), "--storage", "s3://bucket/prefix"]) == 2
    err = capsys.readouterr().err
    assert "SELMA_S3_ENDPOINT" in err and len(err.strip().splitlines()) == 1


def test_a_run_skill_reference_is_the_expert_the_run_recorded_not_one_found_by_labels(serving_endpoints, capsys):
    path, _ = serving_endpoints
    assert main(["lineage", "run1/counting", "--endpoints", path]) == 2  # run1 has no succeeded counting training job
    err = capsys.readouterr().err
    assert "recorded no expert" in err and "run1/counting/training" in err
