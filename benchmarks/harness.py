"""The one benchmark method every script in ``benchmarks/`` uses (never a pass/fail test).

Why a shared harness: a speed claim must hold up when someone else re-runs it on a busy or a
quiet machine.  So every comparison here

* runs all sides in **one process** (same imports, allocator, CPU frequency state);
* excludes ``warmup`` calls of every side, then runs ``repeats`` **blocks**: each block calls
  every side once, in an order **rotated** per block (no side always runs first, or right after
  an expensive build);
* computes **paired ratios per block** (side / baseline within the same block, so slow drift of
  the machine's load cancels) and prints min / median / max of the times and of the ratios
  (a ratio's min is the min over blocks, never a quotient of minimums from different blocks);
* reports one-off **build costs** (caches, merges) beside the steady state, never hidden;
* records the machine: CPU count, load averages before and after, torch threads.

    from harness import compare
    cmp = compare({"rouge-score": slow, "ours": fast}, baseline="rouge-score", repeats=3)
    cmp.print("ROUGE-L filter, 1,000 prompts")

A side returns ``None`` (the harness times the call) or the seconds it measured itself (e.g.
only the steady-state part of a call).  ``SELMA_BENCH_JSON=path`` appends each comparison as one
JSON line, which is what the README's performance table is built from.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "cpus": os.cpu_count(),
        "load": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
    except ImportError:  # the ROUGE benchmark needs no torch
        pass
    return info


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


@dataclass
class Comparison:
    """Times per side (one per block) and paired ratios against the baseline."""

    title: str
    baseline: str
    times: dict[str, list[float]]
    builds: dict[str, float] = field(default_factory=dict)
    machine_before: dict[str, object] = field(default_factory=dict)
    machine_after: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ratios(self, side: str) -> list[float]:
        """side / baseline, per block (> 1: the side is slower)."""
        return [t / b for t, b in zip(self.times[side], self.times[self.baseline], strict=True)]

    def speedups(self, side: str) -> list[float]:
        """baseline / side, per block (> 1: the side is faster)."""
        return [b / t for t, b in zip(self.times[side], self.times[self.baseline], strict=True)]

    def print(self, *, unit: str = "ms", per: str = "call", speedup: bool = False) -> None:
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        blocks = len(self.times[self.baseline])
        print(f"== {self.title}")
        b, a = self.machine_before, self.machine_after
        print(f"   machine: {b.get('cpus')} CPUs, load {b.get('load')} before, {a.get('load')} after"
              + (f", torch threads {b['torch_threads']}" if "torch_threads" in b else "")
              + (f", {b['device']}" if "device" in b else "")
              + f"; {blocks} blocks, order rotated per block")
        print(f"   {'side':<34}{'min':>11}{'median':>11}{'max':>11}  ({unit} per {per})")
        for name, ts in self.times.items():
            lo, med, hi = (x * scale for x in spread(ts))
            print(f"   {name:<34}{lo:>11.2f}{med:>11.2f}{hi:>11.2f}")
        for name, cost in self.builds.items():
            print(f"   {'build: ' + name:<34}{cost * scale:>11.2f}  (one-off, not in the steady state above)")
        what = "speed-up (baseline / side)" if speedup else "ratio (side / baseline)"
        print(f"   paired {what}, per block, vs {self.baseline}:")
        for name in self.times:
            if name == self.baseline:
                continue
            lo, med, hi = spread(self.speedups(name) if speedup else self.ratios(name))
            print(f"   {name:<34}{lo:>11.3f}{med:>11.3f}{hi:>11.3f}")
        for note in self.notes:
            print(f"   note: {note}")
        path = os.environ.get("SELMA_BENCH_JSON")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({**asdict(self), "ratios": {k: self.ratios(k) for k in self.times if k != self.baseline}}) + "\n")


def compare(
    sides: Mapping[str, Callable[[], float | None]],
    *,
    baseline: str,
    repeats: int = 3,
    warmup: int = 1,
    title: str = "",
    builds: Mapping[str, float] | None = None,
) -> Comparison:
    """Run every side ``warmup`` times (discarded), then ``repeats`` rotated blocks."""
    if baseline not in sides:
        raise ValueError(f"baseline {baseline!r} is not one of the sides {list(sides)}")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(sides)
    before = machine()

    def timed(name: str) -> float:
        t0 = time.perf_counter()
        measured = sides[name]()
        if measured is None:
            return time.perf_counter() - t0
        if not isinstance(measured, float):
            raise TypeError(f"side {name!r} returned {type(measured).__name__}; return None (timed here) or its own float seconds")
        return measured

    for _ in range(warmup):
        for name in names:
            timed(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for block in range(repeats):
        k = block % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timed(name))
    return Comparison(title=title, baseline=baseline, times=times, builds=dict(builds or {}), machine_before=before, machine_after=machine())
