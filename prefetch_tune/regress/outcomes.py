"""What a sweep found: per point, the checks applied and their outcome; the whole report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["pass", "fail", "missing", "error"]


@dataclass
class Check:
    """One rule applied to one point."""

    name: str  # "winner vs stored", "winner beats off", "winner beats default", ...
    metric: str
    ok: bool
    message: str
    stored: float | None = None
    measured: float | None = None
    pct: float | None = None
    band_pct: float | None = None
    limit_pct: float | None = None


@dataclass
class PointOutcome:
    name: str  # the result file's stem (or the slug a missing result would have)
    where: str
    status: Status
    simulated: bool
    backend: str
    max_num_seqs: int
    path: Path | None = None
    metric: str = ""
    minimize: bool = False
    checks: list[Check] = field(default_factory=list)
    stored: dict[str, float | None] = field(default_factory=dict)
    measured: dict[str, float | None] = field(default_factory=dict)
    mad: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        if self.status == "missing" and not self.simulated:
            return "no result"
        return "SIMULATED" if self.simulated else "measured"

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        if self.status == "missing":
            return self.notes[0] if self.notes else "no stored result"
        if self.status == "error":
            return "; ".join(self.notes) or "error"
        if self.failures:
            return "; ".join(c.message for c in self.failures)
        return "holds"


@dataclass
class SweepReport:
    outcomes: list[PointOutcome]
    tolerance: float
    allow_missing: bool
    results_dir: Path
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        bad: set[Status] = {"fail", "error"} if self.allow_missing else {"fail", "error", "missing"}
        return not any(o.status in bad for o in self.outcomes)

    @property
    def simulated(self) -> bool:
        return any(o.simulated for o in self.outcomes)

    def counts(self) -> dict[str, int]:
        out = {"pass": 0, "fail": 0, "missing": 0, "error": 0}
        for o in self.outcomes:
            out[o.status] += 1
        return out
