"""Choosing the winner.

`race` re-measures off, vLLM-Ascend's default and the finalists interleaved (round-robin, so a
drift hits all alike), pairs each run with off's run of the same round, and after each round puts
a paired Student-t interval on every candidate's gain over off. Candidates whose interval lies
below the leader's leave the race; it stops when the leader is separated or `max_repeats` rounds
are spent. Off wins unless some candidate's lower bound of gain over off is above zero, and a tie
(overlapping intervals) goes to fewer prefetched bytes.

`remeasure`, `judge` and `compare` (median and MAD band) are the rules `sweep` re-checks stored
winners with.
"""

from __future__ import annotations

import math
import statistics
import threading
from dataclasses import dataclass, field
from typing import Any

from prefetch_tune.backends.base import Backend, Metrics, OperatingPoint
from prefetch_tune.errors import BackendError
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.search.settings import Progress, SearchSettings

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal noise


@dataclass
class Candidate:
    label: str
    config: PrefetchConfig
    key: str
    total_bytes: int
    values: list[float] = field(default_factory=list)
    runs: list[Metrics] = field(default_factory=list)
    rejected: str = ""
    rounds: list[int] = field(default_factory=list)  # race round of each value
    dropped: str = ""  # why the race stopped measuring it (still a valid candidate)

    def by_round(self) -> dict[int, float]:
        return dict(zip(self.rounds, self.values, strict=True))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def mad(self) -> float:
        if not self.values:
            return math.nan
        med = self.median
        return statistics.median(abs(v - med) for v in self.values)

    def score(self, minimize: bool) -> float:
        """Conservative: the median moved one noise-sigma in the unfavourable direction."""
        penalty = MAD_SCALE * self.mad
        return -(self.median + penalty) if minimize else self.median - penalty


def remeasure(
    cands: list[Candidate],
    point: OperatingPoint,
    backend: Backend,
    settings: SearchSettings,
    progress: Progress,
    stop: threading.Event,
) -> None:
    for cand in cands:
        for r in range(1, settings.repeats + 1):
            if stop.is_set():
                return
            try:
                metrics = backend.evaluate(cand.config, point, repeat=r)
            except BackendError as exc:
                cand.rejected = f"run {r} failed: {' '.join(str(exc).split())[:200]}"
                break
            cand.runs.append(metrics)
            cand.values.append(settings.objective_value(metrics))
            cand.rounds.append(r)
        progress.message(
            f"max-num-seqs {point.max_num_seqs}: re-measured {cand.label}: "
            f"median {cand.median:,.2f}"
        )


def judge(
    cand: Candidate, point: OperatingPoint, settings: SearchSettings, rounds: int | None = None
) -> None:
    """Reject failed, incomplete (fewer than `rounds`, default `settings.repeats`, values),
    unstable or SLO-breaking measurements."""
    if cand.rejected:
        return
    if len(cand.values) < (settings.repeats if rounds is None else rounds):
        cand.rejected = "incomplete re-measurement"
        return
    for run in cand.runs:
        asked = run.get("num_prompts", point.num_prompts)  # what that benchmark was told to send
        if run.get("failed", 0) > 0 or run.get("completed", asked) < asked:
            cand.rejected = (
                f"incomplete benchmark (completed {run.get('completed', 0):.0f} of "
                f"{asked:.0f}, failed {run.get('failed', 0):.0f})"
            )
            return
    if cand.median and cand.mad / abs(cand.median) > settings.max_rel_mad:
        cand.rejected = f"unstable (relative MAD {cand.mad / abs(cand.median):.1%})"
        return
    med = {k: statistics.median(r[k] for r in cand.runs) for k in cand.runs[0]}
    for slo in settings.slos:
        if slo.violation(med) > 0:
            cand.rejected = f"violates {slo} (median {med[slo.metric]:.3g})"
            return


def compare(a: Candidate, b: Candidate, minimize: bool) -> dict[str, Any]:
    """Improvement of a over b, with the noise band and a significance verdict."""
    if not a.values or not b.values or not b.median:
        return {"pct": None, "band_pct": None, "significant": False}
    sign = -1.0 if minimize else 1.0
    pct = sign * (a.median - b.median) / abs(b.median) * 100
    band = 2 * MAD_SCALE * math.hypot(a.mad, b.mad) / abs(b.median) * 100
    return {"pct": pct, "band_pct": band, "significant": pct > band}


INTERVAL_METHOD = "paired Student-t interval on the mean per-round gain (scipy.stats.ttest_1samp)"
LEVEL = 0.95  # two-sided; a lower bound above zero is a one-sided 2.5% test


@dataclass(frozen=True)
class Interval:
    """A gain in percent of the baseline (positive = better) with its confidence interval."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        return self.low > 0

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def to_json(self, level: float = LEVEL) -> dict[str, Any]:
        finite = math.isfinite(self.low) and math.isfinite(self.high)
        return {
            "pct": self.estimate if self.n else None,
            "band_pct": (self.high - self.low) / 2 if finite else None,
            "low_pct": self.low if finite else None,
            "high_pct": self.high if finite else None,
            "significant": self.significant,
            "pairs": self.n,
            "method": INTERVAL_METHOD,
            "level": level,
        }


def paired_gains(a: Candidate, base: Candidate, minimize: bool) -> list[float]:
    """Per round measured by both: a's gain over base in percent of base."""
    sign = -1.0 if minimize else 1.0
    b = base.by_round()
    return [sign * (v - b[r]) / abs(b[r]) * 100 for r, v in a.by_round().items() if b.get(r)]


def gain_interval(gains: list[float], level: float = LEVEL) -> Interval:
    """Student-t interval on the mean gain: exact for normal noise at the 3-12 runs a race has,
    where a bootstrap's percentile interval is too narrow. Unbounded below two pairs."""
    n = len(gains)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, 0)
    mean = statistics.fmean(gains)
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n)
    if statistics.pstdev(gains) == 0:  # identical runs (e.g. a noiseless sim): a point
        return Interval(mean, mean, mean, n)
    from scipy import stats  # lazy: ~0.3 s of import the other commands never pay

    ci = stats.ttest_1samp(gains, 0.0).confidence_interval(confidence_level=level)
    return Interval(mean, float(ci.low), float(ci.high), n)


def interval(a: Candidate, base: Candidate, minimize: bool, level: float = LEVEL) -> Interval:
    if a is base:
        n = len(a.values)
        return Interval(0.0, 0.0, 0.0, n)
    return gain_interval(paired_gains(a, base, minimize), level)


def measured_noise(cands: list[Candidate]) -> dict[str, Any]:
    """Run-to-run spread of the repeated off and default runs: pooled relative standard
    deviation in percent, with the number of runs behind it."""
    var, df, runs = 0.0, 0, 0
    for c in cands:
        if len(c.values) >= 2 and c.median:
            rel = [v / c.median * 100 for v in c.values]
            var += statistics.variance(rel) * (len(rel) - 1)
            df += len(rel) - 1
            runs += len(rel)
    return {
        "pct": math.sqrt(var / df) if df else None,
        "runs": runs,
        "from": [c.label for c in cands],
        "method": "pooled relative standard deviation of the repeated runs",
    }


@dataclass
class RaceCost:
    backend_runs: int = 0
    server_starts: int = 0
    rounds: int = 0


def _measure(
    cand: Candidate, rnd: int, point: OperatingPoint, backend: Backend, settings: SearchSettings
) -> bool:
    try:
        metrics = backend.evaluate(cand.config, point, repeat=rnd)
    except BackendError as exc:
        cand.rejected = f"run {rnd} failed: {' '.join(str(exc).split())[:200]}"
        return False
    cand.runs.append(metrics)
    cand.values.append(settings.objective_value(metrics))
    cand.rounds.append(rnd)
    return True


def race(
    cands: list[Candidate],
    point: OperatingPoint,
    backend: Backend,
    settings: SearchSettings,
    progress: Progress,
    stop: threading.Event,
) -> RaceCost:
    """Round-robin re-measurement with elimination (see the module docstring).

    cands[0] is off, the baseline every run is paired with. From round `settings.repeats` on,
    a candidate leaves when its interval lies below the leader's (or below off) or it is
    rejected; the race ends when at most one challenger is left and its interval excludes
    zero, or after `settings.round_cap` rounds.
    """
    off = cands[0]
    cost = RaceCost()
    starts0 = getattr(backend, "server_starts", 0)
    alive = list(cands)
    for rnd in range(1, settings.round_cap + 1):
        shift = (rnd - 1) % len(alive)  # rotate the order: no candidate always runs first
        for cand in alive[shift:] + alive[:shift]:
            if stop.is_set():
                return cost
            _measure(cand, rnd, point, backend, settings)
            cost.backend_runs += 1
        cost.rounds = rnd
        cost.server_starts = getattr(backend, "server_starts", 0) - starts0
        if off.rejected:
            break
        alive = [c for c in alive if not c.rejected]
        if rnd < settings.repeats:
            continue
        for c in alive:
            judge(c, point, settings, rounds=rnd)
        alive = [c for c in alive if not c.rejected]
        if _eliminate(alive, off, cands[1], settings, rnd):
            break
    progress.message(
        f"max-num-seqs {point.max_num_seqs}: selection: {cost.rounds} round(s), "
        f"{cost.backend_runs} runs; "
        + ", ".join(f"{c.label} {c.median:,.2f}" for c in cands if c.values)
    )
    return cost


def _eliminate(
    alive: list[Candidate],
    off: Candidate,
    default: Candidate,
    settings: SearchSettings,
    rnd: int,
) -> bool:
    """Drop who is separated below the leader, or below a default that beats off (it could no
    longer win, see `choose_winner`); True when the race is decided."""
    challengers = [c for c in alive if c is not off]
    if not challengers:
        return True
    iv = {id(c): interval(c, off, settings.minimize) for c in challengers}
    leader = max(challengers, key=lambda c: iv[id(c)].estimate)
    lead = iv[id(leader)]
    lead_floor = max(lead.low, 0.0)  # off (gain 0) is in the race too
    for c in challengers:
        if c is not leader and iv[id(c)].high < lead_floor:
            c.dropped = f"round {rnd}: interval below {leader.label}'s"
            alive.remove(c)
    if lead.high < 0:  # even the leader is separated below off
        for c in challengers:
            if c in alive:
                c.dropped = f"round {rnd}: interval below off"
                alive.remove(c)
        return True
    if default in alive and iv[id(default)].significant:
        for c in [c for c in alive if c not in (off, default)]:
            if interval(c, default, settings.minimize).high < 0:
                c.dropped = f"round {rnd}: interval of gain over default below zero"
                alive.remove(c)
    rest = [c for c in alive if c is not off]
    if len(rest) != 1:
        return not rest
    last = iv[id(rest[0])]
    return last.low > 0 or last.high < 0


def choose_winner(
    cands: list[Candidate], point: OperatingPoint, settings: SearchSettings
) -> tuple[Candidate, list[str]]:
    """After the race (cands[0] off, cands[1] default): off unless a candidate's lower bound of
    gain over off is above zero. Default is what a user has without tuning, so when it beats off
    it stays unless a candidate's lower bound of gain over default is above zero too. Among the
    candidates left, the best estimate wins; one with fewer bytes whose interval overlaps it
    ties and wins."""
    notes: list[str] = []
    off, default = cands[0], cands[1]
    for c in cands:
        if not c.dropped:
            judge(c, point, settings, rounds=len(c.values))
    ok = [c for c in cands[1:] if not c.rejected and not c.dropped]
    if off.rejected:
        if not ok:
            notes.append("every candidate was rejected; the winner is off")
            return off, notes
        best = max(ok, key=lambda c: c.median * (-1 if settings.minimize else 1))
        notes.append(
            f"off itself was rejected ({off.rejected}), so the gain over off is unknown; "
            "re-run when the measurements are stable before relying on this winner"
        )
        return best, notes
    base = off
    pool = [c for c in ok if interval(c, off, settings.minimize).significant]
    if not pool:
        notes.append(
            f"no candidate's {LEVEL:.0%} lower bound of gain over off is above zero; "
            "the winner is off"
        )
        return off, notes
    if default in pool:
        base = default
        pool = [c for c in pool if interval(c, default, settings.minimize).significant]
        if not pool:
            notes.append(
                f"default beats off and no candidate's {LEVEL:.0%} lower bound of gain over "
                "default is above zero; the winner is default"
            )
            return default, notes
    iv = {id(c): interval(c, base, settings.minimize) for c in pool}
    leader = max(pool, key=lambda c: iv[id(c)].estimate)
    tied = [c for c in pool if iv[id(c)].overlaps(iv[id(leader)])]
    winner = min(tied, key=lambda c: (c.total_bytes, -iv[id(c)].estimate))
    if winner is not leader:
        notes.append(
            f"{winner.label} ties {leader.label} (overlapping {LEVEL:.0%} intervals of gain "
            f"over {base.label}) with fewer prefetched bytes"
        )
    return winner, notes
