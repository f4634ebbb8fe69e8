"""How far a batched image is from the same request's solo image (a measurement, never a pass/fail test).

Runs --rounds rounds of --batch requests through the serving engine twice: each request alone
(batching off), and all of them queued together behind a held slot so they share batched
pipeline calls (batching on).  Requests vary prompts, seeds, negative prompts (with and without),
schedulers and per-request expert mixes (none, one expert, two).  Prints the max |batched - solo|
per channel of the 8-bit images and how many images were byte-identical: the figure behind
PIXEL_TOLERANCE in tests/unit/test_serving_batching.py.

    .venv/bin/python benchmarks/serving_batch_tolerance.py [--rounds 4] [--batch 8] [--steps 4]
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
from harness import machine
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="requests (one image each) per batched round")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    from selma.models.tiny import build_tiny
    from selma_serving.core import ServingCore
    from selma_serving.engine import Admission, BatchPolicy, GenerationRequest
    from selma_serving.merge import ExpertWeight, MergeParams
    from selma_serving.settings import ServingSettings
    from selma_serving.testing import make_expert

    rng = random.Random(0)
    words = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "two", "left of", "above", "big"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = str(build_tiny(tmp_path / "tiny").sd)
        core = ServingCore(ServingSettings(data_dir=tmp_path / "data", storage_uri=(tmp_path / "storage").as_uri(), serving_base_model=base,
                                           serving_max_batch_size=args.batch, serving_max_queue=4 * args.batch))
        core.start()
        engine = core.engine
        a, c = (make_expert(core.store, base, seed=s, rank=4, skill=k) for k, s in (("a", 1), ("c", 3)))
        mixes = [None, MergeParams(experts=(ExpertWeight(a.id, 1.0),)), MergeParams(experts=(ExpertWeight(a.id, 0.5), ExpertWeight(c.id, 0.5)))]
        worst, same, total = 0, 0, 0
        for r in range(args.rounds):
            mix, sched = mixes[r % len(mixes)], ["", "ddim", "euler_ancestral", "dpm_solver_multistep"][r % 4]
            neg = "blurry" if r % 2 else ""
            requests = [GenerationRequest(prompts=[" ".join(rng.sample(words, 3))], negative_prompt=neg, steps=args.steps,
                                          seed=rng.randrange(2**31), scheduler=sched, merge=mix) for _ in range(args.batch)]
            engine.batching = BatchPolicy(1, 0.0)
            alone = [next(iter(engine.generate(q))).png for q in requests]
            engine.batching = BatchPolicy(args.batch, 0.0)
            saved, engine.admission = engine.admission, Admission(max_concurrent=1, max_queue=4 * args.batch)
            adm, out = engine.admission, [b""] * len(requests)

            def run(i: int, requests=requests, out=out) -> None:
                out[i] = next(iter(engine.generate(requests[i]))).png

            with adm.slot():
                threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
                for t in threads:
                    t.start()
                with adm._cond:
                    adm._cond.wait_for(lambda adm=adm, n=args.batch: adm.waiting == n, timeout=120)
            for t in threads:
                t.join()
            engine.admission = saved
            for b, s in zip(out, alone, strict=True):
                d = int(np.abs(np.asarray(Image.open(io.BytesIO(b))).astype(int) - np.asarray(Image.open(io.BytesIO(s))).astype(int)).max())
                worst, same, total = max(worst, d), same + (b == s), total + 1
        core.shutdown()
    m = machine()
    print(f"== batched vs solo images, tiny SD, {args.steps} steps, {args.rounds} rounds x {args.batch} requests "
          f"(mixes: none / one expert / two; schedulers default/ddim/euler_ancestral/dpm++; negative prompt every other round)")
    print(f"   machine: {m.get('cpus')} CPUs, torch threads {m.get('torch_threads')}{', ' + str(m['device']) if 'device' in m else ''}")
    print(f"   images {total}, byte-identical {same}, max |batched - solo| per 8-bit channel: {worst}")


if __name__ == "__main__":
    main()
