"""Speed of the sim backend: noise-free evaluations per second on one core.

(a) Evaluations per second of `SimBackend().evaluate` on random configs (every live knob drawn
    uniformly from [0, 1], so no two configs repeat) at two operating points:
      qwen3-235b-a22b w8a8 tp4 dp4 ep on atlas-a3, max-num-seqs 144 (94 MoE layers)
      qwen3-32b w8a8 tp4 on atlas-a2, max-num-seqs 72 (64 dense layers)
(b) Wall time of a 10,000-point brute-force map (25 x 20 x 20) of a three-knob space: the three
    live knobs of the 235B point (attn.qkv, attn.o, moe.gate_up), each over [0, flat-above].

Goal: >= 2,000 evaluations per second on one core. The process pins itself to one CPU where the
OS allows it (Linux `sched_setaffinity`); the first evaluations (cache warm-up) are not timed.
Rates are per CPU second of this process (`time.process_time`), so other load on a shared machine
does not count against the model; wall-clock rates are printed next to them.

Usage: python benchmarks/sim_speed.py [--seconds 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prefetch_tune.backends.base import OperatingPoint  # noqa: E402
from prefetch_tune.backends.sim import SimBackend  # noqa: E402
from prefetch_tune.models import Layout, load_model  # noqa: E402
from prefetch_tune.prefetch import PrefetchConfig  # noqa: E402
from prefetch_tune.runtime.plan import flat_above, live_knobs  # noqa: E402

GOAL = 2000.0


def points() -> dict[str, OperatingPoint]:
    return {
        "qwen3-235b-a22b tp4-dp4-ep @144 atlas-a3": OperatingPoint(
            model=load_model("qwen3-235b-a22b"),
            layout=Layout(tp=4, dp=4, ep=True),
            max_num_seqs=144,
            hardware="atlas-a3",
        ),
        "qwen3-32b tp4 @72 atlas-a2": OperatingPoint(
            model=load_model("qwen3-32b"), layout=Layout(tp=4), max_num_seqs=72, hardware="atlas-a2"
        ),
    }


def random_configs(point: OperatingPoint, n: int, rng: random.Random) -> list[PrefetchConfig]:
    knobs = live_knobs(point.model, point.semantics, point.options)
    off = PrefetchConfig.off()
    return [off.with_ratios({k: rng.random() for k in knobs}) for _ in range(n)]


def evals_per_second(
    point: OperatingPoint, seconds: float, rng: random.Random
) -> tuple[float, float]:
    """(evaluations per CPU second, per wall second) over at least `seconds` of CPU time."""
    backend = SimBackend()
    for config in random_configs(point, 20, rng):  # warm-up: profile load, compute-op cache
        backend.evaluate(config, point)
    done, cpu, wall = 0, 0.0, 0.0
    while cpu < seconds:
        batch = random_configs(point, 500, rng)  # built outside the timed part
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for config in batch:
            backend.evaluate(config, point)
        cpu += time.process_time() - start_cpu
        wall += time.perf_counter() - start_wall
        done += len(batch)
    return done / cpu, done / wall


def brute_force_map(
    point: OperatingPoint, levels: tuple[int, ...]
) -> tuple[float, float, int, str]:
    """(CPU s, wall s, points, best config) of evaluating a grid over the point's live knobs."""
    knobs = live_knobs(point.model, point.semantics, point.options)
    assert len(knobs) == len(levels), (knobs, levels)
    top = flat_above(point.model, point.layout, point.semantics, point.options)
    axes = [
        [(top[k] or 1.0) * i / (n - 1) for i in range(n)]
        for k, n in zip(knobs, levels, strict=True)
    ]
    backend, off = SimBackend(), PrefetchConfig.off()
    best, best_label, count = -1.0, "", 0
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    for combo in itertools.product(*axes):
        config = off.with_ratios(dict(zip(knobs, combo, strict=True)))
        value = backend.evaluate(config, point)["output_throughput"]
        count += 1
        if value > best:
            best, best_label = value, config.label()
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    return cpu, wall, count, best_label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per point")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        cores = "pinned to 1 core"
    else:
        cores = "not pinned (no sched_setaffinity)"
    print(f"sim backend speed, one process, {cores}; goal >= {GOAL:,.0f} evaluations/s")
    rng = random.Random(args.seed)
    pts = points()
    slowest = float("inf")
    for label, point in pts.items():
        rate, wall_rate = evals_per_second(point, args.seconds, rng)
        slowest = min(slowest, rate)
        print(f"  {label:<42} {rate:8,.0f} evaluations/s  (wall clock {wall_rate:,.0f}/s)")
    moe = next(iter(pts.values()))
    cpu, wall, count, best = brute_force_map(moe, (25, 20, 20))
    print(
        f"  brute-force map, {count:,} points of (attn.qkv, attn.o, moe.gate_up) on the 235B: "
        f"{cpu:.2f} s CPU ({count / cpu:,.0f}/s), {wall:.2f} s wall; best: {best}"
    )
    print(f"  {'meets' if slowest >= GOAL else 'BELOW'} the goal (slowest {slowest:,.0f}/s)")


if __name__ == "__main__":
    main()
