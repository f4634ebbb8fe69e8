"""Different expert mixes in one batched call (unfused, per-row LoRA) vs one fused call per mix (never a pass/fail test).

N requests, each with its own expert mix (one image each), through the serving engine:
  * ``fused serial, cold``  (baseline): each mix merged, fused into a UNet copy and run alone, one
    after the other: what serving does today for N new mixes (merge build cost included);
  * ``fused serial, warm``: the same with every fused mix already cached (the best fused case: no build);
  * ``mixed batch``: all N queued together, run as one call whose rows each carry their own mix
    (``SELMA_SERVING_MIXED_BATCH_MIN_MIXES``), nothing merged or fused;
  * ``one mix, batch of N`` (anchor): the same N images with a single warm fused mix in one call.

Shared harness (benchmarks/harness.py): one process, warm-up excluded, order rotated per block,
paired ratios per block.  ``--tolerance-rounds R`` also measures how far mixed-batch images are from
each request's solo fused image (the figure behind MIXED_TOLERANCE in
tests/unit/test_serving_mixed_batch.py).

    .venv/bin/python benchmarks/serving_mixed_batch.py [--mixes 4 8] [--experts 4] [--rank 8] [--steps 4] [--size 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from harness import compare, machine
from PIL import Image


def run_together(engine, requests) -> list[list]:  # noqa: ANN001
    """Queue every request behind a held slot, then let them in at once (they share the leader's batch)."""
    from selma_serving.engine import Admission, QueueProgress

    saved, engine.admission = engine.admission, Admission(max_concurrent=1, max_queue=4 * len(requests))
    adm, out = engine.admission, [None] * len(requests)

    def run(i: int) -> None:
        out[i] = [x for x in engine.generate(requests[i]) if not isinstance(x, QueueProgress)]

    try:
        with adm.slot():
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
            for i, t in enumerate(threads):  # one at a time: the line's order is the list's order
                t.start()
                with adm._cond:
                    assert adm._cond.wait_for(lambda n=i + 1: adm.waiting == n, timeout=300)
        for t in threads:
            t.join()
    finally:
        engine.admission = saved
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="diffusers pipeline directory (default: build the tiny SD model)")
    parser.add_argument("--mixes", type=int, nargs="+", default=[4, 8], help="distinct mixes (= requests, one image each)")
    parser.add_argument("--experts", type=int, default=4, help="experts the mixes draw from (1 or 2 per mix)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tolerance-rounds", type=int, default=0, help="rounds of 8 mixes: mixed-batch images vs solo fused")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = the CI setting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    from selma.models.tiny import build_tiny
    from selma_serving.core import ServingCore
    from selma_serving.engine import BatchPolicy, GenerationRequest
    from selma_serving.merge import ExpertWeight, MergeParams
    from selma_serving.settings import ServingSettings
    from selma_serving.testing import make_expert

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = args.base or str(build_tiny(tmp_path / "tiny").sd)
        most = max([*args.mixes, 8])
        core = ServingCore(ServingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), serving_base_model=base,
                                           serving_max_batch_size=most, serving_max_queue=4 * most, serving_mixed_batch_min_mixes=2))
        core.start()
        engine = core.engine
        experts = [make_expert(core.store, base, seed=s, rank=args.rank, skill=f"skill{s}").id for s in range(1, args.experts + 1)]

        def mixes(n: int) -> list[MergeParams]:
            out: list[MergeParams] = []
            while len(out) < n:
                chosen = rng.sample(experts, rng.choice([1, 2]))
                m = MergeParams(experts=tuple(ExpertWeight(e, round(rng.uniform(0.3, 1.0), 2)) for e in chosen))
                if m not in out:
                    out.append(m)
            return out

        def requests(ms: list[MergeParams | None]) -> list[GenerationRequest]:
            return [GenerationRequest(prompts=[f"a red circle {i}"], steps=args.steps, width=args.size, height=args.size, seed=100 + i, merge=m)
                    for i, m in enumerate(ms)]

        def serial(reqs: list[GenerationRequest], *, cold: bool) -> None:
            engine.batching = BatchPolicy(1, 0.0)
            if cold:
                engine.cache.clear()
            for r in reqs:
                list(engine.generate(r))

        def batched(reqs: list[GenerationRequest], *, cold: bool) -> None:
            engine.batching = BatchPolicy(len(reqs), 0.0, mixed_min_mixes=2)
            if cold:
                engine.cache.clear()
            run_together(engine, reqs)

        for n in args.mixes:
            reqs = requests(mixes(n))
            one_mix = requests([reqs[0].merge] * n)
            serial(reqs, cold=False)  # fills the cache for the warm side
            cmp = compare({
                "fused serial, cold": lambda reqs=reqs: serial(reqs, cold=True),
                "fused serial, warm": lambda reqs=reqs: serial(reqs, cold=False),
                "mixed batch": lambda reqs=reqs: batched(reqs, cold=True),
                "one mix, batch of N (anchor)": lambda one_mix=one_mix: batched(one_mix, cold=False),
            }, baseline="fused serial, cold", repeats=args.repeats,
                title=f"{n} distinct mixes, 1 image each, tiny SD {args.size}x{args.size}, {args.steps} steps, "
                      f"{args.experts} experts of rank {args.rank}")
            cmp.notes.append("the cold and warm sides fill the fused cache; the mixed batch starts with it empty (nothing merged)")
            cmp.print(unit="s", per=f"{n} images", speedup=True)

        if args.tolerance_rounds:
            worst, same, total = 0, 0, 0
            for _ in range(args.tolerance_rounds):
                reqs = requests(mixes(8))
                serial(reqs, cold=True)
                engine.batching = BatchPolicy(1, 0.0)
                alone = [next(iter(engine.generate(r))).png for r in reqs]
                engine.batching = BatchPolicy(8, 0.0, mixed_min_mixes=2)
                engine.cache.clear()
                mixed = [imgs[0] for imgs in run_together(engine, reqs)]
                assert all(i.served.kind == "mixes" for i in mixed)
                for b, s in zip(mixed, alone, strict=True):
                    d = int(np.abs(np.asarray(Image.open(io.BytesIO(b.png))).astype(int) - np.asarray(Image.open(io.BytesIO(s))).astype(int)).max())
                    worst, same, total = max(worst, d), same + (b.png == s), total + 1
            m = machine()
            print(f"== mixed-batch vs solo fused images, {args.tolerance_rounds} rounds x 8 distinct mixes, {args.steps} steps, "
                  f"{args.size}x{args.size}; machine: {m.get('cpus')} CPUs, torch threads {m.get('torch_threads')}")
            print(f"   images {total}, byte-identical {same}, max |mixed - fused| per 8-bit channel: {worst}")
        core.shutdown()


if __name__ == "__main__":
    main()
