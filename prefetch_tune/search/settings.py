"""What a search is asked for: objective, SLO constraints, budget and sampler, and the metric
names it may use (those of `vllm bench serve`'s saved JSON)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefetch_tune import numbers
from prefetch_tune.backends.base import COUNT_METRICS, LOWER_IS_BETTER, Metrics
from prefetch_tune.errors import ConfigError

SAMPLERS = ("tpe", "gp", "random", "grid")
SEED_MAX = 2**32 - 1  # numpy's seed range, which Optuna's samplers pass the seed to

# Numeric metrics of `vllm bench serve`'s saved JSON (docs/design.md section 2); latencies with any
# --metric-percentiles. Checked before a study is touched, so a typo is exit 2, not a bad trial.
BENCH_METRICS = (
    frozenset(
        {
            "duration",
            "request_throughput",
            "request_goodput",
            "output_throughput",
            "total_token_throughput",
            "max_output_tokens_per_s",
            "max_concurrent_requests",
            "rtfx",
        }
    )
    | COUNT_METRICS
    | LOWER_IS_BETTER
)
_LATENCY = re.compile(r"(mean|median|std|p\d+(\.\d+)?)_(ttft|tpot|itl|e2el)_ms")


def check_metric(name: str, flag: str) -> None:
    if name not in BENCH_METRICS and not _LATENCY.fullmatch(name):
        raise ConfigError(
            f"{flag} {name}: not a vllm bench serve metric "
            "(e.g. output_throughput, mean_tpot_ms, p99_tpot_ms)"
        )


@dataclass(frozen=True)
class Slo:
    """A service-level constraint on one metric, e.g. `p99_tpot_ms<=50`."""

    metric: str
    op: Literal["<=", ">="]
    bound: float

    @classmethod
    def parse(cls, text: str, flag: str = "--slo") -> Slo:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*", text)
        if not m:
            raise ConfigError(
                f"{flag} {text}: expected METRIC<=VALUE or METRIC>=VALUE, e.g. p99_tpot_ms<=50"
            )
        try:
            bound = float(m.group(3))
        except ValueError:
            raise ConfigError(f"{flag} {text}: {m.group(3)!r} is not a number") from None
        numbers.number(bound, f"{flag} {text}: bound")
        op: Literal["<=", ">="] = "<=" if m.group(2) == "<=" else ">="
        return cls(m.group(1), op, bound)

    def violation(self, metrics: Metrics) -> float:
        """<= 0 when met (Optuna's feasibility convention)."""
        value = metrics.get(self.metric)
        if value is None:
            raise ConfigError(f"--slo {self}: the backend reports no metric {self.metric!r}")
        return value - self.bound if self.op == "<=" else self.bound - value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


@dataclass(frozen=True)
class SearchSettings:
    """How to search one operating point."""

    results_dir: Path
    trials: int = 30
    timeout: float | None = None
    repeats: int = 3  # race rounds before the first elimination
    max_repeats: int | None = None  # race rounds at most; None: max(12, 4 x repeats)
    objective: str = "output_throughput"
    slos: tuple[Slo, ...] = ()
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None
    heartbeat_s: int = 60  # RDB storages: Optuna heartbeat interval (stale after 3 x)
    finalists: int = 3
    max_rel_mad: float = 0.10
    replace: bool = False  # a stored result gives way even to a less trustworthy one

    def check(self) -> None:
        numbers.positive(self.trials, "--trials", integer=True)
        numbers.positive(self.repeats, "--repeats", integer=True)
        numbers.number(self.seed, "--seed", low=0, high=SEED_MAX, integer=True)
        if self.max_repeats is not None and self.max_repeats < self.repeats:
            raise ConfigError(
                f"--max-repeats {self.max_repeats}: must be >= --repeats {self.repeats}"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler}: expected one of {', '.join(SAMPLERS)}")
        numbers.positive(self.heartbeat_s, "--heartbeat", integer=True)
        if self.timeout is not None:
            numbers.positive(self.timeout, "--timeout")
        check_metric(self.objective, "--objective")
        for slo in self.slos:
            check_metric(slo.metric, f"--slo {slo}:")

    def objective_value(self, metrics: Metrics) -> float:
        """The objective out of one run's metrics (a metric the backend lacks is bad input)."""
        if self.objective not in metrics:
            raise ConfigError(
                f"--objective {self.objective}: the backend reports no such metric "
                f"(known: {', '.join(sorted(k for k in metrics if not k.startswith('sim_')))})"
            )
        return float(metrics[self.objective])

    @property
    def round_cap(self) -> int:
        """The selection race's most rounds."""
        return self.max_repeats if self.max_repeats is not None else max(12, 4 * self.repeats)

    @property
    def minimize(self) -> bool:
        return self.objective in LOWER_IS_BETTER or bool(_LATENCY.fullmatch(self.objective))


class Progress:
    """What a search reports while it runs; the CLI draws it, tests ignore it."""

    def start(self, label: str, total: int, done: int) -> None: ...
    def advance(self, label: str, done: int, best: float | None) -> None: ...
    def message(self, text: str) -> None: ...
