"""Distributed expert training without a cluster: the 2-node x 4-GPU Job, its headless Service and env,
torchrun's arguments, the request rules and how a step's micro-batches are split between ranks."""

from __future__ import annotations

import pytest
from test_training_job_manifest import settings, strict_validate

from selma.batch.kube import COMPLETION_INDEX_ANNOTATION, KUEUE_LABEL, build_job, build_rendezvous_service, job_name
from selma.batch.launchers import LaunchRequest
from selma.errors import InvalidArgument
from selma_training.distributed import TorchrunEnv, World, agent_argv, resolve_distributed
from selma_training.settings import TrainingSettings


def distributed_request(nodes: int = 2, per_node: int = 4, **placement) -> LaunchRequest:
    return LaunchRequest(job_id="expert-training-0123456789abcdef", idempotency_key="run-1/train/spatial", run="run-1",
                         skill="spatial", config_uri="s3://selma/root/artifacts/training-config-x/files/job.json",
                         expert_id="expert-abc", placement={"gpus": per_node, **placement}, nodes=nodes, processes_per_node=per_node)


def test_two_nodes_of_four_gpus_is_a_strict_valid_indexed_job_with_a_headless_service_and_torchrun_env():
    s = settings(batch_policy_max_gpus=4, batch_policy_max_nodes=2, batch_rendezvous_port=29511)
    req = distributed_request(queue_name="gpu-queue")
    job = build_job(req, s)
    strict_validate(job)
    name = job_name("run-1", "spatial", req.job_id)
    assert job["metadata"]["name"] == name
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    # one pod per node, all at once; any failed pod fails the Job (the launcher restarts the whole run)
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert "backoffLimitPerIndex" not in spec
    assert job["metadata"]["labels"][KUEUE_LABEL] == "gpu-queue"  # Kueue admits the whole Job: all pods or none
    assert pod["subdomain"] == name
    c = pod["containers"][0]
    assert c["command"] == ["selma", "train", "--config", req.config_uri]  # the node's torchrun agent
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = {e["name"]: e for e in c["env"]}
    assert env["MASTER_ADDR"]["value"] == f"{name}-0.{name}"
    assert env["MASTER_PORT"]["value"] == "29511"
    assert (env["WORLD_SIZE"]["value"], env["NNODES"]["value"], env["NPROC_PER_NODE"]["value"]) == ("8", "2", "4")
    index_ref = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == index_ref
    assert env["SELMA_BATCH_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == index_ref
    assert env["SELMA_DEVICE"]["value"] == "cuda"
    assert {"name": "rendezvous", "containerPort": 29511, "protocol": "TCP"} in c["ports"]

    svc = build_rendezvous_service(req, s, "5b1e2c4a-0000-4000-8000-000000000001")
    strict_validate(svc)
    assert svc["metadata"]["name"] == name  # the pods' subdomain
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert svc["spec"]["ports"] == [{"name": "rendezvous", "port": 29511, "targetPort": 29511, "protocol": "TCP"}]
    owner = svc["metadata"]["ownerReferences"]
    assert owner == [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": "5b1e2c4a-0000-4000-8000-000000000001"}]
    assert KUEUE_LABEL not in svc["metadata"]["labels"]

    # a new attempt (after a failed rank) is a new Job with its own Service
    retry = distributed_request(queue_name="gpu-queue")
    retry.attempt = 1
    assert build_job(retry, s)["metadata"]["name"] != name
    assert build_rendezvous_service(retry, s, "u")["metadata"]["name"] == build_job(retry, s)["metadata"]["name"]


def test_a_single_process_training_job_has_no_rendezvous():
    job = build_job(distributed_request(nodes=0, per_node=0), settings())
    pod = job["spec"]["template"]["spec"]
    names = {e["name"] for e in pod["containers"][0]["env"]}
    assert "completionMode" not in job["spec"] and "subdomain" not in pod
    assert not names & {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "SELMA_BATCH_COMPLETION_INDEX"}


def test_the_agent_runs_torchrun_at_the_jobs_rendezvous_or_standalone_on_one_machine():
    worker = ["train", "--config", "s3://b/job.json"]
    env = TorchrunEnv(master_addr="selma-train-x-0.selma-train-x", master_port=29500)
    assert agent_argv(2, 4, worker, node_rank=1, env=env) == [
        "--nnodes", "2", "--nproc-per-node", "4", "--node-rank", "1", "--master-addr", "selma-train-x-0.selma-train-x",
        "--master-port", "29500", "--max-restarts", "0", "--module", "selma.app.cli", *worker]
    # the local launcher: every process of every node here, on a free port
    assert agent_argv(2, 1, worker, node_rank=0, env=TorchrunEnv(master_addr="")) == [
        "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "0", "--module", "selma.app.cli", *worker]
    from torch.distributed.run import parse_args

    parsed = parse_args(agent_argv(2, 4, worker, node_rank=1, env=env))
    assert (parsed.nnodes, parsed.nproc_per_node, parsed.node_rank, parsed.max_restarts, parsed.module) == ("2", "4", 1, 0, True)
    assert parsed.training_script == "selma.app.cli" and parsed.training_script_args == worker


@pytest.mark.parametrize("accumulation,world", [(8, 1), (8, 2), (8, 8), (6, 3), (1, 1)])
def test_every_micro_batch_of_a_step_is_trained_by_exactly_one_rank(accumulation, world):
    shares = [World(rank=r, size=world).micro_batches(accumulation) for r in range(world)]
    assert sorted(m for share in shares for m in share) == list(range(accumulation))
    assert {len(share) for share in shares} == {accumulation // world}  # the same work on every rank


def test_distributed_spec_defaults_to_one_process_per_gpu():
    s = TrainingSettings(batch_policy_max_nodes=2)
    assert resolve_distributed({}, {}, 8, s, "local") == (1, 1)
    assert resolve_distributed({}, {"gpus": 4}, 1, s, "kubernetes") == (1, 1)  # no distributed section: one process, as before
    assert resolve_distributed({"distributed": {}}, {"gpus": 4}, 8, s, "kubernetes") == (1, 4)
    assert resolve_distributed({"distributed": {"nodes": 2}}, {"gpus": 4}, 8, s, "kubernetes") == (2, 4)
    assert resolve_distributed({"distributed": {"processes_per_node": 2}}, {}, 4, s, "local") == (1, 2)


@pytest.mark.parametrize("spec,placement,accumulation,launcher,field,words", [
    ({"processes_per_node": 2}, {"gpus": 4}, 8, "local", "spec.distributed.processes_per_node", "one per GPU"),
    ({"nodes": -1}, {}, 8, "local", "spec.distributed.nodes", ">= 0"),
    ({"nodes": 2, "processes_per_node": 2}, {}, 6, "local", "config.gradient_accumulation_steps", "multiple of the 4"),
    ({"nodes": 3}, {"gpus": 1}, 3, "kubernetes", "spec.distributed.nodes", "SELMA_BATCH_POLICY_MAX_NODES=2"),
    ({"nodes": 3, "processes_per_node": 4}, {}, 12, "local", "spec.distributed", "SELMA_TRAINING_MAX_WORKERS=8"),
])
def test_a_distributed_spec_outside_the_rules_is_refused_naming_the_field(spec, placement, accumulation, launcher, field, words):
    s = TrainingSettings(batch_policy_max_nodes=2, training_max_workers=8)
    with pytest.raises(InvalidArgument) as e:
        resolve_distributed({"distributed": spec}, placement, accumulation, s, launcher)
    assert e.value.field == field and words in str(e.value)


def test_the_local_launcher_is_not_held_to_the_node_policy():
    s = TrainingSettings(batch_policy_max_nodes=1)
    assert resolve_distributed({"distributed": {"nodes": 2}}, {}, 2, s, "local") == (2, 1)
