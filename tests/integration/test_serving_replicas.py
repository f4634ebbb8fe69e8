"""Two serving replicas (`selma up --serving-replicas 2`, real `selma serve serving` processes on the
tiny SD model, one shared store): a mix always goes to the replica it hashes to while both are up,
so its merge cache hits; it moves to the next replica when that one goes away; a model registered
through one replica is served by the other; `selma generate` shows where it went and whether it hit.
"""

from __future__ import annotations

import re
import urllib.request

import _processes
import pytest

from selma.app.cli import main
from selma.app.local_stack import LocalStack
from selma.artifacts import ArtifactStore
from selma.client import SelmaClient, generate_routing_key, last_target
from selma.config import SelmaSettings
from selma.storage import open_storage
from selma.v1 import common_pb2
from selma.v1 import serving_service_pb2 as pb
from selma.v1 import serving_service_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = dict(steps=2, width=64, height=64, seed=1)
START_TIMEOUT = 300.0  # two cores shared with the rest of the suite


@pytest.fixture(scope="module")
def replicas(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas") / ".selma"
    stack = LocalStack(root, services=("serving",), serving_replicas=2, base_model=str(tiny_models.sd),
                       extra_env={"SELMA_SERVING_MAX_STEPS": "20", "SELMA_SERVING_MAX_RESOLUTION": "128", "SELMA_LOG_LEVEL": "WARNING"})
    try:
        stack.start(timeout=START_TIMEOUT)
        for sp in stack.processes.values():
            _processes.track(sp.proc.pid, f"selma serve serving ({sp.name})")
        from selma_serving.testing import make_expert

        store = ArtifactStore(open_storage(SelmaSettings(storage_uri=(root / "storage").as_uri())))
        experts = [make_expert(store, str(tiny_models.sd), seed=s, skill=f"skill{s}", run="replicas").id for s in (1, 2, 3)]
        yield stack, experts
    finally:
        stack.stop(grace=10)


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _by_address(stack: LocalStack) -> dict:
    return {sp.address: sp for sp in stack.processes.values()}


def _generate(client: SelmaClient, **kwargs) -> tuple[str, bool]:
    resps = list(client.generate(["two red apples"], **TINY, **kwargs))
    assert len(resps) == 1 and resps[0].image.png
    return last_target()[1], resps[0].model.merge_cache_hit


def test_a_model_registered_through_one_replica_is_served_by_the_other(replicas):
    stack, experts = replicas
    with SelmaClient(stack.endpoints()) as client:
        (a, stub_a), (b, stub_b) = client.serving_stubs("base")
        ref = common_pb2.ArtifactRef(id=experts[2], kind=common_pb2.ARTIFACT_KIND_EXPERT)
        stub_a.RegisterModel(pb.RegisterModelRequest(model_name="via-a", artifact=ref), timeout=60)
        assert "via-a" in {m.model_name for m in stub_b.ListModels(pb.ListModelsRequest(), timeout=60).models}
        req = pb.GenerateRequest(prompts=["a cat"], model_name="via-a", seed=1,
                                 diffusion=common_pb2.DiffusionSettings(steps=2, width=64, height=64))
        resps = list(stub_b.Generate(req, timeout=300))
        assert len(resps) == 1 and resps[0].model.model_name == "via-a" and not resps[0].model.merge_cache_hit
        before_on_b = resps[0].image.png
        assert next(iter(stub_b.Generate(req, timeout=300))).model.merge_cache_hit  # loaded once, held

        # re-pointed through A while B holds the old weights fused: B serves the new target
        ref = common_pb2.ArtifactRef(id=experts[0], kind=common_pb2.ARTIFACT_KIND_EXPERT)
        stub_a.RegisterModel(pb.RegisterModelRequest(model_name="via-a", artifact=ref, replace=True), timeout=60)
        on_a = next(iter(stub_a.Generate(req, timeout=300))).image.png
        on_b = next(iter(stub_b.Generate(req, timeout=300)))
        assert on_b.image.png == on_a != before_on_b and not on_b.model.merge_cache_hit  # fused anew for the new target


def _labelled_metric(url: str, sample: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    m = re.search(rf"^{re.escape(sample)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_a_merge_job_runs_on_the_replica_that_will_serve_its_model_so_it_is_served_warm(replicas):
    stack, experts = replicas
    procs = _by_address(stack)
    job_merges = 'selma_serving_merge_seconds_count{source="job"}'
    with SelmaClient(stack.endpoints()) as client:
        base_first = client.serving_stubs("base")[0][0]
        # a model name whose replica is not the one "base" prefers (job RPCs used to route by "base")
        name = next(n for n in (f"pinned-{i}" for i in range(100)) if client.serving_stubs(f"model:{n}")[0][0] != base_first)
        owner = client.serving_stubs(f"model:{name}")[0][0]
        before = {a: _labelled_metric(sp.metrics_url, job_merges) for a, sp in procs.items()}
        spec = pb.MergeJobSpec(model_name=name, load=True, merge=common_pb2.MergeSpec(
            method=common_pb2.MERGE_METHOD_MEAN_DELTA, experts=[common_pb2.ExpertWeight(expert_id=e, weight=0.5) for e in experts[:2]]))
        merges = client.jobs("merge")
        started, created = merges.start(f"pinned/{name}", spec)
        assert created and last_target()[1] == owner
        job = list(merges.watch(started.status.job_id, timeout=300))[-1]  # the owner's stream ends when the job does
        assert job.status.phase == common_pb2.JOB_PHASE_SUCCEEDED, job.status.message
        assert last_target()[1] == owner
        # another JobClient of the same client knows where the job lives
        assert client.jobs("merge").get(job.status.job_id).status.phase == common_pb2.JOB_PHASE_SUCCEEDED
        assert last_target()[1] == owner
        assert {a: _labelled_metric(sp.metrics_url, job_merges) - before[a] for a, sp in procs.items()} == \
            {owner: 1.0, base_first: 0.0}
        # the first Generate of the model lands where it was built and loaded: already fused there
        assert _generate(client, model_name=name) == (owner, True)


def test_the_same_mix_goes_to_the_same_replica_and_moves_when_it_goes_away(replicas):
    stack, experts = replicas
    mix = {experts[0]: 0.6, experts[1]: 0.4}
    procs = _by_address(stack)
    with SelmaClient(stack.endpoints()) as client:
        key = generate_routing_key(pb.GenerateRequest(prompts=["x"], experts=common_pb2.MergeSpec(
            method=common_pb2.MERGE_METHOD_MEAN_DELTA, experts=[common_pb2.ExpertWeight(expert_id=k, weight=v) for k, v in mix.items()])))
        first, second = [address for address, _ in client.serving_stubs(key)]
        misses_before = {a: _metric(sp.metrics_url, "selma_serving_merge_cache_misses_total") for a, sp in procs.items()}

        assert _generate(client, experts=mix) == (first, False)  # merged on its replica
        for _ in range(3):  # while the ring is stable: the same replica, from its cache
            assert _generate(client, experts=mix) == (first, True)
        assert _metric(procs[first].metrics_url, "selma_serving_merge_cache_misses_total") == misses_before[first] + 1
        assert _metric(procs[first].metrics_url, "selma_serving_merge_cache_hits_total") >= 3
        assert _metric(procs[second].metrics_url, "selma_serving_merge_cache_misses_total") == misses_before[second]

        # the mix's replica goes away (stopped by its PID): the next one in the mix's order takes it, and keeps it
        victim = procs[first].proc
        victim.terminate()
        victim.wait(timeout=60)
        assert _generate(client, experts=mix) == (second, False)
        assert _generate(client, experts=mix) == (second, True)


def test_selma_generate_prints_the_replica_and_cache_hits_on_a_repeated_mix(replicas, capsys, tmp_path):
    stack, experts = replicas
    endpoints = tmp_path / "endpoints.json"
    live = [sp.address for sp in stack.processes.values() if sp.proc.poll() is None]
    ep = stack.endpoints()
    ep.serving = "|".join(live)
    ep.save(endpoints)
    lines = []
    for _ in range(2):
        capsys.readouterr()
        code = main(["--log-level", "WARNING", "generate", "a dog", "--experts", f"{experts[1]}=0.5,{experts[2]}=0.5",
                     "--endpoints", str(endpoints), "-o", str(tmp_path / "dog.png"), "--steps", "2", "--width", "64", "--height", "64"])
        out, err = capsys.readouterr()
        assert code == 0, err
        lines.append(next(line for line in out.splitlines() if line.startswith("served by")))
    assert "cache miss" in lines[0] and "cache hit" in lines[1]
    assert lines[0].split(":")[0:2] == lines[1].split(":")[0:2]  # the same replica both times
    with SelmaClient(stack.endpoints()) as client:  # keep the pb_grpc import honest: a stub per replica
        assert all(isinstance(s, pb_grpc.ServingServiceStub) for _, s in client.serving_stubs("base"))
