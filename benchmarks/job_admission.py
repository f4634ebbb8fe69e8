"""What fair admission costs a Start and a Cancel as the queue grows (selma.jobs.JobManager).

Each side is a manager whose one slot is held by a job that never ends, with ``--small`` or
``--large`` jobs waiting, spread over ``--runs`` runs (round robin between them).  One call
starts a new job of a new run (saved record, then the admission order and every waiting job's
place recomputed) and cancels it (finished record, places recomputed again), on a file store in a
temporary directory.  The shared harness runs both sides (warm-up excluded, rotated order, paired
ratios per block).  Goal: with 1,000 waiting jobs one Start+Cancel stays well under the cost of
one storage write per waiting job (i.e. places are not saved one by one): ratio large/small < 10.

    .venv/bin/python benchmarks/job_admission.py [--small 10] [--large 1000] [--runs 5] [--calls 20]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import threading
import time
from pathlib import Path

from harness import compare

from selma.jobs import JobContext, JobManager, JobResult
from selma.storage import FileStorage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=10, help="jobs waiting on the baseline side")
    ap.add_argument("--large", type=int, default=1000, help="jobs waiting on the other side")
    ap.add_argument("--runs", type=int, default=5, help="runs the waiting jobs belong to")
    ap.add_argument("--calls", type=int, default=20, help="Start+Cancel pairs per timed call")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    hold = threading.Event()

    def held(ctx: JobContext) -> JobResult:
        while not hold.wait(0.05):
            ctx.check_cancelled()
        return JobResult()

    with tempfile.TemporaryDirectory() as tmp:
        managers: dict[str, JobManager] = {}
        for name, waiting in ((f"{args.small} waiting", args.small), (f"{args.large} waiting", args.large)):
            mgr = JobManager(FileStorage(Path(tmp) / name.replace(" ", "-")), "expert_training", held,
                             max_concurrent=4, max_admitted=1, max_waiting=waiting + 10)
            for i in range(waiting + 1):  # the first one holds the slot
                mgr.start(f"run-{i % args.runs}/skill-{i}", {"i": i}, run=f"run-{i % args.runs}")
            managers[name] = mgr
        counter = itertools.count()

        def side(mgr: JobManager):
            def call() -> float:
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    n = next(counter)
                    rec, _ = mgr.start(f"new-{n}/x", {"n": n}, run=f"new-{n}")
                    mgr.cancel(rec.job_id)
                return (time.perf_counter() - t0) / args.calls
            return call

        names = list(managers)
        cmp = compare({name: side(mgr) for name, mgr in managers.items()}, baseline=names[0], repeats=args.repeats,
                      title=f"Start+Cancel of one job with {args.small} vs {args.large} jobs waiting ({args.runs} runs, one slot)")
        cmp.print(per="Start+Cancel")
        hold.set()
        for mgr in managers.values():
            mgr.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
