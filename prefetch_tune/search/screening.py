"""Screening: rank many candidates on one eager server, restart only for the finalists.

Each real trial restarts `vllm serve` (weights load, graph capture: minutes). With `--screen`
the trials run instead on one `--enforce-eager` server whose prefetch config the runtime's
control channel changes between benchmark runs (`runtime/control.py`): one start for the whole
trial budget. Every few candidates off and default run again on the same server, so drift over
the session is visible in the result. The finalists (and off and default) are then measured the
normal way, one graph-mode server each, by the noise-aware selection; only those final numbers
decide the winner.

What screening cannot know: eager mode has no graph, so every kernel pays the host launch time,
and the windows a prefetch hides behind are longer than under graph capture. Eager rankings can
therefore differ from graph rankings; the result gives the Spearman rank correlation between
the screened and the final measurements of the finalists, so a user sees how far to trust it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import optuna
import pandas as pd

from prefetch_tune.backends.base import Backend, Metrics, OperatingPoint, Screening, open_screening
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.search.selection import Candidate
from prefetch_tune.search.settings import SearchSettings

MODE_SCREENED = "screened (eager, one server, config changed at run time)"
MODE_FINAL = "final (graph mode, one server start per candidate)"
DRIFT_ATTR = "screen_drift"


@dataclass
class DriftChecked:
    """A screening session that re-runs off and default after every `every` candidates.

    It stands in for the backend in the trial loop (same `evaluate`), so the loop does not
    know it screens. The re-runs are kept in the study's user attrs: they survive a resume.
    """

    session: Screening
    study: optuna.Study
    settings: SearchSettings
    every: int
    candidates: int = 0
    drift: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.name = self.session.name
        self.measured = self.session.measured
        self.drift = list(self.study.user_attrs.get(DRIFT_ATTR, []))

    @property
    def last_artifacts(self) -> dict[str, str]:
        return dict(getattr(self.session, "last_artifacts", {}))

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        point = screened_point(point, self.settings.screen_waves)
        if self.candidates % self.every == 0:
            self.check_drift(point)
        self.candidates += 1
        return self.session.evaluate(config, point, repeat)

    def check_drift(self, point: OperatingPoint) -> None:
        entry: dict[str, Any] = {"after_candidates": self.candidates}
        for label, config in (("off", PrefetchConfig.off()), ("default", PrefetchConfig.default())):
            metrics = self.session.evaluate(config, point, len(self.drift))
            entry[label] = self.settings.objective_value(metrics)
        self.drift.append(entry)
        self.study.set_user_attr(DRIFT_ATTR, self.drift)


def screened_point(point: OperatingPoint, waves: int) -> OperatingPoint:
    """The point a screened run benchmarks: `waves` x concurrency requests (default 1 wave, a
    quarter of a final run: ranking needs less precision than the final verdict)."""
    workload = dataclasses.replace(point.workload, num_prompts=waves * point.concurrency)
    return dataclasses.replace(point, workload=workload)


def screened_runs(drift: list[dict[str, Any]], candidates: int) -> int:
    """Benchmark runs one screening session paid: candidates plus the off/default re-runs."""
    return candidates + 2 * len(drift)


def rank_correlation(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman's rho of (screened, final) pairs: Pearson on average ranks (None below 3)."""
    if len(pairs) < 3:
        return None
    frame = pd.DataFrame(pairs, columns=["screened", "final"]).rank()
    rho = float(frame["screened"].corr(frame["final"]))
    return None if math.isnan(rho) else rho


def screened_value(
    cand: Candidate, study: optuna.Study, drift: list[dict[str, Any]]
) -> float | None:
    """A finalist's screened objective: its trial's value; off/default: the median re-run."""
    if cand.label in ("off", "default"):
        values = [float(d[cand.label]) for d in drift if cand.label in d]
        return statistics.median(values) if values else None
    if cand.label.startswith("trial "):
        trial = study.trials[int(cand.label.split()[1])]
        return float(trial.value) if trial.value is not None else None
    return None


def screening_summary(
    study: optuna.Study,
    cands: list[Candidate],
    settings: SearchSettings,
    starts: int,
    drift: list[dict[str, Any]],
) -> dict[str, Any]:
    """The `screening` block of a result: what was screened, how it ranked against the finals."""
    pairs: list[dict[str, Any]] = []
    for cand in cands:
        screened = screened_value(cand, study, drift)
        if screened is None or not cand.values:
            continue
        pairs.append({"candidate": cand.label, "screened": screened, "final": cand.median})
    rho = rank_correlation([(p["screened"], p["final"]) for p in pairs])
    screened_trials = [t for t in study.trials if t.user_attrs.get("measured_in") == MODE_SCREENED]
    return {
        "mode": MODE_SCREENED,
        "final_mode": MODE_FINAL,
        "candidates_screened": len(screened_trials),
        "screening_server_starts": starts,
        "screening_runs": screened_runs(drift, len(screened_trials)),
        "drift_checks": drift,
        "finalists": pairs,
        "spearman_screened_vs_final": rho,
        "note": (
            "screened numbers come from an eager server (no graph, host-launched kernels); "
            "the winner and every improvement are from the final graph-mode measurements"
        ),
    }


def open_drift_checked(
    backend: Backend, point: OperatingPoint, study: optuna.Study, settings: SearchSettings
) -> DriftChecked:
    return DriftChecked(open_screening(backend, point), study, settings, settings.screen_every)


__all__ = [
    "DRIFT_ATTR",
    "MODE_FINAL",
    "MODE_SCREENED",
    "DriftChecked",
    "open_drift_checked",
    "rank_correlation",
    "screened_runs",
    "screened_value",
    "screening_summary",
]
