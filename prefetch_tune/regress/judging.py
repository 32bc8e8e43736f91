"""The sweep's rules: does a re-measured winner still hold against its stored result?

A point regresses when

- the winner's objective median falls below the stored one by more than
  max(tolerance, noise band), or
- the winner no longer beats `off` or `default` beyond the noise where the stored result said it
  did (the stored improvement was significant), or
- a re-measurement needed for these checks is rejected (failed, incomplete, unstable, SLO).
"""

from __future__ import annotations

from typing import Any

from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.regress.outcomes import Check, PointOutcome
from prefetch_tune.search.selection import Candidate, compare


def _stored_candidate(summary: dict[str, Any], label: str) -> Candidate:
    """A stand-in for a stored finalist with its stored median and MAD.

    Three values m-mad, m, m+mad have median m and MAD mad, so `compare` sees the stored
    spread exactly as the search recorded it (even if only the median was kept).
    """
    cand = Candidate(label, PrefetchConfig.off(), label, 0)
    med = summary.get("objective_median")
    if med is None:
        return cand
    mad = float(summary.get("objective_mad") or 0.0)
    cand.values = [float(med) - mad, float(med), float(med) + mad]
    return cand


def evaluate(
    out: PointOutcome,
    doc: dict[str, Any],
    by_role: dict[str, Candidate],
    tolerance: float,
    minimize: bool,
) -> None:
    """Apply the rules to one point's judged re-measurements; sets `out.status` and its checks."""
    metric = out.metric
    stored = {
        "winner": doc["winner"],
        "off": doc["baselines"]["off"],
        "default": doc["baselines"]["default"],
    }
    for role, cand in by_role.items():
        out.measured[role] = cand.median if cand.values else None
        out.mad[role] = cand.mad if cand.values else None
        out.stored[role] = stored[role].get("objective_median")
    winner = by_role["winner"]
    if winner.rejected:
        out.checks.append(
            Check(
                "winner re-measurement",
                metric,
                False,
                f"{metric}: winner re-measurement rejected: {winner.rejected}",
            )
        )
    else:
        out.checks.append(_winner_vs_stored(winner, stored["winner"], metric, tolerance, minimize))
    improvement = doc.get("improvement", {})
    for base in ("off", "default"):
        was = improvement.get(f"vs_{base}", {}) or {}
        if was.get("significant"):
            out.checks.append(_winner_beats(winner, by_role[base], base, was, metric, minimize))
    out.status = "fail" if out.failures else "pass"


def _winner_vs_stored(
    winner: Candidate, stored: dict[str, Any], metric: str, tolerance: float, minimize: bool
) -> Check:
    """The winner's median may fall short of the stored one by max(tolerance, noise band)."""
    ref = _stored_candidate(stored, "stored winner")
    cmp = compare(winner, ref, minimize)
    if cmp["pct"] is None:
        return Check(
            "winner vs stored",
            metric,
            False,
            f"{metric}: the stored winner has no objective median",
        )
    pct, band = float(cmp["pct"]), float(cmp["band_pct"])
    limit = max(tolerance, band)
    worse = "below" if not minimize else "above"
    ok = -pct <= limit
    msg = (
        f"{metric}: winner median {winner.median:.2f} vs stored {ref.median:.2f} "
        f"({pct:+.2f}%); allowed {limit:.2f}% {worse} (tolerance {tolerance:g}%, "
        f"noise band {band:.2f}%)"
    )
    return Check("winner vs stored", metric, ok, msg, ref.median, winner.median, pct, band, limit)


def _winner_beats(
    winner: Candidate,
    baseline: Candidate,
    base: str,
    was: dict[str, Any],
    metric: str,
    minimize: bool,
) -> Check:
    """Where the stored winner beat `base` significantly, it must still beat it beyond noise."""
    name = f"winner beats {base}"
    if winner is baseline:  # the stored winner re-keys as the baseline itself
        return Check(
            name,
            metric,
            False,
            f"{metric}: the stored winner now prefetches the same bytes "
            f"as {base}; it cannot beat it",
        )
    for cand in (winner, baseline):
        if cand.rejected:
            return Check(
                name,
                metric,
                False,
                f"{metric}: cannot check the winner against {base}: "
                f"{cand.label} re-measurement rejected ({cand.rejected})",
            )
    cmp = compare(winner, baseline, minimize)
    pct = cmp["pct"]
    band = cmp["band_pct"]
    stored_pct = float(was.get("pct") or 0.0)
    stored_band = float(was.get("band_pct") or 0.0)
    ok = bool(cmp["significant"])
    shown = "n/a" if pct is None else f"{pct:+.2f}% (band ±{band:.2f}%)"
    msg = (
        f"{metric}: winner vs {base} {shown}, stored {stored_pct:+.2f}% "
        f"(band ±{stored_band:.2f}%)"
        + ("" if ok else f"; the winner no longer beats {base} beyond the noise")
    )
    return Check(
        name,
        metric,
        ok,
        msg,
        stored_pct,
        None if pct is None else float(pct),
        None if pct is None else float(pct),
        None if band is None else float(band),
    )
