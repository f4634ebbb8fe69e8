"""Data-parallel expert training: the shape of a distributed job, who a process is in it, and how a step is split.

A training spec may ask for ``nodes × processes_per_node`` trainer processes
(:func:`resolve_distributed`).  They all run ``selma train --config URI``:

* **The agent.**  ``selma train`` started by a launcher (a local subprocess, or a pod of the
  Kubernetes Indexed Job) reads the job document; when it asks for more than one process, it
  becomes a ``torchrun`` agent (:mod:`torch.distributed.run`, in process: it keeps the local
  launcher's parent-death signal and SIGTERM handling) that starts its node's processes, each
  running ``selma train --config URI`` again, and fails the node when any of them fails
  (``--max-restarts 0``: a rank cannot be replaced alone; the launcher restarts the whole run,
  which resumes from the last checkpoint).  Locally every process runs on this machine
  (``--standalone``); in a Job the node rank is the completion index and the rendezvous is the
  first pod (``MASTER_ADDR``/``MASTER_PORT`` from the Job, see :mod:`selma.batch.kube`), so
  ``RANK = node_rank × processes_per_node + LOCAL_RANK``.
* **A rank.**  A process with torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` joins the
  process group (NCCL on GPU, gloo on CPU) and trains with DistributedDataParallel.

**Splitting a step.**  The effective batch is the config's ``batch_size ×
gradient_accumulation_steps`` whatever the world size: micro-batch ``m`` of a step (positions
``[m·b, (m+1)·b)`` of the seeded sample stream) is trained by rank ``m mod W``
(:meth:`World.micro_batches`, DistributedSampler-like, deterministic), every rank draws the
random numbers of *every* micro-batch so that the generator state stays the same on all ranks
(and in rank 0's checkpoint), and each rank scales its loss by ``W / accumulation`` so that the
averaged gradient is the one-process gradient.  The adapter therefore equals a one-process run
with the same config and seed up to fp32 summation order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pydantic_settings import BaseSettings, SettingsConfigDict

from selma.batch.launchers import EXIT_BAD_INPUT, EXIT_INTERRUPTED
from selma.errors import FailedPrecondition, InvalidArgument
from selma.limits import check_at_most
from selma.specs import parse_int, parse_mapping

log = logging.getLogger(__name__)

WORKER_MODULE = "selma.app.cli"


class TorchrunEnv(BaseSettings):
    """torch's own variables (no ``SELMA_`` prefix): set by torchrun in a rank, by the Job in an agent's pod."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    rank: int | None = None
    local_rank: int | None = None
    world_size: int | None = None
    master_addr: str = ""
    master_port: int = 0


@dataclass(frozen=True)
class World:
    """This process's place among the trainer processes of one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes progress, checkpoints and the expert."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def micro_batches(self, accumulation: int) -> list[int]:
        """The micro-batches of every step this rank trains: ``m`` with ``m mod size == rank``."""
        return list(range(self.rank, accumulation, self.size))


def current_world(env: TorchrunEnv | None = None) -> World | None:
    """This process's World when torchrun started it as a rank; None otherwise (a single process, or an agent)."""
    env = env or TorchrunEnv()
    if env.rank is None or env.local_rank is None or env.world_size is None:
        return None
    return World(rank=env.rank, size=env.world_size, local_rank=env.local_rank)


# --- the request ------------------------------------------------------------------------------


def resolve_distributed(spec: dict[str, Any], placement: dict[str, Any], accumulation: int, settings: Any, launcher: str) -> tuple[int, int]:
    """(nodes, processes_per_node) of a training spec, checked; (1, 1) when it has no ``distributed`` section.

Without one a training is one process, however many GPUs its pod has (as before distributed
training existed); with one, unset counts default to one node and one process per GPU.

    INVALID_ARGUMENT naming the field for counts out of range, a processes_per_node that is not one
    per GPU, over the limits (SELMA_TRAINING_MAX_WORKERS, SELMA_BATCH_POLICY_MAX_NODES for Kubernetes)
    or a world size that does not divide ``gradient_accumulation_steps``.
    """
    if spec.get("distributed") is None:
        return 1, 1
    d = parse_mapping(spec.get("distributed"), "spec.distributed")
    nodes = parse_int(d.get("nodes"), "spec.distributed.nodes")
    per_node = parse_int(d.get("processes_per_node"), "spec.distributed.processes_per_node")
    gpus = int(placement.get("gpus", 0) or 0)
    if nodes < 0:
        raise InvalidArgument(f"nodes must be >= 0 (0 = 1); got {nodes}", field="spec.distributed.nodes")
    if per_node < 0:
        raise InvalidArgument(f"processes_per_node must be >= 0 (0 = one per GPU); got {per_node}", field="spec.distributed.processes_per_node")
    nodes = nodes or 1
    per_node = per_node or gpus or 1
    if gpus and per_node != gpus:
        raise InvalidArgument(f"processes_per_node must be one per GPU: placement.gpus is {gpus}; got {per_node}",
                              field="spec.distributed.processes_per_node")
    world = nodes * per_node
    check_at_most(world, "spec.distributed", settings.training_max_workers, "training_max_workers", "trainer processes (nodes x processes_per_node)")
    if launcher == "kubernetes":
        check_at_most(nodes, "spec.distributed.nodes", settings.batch_policy_max_nodes, "batch_policy_max_nodes", "nodes")
    if accumulation % world:
        raise InvalidArgument(
            f"gradient_accumulation_steps {accumulation} must be a multiple of the {world} trainer processes "
            f"(nodes x processes_per_node): the effective batch batch_size x gradient_accumulation_steps is split between them",
            field="config.gradient_accumulation_steps",
        )
    return nodes, per_node


# --- the agent --------------------------------------------------------------------------------


def agent_argv(nodes: int, per_node: int, worker_args: list[str], *, node_rank: int, env: TorchrunEnv) -> list[str]:
    """torchrun's arguments for this node: a multi-node rendezvous when the Job set ``MASTER_ADDR``, else all processes here."""
    if env.master_addr:
        if not env.master_port:
            raise FailedPrecondition("MASTER_ADDR is set but MASTER_PORT is not; the Job sets both")
        placement = ["--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--node-rank", str(node_rank),
                     "--master-addr", env.master_addr, "--master-port", str(env.master_port)]
    else:  # the local launcher: every rank of every "node" on this machine, rendezvous on a free local port
        placement = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nodes * per_node)]
    return [*placement, "--max-restarts", "0", "--module", WORKER_MODULE, *worker_args]


def run_agent(argv: list[str]) -> int:
    """Run torchrun with ``argv`` in this process; the exit code of the node (0, 2 bad input, 143 stopped, 1 failed)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    log.info("starting trainer processes: torchrun %s", " ".join(argv))
    try:
        run(parse_args(argv))
    except SignalException as e:
        log.warning("trainer processes stopped by signal %s", e.sigval)
        return EXIT_INTERRUPTED
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        log.error("trainer processes failed (exit codes %s): %s", codes, e.format_msg()[-2000:])
        if codes == [EXIT_BAD_INPUT]:
            return EXIT_BAD_INPUT
        if codes == [EXIT_INTERRUPTED]:
            return EXIT_INTERRUPTED
        return 1
    return 0


# --- a rank -------------------------------------------------------------------------------------


@contextmanager
def process_group(world: World, device: torch.device, timeout_seconds: int) -> Iterator[None]:
    """Join the job's process group (torchrun's env:// rendezvous) for the duration; nothing when not distributed."""
    if not world.distributed:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds),
                            **({"device_id": device} if device.type == "cuda" else {}))
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        dist.destroy_process_group()
        raise FailedPrecondition(f"process group is rank {dist.get_rank()} of {dist.get_world_size()}; expected {world.rank} of {world.size}")
    log.info("rank %d of %d joined the %s process group", world.rank, world.size, backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def _collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensors live: the GPU for NCCL, the CPU for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def sum_across(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (one small all-reduce); ``values`` itself when alone."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def same_on_all(world: World, value: int, device: torch.device, what: str) -> None:
    """FailedPrecondition unless every rank holds the same ``value`` (e.g. the step it resumed from)."""
    if not world.distributed:
        return
    t = torch.tensor([value, -value], dtype=torch.int64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0]), -int(t[1])
    if high != low:
        raise FailedPrecondition(f"trainer processes disagree on {what}: {low} .. {high}; is storage consistent for every rank?")
