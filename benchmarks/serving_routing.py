"""Merge-cache hits with two serving replicas: routed by mix (selma.routing) vs. round robin.

Two real `selma serve serving` processes (`selma up --serving-replicas 2` machinery) on the tiny SD
model and one store with four seeded experts.  The same sequence of requests — ``--mixes`` per-request
expert mixes, each asked ``--repeats`` times, interleaved — is sent once routed (one SDK client over
both replicas: each mix goes to the replica it hashes to) and once round robin (request i to replica
i mod 2, what a connection-balancing Service gives).  Each mode uses its own weights, so both start
cold.  Printed: the merge-cache hit ratio of each mode and the wall-time ratio round robin / routed.

    .venv/bin/python benchmarks/serving_routing.py [--mixes 5] [--repeats 4] [--steps 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from selma.app.local_stack import LocalStack
from selma.artifacts import ArtifactStore
from selma.client import Endpoints, SelmaClient
from selma.config import SelmaSettings
from selma.models.tiny import build_tiny
from selma.storage import open_storage
from selma_serving.testing import make_expert


def _mixes(experts: list[str], n: int, offset: float) -> list[dict[str, float]]:
    pairs = list(itertools.combinations(experts, 2))
    return [{a: 0.5 + offset + 0.01 * i, b: 0.5 - offset - 0.01 * i} for i, (a, b) in enumerate(itertools.islice(itertools.cycle(pairs), n))]


def _run(clients: list[SelmaClient], mixes: list[dict[str, float]], repeats: int, steps: int) -> tuple[int, int, float]:
    hits = total = 0
    t0 = time.perf_counter()
    for i, mix in enumerate(m for _ in range(repeats) for m in mixes):
        client = clients[i % len(clients)]
        for resp in client.generate(["two red apples"], experts=mix, steps=steps, width=64, height=64, seed=1):
            hits += resp.model.merge_cache_hit
            total += 1
    return hits, total, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", type=int, default=5, help="odd, so round robin sends each mix to both replicas")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_tiny(root / "tiny", seed=0)
        stack = LocalStack(root / ".selma", services=("serving",), serving_replicas=2, base_model=str(tiny.sd),
                           extra_env={"SELMA_LOG_LEVEL": "WARNING"})
        try:
            endpoints = stack.start(timeout=600)
            store = ArtifactStore(open_storage(SelmaSettings(storage_uri=(root / ".selma" / "storage").as_uri())))
            experts = [make_expert(store, str(tiny.sd), seed=s, skill=f"skill{s}", run="bench").id for s in range(4)]
            replicas = endpoints.serving.split("|")
            with SelmaClient(endpoints) as routed:
                r_hits, r_total, r_time = _run([routed], _mixes(experts, args.mixes, 0.0), args.repeats, args.steps)
            singles = [SelmaClient(Endpoints(serving=a)) for a in replicas]
            try:
                rr_hits, rr_total, rr_time = _run(singles, _mixes(experts, args.mixes, 0.2), args.repeats, args.steps)
            finally:
                for c in singles:
                    c.close()
        finally:
            stack.stop(grace=10)
    print(f"{args.mixes} mixes x {args.repeats} requests over 2 replicas, tiny SD, {args.steps} steps, 64x64")
    print(f"routed      merge-cache hits {r_hits}/{r_total} = {r_hits / r_total:.2f}   wall {r_time:.1f} s")
    print(f"round robin merge-cache hits {rr_hits}/{rr_total} = {rr_hits / rr_total:.2f}   wall {rr_time:.1f} s")
    print(f"round robin / routed wall time: {rr_time / r_time:.2f}x")


if __name__ == "__main__":
    main()
