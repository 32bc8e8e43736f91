"""Regression sweeps: re-measure stored winners and check they still hold.

A sweep plan (TOML) names operating points (`[[point]]` tables) or takes every stored result
(`every_stored_result = true`). For each point with a stored result the winner, `off` and
vLLM-Ascend's `default` are re-measured with the same repeat and noise rules as `search`
(`selection.remeasure`, `judge`, `compare`). A point regresses when

- the winner's objective median falls below the stored one by more than
  max(tolerance, noise band), or
- the winner no longer beats `off` or `default` beyond the noise where the stored result said it
  did (the stored improvement was significant), or
- a re-measurement needed for these checks is rejected (failed, incomplete, unstable, SLO).

A point without a stored result is reported missing. Simulated results stay labelled SIMULATED
in every output (JUnit, Markdown, CSV).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from prefetch_tune.backends.base import (
    Backend,
    OperatingPoint,
    Workload,
    backend_names,
    get_backend,
)
from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, MiB, ModelSpec, Quant, load_model
from prefetch_tune.prefetch import (
    SEMANTICS,
    PrefetchConfig,
    Semantics,
    parse_weight_prefetch_config,
)
from prefetch_tune.results import atomic_write, iter_results, load_result, point_slug, result_path
from prefetch_tune.runtime.plan import PlanOptions
from prefetch_tune.search.selection import Candidate, compare, judge, remeasure
from prefetch_tune.search.settings import Progress, SearchSettings, Slo
from prefetch_tune.search.space import build_space
from prefetch_tune.tuneconfig import check_keys, read_toml

DEFAULT_TOLERANCE_PCT = 2.0

# [[point]] keys and the types they accept.
POINT_KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "quant": (str,),
    "tp": (int,),
    "dp": (int,),
    "ep": (bool,),
    "hardware": (str,),
    "max_num_seqs": (int, list),
    "semantics": (str,),
    "input_len": (int,),
    "output_len": (int,),
    "sequence_parallel": (bool,),
    "cap_mib": (int, float),
    "backend": (str,),
    "vllm": (dict,),
}
PLAN_KEYS: dict[str, tuple[type, ...]] = {
    "point": (list,),
    "every_stored_result": (bool,),
    "tolerance": (int, float),
    "repeats": (int,),
    "vllm": (dict,),
}

Status = Literal["pass", "fail", "missing", "error"]


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanPoint:
    """One operating point of a plan, before it is matched with a stored result."""

    where: str  # e.g. "plan.toml: [[point]] 2" (for messages)
    model: ModelSpec
    layout: Layout
    max_num_seqs: int
    hardware: str = "atlas-a2"
    semantics: Semantics = "plugin"
    sequence_parallel: bool = False
    cap_mib: float = 18.0
    input_len: int | None = None
    output_len: int | None = None
    backend: str | None = None
    vllm: dict[str, Any] = field(default_factory=dict)  # over the plan's [vllm] table

    def operating_point(self, workload: Workload | None = None) -> OperatingPoint:
        wl = workload or Workload(
            input_len=self.input_len or Workload.input_len,
            output_len=self.output_len or Workload.output_len,
        )
        return OperatingPoint(
            model=self.model,
            layout=self.layout,
            max_num_seqs=self.max_num_seqs,
            hardware=self.hardware,
            workload=wl,
            semantics=self.semantics,
            options=PlanOptions(self.sequence_parallel, int(self.cap_mib * MiB)),
        )


@dataclass
class Plan:
    path: Path
    points: list[PlanPoint] = field(default_factory=list)
    every_stored_result: bool = False
    tolerance: float | None = None
    repeats: int | None = None
    vllm: dict[str, Any] = field(default_factory=dict)


def load_plan(path: Path) -> Plan:
    """Read a sweep plan; a bad key, type, model or layout is a ConfigError naming it."""
    doc = read_toml(path, "sweep plan")
    check_keys(doc, PLAN_KEYS, str(path))
    plan = Plan(
        path=path,
        every_stored_result=bool(doc.get("every_stored_result", False)),
        vllm=dict(doc.get("vllm", {})),
    )
    if "tolerance" in doc:
        plan.tolerance = float(doc["tolerance"])
        if plan.tolerance < 0:
            raise ConfigError(f"{path}: tolerance {plan.tolerance}: must be >= 0 (percent)")
    if "repeats" in doc:
        plan.repeats = int(doc["repeats"])
        if plan.repeats <= 0:
            raise ConfigError(f"{path}: repeats {plan.repeats}: must be > 0")
    for i, raw in enumerate(doc.get("point", []), start=1):
        where = f"{path}: [[point]] {i}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table")
        plan.points.extend(_plan_points(raw, where))
    if not plan.points and not plan.every_stored_result:
        raise ConfigError(f"{path}: no [[point]] tables and every_stored_result is not true")
    return plan


def _plan_points(raw: dict[str, Any], where: str) -> list[PlanPoint]:
    check_keys(raw, POINT_KEYS, where)
    for required in ("model", "max_num_seqs"):
        if required not in raw:
            raise ConfigError(f"{where}: missing key {required!r}")
    seqs = raw["max_num_seqs"]
    seqs = [seqs] if isinstance(seqs, int) else seqs
    if not seqs or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in seqs):
        raise ConfigError(f"{where}: max_num_seqs must be a positive integer or a list of them")
    quant = raw.get("quant")
    if quant is not None and quant not in ("w8a8", "bf16"):
        raise ConfigError(f"{where}: quant {quant!r}: expected w8a8 or bf16")
    semantics = raw.get("semantics", "plugin")
    if semantics not in SEMANTICS:
        raise ConfigError(
            f"{where}: semantics {semantics!r}: expected one of {', '.join(SEMANTICS)}"
        )
    for key in ("input_len", "output_len", "tp", "dp"):
        if key in raw and raw[key] <= 0:
            raise ConfigError(f"{where}: {key} {raw[key]}: must be > 0")
    cap = float(raw.get("cap_mib", 18.0))
    if cap <= 0:
        raise ConfigError(f"{where}: cap_mib {cap}: must be > 0")
    try:
        spec = load_model(str(raw["model"]), cast(Quant | None, quant))
        layout = Layout(
            tp=int(raw.get("tp", 1)), dp=int(raw.get("dp", 1)), ep=bool(raw.get("ep", False))
        )
        spec.check_layout(layout)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return [
        PlanPoint(
            where=f"{where} (max_num_seqs {n})",
            model=spec,
            layout=layout,
            max_num_seqs=n,
            hardware=str(raw.get("hardware", "atlas-a2")),
            semantics=cast(Semantics, semantics),
            sequence_parallel=bool(raw.get("sequence_parallel", False)),
            cap_mib=cap,
            input_len=raw.get("input_len"),
            output_len=raw.get("output_len"),
            backend=raw.get("backend"),
            vllm=dict(raw.get("vllm", {})),
        )
        for n in seqs
    ]


def _point_from_result(path: Path, doc: dict[str, Any]) -> PlanPoint:
    """The plan point a stored result describes (for `every_stored_result`)."""
    model = doc["model"]
    source = str(model.get("source", ""))
    ref = model["name"] if source.startswith("catalog") or not source else source
    try:
        spec = load_model(ref, cast(Quant, model["quant"]))
        lay = doc["layout"]
        layout = Layout(tp=int(lay["tp"]), dp=int(lay["dp"]), ep=bool(lay["ep"]))
        wl = doc.get("workload", {})
        return PlanPoint(
            where=str(path),
            model=spec,
            layout=layout,
            max_num_seqs=int(doc["max_num_seqs"]),
            hardware=str(doc["hardware"]),
            semantics=cast(Semantics, doc["semantics"]),
            sequence_parallel=bool(doc.get("sequence_parallel", False)),
            cap_mib=float(doc.get("cap_mib", 18.0)),
            input_len=wl.get("input_len"),
            output_len=wl.get("output_len"),
            backend=str(doc["backend"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: damaged result file ({type(exc).__name__}: {exc})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- outcomes


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


# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class SweepOptions:
    results_dir: Path
    backend: str | None = None
    tolerance: float | None = None
    repeats: int | None = None
    allow_missing: bool = False


def _stored_backends(results_dir: Path) -> list[str]:
    """Backends with stored results, measured ones first (never prefer the sim silently)."""
    names = {
        str(doc["backend"])
        for _, doc in iter_results(results_dir)
        if not isinstance(doc, ConfigError)
    }
    return sorted(names, key=lambda b: (b == "sim", b))


def find_stored(
    results_dir: Path, point: OperatingPoint, backend: str | None
) -> tuple[Path | None, str | None]:
    """The stored result of a point: for `backend`, else for any backend (measured first)."""
    if backend is not None:
        path = result_path(results_dir, point, backend)
        return (path if path.exists() else None), backend
    for name in _stored_backends(results_dir):
        path = result_path(results_dir, point, name)
        if path.exists():
            return path, name
    return None, None


def _points(plan: Plan, opts: SweepOptions) -> Iterator[PlanPoint | tuple[Path, ConfigError]]:
    yield from plan.points
    if plan.every_stored_result:
        for path, doc in iter_results(opts.results_dir):
            if isinstance(doc, ConfigError):
                yield path, doc
                continue
            if opts.backend is not None and doc["backend"] != opts.backend:
                continue
            try:
                yield _point_from_result(path, doc)
            except ConfigError as exc:
                yield path, exc


def run_sweep(
    plan: Plan,
    opts: SweepOptions,
    progress: Progress | None = None,
    backend_factory: Callable[[str], Backend] | None = None,
    stop: threading.Event | None = None,
) -> SweepReport:
    """Check every point of the plan against its stored result."""
    progress = progress or Progress()
    stop = stop or threading.Event()
    tolerance = opts.tolerance if opts.tolerance is not None else plan.tolerance
    tolerance = DEFAULT_TOLERANCE_PCT if tolerance is None else tolerance
    if tolerance < 0:
        raise ConfigError(f"--tolerance {tolerance}: must be >= 0 (percent)")
    repeats = opts.repeats if opts.repeats is not None else plan.repeats
    if repeats is not None and repeats <= 0:
        raise ConfigError(f"--repeats {repeats}: must be > 0")
    if not opts.results_dir.is_dir():
        if plan.every_stored_result:
            raise ConfigError(f"--results-dir {opts.results_dir}: no such directory")
        progress.message(f"--results-dir {opts.results_dir} does not exist: every point is missing")
    backends: dict[str, Backend] = {}

    def backend_for(name: str, vllm: dict[str, Any]) -> Backend:
        table = {**plan.vllm, **vllm}
        key = f"{name}|{json.dumps(table, sort_keys=True, default=str)}"
        if key not in backends:
            if backend_factory is not None:
                backends[key] = backend_factory(name)
            else:
                ensure_backend(name)
                backends[key] = get_backend(
                    name,
                    noise_pct=0.0,
                    seed=0,
                    vllm=table,
                    python=None,
                    results_dir=opts.results_dir,
                )
        return backends[key]

    started = time.monotonic()
    outcomes: list[PointOutcome] = []
    try:
        _check_all(plan, opts, tolerance, repeats, backend_for, progress, stop, outcomes)
        if not outcomes and not stop.is_set():
            raise ConfigError(
                f"{plan.path}: nothing to check (every_stored_result found no result files"
                f"{'' if opts.backend is None else ' of backend ' + opts.backend} "
                f"in {opts.results_dir})"
            )
    finally:
        for be in backends.values():  # e.g. the vllm backend stops its last server
            close = getattr(be, "close", None)
            if callable(close):
                close()
    return SweepReport(
        outcomes, tolerance, opts.allow_missing, opts.results_dir, time.monotonic() - started
    )


def ensure_backend(name: str) -> None:
    """ConfigError unless a backend of that name is registered (importing its module if any)."""
    if name in backend_names():
        return
    if re.fullmatch(r"[a-z][a-z0-9_]*", name):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"prefetch_tune.backends.{name}")
    if name not in backend_names():
        raise ConfigError(
            f"--backend {name}: unknown backend (known: {', '.join(backend_names())})"
        )


def _check_all(
    plan: Plan,
    opts: SweepOptions,
    tolerance: float,
    repeats: int | None,
    backend_for: Callable[[str, dict[str, Any]], Backend],
    progress: Progress,
    stop: threading.Event,
    outcomes: list[PointOutcome],
) -> None:
    seen: set[Path] = set()
    for item in _points(plan, opts):
        if stop.is_set():
            break
        if isinstance(item, tuple):
            path, exc = item
            outcomes.append(
                PointOutcome(
                    name=path.stem,
                    where=str(path),
                    status="error",
                    simulated="-sim-" in path.stem,
                    backend="?",
                    max_num_seqs=0,
                    path=path,
                    notes=[str(exc)],
                )
            )
            continue
        outcome = check_point(item, opts, tolerance, repeats, backend_for, progress, stop, seen)
        if outcome is not None:
            outcomes.append(outcome)


def _stored_workload(doc: dict[str, Any], pp: PlanPoint) -> Workload:
    wl = doc.get("workload") or {}
    stored_in, stored_out = wl.get("input_len"), wl.get("output_len")
    for key, want, have in (
        ("input_len", pp.input_len, stored_in),
        ("output_len", pp.output_len, stored_out),
    ):
        if want is not None and have is not None and want != have:
            raise ConfigError(
                f"{pp.where}: {key} {want} differs from the stored result's {have}; "
                f"a sweep re-checks the stored workload"
            )
    return Workload(
        input_len=int(stored_in or pp.input_len or Workload.input_len),
        output_len=int(stored_out or pp.output_len or Workload.output_len),
        concurrency=wl.get("concurrency"),
        num_prompts=wl.get("num_prompts"),
        max_num_batched_tokens=int(
            wl.get("max_num_batched_tokens", Workload.max_num_batched_tokens)
        ),
    )


def _stored_candidate(summary: dict[str, Any], label: str) -> Candidate:
    """A stand-in for a stored finalist with its stored median and MAD.

    Three values m-mad, m, m+mad have median m and MAD mad, so `_compare` sees the stored
    spread exactly as the search recorded it (even if only the median was kept).
    """
    cand = Candidate(label, PrefetchConfig.off(), label, 0)
    med = summary.get("objective_median")
    if med is None:
        return cand
    mad = float(summary.get("objective_mad") or 0.0)
    cand.values = [float(med) - mad, float(med), float(med) + mad]
    return cand


def check_point(
    pp: PlanPoint,
    opts: SweepOptions,
    tolerance: float,
    repeats: int | None,
    backend_for: Callable[[str, dict[str, Any]], Backend],
    progress: Progress,
    stop: threading.Event,
    seen: set[Path],
) -> PointOutcome | None:
    started = time.monotonic()
    probe = pp.operating_point()
    backend_name = opts.backend or pp.backend
    path, found_backend = find_stored(opts.results_dir, probe, backend_name)
    if path is None:
        name = f"{point_slug(probe, backend_name or 'any')}-mns{pp.max_num_seqs}"
        wanted = f"backend {backend_name}" if backend_name else "any backend"
        return PointOutcome(
            name=name,
            where=pp.where,
            status="missing",
            simulated=backend_name == "sim",
            backend=backend_name or "-",
            max_num_seqs=pp.max_num_seqs,
            notes=[f"no stored result for {name} ({wanted}) in {opts.results_dir}"],
        )
    if path in seen:
        return None
    seen.add(path)
    assert found_backend is not None
    try:
        doc = load_result(path)
    except ConfigError as exc:
        return PointOutcome(
            name=path.stem,
            where=pp.where,
            status="error",
            simulated="-sim-" in path.stem,
            backend=found_backend,
            max_num_seqs=pp.max_num_seqs,
            path=path,
            notes=[str(exc)],
        )
    point = pp.operating_point(_stored_workload(doc, pp))
    backend = backend_for(found_backend, pp.vllm)
    objective = str(doc.get("objective", {}).get("metric", "output_throughput"))
    settings = SearchSettings(
        results_dir=opts.results_dir,
        repeats=repeats or int(doc.get("repeats", 3)),
        objective=objective,
        slos=tuple(Slo.parse(s) for s in doc.get("constraints", [])),
    )
    out = PointOutcome(
        name=path.stem,
        where=pp.where,
        status="pass",
        simulated=bool(doc["simulated"]) or not backend.measured,
        backend=found_backend,
        max_num_seqs=pp.max_num_seqs,
        path=path,
        metric=objective,
        minimize=settings.minimize,
    )
    if bool(doc["simulated"]) != (not backend.measured):
        out.notes.append(
            f"stored result is {'SIMULATED' if doc['simulated'] else 'measured'}, "
            f"re-measured with {'SIMULATED' if not backend.measured else 'measured'}"
            f" backend {backend.name}"
        )
    try:
        winner_cfg = parse_weight_prefetch_config(doc["winner"]["weight_prefetch_config"])
    except (ConfigError, KeyError, TypeError) as exc:
        out.status = "error"
        out.notes.append(f"{path}: stored winner unreadable ({exc})")
        return out
    space = build_space(point)
    cands: dict[str, Candidate] = {}
    for label, cfg in (
        ("off", PrefetchConfig.off()),
        ("default", PrefetchConfig.default()),
        ("winner", winner_cfg),
    ):
        key = space.key(cfg)
        if key not in cands:
            cands[key] = Candidate(label, cfg, key, space.total_bytes(cfg))
    by_role = {
        role: cands[space.key(cfg)]
        for role, cfg in (
            ("off", PrefetchConfig.off()),
            ("default", PrefetchConfig.default()),
            ("winner", winner_cfg),
        )
    }
    progress.message(
        f"{out.name} ({out.label}): re-measuring winner, off and default x{settings.repeats}"
    )
    unique = list(cands.values())
    remeasure(unique, point, backend, settings, progress, stop)
    if stop.is_set():
        out.status = "error"
        out.notes.append("interrupted")
        return out
    for cand in unique:
        judge(cand, point, settings)
    _evaluate(out, doc, by_role, tolerance, settings.minimize)
    out.seconds = time.monotonic() - started
    return out


def _evaluate(
    out: PointOutcome,
    doc: dict[str, Any],
    by_role: dict[str, Candidate],
    tolerance: float,
    minimize: bool,
) -> None:
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
        ref = _stored_candidate(stored["winner"], "stored winner")
        cmp = compare(winner, ref, minimize)
        if cmp["pct"] is None:
            out.checks.append(
                Check(
                    "winner vs stored",
                    metric,
                    False,
                    f"{metric}: the stored winner has no objective median",
                )
            )
        else:
            pct, band = float(cmp["pct"]), float(cmp["band_pct"])
            limit = max(tolerance, band)
            worse = "below" if not minimize else "above"
            ok = -pct <= limit
            msg = (
                f"{metric}: winner median {winner.median:.2f} vs stored {ref.median:.2f} "
                f"({pct:+.2f}%); allowed {limit:.2f}% {worse} (tolerance {tolerance:g}%, "
                f"noise band {band:.2f}%)"
            )
            out.checks.append(
                Check(
                    "winner vs stored", metric, ok, msg, ref.median, winner.median, pct, band, limit
                )
            )
    improvement = doc.get("improvement", {})
    for base in ("off", "default"):
        was = improvement.get(f"vs_{base}", {}) or {}
        if not was.get("significant"):
            continue
        baseline = by_role[base]
        name = f"winner beats {base}"
        if winner is baseline:  # the stored winner re-keys as the baseline itself
            out.checks.append(
                Check(
                    name,
                    metric,
                    False,
                    f"{metric}: the stored winner now prefetches the same bytes "
                    f"as {base}; it cannot beat it",
                )
            )
            continue
        for cand in (winner, baseline):
            if cand.rejected:
                out.checks.append(
                    Check(
                        name,
                        metric,
                        False,
                        f"{metric}: cannot check the winner against {base}: "
                        f"{cand.label} re-measurement rejected ({cand.rejected})",
                    )
                )
                break
        else:
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
            out.checks.append(
                Check(
                    name,
                    metric,
                    ok,
                    msg,
                    stored_pct,
                    None if pct is None else float(pct),
                    None if pct is None else float(pct),
                    None if band is None else float(band),
                )
            )
    out.status = "fail" if out.failures else "pass"


# ---------------------------------------------------------------- outputs


def check_output_path(path: Path, flag: str) -> None:
    """Fail early (exit 2) when an output file cannot be written."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: not writable ({exc.strerror or exc})") from None


def _fmt(value: float | None, spec: str = ",.2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def junit_xml(report: SweepReport) -> str:
    """JUnit XML: one testcase per point; a regression is a <failure> naming metric and values."""
    counts = report.counts()
    failures = counts["fail"] + (0 if report.allow_missing else counts["missing"])
    suite_name = "prefetch-tune sweep" + (" (SIMULATED)" if report.simulated else "")
    suites = ET.Element(
        "testsuites",
        name=suite_name,
        tests=str(len(report.outcomes)),
        failures=str(failures),
        errors=str(counts["error"]),
        time=f"{report.seconds:.3f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=suite_name,
        tests=str(len(report.outcomes)),
        failures=str(failures),
        errors=str(counts["error"]),
        skipped=str(counts["missing"] if report.allow_missing else 0),
        time=f"{report.seconds:.3f}",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="tolerance_pct", value=f"{report.tolerance:g}")
    ET.SubElement(props, "property", name="results_dir", value=str(report.results_dir))
    for o in report.outcomes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"prefetch-tune.sweep.{o.backend}",
            name=f"{o.name} [{o.label}]",
            time=f"{o.seconds:.3f}",
        )
        cprops = ET.SubElement(case, "properties")
        ET.SubElement(cprops, "property", name="label", value=o.label)
        ET.SubElement(cprops, "property", name="plan", value=o.where)
        if o.path is not None:
            ET.SubElement(cprops, "property", name="result_file", value=str(o.path))
        details = "\n".join(
            [f"[{o.label}] {o.where}"]
            + [f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.message}" for c in o.checks]
            + [f"note: {n}" for n in o.notes]
        )
        if o.status == "fail":
            el = ET.SubElement(
                case,
                "failure",
                type="regression",
                message=f"[{o.label}] " + "; ".join(c.message for c in o.failures),
            )
            el.text = details
        elif o.status == "missing":
            tag = "skipped" if report.allow_missing else "failure"
            el = ET.SubElement(case, tag, message=f"[{o.label}] {o.summary()}")
            if tag == "failure":
                el.set("type", "missing")
        elif o.status == "error":
            el = ET.SubElement(case, "error", type="error", message=f"[{o.label}] {o.summary()}")
            el.text = details
        else:
            out = ET.SubElement(case, "system-out")
            out.text = details
    ET.indent(suites)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    )


_ICON = {"pass": "✅ pass", "fail": "❌ REGRESSION", "missing": "⚠️ missing", "error": "❌ error"}


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: SweepReport) -> str:
    """A summary for a CI job page ($GITHUB_STEP_SUMMARY)."""
    counts = report.counts()
    verdict = (
        "all points hold"
        if report.ok
        else "REGRESSION"
        if counts["fail"] or counts["error"]
        else "points missing"
    )
    lines = [f"## prefetch-tune sweep: {'✅' if report.ok else '❌'} {verdict}", ""]
    if report.simulated:
        lines += [
            "> **SIMULATED**: some or all results come from the built-in performance model "
            "(sim backend), not from measurements.",
            "",
        ]
    lines += [
        f"{counts['pass']} pass, {counts['fail']} regressed, {counts['missing']} missing"
        f"{' (allowed)' if report.allow_missing and counts['missing'] else ''}, "
        f"{counts['error']} errors; tolerance {report.tolerance:g}% (or the noise band "
        f"when wider); results in `{report.results_dir}`; {report.seconds:.1f} s.",
        "",
    ]
    lines += [
        "| status | point | max-num-seqs | backend | metric | stored | measured | change "
        "| allowed | vs off | vs default |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    for o in report.outcomes:
        checks = {c.name: c for c in o.checks}
        main = checks.get("winner vs stored")
        status = _ICON[o.status]
        if o.status == "missing" and report.allow_missing:
            status = "⚠️ missing (allowed)"

        def beat(base: str, checks: dict[str, Check] = checks) -> str:
            c = checks.get(f"winner beats {base}")
            if c is None:
                return "not claimed"
            return f"{'✅' if c.ok else '❌'} {_fmt(c.pct, '+.2f')}% (±{_fmt(c.band_pct, '.2f')})"

        lines.append(
            f"| {status} | `{o.name}` | {o.max_num_seqs or '-'} | {o.backend} **{o.label}** "
            f"| {o.metric or '-'} | {_fmt(o.stored.get('winner'))} | "
            f"{_fmt(o.measured.get('winner'))} | "
            f"{_fmt(main.pct if main else None, '+.2f')}{'%' if main else ''} | "
            f"{'-' if main is None or main.limit_pct is None else f'{main.limit_pct:.2f}% worse'} | "
            f"{beat('off') if o.status in ('pass', 'fail') else '-'} | "
            f"{beat('default') if o.status in ('pass', 'fail') else '-'} |"
        )
    problems = [o for o in report.outcomes if o.status != "pass"]
    if problems:
        lines += ["", "### Details", ""]
        for o in problems:
            lines.append(f"- **{o.status}** `{o.name}` [{o.label}]: {_md(o.summary())}")
    notes = [(o, n) for o in report.outcomes for n in o.notes if o.status == "pass"]
    if notes:
        lines += ["", "### Notes", ""]
        lines += [f"- `{o.name}`: {_md(n)}" for o, n in notes]
    return "\n".join(lines) + "\n"


def rows(report: SweepReport) -> list[dict[str, Any]]:
    out = []
    for o in report.outcomes:
        checks = {c.name: c for c in o.checks}
        main = checks.get("winner vs stored")
        row: dict[str, Any] = {
            "point": o.name,
            "label": o.label,
            "simulated": o.simulated,
            "status": o.status,
            "backend": o.backend,
            "max_num_seqs": o.max_num_seqs or None,
            "metric": o.metric,
            "direction": ("minimize" if o.minimize else "maximize") if o.metric else None,
        }
        for role in ("winner", "off", "default"):
            row[f"stored_{role}"] = o.stored.get(role)
            row[f"measured_{role}"] = o.measured.get(role)
            row[f"measured_{role}_mad"] = o.mad.get(role)
        row["change_pct"] = main.pct if main else None
        row["band_pct"] = main.band_pct if main else None
        row["allowed_pct"] = main.limit_pct if main else None
        for base in ("off", "default"):
            c = checks.get(f"winner beats {base}")
            row[f"vs_{base}_pct"] = c.pct if c else None
            row[f"vs_{base}_band_pct"] = c.band_pct if c else None
            row[f"vs_{base}_stored_pct"] = c.stored if c else None
            row[f"vs_{base}_holds"] = c.ok if c else None
        row["message"] = o.summary()
        row["result_file"] = str(o.path) if o.path else None
        out.append(row)
    return out


def csv_text(report: SweepReport) -> str:
    import pandas as pd

    columns = list(rows(_empty_like(report))[0]) if not report.outcomes else None
    frame = pd.DataFrame(rows(report), columns=columns)
    return str(frame.to_csv(index=False))


def _empty_like(report: SweepReport) -> SweepReport:
    o = PointOutcome(name="", where="", status="pass", simulated=False, backend="", max_num_seqs=0)
    return SweepReport([o], report.tolerance, report.allow_missing, report.results_dir)


def write_outputs(
    report: SweepReport, junit: Path | None, md: Path | None, csv: Path | None
) -> None:
    for path, render in ((junit, junit_xml), (md, markdown), (csv, csv_text)):
        if path is not None:
            atomic_write(path, render(report))
            path.chmod(0o644)  # CI artifacts: readable like any other output file
