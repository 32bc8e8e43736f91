"""Fit a hardware profile's estimated fields to what a profile measured.

Calibration (`calibrate`) fits the base hardware profile's estimated fields that a profile
measures (prefetch_bw, cmo_issue_us, kernel_overhead_us, vector_bw_fraction, hbm_bw) and writes
a new profile TOML that the sim backend loads with `--hardware OUT.toml`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import tomllib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prefetch_tune.analysis.kernels import NORM_QUANT
from prefetch_tune.analysis.pairing import DENSE_MATMULS, ROLE_BITS, label_layers
from prefetch_tune.analysis.profile import ProfileReport
from prefetch_tune.errors import ConfigError
from prefetch_tune.hardware import HardwareProfile, load_hardware, parse_profile

# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Fit:
    """One fitted hardware field."""

    field: str
    value: float
    base: float
    samples: int
    how: str


@dataclass
class Calibration:
    """What a profile measured of the hardware, against the base profile."""

    base: HardwareProfile
    base_path: Path
    fits: list[Fit]
    kept: dict[str, str]  # field -> why it was not fitted
    ops: list[dict[str, Any]]  # per op role: observed vs modelled durations
    profile: HardwareProfile | None = None  # the result, once written and re-read

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.name,
            "base_path": str(self.base_path),
            "fitted": {
                f.field: {"value": f.value, "base": f.base, "samples": f.samples, "how": f.how}
                for f in self.fits
            },
            "kept": self.kept,
            "ops": self.ops,
        }


def _linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x over (x, y); None when x does not vary enough."""
    xs = [p[0] for p in points]
    if len(points) < 2 or max(xs) < 1.2 * min(xs):
        return None
    mx = statistics.fmean(xs)
    my = statistics.fmean(p[1] for p in points)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def _overlaps_any(start: float, end: float, spans: Sequence[tuple[float, float]]) -> bool:
    i = bisect_right(spans, (end, math.inf))
    return any(s < end and e > start for s, e in spans[max(0, i - 8) : i])


def calibrate(report: ProfileReport, hardware: str) -> Calibration:
    """Fit the base profile's fields a profile measures. Needs a plan (model, layout, tokens).

    * prefetch_bw, cmo_issue_us: CMO busy time vs bytes. With several sizes, the least-squares
      line through the per-size medians (intercept = issue, slope = 1 / bandwidth); with one
      size, bandwidth = median bytes / (duration - cmo_issue_us), issue kept.
    * kernel_overhead_us, vector bandwidth: per vector-op role, the median duration of the
      instances no prefetch overlaps (no contention) against the modelled bytes of that op at
      the plan's tokens; a line through them when sizes differ, else bandwidth alone.
    * hbm_bw: dense projections that no prefetch fills nor overlaps, memory-bound at the
      fitted overhead: the bandwidth at which the sim's matmul time equals the median.
    * vector_bw_fraction = vector bandwidth / hbm_bw.
    """
    from prefetch_tune.backends.sim import _memory_time, compute_ops

    if report.plan is None:
        raise ConfigError("--calibrate needs --model (and layout, tokens) for the runtime plan")
    base = load_hardware(hardware)
    plan = report.plan.plan
    fits: list[Fit] = []
    kept: dict[str, str] = {}
    issue, bw = _fit_prefetch(report, base, fits, kept)
    if not plan.tokens:
        raise ConfigError("--calibrate needs the tokens per forward (--tokens / --max-num-seqs)")
    ops = {o.name: o for o in compute_ops(plan.model, plan.layout, base, plan.tokens, 0, 0)}
    seen = _observe_ops(report, ops)
    overhead, vector_bw, vec_points = _fit_vector(seen.observed, ops, base, fits, kept)
    hbm = _fit_hbm(seen, ops, overhead, base, fits, kept, _memory_time)
    if vec_points:
        _fit_vector_fraction(vector_bw, hbm, sum(p[2] for p in vec_points), base, fits, kept)
    fitted = replace(
        base,
        prefetch_bw=bw,
        cmo_issue_us=issue,
        kernel_overhead_us=overhead,
        hbm_bw=hbm,
        vector_bw_fraction=next(
            (f.value for f in fits if f.field == "vector_bw_fraction"), base.vector_bw_fraction
        ),
    )
    table = _op_table(seen, ops, base, fitted, _memory_time)
    return Calibration(base, Path(base.source), fits, kept, table)


def _fit_prefetch(
    report: ProfileReport, base: HardwareProfile, fits: list[Fit], kept: dict[str, str]
) -> tuple[float, float]:
    """cmo_issue_us and prefetch_bw from CMO busy time vs bytes (the base's where unmeasured)."""
    by_size: dict[int, list[float]] = {}
    for inst in report.instances:
        if inst.nbytes and inst.busy_dur > 0:
            by_size.setdefault(inst.nbytes, []).append(inst.busy_dur)
    n_cmo = sum(len(v) for v in by_size.values())
    issue = base.cmo_issue_us
    bw = base.prefetch_bw
    if not by_size:
        kept["prefetch_bw"] = kept["cmo_issue_us"] = "no prefetch task with known bytes"
        return issue, bw
    line = _linear_fit([(float(b), statistics.median(d)) for b, d in by_size.items()])
    if line is not None and line[1] > 0 and line[0] >= 0:
        issue, bw = line[0], 1e6 / line[1]
        how = f"CMO busy time vs bytes, line through {len(by_size)} per-size medians"
        fits.append(Fit("cmo_issue_us", issue, base.cmo_issue_us, n_cmo, how))
        fits.append(Fit("prefetch_bw", bw, base.prefetch_bw, n_cmo, how))
        return issue, bw
    rates = [b / ((d - issue) * 1e-6) for b, ds in by_size.items() for d in ds if d > issue]
    if rates:
        bw = statistics.median(rates)
        fits.append(
            Fit(
                "prefetch_bw",
                bw,
                base.prefetch_bw,
                len(rates),
                f"median bytes / (CMO duration - cmo_issue_us {issue:g} us)",
            )
        )
    kept["cmo_issue_us"] = (
        "one prefetch size only (or no consistent line): the intercept is not measurable"
    )
    return issue, bw


@dataclass
class _Observed:
    """Compute-op durations free of prefetch contention, per plan-op role."""

    observed: dict[str, list[float]]  # role -> durations (µs) of ops no prefetch overlaps
    excluded: dict[str, int]  # role -> ops left out because a prefetch overlapped them
    consumers: dict[str, bool]  # dense matmul role -> a prefetch fills its weight


def _observe_ops(report: ProfileReport, ops: dict[str, Any]) -> _Observed:
    """Durations of single-role compute ops that no prefetch overlaps (fused ops left out)."""
    assert report.plan is not None
    observed: dict[str, list[float]] = {}
    excluded: dict[str, int] = {}
    consumers = dict.fromkeys(DENSE_MATMULS, False)
    seen_knobs = {(i.knob, i.weight) for i in report.instances}
    for o in report.plan.plan.ops:
        if (o.knob, o.weight) in seen_knobs:
            consumers[o.consumer] = True
    single = {bit: name for name, bit in ROLE_BITS.items() if name in ops}
    for dev in report.data.devices:
        roles = report.roles.get(dev.name)
        if roles is None:
            roles, _ = label_layers(dev.cat)
        spans = sorted((c.start, c.end) for c in dev.cmos)
        for j in range(len(dev.start)):
            role = single.get(roles[j])  # exactly one role (fused ops are left out)
            if role is None or dev.cat[j] == NORM_QUANT:
                continue
            if _overlaps_any(dev.start[j], dev.end[j], spans):
                excluded[role] = excluded.get(role, 0) + 1
                continue
            observed.setdefault(role, []).append(dev.end[j] - dev.start[j])
    return _Observed(observed, excluded, consumers)


def _fit_vector(
    observed: dict[str, list[float]],
    ops: dict[str, Any],
    base: HardwareProfile,
    fits: list[Fit],
    kept: dict[str, str],
) -> tuple[float, float, list[tuple[float, float, int]]]:
    """kernel_overhead_us and the vector bandwidth from vector-op durations vs modelled bytes."""
    overhead = base.kernel_overhead_us
    vector_bw = base.vector_bw
    vec_points = [
        (ops[r].hbm_bytes, statistics.median(d), len(d))
        for r, d in observed.items()
        if ops[r].kind == "vector" and ops[r].hbm_bytes > 0
    ]
    n_vec = sum(p[2] for p in vec_points)
    line = _linear_fit([(b, d) for b, d, _ in vec_points])
    if line is not None and line[1] > 0 and line[0] >= 0:
        overhead, vector_bw = line[0], 1e6 / line[1]
        how = f"vector-op duration vs modelled bytes, line through {len(vec_points)} op medians"
        fits.append(Fit("kernel_overhead_us", overhead, base.kernel_overhead_us, n_vec, how))
    elif vec_points:
        rates = [b / ((d - overhead) * 1e-6) for b, d, _ in vec_points if d > overhead]
        if rates:
            vector_bw = statistics.median(rates)
        kept["kernel_overhead_us"] = "vector ops of one size only: the intercept is not measurable"
    else:
        kept["kernel_overhead_us"] = "no vector op free of prefetch contention"
    return overhead, vector_bw, vec_points


def _fit_hbm(
    seen: _Observed,
    ops: dict[str, Any],
    overhead: float,
    base: HardwareProfile,
    fits: list[Fit],
    kept: dict[str, str],
    memory_time: Any,
) -> float:
    """hbm_bw from memory-bound dense matmuls, inverted through the sim's matmul time."""
    hbm_values: list[float] = []
    n_mm = 0
    for r in DENSE_MATMULS:
        if r not in seen.observed or seen.consumers.get(r):
            continue
        op = ops[r]
        memory_s = (statistics.median(seen.observed[r]) - overhead) * 1e-6
        if op.hbm_bytes <= 0 or memory_s <= op.cube_s * 1.02:
            continue  # compute-bound (or overhead only): says nothing of HBM

        def excess(x: float, op: Any = op, memory_s: float = memory_s) -> float:
            return float(memory_time(op, replace(base, hbm_bw=x), 0.0)) - memory_s

        lo, hi = 1e9, 1e15
        if excess(lo) < 0 or excess(hi) > 0:
            continue
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if excess(mid) > 0:
                lo = mid
            else:
                hi = mid
        hbm_values.append(math.sqrt(lo * hi))
        n_mm += len(seen.observed[r])
    if not hbm_values:
        kept["hbm_bw"] = "no memory-bound dense matmul free of prefetch hits and contention"
        return base.hbm_bw
    hbm = statistics.median(hbm_values)
    fits.append(
        Fit(
            "hbm_bw",
            hbm,
            base.hbm_bw,
            n_mm,
            f"memory-bound matmuls no prefetch fills or overlaps ({len(hbm_values)} ops), "
            "inverted through the sim's matmul time",
        )
    )
    return hbm


def _fit_vector_fraction(
    vector_bw: float,
    hbm: float,
    n_vec: int,
    base: HardwareProfile,
    fits: list[Fit],
    kept: dict[str, str],
) -> None:
    """vector_bw_fraction = vector bandwidth / hbm_bw, when that is physical (in (0, 1])."""
    frac = vector_bw / hbm
    if 0 < frac <= 1:
        fits.append(
            Fit(
                "vector_bw_fraction",
                frac,
                base.vector_bw_fraction,
                n_vec,
                f"vector bandwidth {vector_bw / 1e9:.1f} GB/s (from vector-op durations vs "
                f"modelled bytes) / hbm_bw {hbm / 1e9:.1f} GB/s",
            )
        )
    else:
        kept["vector_bw_fraction"] = (
            f"vector ops imply {vector_bw / 1e9:.1f} GB/s, above hbm_bw: not physical, kept"
        )


def _op_table(
    seen: _Observed,
    ops: dict[str, Any],
    base: HardwareProfile,
    fitted: HardwareProfile,
    memory_time: Any,
) -> list[dict[str, Any]]:
    """Per op role: observed median duration vs the base and the fitted model."""
    table: list[dict[str, Any]] = []
    for role, durs in seen.observed.items():
        op = ops[role]
        if op.kind not in ("vector", "matmul"):
            continue
        table.append(
            {
                "op": role,
                "kind": op.kind,
                "samples": len(durs),
                "excluded_overlapping_prefetch": seen.excluded.get(role, 0),
                "observed_us": round(statistics.median(durs), 3),
                "model_base_us": round(_op_us(op, base, memory_time), 3),
                "model_fitted_us": round(_op_us(op, fitted, memory_time), 3),
                "prefetched": bool(seen.consumers.get(role)),
            }
        )
    return table


def _op_us(op: Any, hw: HardwareProfile, memory_time: Any) -> float:
    return hw.kernel_overhead_us + float(memory_time(op, hw, 0.0)) * 1e6


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written to a hardware profile")
        return repr(value)
    return json.dumps(str(value))


def _widen_to_measurement(entry: dict[str, Any]) -> None:
    """A measured value outside the base's mechanism range wins over the estimate: the range
    grows to include it and says so (the mechanism behind the old range needs revisiting)."""
    bounds = entry.get("range")
    if not (isinstance(bounds, list) and len(bounds) == 2):
        return
    low, high = float(bounds[0]), float(bounds[1])
    value = float(entry["value"])
    if low <= value <= high:
        return
    entry["range"] = [min(low, value), max(high, value)]
    entry["range_why"] = (
        f"widened from [{low:g}, {high:g}] to the measured {value:g}: a measurement beats the "
        f"estimate the old range came from ({entry.get('range_why', '')})"
    )


def render_profile_toml(cal: Calibration, trace: Path, name: str | None = None) -> str:
    """The base profile's TOML with the fitted fields replaced and a new [calibration] table."""
    try:
        doc = tomllib.loads(cal.base_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{cal.base_path}: cannot re-read the base profile ({exc})") from None
    fits = {f.field: f for f in cal.fits}
    lines = [
        "# Hardware profile calibrated by `prefetch-tune profile --calibrate`.",
        f'# Base: {cal.base_path}. Fitted fields have kind = "fitted"; the rest are the base\'s.',
        f"name = {_toml_value(name or cal.base.name + '-calibrated')}",
    ]
    if "description" in doc:
        desc = f"{doc['description']} (calibrated from {trace.name})"
        lines.append(f"description = {_toml_value(desc)}")
    for key, entry in doc.items():
        if not isinstance(entry, dict) or key == "calibration":
            continue
        lines.append("")
        lines.append(f"[{key}]")
        entry = dict(entry)
        if key in fits:
            f = fits[key]
            entry["value"] = float(f"{f.value:.6g}")
            entry["kind"] = "fitted"
            entry["source"] = (
                f"prefetch-tune profile --calibrate from {trace}: {f.how}; {f.samples} samples "
                f"(base {cal.base.name}: {f.base:g})"
            )
            _widen_to_measurement(entry)
        for k2, v2 in entry.items():
            if isinstance(v2, dict):
                continue
            if isinstance(v2, list):
                lines.append(f"{k2} = [{', '.join(_toml_value(x) for x in v2)}]")
                continue
            lines.append(f"{k2} = {_toml_value(v2)}")
    lines += [
        "",
        "[calibration]",
        f"source_trace = {_toml_value(str(trace))}",
        f"base_profile = {_toml_value(str(cal.base_path))}",
        f"fitted = {_toml_value(', '.join(f.field for f in cal.fits))}",
        "method = "
        + _toml_value(
            "prefetch-tune profile --calibrate: robust per-size / per-op medians, least squares "
            "through them (see prefetch_tune/analysis/calibration.py calibrate)"
        ),
        f"created = {_toml_value(time.strftime('%Y-%m-%dT%H:%M:%S%z'))}",
    ]
    for f in cal.fits:
        lines.append(f"samples_{f.field} = {f.samples}")
    base_cal = doc.get("calibration")
    if isinstance(base_cal, dict):  # what the base itself was fitted to, for provenance
        for k4, v4 in base_cal.items():
            if isinstance(v4, str | int | float):
                lines.append(f"base_{k4} = {_toml_value(v4)}")
    for k3, why in cal.kept.items():
        lines.append(f"kept_{k3} = {_toml_value(why)}")
    return "\n".join(lines) + "\n"


def write_profile(cal: Calibration, out: Path, trace: Path) -> HardwareProfile:
    """Write the calibrated profile and read it back the way the sim backend will."""
    text = render_profile_toml(cal, trace)
    try:
        parsed = parse_profile(tomllib.loads(text), str(out))
    except (ConfigError, tomllib.TOMLDecodeError) as exc:  # a bug here, not the user's input
        raise ConfigError(
            f"--calibrate {out}: the fitted profile does not validate ({exc})"
        ) from None
    try:
        out.write_text(text)
    except OSError as exc:
        raise ConfigError(f"--calibrate {out}: cannot write ({exc.strerror})") from None
    cal.profile = parsed
    return parsed
