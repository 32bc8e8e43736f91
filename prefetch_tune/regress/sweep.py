"""Regression sweeps: re-measure stored winners and check they still hold.

For each point of a sweep plan (`sweep_plan`) with a stored result, the winner, `off` and
vLLM-Ascend's `default` are re-measured with the same repeat and noise rules as `search`
(`selection.remeasure`, `judge`), then checked by the sweep's rules (`judging`). A point
without a stored result is reported missing. Simulated results stay labelled SIMULATED in every
output (`outputs`: JUnit, Markdown, CSV).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefetch_tune.backends.base import (
    Backend,
    OperatingPoint,
    Workload,
    backend_names,
    get_backend,
)
from prefetch_tune.errors import ConfigError
from prefetch_tune.numbers import non_negative
from prefetch_tune.prefetch import PrefetchConfig, parse_weight_prefetch_config
from prefetch_tune.regress.judging import evaluate
from prefetch_tune.regress.outcomes import PointOutcome, SweepReport
from prefetch_tune.regress.sweep_plan import (
    DEFAULT_TOLERANCE_PCT,
    Plan,
    PlanPoint,
    find_stored,
    point_from_result,
)
from prefetch_tune.results import iter_results, load_result, point_slug
from prefetch_tune.search.selection import Candidate, judge, remeasure
from prefetch_tune.search.settings import Progress, SearchSettings, Slo
from prefetch_tune.search.space import SearchSpace, build_space

# ---------------------------------------------------------------- running


@dataclass(frozen=True)
class SweepOptions:
    results_dir: Path
    backend: str | None = None
    tolerance: float | None = None
    repeats: int | None = None
    allow_missing: bool = False


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
                yield point_from_result(path, doc)
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
    non_negative(tolerance, "--tolerance")
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
    """Re-measure and check one plan point; None when its result file was already checked."""
    started = time.monotonic()
    probe = pp.operating_point()
    backend_name = opts.backend or pp.backend
    path, found_backend = find_stored(opts.results_dir, probe, backend_name)
    if path is None:
        return _missing(pp, probe, backend_name, opts.results_dir)
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
    settings = _stored_settings(doc, opts.results_dir, repeats)
    objective = settings.objective
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
    cands, by_role = _finalists(build_space(point), winner_cfg)
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
    evaluate(out, doc, by_role, tolerance, settings.minimize)
    out.seconds = time.monotonic() - started
    return out


def _finalists(
    space: SearchSpace, winner_cfg: PrefetchConfig
) -> tuple[dict[str, Candidate], dict[str, Candidate]]:
    """One candidate per distinct config among off, default and the winner (by space key),
    and which candidate plays each role (a winner equal to a baseline shares its candidate)."""
    roles = (
        ("off", PrefetchConfig.off()),
        ("default", PrefetchConfig.default()),
        ("winner", winner_cfg),
    )
    cands: dict[str, Candidate] = {}
    for label, cfg in roles:
        key = space.key(cfg)
        if key not in cands:
            cands[key] = Candidate(label, cfg, key, space.total_bytes(cfg))
    return cands, {role: cands[space.key(cfg)] for role, cfg in roles}


def _missing(
    pp: PlanPoint, probe: OperatingPoint, backend_name: str | None, results_dir: Path
) -> PointOutcome:
    name = f"{point_slug(probe, backend_name or 'any')}-mns{pp.max_num_seqs}"
    wanted = f"backend {backend_name}" if backend_name else "any backend"
    return PointOutcome(
        name=name,
        where=pp.where,
        status="missing",
        simulated=backend_name == "sim",
        backend=backend_name or "-",
        max_num_seqs=pp.max_num_seqs,
        notes=[f"no stored result for {name} ({wanted}) in {results_dir}"],
    )


def _stored_settings(doc: dict[str, Any], results_dir: Path, repeats: int | None) -> SearchSettings:
    """The stored search's objective, SLOs and repeats (unless the sweep sets its own)."""
    return SearchSettings(
        results_dir=results_dir,
        repeats=repeats or int(doc.get("repeats", 3)),
        objective=str(doc.get("objective", {}).get("metric", "output_throughput")),
        slos=tuple(Slo.parse(s) for s in doc.get("constraints", [])),
    )
