"""How good is the winner `search` reports, at what cost, against what a user gets without it?

SIMULATED: the sim backend with seeded measurement noise (default 1% of each metric per run).
For each operating point the true optimum is a dense brute force of the NOISELESS model (every
live knob on 6- and 9-level grids up to its bound, plus off). A method's regret is the
noiseless shortfall of the config it reports, in percent of that optimum. Methods:

  keep-default  no search: vLLM-Ascend's default ratios (0 runs)
  stock-tpe     Optuna's TPESampler as shipped, no seeds, winner = the best single noisy run
  ours          `search_point`: TPE seeded with off and default, then the selection race
  random        `search_point` with the random sampler, same race
  grid          `search_point` with the 6-level grid sampler, same race

Per point and budget: regret median / p90 / worst over the seeds, how often off was reported,
the median runs paid (trials + selection), the measured noise (pooled relative sd of the
off/default race runs) and `resolv%`, the half-width of the race's 95% interval on a gain over
off at the rounds it used (the smallest gain those repeats can tell from zero), and `visit%`, the
regret of the best config any trial visited (noiseless: the best any selection could report),
medians over seeds. A second table repeats `ours` at 12 trials with
`--repeats` raised. Ratios and figures only; the reader judges.

    nice python benchmarks/search_quality.py [--seeds 20] [--budgets 6 8 12 20] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import FloatDistribution

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.backends.sim import SimBackend, evaluate_point
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig, parse_weight_prefetch_config
from prefetch_tune.search import tuner
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.space import SearchSpace, build_space
from prefetch_tune.search.tuner import search_point

OBJECTIVE = "output_throughput"
POINTS = {
    "32b-tp4@8": ("qwen3-32b", 4, 1, False, "atlas-a2", 8),
    "32b-tp4@72": ("qwen3-32b", 4, 1, False, "atlas-a2", 72),
    "32b-tp4@256": ("qwen3-32b", 4, 1, False, "atlas-a2", 256),
    "235b-tp4dp4ep@144": ("qwen3-235b-a22b", 4, 4, True, "atlas-a3", 144),
}
SEARCHED = ("ours", "random", "grid")
SAMPLER = {"ours": "tpe", "random": "random", "grid": "grid"}


def make_point(name: str) -> OperatingPoint:
    model, tp, dp, ep, hw, mns = POINTS[name]
    return OperatingPoint(
        model=load_model(model, "w8a8"),
        layout=Layout(tp=tp, dp=dp, ep=ep),
        max_num_seqs=mns,
        hardware=hw,
    )


def noiseless(config: PrefetchConfig, point: OperatingPoint) -> float:
    return evaluate_point(config, point)[0][OBJECTIVE]


def brute_force(space: SearchSpace) -> float:
    best = noiseless(PrefetchConfig.off(), space.point)
    seen: set[str] = set()
    for levels in (6, 9):
        axes = [[space.bound(k) * i / (levels - 1) for i in range(levels)] for k in space.knobs]
        for combo in itertools.product(*axes):
            config = space.config(dict(zip(space.knobs, combo, strict=True)))
            if space.key(config) not in seen:
                seen.add(space.key(config))
                best = max(best, noiseless(config, space.point))
    return best


@dataclass
class Run:
    point: str
    method: str
    budget: int
    repeats: int
    seed: int
    regret_pct: float
    off: bool
    paid: int
    noise_pct: float | None
    resolvable_pct: float | None = None  # the race's 95% half-width on a gain over off
    visited_pct: float | None = None  # regret of the best config any trial visited


class VisitingSim(SimBackend):
    """The noisy sim, noting the best noiseless value among the configs trials visited: the
    best any selection rule could report."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.best_visited = 0.0

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Any:
        if repeat == 0:
            self.best_visited = max(self.best_visited, noiseless(config, point))
        return super().evaluate(config, point, repeat)


def _in_memory(settings: SearchSettings, name: str) -> tuple[optuna.storages.BaseStorage, str]:
    return optuna.storages.InMemoryStorage(), "memory"  # the search, not the journal, is measured


def one_run(
    point_name: str, method: str, budget: int, repeats: int, seed: int, noise: float, opt: float
) -> Run:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    tuner.storage_for = _in_memory  # type: ignore[assignment]
    point = make_point(point_name)
    space = build_space(point)
    backend = VisitingSim(noise_pct=noise, seed=seed)
    if method == "stock-tpe":
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        dists = {k: FloatDistribution(space.low(k), space.high(k)) for k in space.knobs}
        for _ in range(budget):
            trial = study.ask(dists)
            value = backend.evaluate(space.config(trial.params), point)[OBJECTIVE]
            study.tell(trial, value)
        config = space.config(study.best_trial.params)
        return Run(
            point_name,
            method,
            budget,
            0,
            seed,
            _regret(config, point, opt),
            space.key(config) == "off",
            budget,
            None,
            None,
            (opt - backend.best_visited) / opt * 100,
        )
    with tempfile.TemporaryDirectory() as tmp:
        settings = SearchSettings(
            results_dir=Path(tmp),
            trials=budget,
            repeats=repeats,
            sampler=SAMPLER[method],
            seed=seed,
            storage="memory",
        )
        outcome = search_point(point, backend, settings)
    doc = outcome.result
    assert doc is not None
    config = parse_weight_prefetch_config(doc["winner"]["weight_prefetch_config"])
    return Run(
        point_name,
        method,
        budget,
        repeats,
        seed,
        _regret(config, point, opt),
        bool(doc["winner"]["is_off"]),
        int(doc["cost"]["total"]["backend_runs"]),
        doc["selection"]["noise"]["pct"],
        _resolvable(doc["selection"]["noise"]["pct"], int(doc["selection"]["rounds"])),
        (opt - backend.best_visited) / opt * 100,
    )


def _resolvable(noise_pct: float | None, rounds: int) -> float | None:
    """Half-width of the race's 95% paired interval on a gain over off: the smallest gain the
    repeats used can tell from zero (paired difference of two runs: sqrt(2) x the noise)."""
    if noise_pct is None or rounds < 2:
        return None
    from scipy import stats

    return float(stats.t.ppf(0.975, rounds - 1) * math.sqrt(2) * noise_pct / math.sqrt(rounds))


def _regret(config: PrefetchConfig, point: OperatingPoint, opt: float) -> float:
    return (opt - noiseless(config, point)) / opt * 100


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(label: str, runs: list[Run]) -> str:
    regrets = [r.regret_pct for r in runs]
    noise = [r.noise_pct for r in runs if r.noise_pct is not None]
    resolv = [r.resolvable_pct for r in runs if r.resolvable_pct is not None]
    visited = [r.visited_pct for r in runs if r.visited_pct is not None]
    return (
        f"{label:<22} {statistics.median(regrets):>7.3f} {pct(regrets, 0.9):>7.3f} "
        f"{max(regrets):>7.3f} {sum(r.off for r in runs):>4d}/{len(runs):<3d} "
        f"{statistics.median(r.paid for r in runs):>6.0f} "
        + (f"{statistics.median(noise):>7.2f}" if noise else f"{'-':>7}")
        + (f" {statistics.median(resolv):>7.2f}" if resolv else f" {'-':>7}")
        + (f" {statistics.median(visited):>7.3f}" if visited else f" {'-':>7}")
    )


HEAD = (
    f"{'method':<22} {'med%':>7} {'p90%':>7} {'worst%':>7} {'off':>8} {'paid':>6} {'noise%':>7} "
    f"{'resolv%':>7} {'visit%':>7}"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budgets", type=int, nargs="+", default=[6, 8, 12, 20])
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--noise", type=float, default=1.0, help="sim noise, percent per run")
    parser.add_argument("--repeats", type=int, default=3, help="race rounds before drops")
    parser.add_argument(
        "--raised-repeats", type=int, default=6, help="the raised --repeats (at 12 trials)"
    )
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    t0 = time.monotonic()
    optimum: dict[str, float] = {}
    print(f"SIMULATED (sim backend, {args.noise:g}% seeded noise per run), {args.seeds} seeds")
    print("regret = noiseless shortfall of the reported config vs the brute-force optimum")
    for name in args.points:
        space = build_space(make_point(name))
        optimum[name] = brute_force(space)
        off = noiseless(PrefetchConfig.off(), space.point)
        default = noiseless(PrefetchConfig.default(), space.point)
        print(
            f"  {name}: optimum {optimum[name]:.2f}; brute-force gain over off "
            f"{(optimum[name] / off - 1) * 100:+.2f}%, default's regret "
            f"{(optimum[name] - default) / optimum[name] * 100:.3f}%"
        )
    jobs: list[tuple[str, str, int, int, int]] = []
    for name in args.points:
        for budget in args.budgets:
            for method in ("stock-tpe", *SEARCHED):
                jobs += [(name, method, budget, args.repeats, s) for s in range(args.seeds)]
        jobs += [(name, "ours", 12, args.raised_repeats, s) for s in range(args.seeds)]
    runs: list[Run] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(one_run, p, m, b, r, s, args.noise, optimum[p]) for p, m, b, r, s in jobs
        ]
        for done in as_completed(futures):
            runs.append(done.result())
            if len(runs) % 50 == 0 or len(runs) == len(jobs):
                print(
                    f"  {len(runs)}/{len(jobs)} runs, {time.monotonic() - t0:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )

    def pick(name: str, method: str, budget: int, repeats: int) -> list[Run]:
        return [
            r
            for r in runs
            if (r.point, r.method, r.budget) == (name, method, budget)
            and (method == "stock-tpe" or r.repeats == repeats)
        ]

    for name in args.points:
        space = build_space(make_point(name))
        default_regret = _regret(PrefetchConfig.default(), space.point, optimum[name])
        print(f"\n{name} (SIMULATED)   paid = median backend runs, trials + selection")
        print(HEAD)
        print(
            f"{'keep-default':<22} {default_regret:>7.3f} {default_regret:>7.3f} "
            f"{default_regret:>7.3f} {0:>4d}/{args.seeds:<3d} {0:>6d} {'-':>7} {'-':>7} {'-':>7}"
        )
        for budget in args.budgets:
            for method in ("stock-tpe", *SEARCHED):
                print(row(f"{method} {budget}", pick(name, method, budget, args.repeats)))
    print(
        f"\n--repeats raised: ours at 12 trials, --repeats {args.repeats} vs {args.raised_repeats}"
    )
    print(HEAD)
    for name in args.points:
        for rep in (args.repeats, args.raised_repeats):
            print(row(f"{name} r{rep}", pick(name, "ours", 12, rep)))
    print(f"\n{len(runs)} runs in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
