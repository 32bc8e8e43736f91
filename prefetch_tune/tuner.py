"""The search: one Optuna study per operating point, then a noise-aware choice of the winner.

The study lives in durable storage (a journal file under the results directory by default, or
any Optuna storage URL such as PostgreSQL so several hosts share one study). It is seeded with
off, vLLM-Ascend's defaults, the stored best for the point, the winners of neighbouring
concurrencies and, for real runs, the simulated winner. A candidate whose effective bytes were
already measured reuses that value; a backend failure becomes a FAIL trial with its reason and
the study goes on. The winner is not
Optuna's single best value: the top finalists, off and default are re-measured, scored
conservatively (median minus a MAD penalty), unstable or incomplete ones are rejected, a tie
goes to fewer prefetched bytes, and when nothing beats off beyond the noise the winner is off.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState

from prefetch_tune import __version__
from prefetch_tune.backends.base import LOWER_IS_BETTER, Backend, Metrics, OperatingPoint
from prefetch_tune.errors import BackendError, ConfigError
from prefetch_tune.models import MiB
from prefetch_tune.prefetch import PrefetchConfig, emit, parse_weight_prefetch_config
from prefetch_tune.results import (
    iter_results,
    load_result,
    point_slug,
    result_path,
    trials_path,
    write_result,
)
from prefetch_tune.space import SearchSpace, build_space

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "gp", "random", "grid")
GRID_LEVELS = 6
MAD_SCALE = 1.4826  # MAD -> standard deviation for normal noise
HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")

# Numeric metrics of `vllm bench serve`'s saved JSON (DESIGN.md 3.2); latencies with any
# --metric-percentiles. Checked before a study is touched, so a typo is exit 2, not a bad trial.
BENCH_METRICS = (
    frozenset(
        {
            "duration",
            "completed",
            "failed",
            "num_prompts",
            "max_concurrency",
            "total_input_tokens",
            "total_output_tokens",
            "request_throughput",
            "request_goodput",
            "output_throughput",
            "total_token_throughput",
            "max_output_tokens_per_s",
            "max_concurrent_requests",
            "rtfx",
        }
    )
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
    def parse(cls, text: str) -> Slo:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*", text)
        if not m:
            raise ConfigError(
                f"--slo {text}: expected METRIC<=VALUE or METRIC>=VALUE, e.g. p99_tpot_ms<=50"
            )
        try:
            bound = float(m.group(3))
        except ValueError:
            raise ConfigError(f"--slo {text}: {m.group(3)!r} is not a number") from None
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
    repeats: int = 3
    objective: str = "output_throughput"
    slos: tuple[Slo, ...] = ()
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None
    finalists: int = 3
    tie_tolerance: float = 0.01
    max_rel_mad: float = 0.10

    def check(self) -> None:
        if self.trials <= 0:
            raise ConfigError(f"--trials {self.trials}: must be > 0")
        if self.repeats <= 0:
            raise ConfigError(f"--repeats {self.repeats}: must be > 0")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler}: expected one of {', '.join(SAMPLERS)}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout {self.timeout}: must be > 0")
        if not 0 <= self.tie_tolerance < 1:
            raise ConfigError(f"--tie-tolerance {self.tie_tolerance}: must be in [0, 1)")
        check_metric(self.objective, "--objective")
        for slo in self.slos:
            check_metric(slo.metric, f"--slo {slo}:")

    @property
    def minimize(self) -> bool:
        return self.objective in LOWER_IS_BETTER or bool(_LATENCY.fullmatch(self.objective))


class Progress:
    """What a search reports while it runs; the CLI draws it, tests ignore it."""

    def start(self, label: str, total: int, done: int) -> None: ...
    def advance(self, label: str, done: int, best: float | None) -> None: ...
    def message(self, text: str) -> None: ...


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
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- study plumbing


def study_name(point: OperatingPoint, backend: str) -> str:
    return f"{point_slug(point, backend)}-mns{point.max_num_seqs}"


def storage_for(settings: SearchSettings, name: str) -> tuple[optuna.storages.BaseStorage, str]:
    """The study's storage: the given URL, or a journal file under the results directory."""
    if settings.storage:
        url = settings.storage
        try:
            return optuna.storages.get_storage(url), url
        except Exception as exc:
            raise ConfigError(
                f"--storage {url}: cannot open ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
    path = settings.results_dir / "studies" / f"{name}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path))), str(path)


def make_sampler(settings: SearchSettings, space: SearchSpace) -> optuna.samplers.BaseSampler:
    constraints = None if HAS_SET_CONSTRAINT or not settings.slos else _constraints_from_attrs
    if settings.sampler == "tpe":
        # Pinned so results do not change with Optuna's defaults (4.x vs 5.x).
        kwargs: dict[str, Any] = {
            "seed": settings.seed,
            "multivariate": True,
            "constant_liar": True,
            "n_startup_trials": 5,
        }
        if constraints:
            kwargs["constraints_func"] = constraints
        return optuna.samplers.TPESampler(**kwargs)
    if settings.sampler == "gp":
        if not all(importlib.util.find_spec(m) for m in ("scipy", "torch")):
            raise ConfigError(
                "--sampler gp needs torch and scipy (pip install "
                "'prefetch-tune[gp]' or torch==2.13.0 scipy)"
            ) from None
        gkw: dict[str, Any] = {"seed": settings.seed, "deterministic_objective": False}
        if constraints:
            gkw["constraints_func"] = constraints
        return optuna.samplers.GPSampler(**gkw)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    grid = {
        k: [space.bound(k) * i / (GRID_LEVELS - 1) for i in range(GRID_LEVELS)] for k in space.knobs
    }
    return optuna.samplers.GridSampler(grid, seed=settings.seed)


def _constraints_from_attrs(trial: optuna.trial.FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get("constraints", []))


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Every search on a journal holds a shared flock on `<journal>.users` while it runs (the kernel
# drops it when the process dies, even by SIGKILL). A search that gets it exclusively is the only
# live one on this host: every RUNNING trial there is an orphan, including one killed between its
# creation and its owner tag, and a journal lock file left by a killed writer is stale (Optuna's
# file locks would otherwise stall the next run for their 30 s grace period).
_JOURNAL_USERS: dict[str, int] = {}


def claim_journal(path: str) -> bool:
    """Join the searches using a journal file; True when no other live process on this host is."""
    import fcntl

    old = _JOURNAL_USERS.pop(path, None)
    if old is not None:
        os.close(old)
    fd = os.open(f"{path}.users", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except BlockingIOError:
        alone = False
    if alone:
        Path(f"{path}.lock").unlink(missing_ok=True)  # JournalFileSymlinkLock of a killed run
        _drop_torn_tail(Path(path))
    fcntl.flock(fd, fcntl.LOCK_SH)
    _JOURNAL_USERS[path] = fd
    return alone


def _drop_torn_tail(path: Path) -> None:
    """Cut a half-written last record (a writer killed mid-append); Optuna would refuse to read
    the journal once another record follows it."""
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        with path.open("rb+") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
        log.warning("%s: dropped a half-written last record of a killed run", path)


def release_journal(path: str) -> None:
    fd = _JOURNAL_USERS.pop(path, None)
    if fd is not None:
        os.close(fd)


def fail_orphans(study: optuna.Study, alone: bool = False) -> int:
    """Journal storage has no heartbeat: fail RUNNING trials whose owner on this host is gone.

    `alone`: no other search on this host uses the study (see `claim_journal`), so a RUNNING
    trial of this host, or one without an owner tag yet, is an orphan whatever its pid.
    """
    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get("owner", ""))
        owner_host, _, pid = owner.rpartition(":")
        mine = owner_host == host and pid.isdigit()
        if (alone and (mine or not owner)) or (mine and not _pid_alive(int(pid))):
            study._storage.set_trial_user_attr(trial._trial_id, "orphaned", True)
            study._storage.set_trial_user_attr(trial._trial_id, "failure_class", "interrupted")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed += 1
    return failed


def _spent(study: optuna.Study) -> int:
    """Trials that count against the budget: all but orphans and queued seeds."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING or t.user_attrs.get("orphaned"):
            continue
        n += 1
    return n


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


def _objective_value(settings: SearchSettings, metrics: Metrics) -> float:
    if settings.objective not in metrics:
        raise ConfigError(
            f"--objective {settings.objective}: the backend reports no such metric "
            f"(known: {', '.join(sorted(k for k in metrics if not k.startswith('sim_')))})"
        )
    return float(metrics[settings.objective])


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
        k: FloatDistribution(space.low(k), space.bound(k)) for k in space.knobs
    }
    deadline = time.monotonic() + settings.timeout if settings.timeout else None
    progress.start(label, settings.trials, min(_spent(study), settings.trials))
    while not stop.is_set():
        if _spent(study) >= settings.trials:
            break
        if deadline is not None and time.monotonic() >= deadline:
            progress.message(f"{label}: --timeout reached")
            break
        if _grid_exhausted(study, space):
            progress.message(f"{label}: every grid point was tried")
            break
        try:
            trial = study.ask(dists)
        except RuntimeError as exc:  # e.g. GridSampler exhausted
            progress.message(f"{label}: sampler has nothing left ({exc})")
            break
        trial.set_user_attr("owner", _owner())
        config = space.config(trial.params)
        key = space.key(config)
        trial.set_user_attr("key", key)
        trial.set_user_attr("config", config.canonical_json())
        trial.set_user_attr("effective_mib", space.effective_mib(config))
        done, failed = _measured(study)
        if key in done:  # same effective bytes: never pay twice
            prior = done[key]
            trial.set_user_attr("duplicate_of", prior.number)
            trial.set_user_attr("metrics", prior.user_attrs.get("metrics", {}))
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
        progress.advance(label, min(_spent(study), settings.trials), _best(study, settings))


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
        trial.set_user_attr("failure", " ".join(str(exc).split())[:500])
        _tell(study, trial, state=TrialState.FAIL)
        return
    except BaseException:
        trial.set_user_attr("failure_class", "interrupted")
        _tell(study, trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
    for extra in ("log", "bench_json", "serve_command", "bench_command"):
        if extra in getattr(backend, "last_artifacts", {}):
            trial.set_user_attr(extra, backend.last_artifacts[extra])  # type: ignore[attr-defined]
    try:
        constraints = [slo.violation(metrics) for slo in settings.slos]
        value = _objective_value(settings, metrics)
    except ConfigError as exc:  # the backend lacks the metric: fail the trial, then stop
        trial.set_user_attr("failure_class", "bad_metric")
        trial.set_user_attr("failure", str(exc))
        _tell(study, trial, state=TrialState.FAIL)
        raise
    _tell_complete(study, trial, value, constraints)


# ---------------------------------------------------------------- winner selection


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
            cand.values.append(_objective_value(settings, metrics))
        progress.message(f"re-measured {cand.label}: median {cand.median:,.2f}")


def _judge(cand: Candidate, point: OperatingPoint, settings: SearchSettings) -> None:
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


def _compare(a: Candidate, b: Candidate, minimize: bool) -> dict[str, Any]:
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
        _judge(c, point, settings)
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
        cmp = _compare(winner, off, settings.minimize)
        if not cmp["significant"]:
            notes.append("nothing beat off beyond the noise; the winner is off")
            winner = off
    else:
        notes.append(
            f"off itself was rejected ({off.rejected}), so the gain over off is unknown; "
            "re-run when the measurements are stable before relying on this winner"
        )
    return winner, notes


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
    storage, storage_label = storage_for(settings, name)
    alone = not settings.storage and claim_journal(storage_label)
    direction: Literal["minimize", "maximize"] = "minimize" if settings.minimize else "maximize"
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction=direction,
        sampler=make_sampler(settings, space),
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"--objective {settings.objective}: study {name} in {storage_label} "
            f"was created to {study.direction.name.lower()}; use another --storage"
        )
    orphans = fail_orphans(study, alone)
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
    if _spent(study) < settings.trials:  # a finished study re-run gets no new (WAITING) seeds
        enqueue_seeds(study, space, seeds)
    label = f"max-num-seqs {point.max_num_seqs}"
    run_trials(study, space, backend, settings, progress, label, stop)
    outcome = SearchOutcome(point, None, None, None, stop.is_set(), name, storage_label)
    if stop.is_set():
        outcome.interrupted = True
        return outcome
    cands = _finalists(study, space, settings)
    remeasure(cands, point, backend, settings, progress, stop)
    if stop.is_set():
        outcome.interrupted = True
        return outcome
    winner, notes = choose_winner(cands, point, settings)
    doc = build_result(point, backend, settings, space, study, storage_label, cands, winner, notes)
    outcome.moved_damaged = write_result(path, doc)
    csv = trials_path(settings.results_dir, point, backend.name)
    write_trials_csv(study, csv)
    outcome.result, outcome.path, outcome.trials_csv, outcome.notes = doc, path, csv, notes
    release_journal(storage_label)
    return outcome


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
    """The result document of DESIGN.md 3.1."""
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
        "winner": _summary(winner, space) | {"is_off": winner.key == "off"},
        "baselines": {"off": _summary(off, space), "default": _summary(default, space)},
        "improvement": {
            "vs_off": _compare(winner, off, settings.minimize),
            "vs_default": _compare(winner, default, settings.minimize),
        },
        "finalists": [_summary(c, space) for c in cands],
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


def write_trials_csv(study: optuna.Study, path: Path) -> None:
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
        }
        row.update({f"ratio.{k}": v for k, v in t.params.items()})
        row.update({f"mib.{k}": v for k, v in t.user_attrs.get("effective_mib", {}).items()})
        row.update({k: v for k, v in metrics.items() if not k.startswith("sim_")})
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    from prefetch_tune.results import atomic_write

    atomic_write(path, pd.DataFrame(rows).to_csv(index=False))
