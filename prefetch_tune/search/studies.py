"""Optuna study plumbing: names, storage (a journal file or an RDB URL), samplers, and orphaned
trials: an RDB storage runs Optuna's heartbeat (a dead worker's trial goes stale, is failed and
retried); a journal has none, so searches on one host coordinate through a lock file."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.trial import TrialState

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.errors import ConfigError
from prefetch_tune.results import point_slug
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.space import SearchSpace
from prefetch_tune.search.storage import absolute_url, open_journal

log = logging.getLogger(__name__)

GRID_LEVELS = 6
HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


def study_name(point: OperatingPoint, backend: str) -> str:
    return f"{point_slug(point, backend)}-mns{point.max_num_seqs}"


# What SQLite and PostgreSQL say when two workers create a new database's schema at once.
_SCHEMA_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key", "database is locked")


def rdb_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """An RDB storage with Optuna's heartbeat: a trial whose worker stopped beating for three
    intervals is failed by the next worker that looks, and queued again (up to twice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry_class = getattr(  # renamed in Optuna 4.9; the old name is a deprecated alias
            optuna.storages,
            "RetryHeartbeatStaleTrialCallback",
            optuna.storages.RetryFailedTrialCallback,
        )
        retry = retry_class(max_retry=2)
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    callback = (  # Optuna >= 4.9 renamed the argument
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in params
        else "failed_trial_callback"
    )
    kwargs: dict[str, Any] = {callback: retry}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s, **kwargs
                )
        except Exception as exc:  # workers starting at once on a new database race on its tables
            if not any(m in str(exc) for m in _SCHEMA_RACE) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def storage_for(settings: SearchSettings, name: str) -> tuple[optuna.storages.BaseStorage, str]:
    """The study's storage: the given URL, or a journal file under the results directory (both
    opened by `storage`: absolute paths, an owner-aware lock, damage checked first)."""
    if settings.storage:
        url = absolute_url(settings.storage)
        try:
            return rdb_storage(url, settings.heartbeat_s), url
        except Exception as exc:
            raise ConfigError(
                f"--storage {url}: cannot open ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
    return open_journal(settings.results_dir / "studies" / f"{name}.journal")


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


def owner() -> str:
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
# creation and its owner tag. (A lock left by a killed writer is broken by `storage`.)
_JOURNAL_USERS: dict[str, int] = {}


def open_journal_study(
    path: str, open_study: Callable[[], optuna.Study]
) -> tuple[optuna.Study, int]:
    """Join the searches on a journal file, open its study and fail its orphans, as one decision.

    A search that gets the lock exclusively is the only live one on this host, and keeps it
    exclusive while it cleans up (stale lock, torn tail) and fails every RUNNING trial of this
    host: a search starting meanwhile blocks on its shared lock until then, so its fresh trials
    cannot be taken for orphans. Otherwise only trials of dead processes here are failed. The
    lock is then held shared until `release_journal`. Returns the study and the trials failed.
    """
    import fcntl

    old = _JOURNAL_USERS.pop(path, None)
    if old is not None:
        os.close(old)
    fd = os.open(f"{path}.users", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a lone search cleans up
        study = open_study()
        failed = fail_orphans(study, alone)
        # Not atomic, and need not be: this search runs no trial yet, so whoever slips in
        # between finds nothing of it to fail.
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    _JOURNAL_USERS[path] = fd
    return study, failed


def release_journal(path: str) -> None:
    fd = _JOURNAL_USERS.pop(path, None)
    if fd is not None:
        os.close(fd)


def fail_orphans(study: optuna.Study, alone: bool = False) -> int:
    """Journal storage has no heartbeat: fail RUNNING trials whose owner on this host is gone.

    `alone`: no other search on this host uses the study (see `open_journal_study`), so a RUNNING
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


def spent(study: optuna.Study) -> int:
    """Trials that count against the budget: all but orphans, queued seeds and stale trials of
    a dead RDB worker that were queued again."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    n = 0
    for t in trials:
        if t.state == TrialState.WAITING or t.user_attrs.get("orphaned") or t.number in retried:
            continue
        n += 1
    return n


def heartbeat_interval(study: optuna.Study) -> int | None:
    """Seconds between heartbeats when the study's storage runs Optuna's heartbeat."""
    get = getattr(study._storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


def fail_stale(study: optuna.Study) -> int:
    """Fail (and queue again) trials of workers whose heartbeat stopped; RDB storages only."""
    if heartbeat_interval(study) is None:
        return 0
    before = spent(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return before - spent(study)


def others_running(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


@contextlib.contextmanager
def beating(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Record the trial's heartbeat (Optuna's own, on RDB storages) while it runs.

    Optuna beats only inside `Study.optimize`; the ask-and-tell loop beats here instead, from
    right after `ask` so a worker killed at any moment leaves a trial that goes stale.
    """
    interval = heartbeat_interval(study)
    if interval is None:
        yield
        return
    storage: Any = study._storage  # RDBStorage (or Optuna's cache in front of it)
    trial_id = trial._trial_id
    storage.record_heartbeat(trial_id)
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            with contextlib.suppress(Exception):  # a lost beat only risks a retry
                storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name="prefetch-tune-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# ---------------------------------------------------------------- what optuna-dashboard shows


def describe_study(study: optuna.Study, space: SearchSpace, settings: SearchSettings) -> None:
    """Name the objective and record each knob's flat-above ratio, so optuna-dashboard (and the
    report) show metric names and ratios instead of "Objective 0" and sampling coordinates."""
    if list(study.metric_names or []) != [settings.objective]:
        with warnings.catch_warnings():  # experimental since 3.2, stable in use; not a user issue
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([settings.objective])
    flat = {k: (None if space.bound(k) >= 1.0 else space.bound(k)) for k in space.knobs}
    wanted: dict[str, Any] = {
        "objective": settings.objective,
        "direction": "minimize" if settings.minimize else "maximize",
        "max_num_seqs": space.point.max_num_seqs,
        "knobs": list(space.knobs),
        "flat_above": flat,
        "params_note": "params are sampling coordinates: <= 0 is off, above flat_above is "
        "flat_above; trial attrs ratio.<knob> are the ratios in effect",
    }
    for key, value in wanted.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


def ratio_attrs(space: SearchSpace, params: dict[str, float]) -> dict[str, float]:
    """A trial's ratios in effect as flat, numeric user attrs (`ratio.mlp.gate_up`)."""
    return {f"ratio.{k}": space.ratio(k, params[k]) for k in space.knobs if k in params}


def metric_attrs(metrics: dict[str, float]) -> dict[str, float]:
    """A trial's metrics as flat, numeric user attrs (`metric.output_throughput`), next to the
    `metrics` dict, so the dashboard can list and sort them."""
    return {f"metric.{k}": float(v) for k, v in metrics.items() if not k.startswith("sim_")}
