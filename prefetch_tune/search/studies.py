"""Optuna study plumbing: names, storage (a journal file or an RDB URL), samplers, and the
bookkeeping a journal needs because it has no heartbeat (orphaned trials, stale locks)."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.errors import ConfigError
from prefetch_tune.results import point_slug
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.space import SearchSpace
from prefetch_tune.search.storage import open_journal, open_url

log = logging.getLogger(__name__)

GRID_LEVELS = 6
HAS_SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


def study_name(point: OperatingPoint, backend: str) -> str:
    return f"{point_slug(point, backend)}-mns{point.max_num_seqs}"


def storage_for(settings: SearchSettings, name: str) -> tuple[optuna.storages.BaseStorage, str]:
    """The study's storage: the given URL, or a journal file under the results directory (both
    opened by `storage`: absolute paths, an owner-aware lock, damage checked first)."""
    if settings.storage:
        return open_url(settings.storage)
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
    fcntl.flock(fd, fcntl.LOCK_SH)
    _JOURNAL_USERS[path] = fd
    return alone


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


def spent(study: optuna.Study) -> int:
    """Trials that count against the budget: all but orphans and queued seeds."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING or t.user_attrs.get("orphaned"):
            continue
        n += 1
    return n


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
