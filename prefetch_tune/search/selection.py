"""Choosing the winner: re-measure the finalists, off and default, score conservatively
(median minus a MAD penalty), reject unstable, incomplete or SLO-breaking runs, give a tie to
fewer prefetched bytes, and fall back to off when nothing beats it beyond the noise. `sweep`
uses the same rules to re-check stored winners."""

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
        progress.message(
            f"max-num-seqs {point.max_num_seqs}: re-measured {cand.label}: "
            f"median {cand.median:,.2f}"
        )


def judge(cand: Candidate, point: OperatingPoint, settings: SearchSettings) -> None:
    if cand.rejected:
        return
    if len(cand.values) < settings.repeats:
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


def choose_winner(
    cands: list[Candidate], point: OperatingPoint, settings: SearchSettings
) -> tuple[Candidate, list[str]]:
    notes: list[str] = []
    for c in cands:
        judge(c, point, settings)
    ok = [c for c in cands if not c.rejected]
    off = next(c for c in cands if c.label == "off")
    if not ok:
        notes.append("every finalist was rejected; the winner is off")
        return off, notes
    best_score = max(c.score(settings.minimize) for c in ok)
    tol = settings.tie_tolerance * abs(best_score)
    tied = [c for c in ok if c.score(settings.minimize) >= best_score - tol]
    winner = min(tied, key=lambda c: (c.total_bytes, -c.score(settings.minimize)))
    if winner is off:  # off scored best, or within the tie tolerance of the best
        notes.append(
            f"nothing beat off by more than the {settings.tie_tolerance:.0%} tie tolerance; "
            "the winner is off"
        )
    elif not off.rejected:
        cmp = compare(winner, off, settings.minimize)
        if not cmp["significant"]:
            notes.append("nothing beat off beyond the noise; the winner is off")
            winner = off
    else:
        notes.append(
            f"off itself was rejected ({off.rejected}), so the gain over off is unknown; "
            "re-run when the measurements are stable before relying on this winner"
        )
    return winner, notes
