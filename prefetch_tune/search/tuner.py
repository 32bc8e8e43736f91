"""The search of one operating point: seed an Optuna study, run ask-and-tell trials, pick the
winner and write the result.

The study (see `studies`) is seeded with off, vLLM-Ascend's defaults, the stored best for the
point, the winners of neighbouring concurrencies and, for real runs, the simulated winner. A
candidate whose effective bytes were already measured reuses that value; a backend failure
becomes a FAIL trial with its reason and the study goes on. The winner is not Optuna's single
best value but the noise-aware choice of `selection`.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState

from prefetch_tune import __version__
from prefetch_tune.backends.base import Backend, OperatingPoint
from prefetch_tune.errors import BackendError, ConfigError
from prefetch_tune.models import MiB
from prefetch_tune.prefetch import PrefetchConfig, emit, parse_weight_prefetch_config
from prefetch_tune.results import (
    Stored,
    atomic_write,
    iter_results,
    load_result,
    point_slug,
    result_path,
    store_result,
    trials_path,
)
from prefetch_tune.search.screening import (
    DRIFT_ATTR,
    MODE_FINAL,
    MODE_SCREENED,
    open_drift_checked,
    screening_summary,
)
from prefetch_tune.search.selection import (
    LEVEL,
    Candidate,
    RaceCost,
    choose_winner,
    interval,
    measured_noise,
    race,
)
from prefetch_tune.search.settings import Progress, SearchSettings
from prefetch_tune.search.space import SearchSpace, build_space
from prefetch_tune.search.studies import (
    GRID_LEVELS,
    HAS_SET_CONSTRAINT,
    beating,
    describe_study,
    fail_stale,
    heartbeat_interval,
    make_sampler,
    metric_attrs,
    open_journal_study,
    others_running,
    owner,
    ratio_attrs,
    release_journal,
    spent,
    storage_for,
    study_name,
)

log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    point: OperatingPoint
    result: dict[str, Any] | None
    path: Path | None
    trials_csv: Path | None
    interrupted: bool
    study_name: str
    storage: str
    moved_damaged: Path | None = None
    stored: Stored | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- seeding


def _stored_winner(path: Path) -> PrefetchConfig | None:
    try:
        doc = load_result(path)
        return parse_weight_prefetch_config(doc["winner"]["weight_prefetch_config"])
    except (ConfigError, KeyError, TypeError):
        return None


def neighbour_winners(
    results_dir: Path, point: OperatingPoint, backend: str
) -> list[PrefetchConfig]:
    """Winners stored for the nearest lower and higher max-num-seqs of the same point."""
    slug = point_slug(point, backend)
    lower: tuple[int, PrefetchConfig] | None = None
    higher: tuple[int, PrefetchConfig] | None = None
    for path, doc in iter_results(results_dir):
        if isinstance(doc, ConfigError) or not path.stem.startswith(slug + "-mns"):
            continue
        n = int(doc["max_num_seqs"])
        cfg = _stored_winner(path)
        if cfg is None or n == point.max_num_seqs:
            continue
        if n < point.max_num_seqs and (lower is None or n > lower[0]):
            lower = (n, cfg)
        if n > point.max_num_seqs and (higher is None or n < higher[0]):
            higher = (n, cfg)
    return [pair[1] for pair in (lower, higher) if pair is not None]


def enqueue_seeds(
    study: optuna.Study, space: SearchSpace, seeds: list[tuple[str, PrefetchConfig]]
) -> None:
    seen = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)}
    queued: set[str] = set()
    for label, config in seeds:
        key = space.key(config)
        if label in seen or key in queued:
            continue
        queued.add(key)
        study.enqueue_trial(space.params(config), user_attrs={"seed": label})


# ---------------------------------------------------------------- the search loop


def _measured(study: optuna.Study) -> tuple[dict[str, optuna.trial.FrozenTrial], dict[str, int]]:
    done: dict[str, optuna.trial.FrozenTrial] = {}
    failed: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        key = t.user_attrs.get("key")
        if not key or t.user_attrs.get("orphaned"):
            continue
        if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs:
            done.setdefault(key, t)
        elif t.state == TrialState.FAIL and "failure_class" in t.user_attrs:
            failed.setdefault(key, t.number)
    return done, failed


def _tell(study: optuna.Study, trial: optuna.Trial, *args: Any, **kwargs: Any) -> None:
    """`study.tell`, minus GridSampler's `study.stop()` once its grid is exhausted.

    Outside `optimize()` that stop raises RuntimeError after the trial is stored; the loop ends
    on `_grid_exhausted` instead.
    """
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def _grid_exhausted(study: optuna.Study, space: SearchSpace) -> bool:
    """Every grid point has a trial (cheaper than GridSampler.is_exhausted, which is O(trials x
    grid values) per call)."""
    if not isinstance(study.sampler, optuna.samplers.GridSampler):
        return False
    ids = {t.system_attrs.get("grid_id") for t in study.get_trials(deepcopy=False)}
    return len(ids - {None}) >= int(GRID_LEVELS ** len(space.knobs))


def _tell_complete(
    study: optuna.Study, trial: optuna.Trial, value: float, constraints: list[float]
) -> None:
    if constraints:
        trial.set_user_attr("constraints", constraints)
        if HAS_SET_CONSTRAINT:
            for i, c in enumerate(constraints):
                trial.set_constraint(f"slo{i}", c)
    _tell(study, trial, value)


def _best(study: optuna.Study, settings: SearchSettings) -> float | None:
    values = [
        t.value
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and max(t.user_attrs.get("constraints", [0.0]) or [0.0]) <= 0
    ]
    if not values:
        return None
    return min(values) if settings.minimize else max(values)


def run_trials(
    study: optuna.Study,
    space: SearchSpace,
    backend: Backend,
    settings: SearchSettings,
    progress: Progress,
    label: str,
    stop: threading.Event,
) -> None:
    """Ask-and-tell until the budget is spent, the timeout passes or a stop is requested."""
    dists: dict[str, BaseDistribution] = {
        k: FloatDistribution(space.low(k), space.high(k)) for k in space.knobs
    }
    deadline = time.monotonic() + settings.timeout if settings.timeout else None
    progress.start(label, settings.trials, min(spent(study), settings.trials))
    beat = heartbeat_interval(study)
    while not stop.is_set():
        if fail_stale(study):
            progress.message(f"{label}: failed a trial of a worker whose heartbeat stopped")
        if spent(study) >= settings.trials:
            if beat is None or not others_running(study):
                break
            # Other workers' trials still count: wait until they end or go stale (and are
            # queued again), so the budget ends in COMPLETE trials.
            stop.wait(beat)
            continue
        if deadline is not None and time.monotonic() >= deadline:
            progress.message(f"{label}: --timeout reached")
            break
        if _grid_exhausted(study, space):
            progress.message(f"{label}: every grid point was tried")
            break
        try:
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize"
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = study.ask(dists)
        except RuntimeError as exc:  # e.g. GridSampler exhausted
            progress.message(f"{label}: sampler has nothing left ({exc})")
            break
        with beating(study, trial):
            _run_trial(study, trial, space, backend, settings)
        progress.advance(label, min(spent(study), settings.trials), _best(study, settings))


FAILURE_CHARS = 500


def clip_failure(text: str, limit: int = FAILURE_CHARS) -> str:
    """One line of at most `limit` characters keeping both ends: what failed comes first, and
    the log tail at the end holds the reason (a real vLLM prints its argparse usage or a long
    traceback before the line that matters)."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    head = limit // 3
    return f"{flat[:head]} ... {flat[-(limit - head - 5) :]}"


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    space: SearchSpace,
    backend: Backend,
    settings: SearchSettings,
) -> None:
    trial.set_user_attr("owner", owner())
    trial.set_user_attr("measured_in", MODE_SCREENED if settings.screen else MODE_FINAL)
    config = space.config(trial.params)
    key = space.key(config)
    trial.set_user_attr("key", key)
    trial.set_user_attr("config", config.canonical_json())
    trial.set_user_attr("effective_mib", space.effective_mib(config))
    for attr, ratio in ratio_attrs(space, trial.params).items():
        trial.set_user_attr(attr, ratio)
    done, failed = _measured(study)
    if key in done:  # same effective bytes: never pay twice
        prior = done[key]
        trial.set_user_attr("duplicate_of", prior.number)
        trial.set_user_attr("metrics", prior.user_attrs.get("metrics", {}))
        for attr, value in metric_attrs(prior.user_attrs.get("metrics", {})).items():
            trial.set_user_attr(attr, value)
        _tell_complete(
            study,
            trial,
            float(prior.value or 0.0),
            list(prior.user_attrs.get("constraints", [])),
        )
    elif key in failed:
        trial.set_user_attr("failure_class", "skipped")
        trial.set_user_attr("failure", f"same config failed in trial {failed[key]}; not re-run")
        _tell(study, trial, state=TrialState.FAIL)
    else:
        _evaluate_trial(study, trial, config, space.point, backend, settings)


def _evaluate_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    config: PrefetchConfig,
    point: OperatingPoint,
    backend: Backend,
    settings: SearchSettings,
) -> None:
    try:
        metrics = backend.evaluate(config, point, repeat=0)
    except BackendError as exc:
        trial.set_user_attr("failure_class", exc.failure_class or "backend_error")
        trial.set_user_attr("failure", clip_failure(str(exc)))
        _tell(study, trial, state=TrialState.FAIL)
        return
    except BaseException:
        trial.set_user_attr("failure_class", "interrupted")
        _tell(study, trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
    for attr, value in metric_attrs(dict(metrics)).items():
        trial.set_user_attr(attr, value)
    for extra in ("log", "bench_json", "serve_command", "bench_command"):
        if extra in getattr(backend, "last_artifacts", {}):
            trial.set_user_attr(extra, backend.last_artifacts[extra])  # type: ignore[attr-defined]
    try:
        constraints = [slo.violation(metrics) for slo in settings.slos]
        value = settings.objective_value(metrics)
    except ConfigError as exc:  # the backend lacks the metric: fail the trial, then stop
        trial.set_user_attr("failure_class", "bad_metric")
        trial.set_user_attr("failure", str(exc))
        _tell(study, trial, state=TrialState.FAIL)
        raise
    _tell_complete(study, trial, value, constraints)


# ---------------------------------------------------------------- finalists


def _finalists(
    study: optuna.Study, space: SearchSpace, settings: SearchSettings
) -> list[Candidate]:
    ranked = sorted(
        (
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None
            and "duplicate_of" not in t.user_attrs
            and max(t.user_attrs.get("constraints", [0.0]) or [0.0]) <= 0
        ),
        key=lambda t: float(t.value or 0.0) * (1.0 if settings.minimize else -1.0),
    )
    out: list[Candidate] = []
    keys: set[str] = set()
    for label, config in (("off", PrefetchConfig.off()), ("default", PrefetchConfig.default())):
        out.append(Candidate(label, config, space.key(config), space.total_bytes(config)))
        keys.add(space.key(config))
    picked = 0
    for t in ranked:
        if picked >= settings.finalists:
            break
        config = space.config(t.params)
        key = space.key(config)
        if key in keys:
            continue
        keys.add(key)
        picked += 1
        out.append(Candidate(f"trial {t.number}", config, key, space.total_bytes(config)))
    return out


# ---------------------------------------------------------------- one operating point


def search_point(
    point: OperatingPoint,
    backend: Backend,
    settings: SearchSettings,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> SearchOutcome:
    """Search one operating point and write its result file (only when the search completed)."""
    settings.check()
    progress = progress or Progress()
    stop = stop or threading.Event()
    space = build_space(point)
    name = study_name(point, backend.name)
    sampler = make_sampler(settings, space)  # may refuse (exit 2): before any study file exists
    storage, storage_label = storage_for(settings, name)
    direction: Literal["minimize", "maximize"] = "minimize" if settings.minimize else "maximize"

    def open_study() -> optuna.Study:
        return optuna.create_study(
            study_name=name,
            storage=storage,
            direction=direction,
            sampler=sampler,
            load_if_exists=True,
        )

    if settings.storage:  # RDB: Optuna's heartbeat finds the trials of dead workers
        study = open_study()
        orphans = fail_stale(study)
    else:
        study, orphans = open_journal_study(storage_label, open_study)
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"--objective {settings.objective}: study {name} in {storage_label} "
            f"was created to {study.direction.name.lower()}; use another --storage"
        )
    describe_study(study, space, settings)
    if orphans:
        progress.message(f"{name}: marked {orphans} trial(s) left RUNNING by a killed run as FAIL")
    path = result_path(settings.results_dir, point, backend.name)
    seeds: list[tuple[str, PrefetchConfig]] = [
        ("off", PrefetchConfig.off()),
        ("default", PrefetchConfig.default()),
    ]
    stored = _stored_winner(path) if path.exists() else None
    if stored is not None:
        seeds.append(("stored best", stored))
    seeds += [
        (f"neighbour {i}", c)
        for i, c in enumerate(neighbour_winners(settings.results_dir, point, backend.name))
    ]
    if backend.measured:  # a simulated winner for the same point warm-starts a real search
        sim_path = result_path(settings.results_dir, point, "sim")
        sim_best = _stored_winner(sim_path) if sim_path.exists() else None
        if sim_best is not None:
            seeds.append(("simulated best", sim_best))
    if spent(study) < settings.trials:  # a finished study re-run gets no new (WAITING) seeds
        enqueue_seeds(study, space, seeds)
    label = f"max-num-seqs {point.max_num_seqs}"
    screen = _run_trial_phase(study, space, backend, settings, progress, label, stop)
    outcome = SearchOutcome(point, None, None, None, stop.is_set(), name, storage_label)
    if stop.is_set():
        outcome.interrupted = True
        return outcome
    cands = _finalists(study, space, settings)
    cost = race(cands, point, backend, settings, progress, stop)
    if stop.is_set():
        outcome.interrupted = True
        return outcome
    winner, notes = choose_winner(cands, point, settings)
    doc = build_result(point, backend, settings, space, study, storage_label, cands, winner, notes)
    doc["selection"] = selection_summary(cands, settings, cost)
    doc["cost"] = cost_summary(study, backend, cost, screen)
    if screen is not None:
        doc["screening"] = screening_summary(study, cands, settings, screen.starts, screen.drift)
    outcome.stored = store_result(path, doc, settings.replace)
    outcome.moved_damaged = outcome.stored.moved_damaged
    csv = trials_path(settings.results_dir, point, backend.name)
    write_trials_csv(study, space, csv)
    outcome.result, outcome.trials_csv, outcome.notes = doc, csv, notes
    outcome.path = outcome.stored.written
    release_journal(storage_label)
    return outcome


@dataclass(frozen=True)
class _ScreenCost:
    starts: int
    drift: list[dict[str, Any]]


def _run_trial_phase(
    study: optuna.Study,
    space: SearchSpace,
    backend: Backend,
    settings: SearchSettings,
    progress: Progress,
    label: str,
    stop: threading.Event,
) -> _ScreenCost | None:
    """The trials: on the backend itself, or (--screen) on one eager screening session."""
    if not settings.screen:
        run_trials(study, space, backend, settings, progress, label, stop)
        return None
    if spent(study) >= settings.trials:
        drift = list(study.user_attrs.get(DRIFT_ATTR, []))
        return _ScreenCost(int(study.user_attrs.get("screen_starts", 0)), drift)
    session = open_drift_checked(backend, space.point, study, settings)
    progress.message(f"{label}: screening on one eager server ({MODE_SCREENED})")
    try:
        run_trials(study, space, session, settings, progress, label, stop)
    finally:
        session.session.close()
        starts = int(study.user_attrs.get("screen_starts", 0)) + session.session.starts
        study.set_user_attr("screen_starts", starts)
    return _ScreenCost(starts, session.drift)


def search_runs(study: optuna.Study) -> int:
    """Backend runs the trials paid for (every process on the study): not duplicates of a
    measured key, not failures skipped without a run."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        if "duplicate_of" not in t.user_attrs and t.user_attrs.get("failure_class") != "skipped"
    )


def cost_summary(
    study: optuna.Study, backend: Backend, race_cost: RaceCost, screen: _ScreenCost | None = None
) -> dict[str, Any]:
    """What the search and the selection cost: backend runs, and server starts where the
    backend starts servers (vllm: one per trial, and one per race run as configs alternate)."""
    runs = search_runs(study)
    starts = runs if hasattr(backend, "server_starts") else 0
    if screen is not None:  # one screening server for every trial, plus off/default re-runs
        runs += 2 * len(screen.drift)
        starts = screen.starts
    return {
        "search": {"backend_runs": runs, "server_starts": starts},
        "selection": {
            "backend_runs": race_cost.backend_runs,
            "server_starts": race_cost.server_starts,
            "rounds": race_cost.rounds,
        },
        "total": {
            "backend_runs": runs + race_cost.backend_runs,
            "server_starts": starts + race_cost.server_starts,
        },
    }


def selection_summary(
    cands: list[Candidate], settings: SearchSettings, cost: RaceCost
) -> dict[str, Any]:
    return {
        "method": "interleaved round-robin race of off, default and finalists, paired with off",
        "interval": interval(cands[0], cands[0], settings.minimize).to_json()["method"],
        "level": LEVEL,
        "min_rounds": settings.repeats,
        "max_rounds": settings.round_cap,
        "rounds": cost.rounds,
        "noise": measured_noise(cands[:2]),
    }


def _summary(c: Candidate, space: SearchSpace) -> dict[str, Any]:
    runs = c.runs
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]} if runs else {}
    return {
        "label": c.label,
        "weight_prefetch_config": c.config.to_json_obj(),
        "effective_mib": space.effective_mib(c.config),
        "total_effective_mib": c.total_bytes / MiB,
        "objective_values": c.values,
        "objective_median": c.median if c.values else None,
        "objective_mad": c.mad if c.values else None,
        "metrics_median": med,
        "rejected": c.rejected or None,
        "dropped": c.dropped or None,
    }


def build_result(
    point: OperatingPoint,
    backend: Backend,
    settings: SearchSettings,
    space: SearchSpace,
    study: optuna.Study,
    storage: str,
    cands: list[Candidate],
    winner: Candidate,
    notes: list[str],
) -> dict[str, Any]:
    """The result document (docs/design.md section 1)."""
    off = next(c for c in cands if c.label == "off")
    default = next(c for c in cands if c.label == "default")
    emission = emit(winner.config, point.semantics)
    trials = study.get_trials(deepcopy=False)
    provenance: dict[str, Any] = {
        "tool_version": __version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    provenance.update(getattr(backend, "provenance", lambda: {})())
    simulated = not backend.measured
    return {
        "schema_version": 1,
        "simulated": simulated,
        "label": "SIMULATED (sim backend, not a measurement)" if simulated else "measured",
        "model": {
            "name": point.model.name,
            "quant": point.model.quant,
            "source": point.model.source,
        },
        "layout": {"tp": point.layout.tp, "dp": point.layout.dp, "ep": point.layout.ep},
        "max_num_seqs": point.max_num_seqs,
        "hardware": point.hardware,
        "backend": backend.name,
        "semantics": point.semantics,
        "sequence_parallel": point.options.sequence_parallel,
        "cap_mib": point.options.cap_bytes / MiB,
        "workload": point.describe()["workload"],
        "objective": {
            "metric": settings.objective,
            "direction": "minimize" if settings.minimize else "maximize",
        },
        "constraints": [str(s) for s in settings.slos],
        "repeats": settings.repeats,
        "max_repeats": settings.round_cap,
        "winner": _summary(winner, space) | {"is_off": winner.key == "off"},
        "baselines": {"off": _summary(off, space), "default": _summary(default, space)},
        "improvement": {
            "vs_off": interval(winner, off, settings.minimize).to_json(),
            "vs_default": interval(winner, default, settings.minimize).to_json(),
        },
        "finalists": [
            _summary(c, space) | {"vs_off": interval(c, off, settings.minimize).to_json()}
            for c in cands
        ],
        "additional_config": emission.flag,
        "additional_config_notes": list(emission.notes),
        "notes": notes,
        "study": {
            "storage": storage,
            "name": study.study_name,
            "sampler": settings.sampler,
            "seed": settings.seed,
            "trials": len(trials),
            "failures": sum(t.state == TrialState.FAIL for t in trials),
            "duplicates": sum("duplicate_of" in t.user_attrs for t in trials),
            "failure_classes": sorted(
                {
                    str(t.user_attrs["failure_class"])
                    for t in trials
                    if "failure_class" in t.user_attrs
                }
            ),
        },
        "provenance": provenance,
    }


def write_trials_csv(study: optuna.Study, space: SearchSpace, path: Path) -> None:
    """One row per trial: the ratios in effect (not the raw sampled params), MiB, metrics."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        metrics = t.user_attrs.get("metrics", {})
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "key": t.user_attrs.get("key"),
            "seed": t.user_attrs.get("seed"),
            "duplicate_of": t.user_attrs.get("duplicate_of"),
            "failure_class": t.user_attrs.get("failure_class"),
            "failure": t.user_attrs.get("failure"),
            "measured_in": t.user_attrs.get("measured_in"),
        }
        row.update({f"ratio.{k}": space.ratio(k, v) for k, v in t.params.items()})
        row.update({f"mib.{k}": v for k, v in t.user_attrs.get("effective_mib", {}).items()})
        row.update({k: v for k, v in metrics.items() if not k.startswith("sim_")})
        rows.append(row)
    atomic_write(path, pd.DataFrame(rows).to_csv(index=False))
