"""How many paid evaluations does the search need, and how good is the winner it picks?

Sim backend with 1% seeded measurement noise, Qwen3-32B W8A8 TP4 at max-num-seqs 72 on
atlas-a2, 20 seeds per method:

  tpe     our `search_point` with the TPE sampler (seeded with off and default), 400 trials
          (duplicate effective configs are free, so it pays fewer)
  random  the same with the random sampler, 400 trials
  grid    the same with the grid sampler (6 levels per live knob), the full grid

Per run: the number of paid evaluations (backend runs; duplicates of a measured key are free)
until a trial whose *noiseless* value is within 1% of the true optimum, and the regret of the
selected winner (its noiseless value vs the true optimum, after the finalists' re-measurement).
The true optimum is the best noiseless value on a 9-level grid (and the 6-level one, the grid
baseline). Goal: TPE under a third of the grid's evaluations at equal or better regret; the
verdict is printed for the whole search and per closeness threshold.

    python benchmarks/search_efficiency.py [--seeds 20] [--jobs 2]
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

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.backends.sim import SimBackend, evaluate_point
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig, parse_weight_prefetch_config
from prefetch_tune.search import space as space_module
from prefetch_tune.search import tuner
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.space import SearchSpace, build_space
from prefetch_tune.search.studies import GRID_LEVELS
from prefetch_tune.search.tuner import search_point

OBJECTIVE = "output_throughput"
NOISE_PCT = 1.0
# Gaps to the true optimum: 1% is the brief's; vLLM-Ascend's default (a seed of every method)
# is already within 0.3% here, so the tighter ones are where the methods differ.
WITHIN_PCT = (1.0, 0.25, 0.1)


def make_point() -> OperatingPoint:
    return OperatingPoint(
        model=load_model("qwen3-32b", "w8a8"),
        layout=Layout(tp=4, dp=1, ep=False),
        max_num_seqs=72,
        hardware="atlas-a2",
    )


def noiseless(config: PrefetchConfig, point: OperatingPoint) -> float:
    return evaluate_point(config, point)[0][OBJECTIVE]


def grid_optimum(space: SearchSpace, levels: int) -> tuple[float, PrefetchConfig]:
    point = space.point
    best = (noiseless(PrefetchConfig.off(), point), PrefetchConfig.off())
    axes = [[space.bound(k) * i / (levels - 1) for i in range(levels)] for k in space.knobs]
    for combo in itertools.product(*axes):
        config = space.config(dict(zip(space.knobs, combo, strict=True)))
        value = noiseless(config, point)
        if value > best[0]:
            best = (value, config)
    return best


class CountingSim(SimBackend):
    """The sim with noise, counting search evaluations (repeat 0) and re-measurements."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.search_runs = 0
        self.remeasure_runs = 0

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Any:
        if repeat == 0:
            self.search_runs += 1
        else:
            self.remeasure_runs += 1
        return super().evaluate(config, point, repeat)


@dataclass
class Run:
    method: str
    seed: int
    to_within: dict[float, float]  # gap % -> paid evaluations until a noiseless value within it
    paid: int  # search evaluations paid in total
    remeasured: int  # finalist/baseline re-measurement runs
    regret_pct: float  # winner's noiseless shortfall vs the true optimum
    seconds: float


def in_memory(settings: SearchSettings, name: str) -> tuple[optuna.storages.BaseStorage, str]:
    # The benchmark measures the search, not the journal file: keep every study in memory.
    return optuna.storages.InMemoryStorage(), "memory"


def one_run(method: str, seed: int, budget: int, true_opt: float, off_zone: float) -> Run:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space_module.OFF_ZONE = off_zone
    tuner.storage_for = in_memory  # type: ignore[assignment]
    # GridSampler.after_trial looks for unvisited grid points on every tell, O(trials x grid
    # values): minutes over a 1296-point grid. The budget is the grid, so skip it here.
    optuna.samplers.GridSampler.after_trial = lambda *args, **kwargs: None  # type: ignore[method-assign]
    point = make_point()
    space = build_space(point)
    backend = CountingSim(noise_pct=NOISE_PCT, seed=seed)
    captured: dict[str, optuna.Study] = {}
    real_finalists = tuner._finalists

    def finalists(study: optuna.Study, *args: Any) -> Any:
        captured["study"] = study
        return real_finalists(study, *args)

    tuner._finalists = finalists  # type: ignore[assignment]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        settings = SearchSettings(
            results_dir=Path(tmp), trials=budget, sampler=method, seed=seed, storage="memory"
        )
        outcome = search_point(point, backend, settings)
    seconds = time.monotonic() - started
    assert outcome.result is not None
    study = captured["study"]
    paid = 0
    to_within = dict.fromkeys(WITHIN_PCT, math.inf)
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = trial.user_attrs
        if "duplicate_of" in attrs or attrs.get("failure_class") == "skipped" or not trial.params:
            continue
        paid += 1
        value = noiseless(space.config(trial.params), point)
        for pct, reached in to_within.items():
            if math.isinf(reached) and value >= (1 - pct / 100) * true_opt:
                to_within[pct] = paid
    assert paid == backend.search_runs, (paid, backend.search_runs)
    winner = parse_weight_prefetch_config(outcome.result["winner"]["weight_prefetch_config"])
    regret = (true_opt - noiseless(winner, point)) / true_opt * 100
    return Run(method, seed, to_within, paid, backend.remeasure_runs, regret, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument(
        "--trials", type=int, default=400, help="budget of tpe and random (< a third of the grid)"
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--off-zone",
        type=float,
        default=space_module.OFF_ZONE,
        help="share of each knob's range below 0 that means off (prefetch_tune.search.space.OFF_ZONE)",
    )
    args = parser.parse_args()

    point = make_point()
    space = build_space(point)
    t0 = time.monotonic()
    opt6, _ = grid_optimum(space, GRID_LEVELS)
    opt9, cfg9 = grid_optimum(space, 9)
    true_opt = max(opt6, opt9)
    off = noiseless(PrefetchConfig.off(), point)
    default = noiseless(PrefetchConfig.default(), point)
    print(
        f"point: {point.model.name} {point.model.quant} tp4 max-num-seqs 72 atlas-a2, "
        f"knobs {', '.join(f'{k}<={space.bound(k):g}' for k in space.knobs)}"
    )
    print(
        f"noiseless {OBJECTIVE}: off {off:.2f}, default {default:.2f}, "
        f"6-level grid optimum {opt6:.2f}, 9-level {opt9:.2f} -> true optimum {true_opt:.2f} "
        f"({time.monotonic() - t0:.1f} s brute force)"
    )
    print(f"  9-level optimum at {space.effective_mib(cfg9)} MiB/layer")

    grid_budget = GRID_LEVELS ** len(space.knobs) + 2  # + the off and default seeds
    jobs = [("tpe", s, args.trials) for s in range(args.seeds)]
    jobs += [("random", s, args.trials) for s in range(args.seeds)]
    jobs += [("grid", s, grid_budget) for s in range(args.seeds)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(one_run, m, s, b, true_opt, args.off_zone) for m, s, b in jobs]
        runs = []
        for done in as_completed(futures):
            r = done.result()
            runs.append(r)
            print(
                f"  [{len(runs)}/{len(jobs)}] {r.method} seed {r.seed}: {r.to_within}, "
                f"regret {r.regret_pct:.3f}%, {r.seconds:.1f} s",
                file=sys.stderr,
                flush=True,
            )

    print()
    print(f"search space off zone {args.off_zone:g}")
    print(
        f"sim noise {NOISE_PCT:g}%, {args.seeds} seeds per method. 'to X%' = median paid "
        "evaluations (backend runs in the search, seeds included) until a trial's noiseless "
        "value is within X% of the true optimum [runs that never got there]; regret = the "
        "selected winner's noiseless shortfall."
    )
    head = f"{'method':<7} {'budget':>6} {'paid':>5} "
    head += " ".join(f"{'to ' + format(p, 'g') + '%':>13}" for p in WITHIN_PCT)
    head += f" {'regret% med':>11} {'regret% max':>11} {'re-meas.':>8} {'s/run':>6}"
    print(head)
    print("-" * len(head))
    summary: dict[str, dict[str, Any]] = {}
    for method, budget in (("tpe", args.trials), ("random", args.trials), ("grid", grid_budget)):
        rs = [r for r in runs if r.method == method]
        regrets = [r.regret_pct for r in rs]
        med_to = {p: statistics.median(r.to_within[p] for r in rs) for p in WITHIN_PCT}
        never = {p: sum(math.isinf(r.to_within[p]) for r in rs) for p in WITHIN_PCT}
        summary[method] = {
            "to": med_to,
            "regret": statistics.median(regrets),
            "paid": statistics.median(r.paid + r.remeasured for r in rs),
        }
        row = f"{method:<7} {budget:>6} {statistics.median(r.paid for r in rs):>5.0f} "
        row += " ".join(
            f"{format(med_to[p], '.1f') + ' [' + str(never[p]) + ']':>13}" for p in WITHIN_PCT
        )
        row += (
            f" {statistics.median(regrets):>11.3f} {max(regrets):>11.3f} "
            f"{statistics.median(r.remeasured for r in rs):>8.0f} "
            f"{statistics.median(r.seconds for r in rs):>6.1f}"
        )
        print(row)
    tpe, grid = summary["tpe"], summary["grid"]
    print()
    # The goal as a whole search: all the evaluations TPE pays (trials + re-measurements) against
    # the grid's, at a winner regret no worse than the grid's.
    ratio = tpe["paid"] / grid["paid"]
    goal = ratio < 1 / 3 and tpe["regret"] <= grid["regret"]
    print(
        f"whole search: TPE pays {tpe['paid']:.0f} evaluations, {ratio:.2f}x the grid's "
        f"{grid['paid']:.0f} (goal < 0.33), median regret {tpe['regret']:.3f}% vs the grid's "
        f"{grid['regret']:.3f}%: goal {'met' if goal else 'NOT met'}"
    )
    # The same per closeness threshold (the default seed is within 1% here, so 'to 1%' is 2
    # for every method and says nothing).
    for p in WITHIN_PCT:
        ratio = tpe["to"][p] / grid["to"][p]
        goal = ratio < 1 / 3 and tpe["regret"] <= grid["regret"]
        print(
            f"to {p:g}%: TPE needs {ratio:.2f}x the grid's evaluations (goal < 0.33, with "
            f"median regret {tpe['regret']:.3f}% vs the grid's {grid['regret']:.3f}%): "
            f"goal {'met' if goal else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
