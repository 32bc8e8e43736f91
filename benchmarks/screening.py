"""Screened vs unscreened search at equal estimated wall time, on the sim with seeded noise.

SIMULATED. A real search's wall time is server starts and benchmark runs. This script counts
both the way the vllm backend pays them: a start whenever a run's config differs from the last
one (the race interleaves configs, so each race run of another config is a start), plus one for
the eager screening server; a benchmark run costs the `duration` the sim reports for it (the
workload's requests at its throughput), a screened candidate also `--switch-s` for the warm-up
that carries the new config to every worker. A start costs `--restart-s` (default 180 s).

Per point and seed: the unscreened search gets `--budget` trials; the screened one as many
trials as fit into the same estimated wall time. Both end in the same race. Regret is the
noiseless shortfall of the reported config against a dense brute force of the noiseless
(graph-mode) model, as in search_quality.py. Figures only; the reader judges.

    nice python benchmarks/screening.py [--seeds 20] [--budget 12] [--jobs 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_quality import (
    POINTS,
    _in_memory,
    brute_force,
    make_point,
    noiseless,
    pct,
)

from prefetch_tune.backends.base import Metrics, OperatingPoint
from prefetch_tune.backends.sim import SimBackend, SimScreening
from prefetch_tune.prefetch import PrefetchConfig, parse_weight_prefetch_config
from prefetch_tune.search import tuner
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.space import build_space
from prefetch_tune.search.tuner import search_point


class WallClockSim(SimBackend):
    """The noisy sim, charging what the vllm backend would pay in server starts and runs."""

    def __init__(self, restart_s: float, switch_s: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.restart_s, self.switch_s = restart_s, switch_s
        self.starts = 0
        self.runs = 0
        self.wall_s = 0.0
        self._last: str | None = None

    @property
    def server_starts(self) -> int:  # what the race reads for its cost
        return self.starts

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        key = config.canonical_json()
        if repeat == 0 or key != self._last:
            self.starts += 1
            self.wall_s += self.restart_s
        self._last = key
        metrics = super().evaluate(config, point, repeat)
        self.runs += 1
        self.wall_s += metrics["duration"]
        return metrics

    def screening(self, point: OperatingPoint) -> SimScreening:
        self.starts += 1
        self.wall_s += self.restart_s
        self._last = None  # the graph-mode server is gone while the eager one runs
        return ChargedScreening(self)


class ChargedScreening(SimScreening):
    def __init__(self, backend: WallClockSim) -> None:
        super().__init__(backend)
        self.clock = backend

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        metrics = super().evaluate(config, point, repeat)
        self.clock.runs += 1
        self.clock.wall_s += metrics["duration"] + self.clock.switch_s
        return metrics


@dataclass
class Run:
    point: str
    method: str
    seed: int
    trials: int
    regret_pct: float
    off: bool
    starts: int
    runs: int
    wall_h: float
    spearman: float | None


def one_run(
    name: str, screen: bool, trials: int, seed: int, opts: dict[str, float], opt: float
) -> Run:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tuner.storage_for = _in_memory  # type: ignore[assignment]
    point = make_point(name)
    backend = WallClockSim(opts["restart_s"], opts["switch_s"], noise_pct=opts["noise"], seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        settings = SearchSettings(
            results_dir=Path(tmp), trials=trials, seed=seed, storage="memory", screen=screen
        )
        doc = search_point(point, backend, settings).result
    assert doc is not None
    config = parse_weight_prefetch_config(doc["winner"]["weight_prefetch_config"])
    return Run(
        name,
        "screened" if screen else "unscreened",
        seed,
        trials,
        (opt - noiseless(config, point)) / opt * 100,
        bool(doc["winner"]["is_off"]),
        backend.starts,
        backend.runs,
        backend.wall_s / 3600,
        (doc.get("screening") or {}).get("spearman_screened_vs_final"),
    )


def screened_trials(name: str, budget: int, opts: dict[str, float]) -> int:
    """Trials a screened search pays for with the wall time of `budget` unscreened trials (a
    start and a run each): the eager start, then per candidate a run, its switch and its share
    of the off/default re-runs (every 5). The race after the trials costs both the same."""
    run_s = noiseless_duration(make_point(name))
    per_candidate = run_s / 4 * (1 + 2 / 5) + opts["switch_s"]  # one wave of four
    return max(1, int((budget * (opts["restart_s"] + run_s) - opts["restart_s"]) / per_candidate))


def noiseless_duration(point: OperatingPoint) -> float:
    from prefetch_tune.backends.sim import evaluate_point

    return float(evaluate_point(PrefetchConfig.default(), point)[0]["duration"])


def table(runs: list[Run]) -> None:
    print(
        f"{'point':<20} {'method':<11} {'trials':>6} {'wall h':>7} {'starts':>6} {'runs':>5} "
        f"{'med%':>7} {'p90%':>7} {'worst%':>7} {'off':>6} {'rho':>6}"
    )
    for name in dict.fromkeys(r.point for r in runs):
        for method in ("unscreened", "screened"):
            rs = [r for r in runs if r.point == name and r.method == method]
            if not rs:
                continue
            regrets = [r.regret_pct for r in rs]
            rhos = [r.spearman for r in rs if r.spearman is not None]
            print(
                f"{name:<20} {method:<11} {statistics.median(r.trials for r in rs):>6.0f} "
                f"{statistics.median(r.wall_h for r in rs):>7.2f} "
                f"{statistics.median(r.starts for r in rs):>6.0f} "
                f"{statistics.median(r.runs for r in rs):>5.0f} "
                f"{statistics.median(regrets):>7.3f} {pct(regrets, 0.9):>7.3f} "
                f"{max(regrets):>7.3f} {sum(r.off for r in rs):>3d}/{len(rs):<2d} "
                + (f"{statistics.median(rhos):>6.2f}" if rhos else f"{'-':>6}")
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget", type=int, default=12, help="unscreened trials")
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--restart-s", type=float, default=180.0)
    parser.add_argument("--switch-s", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    opts = {"noise": args.noise, "restart_s": args.restart_s, "switch_s": args.switch_s}
    t0 = time.monotonic()
    print(
        f"SIMULATED (sim backend, {args.noise:g}% seeded noise), {args.seeds} seeds; a server "
        f"start costs {args.restart_s:g} s, a run the workload's simulated duration"
    )
    optimum = {n: brute_force(build_space(make_point(n))) for n in args.points}
    runs: list[Run] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        plain = {
            n: list(
                pool.map(
                    one_run,
                    *zip(
                        *[(n, False, args.budget, s, opts, optimum[n]) for s in range(args.seeds)],
                        strict=True,
                    ),
                )
            )
            for n in args.points
        }
        for n in args.points:
            runs += plain[n]
            k = screened_trials(n, args.budget, opts)
            runs += list(
                pool.map(
                    one_run,
                    *zip(
                        *[(n, True, k, s, opts, optimum[n]) for s in range(args.seeds)], strict=True
                    ),
                )
            )
    table(runs)
    print(f"({time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
