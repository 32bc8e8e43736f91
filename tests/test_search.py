"""Acceptance checks of `search` (and `apply`/`show` on its results) through the real typer app,
plus real `python -m prefetch_tune` processes where one must be killed or run concurrently.

The sim backend drives everything; noiseless unless a test says otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from helpers import assert_bad_input
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from typer.testing import CliRunner

import prefetch_tune
from prefetch_tune.backends.base import OperatingPoint, register_backend
from prefetch_tune.backends.sim import SimBackend, evaluate_point
from prefetch_tune.cli import app
from prefetch_tune.cli.apply import rounded
from prefetch_tune.cli.common import resolve_model, resolve_options
from prefetch_tune.errors import BackendError
from prefetch_tune.prefetch import PrefetchConfig, parse_weight_prefetch_config
from prefetch_tune.results import result_path
from prefetch_tune.search.space import build_space
from prefetch_tune.search.studies import study_name

optuna.logging.set_verbosity(optuna.logging.WARNING)

MODEL = ("--model", "qwen3-32b", "--tp", "4")
# A landscape where prefetch pays beyond the 1% tie tolerance (a test profile, not Atlas physics:
# inside the shipped profiles' ranges it gains < 1%, docs/model.md), for tests that need a
# prefetching winner.
GAINFUL = str(Path(__file__).parent / "profiles" / "gainful-a2.toml")
PG_ENV = "PREFETCH_TUNE_TEST_POSTGRES"


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_ok(result: Any) -> None:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)


def point(n: int, **kw: Any) -> OperatingPoint:
    spec, layout = resolve_model("qwen3-32b", None, 4, 1, False)
    return OperatingPoint(model=spec, layout=layout, max_num_seqs=n, **kw)


def rfile(results_dir: Path, n: int, backend: str = "sim", **kw: Any) -> Path:
    return result_path(results_dir, point(n, **kw), backend)


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def throughput(config: PrefetchConfig, p: OperatingPoint) -> float:
    return evaluate_point(config, p)[0]["output_throughput"]


def brute_force_optimum(p: OperatingPoint, levels: tuple[int, ...] = (5, 6)) -> float:
    """Best noiseless output_throughput over full grids of the live knobs up to their bounds."""
    space = build_space(p)
    best = throughput(PrefetchConfig.off(), p)
    seen: set[str] = set()
    for n in levels:
        axes = [[space.bound(k) * i / (n - 1) for i in range(n)] for k in space.knobs]
        for combo in itertools.product(*axes):
            config = space.config(dict(zip(space.knobs, combo, strict=True)))
            key = space.key(config)
            if key not in seen:
                seen.add(key)
                best = max(best, throughput(config, p))
    return best


def journal_study(results_dir: Path) -> optuna.Study:
    (path,) = (results_dir / "studies").glob("*.journal")
    storage = JournalStorage(JournalFileBackend(str(path)))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def counted(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials that count against the budget: not queued seeds, not orphans of a killed run."""
    return [t for t in trials if t.state != TrialState.WAITING and not t.user_attrs.get("orphaned")]


# ---- test backends (in-process, through the registry) -------------------------------------------


class CountingSim(SimBackend):
    """The sim, counting every evaluation by (canonical config, repeat)."""

    name = "counting"
    calls: list[tuple[str, int]] = []  # noqa: RUF012 - shared on purpose: the CLI builds its own

    def evaluate(self, config: PrefetchConfig, p: OperatingPoint, repeat: int = 0) -> Any:
        CountingSim.calls.append((build_space(p).key(config), repeat))
        return super().evaluate(config, p, repeat)


class CrashySim(SimBackend):
    """The sim, but any config prefetching more than half of mlp.down's range crashes the server."""

    name = "crashy"

    def evaluate(self, config: PrefetchConfig, p: OperatingPoint, repeat: int = 0) -> Any:
        space = build_space(p)
        if config.active_ratio("mlp.down") > space.bound("mlp.down") / 2:
            raise BackendError("boom", failure_class="server_crash")
        return super().evaluate(config, p, repeat)


register_backend("counting", CountingSim)
register_backend("crashy", CrashySim)


# ---- 1. the acceptance ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_points(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`search` at max-num-seqs 8 and 72 with the default settings (TPE, seed 0, 30 trials)."""
    results = tmp_path_factory.mktemp("acceptance")
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "8",
        "--max-num-seqs",
        "72",
        "--trials",
        "30",
        "--results-dir",
        results,
    )
    assert_ok(r)
    assert r.stdout.split() == [str(rfile(results, 8)), str(rfile(results, 72))]
    return results


def test_acceptance_winners_near_brute_force_optimum(two_points: Path) -> None:
    winners = {}
    for n in (8, 72):
        doc = load(rfile(two_points, n))
        p = point(n)
        optimum = brute_force_optimum(p)
        config = parse_weight_prefetch_config(doc["winner"]["weight_prefetch_config"])
        value = throughput(config, p)  # noiseless, recomputed: the file is not trusted
        assert value >= 0.99 * optimum, (n, value, optimum, doc["winner"])
        assert doc["winner"]["objective_median"] == pytest.approx(value)
        if doc["winner"]["is_off"]:  # allowed, but then off itself is within 1%
            assert throughput(PrefetchConfig.off(), p) >= 0.99 * optimum
        else:  # the race keeps off unless the gain over it is significant: here it is real
            assert value > throughput(PrefetchConfig.off(), p)
        winners[n] = doc["winner"]
    # docs/design.md section 3, property 1 through the search: where the optimum beats off by
    # more than 1%, the winner prefetches more at 72 than at 8. Inside the physical ranges of the
    # shipped profile it gains < 1% at 72 (docs/model.md); the noise-free race still separates
    # such gains, so then only "every non-off winner truly beats off" (above) is asserted.
    gain = brute_force_optimum(point(72)) / throughput(PrefetchConfig.off(), point(72)) - 1
    if gain > 0.01:
        assert winners[8]["total_effective_mib"] < winners[72]["total_effective_mib"]


def test_acceptance_result_file_content(two_points: Path) -> None:
    for n in (8, 72):
        doc = load(rfile(two_points, n))
        assert doc["schema_version"] == 1
        assert doc["simulated"] is True
        assert "SIMULATED" in doc["label"]
        assert doc["max_num_seqs"] == n
        assert doc["backend"] == "sim"
        assert doc["model"]["name"] == "qwen3-32b"
        assert doc["layout"] == {"tp": 4, "dp": 1, "ep": False}
        assert doc["objective"] == {"metric": "output_throughput", "direction": "maximize"}
        flag, value = shlex.split(doc["additional_config"])
        assert flag == "--additional-config"
        assert (
            json.loads(value)["weight_prefetch_config"] == doc["winner"]["weight_prefetch_config"]
        )
        rounds = doc["selection"]["rounds"]
        assert doc["repeats"] == 3 <= rounds <= doc["max_repeats"] == 12
        for name in ("off", "default"):
            base = doc["baselines"][name]
            assert base["label"] == name
            assert base["objective_median"] > 0
        # Off is the pair of every run: measured in every round of the race.
        assert len(doc["baselines"]["off"]["objective_values"]) == rounds
        assert doc["baselines"]["off"]["total_effective_mib"] == 0
        assert doc["baselines"]["default"]["total_effective_mib"] > 0
        for vs in ("vs_off", "vs_default"):
            got = doc["improvement"][vs]
            assert got["level"] == 0.95 and "Student-t" in got["method"]
            assert got["low_pct"] <= got["pct"] <= got["high_pct"]
            assert got["significant"] is (got["low_pct"] > 0)
        # Off wins unless a lower bound of gain over off is above zero.
        assert doc["improvement"]["vs_off"]["significant"] is not doc["winner"]["is_off"]
        # The noiseless sim: the measured noise is zero, from every off and default run.
        noise = doc["selection"]["noise"]
        assert noise["pct"] == 0
        assert noise["runs"] == sum(
            len(doc["baselines"][b]["objective_values"]) for b in ("off", "default")
        )
        cost = doc["cost"]
        assert cost["selection"]["backend_runs"] == sum(
            len(f["objective_values"]) for f in doc["finalists"]
        )
        assert 0 < cost["search"]["backend_runs"] <= 30  # duplicates of a measured key are free
        assert cost["search"]["server_starts"] == cost["selection"]["server_starts"] == 0
        assert cost["total"]["backend_runs"] == sum(
            cost[k]["backend_runs"] for k in ("search", "selection")
        )
        assert doc["study"]["trials"] == 30
        assert doc["study"]["failures"] == 0
        assert doc["provenance"]["timestamp"]
        csv = two_points / "trials" / rfile(two_points, n).with_suffix(".csv").name
        assert csv.is_file()
    show = run("show", "--results-dir", two_points)
    assert_ok(show)
    assert "SIMULATED" in show.stderr


# ---- 2. SIGKILL mid-search, then the same command again ------------------------------------------

# Registers `slowsim` in `python -m prefetch_tune` subprocesses (PYTHONPATH=this directory): the sim
# with an optional delay per evaluation, and an optional hang (inside a trial, so the trial is left
# RUNNING when the process is killed) once HANG_AFTER evaluations are done while HANG_FILE exists,
# and an optional barrier: the first evaluation waits until BARRIER_N processes reached it.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    import time
    from pathlib import Path

    from prefetch_tune.backends.base import register_backend
    from prefetch_tune.backends.sim import SimBackend


    class SlowSim(SimBackend):
        name = "slowsim"
        done = 0

        def evaluate(self, config, point, repeat=0):
            barrier = os.environ.get("PT_TEST_BARRIER_DIR")
            if barrier and SlowSim.done == 0:  # start together with the other searches
                Path(barrier, str(os.getpid())).touch()
                deadline = time.monotonic() + 60
                while len(os.listdir(barrier)) < int(os.environ["PT_TEST_BARRIER_N"]):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
            hang = os.environ.get("PT_TEST_HANG_FILE")
            if hang and Path(hang).exists() and SlowSim.done >= int(os.environ["PT_TEST_HANG_AFTER"]):
                Path(hang + ".hanging").touch()
                time.sleep(3600)
            time.sleep(float(os.environ.get("PT_TEST_DELAY_S", "0")))
            SlowSim.done += 1
            return super().evaluate(config, point, repeat)


    register_backend("slowsim", SlowSim)
    """
)


@pytest.fixture
def sub_env(tmp_path: Path) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    # The subprocesses import the prefetch_tune this test imported, whatever is pip-installed.
    here = str(Path(prefetch_tune.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), here, env.get("PYTHONPATH")]))
    env.pop("PT_TEST_HANG_FILE", None)
    return env


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "prefetch_tune", *map(str, args)]


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"search exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def complete_count(results: Path) -> int:
    try:
        return sum(t.state == TrialState.COMPLETE for t in journal_study(results).trials)
    except (ValueError, KeyError, StopIteration):  # journal not created yet
        return 0


def kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["inside-a-trial", "at-a-random-moment"])
def test_sigkill_then_same_command_loses_nothing(
    tmp_path: Path, sub_env: dict[str, str], how: str
) -> None:
    results = tmp_path / "R"
    if how == "inside-a-trial":
        # Deterministic: after 20 evaluations the next one hangs, so one trial is RUNNING at the kill.
        budget = 40
        args = cli(
            "search",
            *MODEL,
            "--max-num-seqs",
            "72",
            "--backend",
            "slowsim",
            "--trials",
            budget,
            "--sampler",
            "random",
            "--repeats",
            "1",
            "--results-dir",
            results,
        )
        hang = tmp_path / "hang"
        hang.touch()
        sub_env |= {"PT_TEST_HANG_FILE": str(hang), "PT_TEST_HANG_AFTER": "20"}
    else:
        # The plain sim, killed whenever the journal first shows 40 completed trials.
        budget = 150
        args = cli(
            "search",
            "--model",
            "qwen3-235b-a22b",
            "--tp",
            "4",
            "--dp",
            "4",
            "--ep",
            "--hardware",
            "atlas-a3",
            "--max-num-seqs",
            "144",
            "--trials",
            budget,
            "--sampler",
            "random",
            "--repeats",
            "1",
            "--results-dir",
            results,
        )
    proc = subprocess.Popen(
        args,
        env=sub_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if how == "inside-a-trial":
            wait_for(lambda: Path(f"{hang}.hanging").exists(), 60, "the hang", proc)
        else:
            wait_for(lambda: complete_count(results) >= 40, 60, "40 trials", proc)
    finally:
        kill_group(proc)
    before = journal_study(results).trials
    done_before = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}
    running_before = [t.number for t in before if t.state == TrialState.RUNNING]
    assert len(done_before) >= 20
    assert len(counted(before)) < budget  # really killed mid-way
    if how == "inside-a-trial":
        assert len(running_before) == 1
        hang.unlink()

    again = subprocess.run(args, env=sub_env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr

    after = {t.number: t for t in journal_study(results).trials}
    for number, value in done_before.items():
        assert after[number].state == TrialState.COMPLETE
        assert after[number].value == value
    for number in running_before:
        assert after[number].state == TrialState.FAIL
        assert after[number].user_attrs["orphaned"] is True
        assert after[number].user_attrs["failure_class"] == "interrupted"
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in after.values())
    assert len(counted(list(after.values()))) == budget
    if running_before:
        assert "killed run" in again.stderr
    doc = load(next(results.glob("*.json")))
    assert doc["study"]["trials"] == budget + len(running_before)


def test_resume_after_a_kill_mid_ask_and_mid_append(tmp_path: Path) -> None:
    """Killed between a trial's creation and its owner tag, holding the lock, mid-record."""
    journal = tmp_path / "studies" / f"{study_name(point(72), 'sim')}.journal"
    journal.parent.mkdir()
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(
        study_name=study_name(point(72), "sim"), storage=storage, direction="maximize"
    )
    untagged = study.ask().number
    dead = subprocess.Popen(["true"])
    dead.wait()  # the journal lock a killed writer leaves: its owner's pid is gone
    Path(f"{journal}.lock").symlink_to(f"prefetch-tune-lock:{socket.gethostname()}:{dead.pid}::x")
    with journal.open("ab") as fh:  # and the first half of the record it was appending
        fh.write(b'{"op_code":8,"worker_id":"x","trial_id":0,"user_attr":{"own')
    started = time.monotonic()
    r = run("search", *MODEL, "--max-num-seqs", "72", "--trials", "6", "--results-dir", tmp_path)
    assert_ok(r)
    assert time.monotonic() - started < 20  # not Optuna's 30 s stale-lock grace period
    assert "broke a stale journal lock" in r.stderr
    assert "cut a half-written last record" in r.stderr
    trials = journal_study(tmp_path).trials
    assert trials[untagged].state == TrialState.FAIL
    assert trials[untagged].user_attrs["orphaned"] is True
    assert len(counted(trials)) == 6


# ---- 3. two searches on one storage at once -------------------------------------------------------


def _concurrent_searches(
    env: dict[str, str], results: Path, budget: int, storage: str | None
) -> None:
    args = cli(
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--backend",
        "slowsim",
        "--trials",
        budget,
        "--repeats",
        "1",
        "--results-dir",
        results,
        *(("--storage", storage) if storage else ()),
    )
    barrier = results.parent / "barrier"
    barrier.mkdir()
    # Both first evaluations wait for each other, then ~10 ms per evaluation: the two interleave.
    env = env | {
        "PT_TEST_DELAY_S": "0.01",
        "PT_TEST_BARRIER_DIR": str(barrier),
        "PT_TEST_BARRIER_N": "2",
    }
    procs = [
        subprocess.Popen(
            args,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err


def _assert_one_consistent_study(study: optuna.Study, budget: int) -> None:
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "duplicate trial numbers"
    assert sorted(numbers) == list(range(len(numbers))), "a trial is missing"
    owners = {str(t.user_attrs.get("owner", "")).rpartition(":")[2] for t in trials}
    assert len(owners - {""}) == 2, "the two processes did not both run trials"
    spent = counted(trials)
    # Each process checks the budget before it asks for a trial, so both may pass the check at
    # the same moment and each start one more: at most budget + (processes - 1) trials.
    assert budget <= len(spent) <= budget + 1, len(spent)
    print(f"concurrent: {len(spent)} counted trials for a budget of {budget}, owners {owners}")
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in spent)
    # Both processes may have queued the off/default seeds; the second copy reuses the first
    # copy's value instead of paying for it again.
    for t in trials:
        if "duplicate_of" in t.user_attrs:
            prior = study.get_trials(deepcopy=False)[t.user_attrs["duplicate_of"]]
            assert t.value == prior.value


@pytest.mark.slow
def test_two_searches_share_one_journal(tmp_path: Path, sub_env: dict[str, str]) -> None:
    results = tmp_path / "R"
    _concurrent_searches(sub_env, results, 40, None)
    _assert_one_consistent_study(journal_study(results), 40)
    assert load(next(results.glob("*.json")))["winner"]["objective_median"] > 0


# Process A opens the journal study alone and pauses inside `open_study` (the moment a search has
# decided it is alone but not yet failed orphans); process B then tries to join and start a trial.
JOIN_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from prefetch_tune.search.studies import open_journal_study, owner

    role, journal, flags = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    storage = JournalStorage(JournalFileBackend(journal))

    def open_study():
        study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
        if role == "A":
            (flags / "A-in").touch()
            while not (flags / "go").exists():
                time.sleep(0.01)
        return study

    if role == "B":
        (flags / "B-trying").touch()
    study, failed = open_journal_study(journal, open_study)
    if role == "A":
        print(failed)
        sys.exit(0)
    trial = study.ask()
    trial.set_user_attr("owner", owner())
    (flags / "B-running").touch()
    time.sleep(3600)
    """
)


def test_a_lone_search_never_fails_a_trial_of_a_search_joining_meanwhile(
    tmp_path: Path, sub_env: dict[str, str]
) -> None:
    journal = tmp_path / "s.journal"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(study_name="s", storage=storage)
    orphan = study.ask().number  # left RUNNING, untagged, by a killed search
    script = tmp_path / "join.py"
    script.write_text(JOIN_SCRIPT)
    flags = tmp_path / "flags"
    flags.mkdir()

    def start(role: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), role, str(journal), str(flags)],
            env=sub_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    a = start("A")
    b: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: (flags / "A-in").exists(), 60, "A inside open_study", a)
        b = start("B")
        wait_for(lambda: (flags / "B-trying").exists(), 60, "B trying to join", b)
        # The bad interleaving: B joins and starts a trial while A, deciding alone, is about to
        # fail orphans. B gets 2 s to do it (it needs milliseconds once joined).
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not (flags / "B-running").exists():
            time.sleep(0.01)
        joined_early = (flags / "B-running").exists()
        (flags / "go").touch()
        out, err = a.communicate(timeout=60)
        assert a.returncode == 0, err
        assert out.split() == ["1"]  # A failed the real orphan, and only it
        wait_for(lambda: (flags / "B-running").exists(), 60, "B's trial", b)
        trials = optuna.load_study(study_name="s", storage=storage).trials
        assert trials[orphan].state == TrialState.FAIL
        assert trials[orphan].user_attrs["orphaned"] is True
        (b_trial,) = (t for t in trials if t.number != orphan)
        assert b_trial.state == TrialState.RUNNING, "A failed the trial of a live search"
        assert not b_trial.user_attrs.get("orphaned")
        assert not joined_early, "B joined while A still held the journal alone"
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                kill_group(proc)


def _one_rdb_worker_killed_mid_trial(tmp_path: Path, sub_env: dict[str, str], url: str) -> None:
    """Optuna's heartbeat: the killed worker's trial goes stale, is failed and queued again,
    and the survivor waits for it, so the budget ends in COMPLETE trials."""
    results = tmp_path / "R"
    budget = 12
    args = cli(
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--backend",
        "slowsim",
        "--trials",
        budget,
        "--repeats",
        "1",
        "--max-repeats",
        "1",
        "--storage",
        url,
        "--heartbeat",
        "1",
        "--results-dir",
        results,
    )
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    hang = tmp_path / "hang"
    hang.touch()
    env = sub_env | {
        "PT_TEST_DELAY_S": "0.3",
        "PT_TEST_BARRIER_DIR": str(barrier),
        "PT_TEST_BARRIER_N": "2",
    }
    # Worker 1 hangs inside its 3rd trial and is SIGKILLed there; worker 2 runs on.
    killed = subprocess.Popen(
        [*args, "--seed", "1"],  # its own proposals, so it is not served duplicates only
        env=env | {"PT_TEST_HANG_FILE": str(hang), "PT_TEST_HANG_AFTER": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    survivor = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: Path(f"{hang}.hanging").exists(), 120, "the hang", killed)
        kill_group(killed)
        _, err = survivor.communicate(timeout=180)
        assert survivor.returncode == 0, err
    finally:
        for proc in (killed, survivor):
            if proc.poll() is None:
                kill_group(proc)
    name = study_name(point(72), "slowsim")
    trials = optuna.load_study(study_name=name, storage=url).trials
    states = [t.state for t in trials]
    stale = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stale) == 1, states  # the killed worker's trial, failed by the heartbeat
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == stale[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == stale[0].params
    assert states.count(TrialState.COMPLETE) == budget, states
    assert TrialState.RUNNING not in states
    doc = load(next(results.glob("*.json")))
    assert doc["study"]["storage"] == url


@pytest.mark.slow
def test_two_workers_on_sqlite_one_killed_mid_trial_end_with_the_full_budget(
    tmp_path: Path, sub_env: dict[str, str]
) -> None:
    _one_rdb_worker_killed_mid_trial(tmp_path, sub_env, f"sqlite:///{tmp_path / 'studies.db'}")


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_on_postgres_one_killed_mid_trial_end_with_the_full_budget(
    tmp_path: Path, sub_env: dict[str, str], postgres_url: str
) -> None:
    name = study_name(point(72), "slowsim")
    storage = optuna.storages.RDBStorage(postgres_url)
    if name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=name, storage=storage)  # left by an earlier run
    try:
        _one_rdb_worker_killed_mid_trial(tmp_path, sub_env, postgres_url)
    finally:
        optuna.delete_study(study_name=name, storage=storage)


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        how = f'start one with `eval "$(bash .ci/postgres.sh)"`, which sets {PG_ENV}'
        if os.environ.get("CI"):
            pytest.fail(
                f"CI is set but {PG_ENV} is not: CI must not skip the PostgreSQL test; {how}"
            )
        pytest.skip(f"{PG_ENV} is not set (a SQLAlchemy URL of a PostgreSQL server); {how}")
    return url


@pytest.mark.slow
@pytest.mark.postgres
def test_two_searches_share_one_postgres_study(
    tmp_path: Path, sub_env: dict[str, str], postgres_url: str
) -> None:
    name = study_name(point(72), "slowsim")
    storage = optuna.storages.RDBStorage(postgres_url)
    if name in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=name, storage=storage)  # left by an earlier run
    try:
        _concurrent_searches(sub_env, tmp_path / "R", 30, postgres_url)
        study = optuna.load_study(study_name=name, storage=storage)
        _assert_one_consistent_study(study, 30)
        assert not (tmp_path / "R" / "studies").exists()  # nothing went to a journal file
        doc = load(next((tmp_path / "R").glob("*.json")))
        assert doc["study"]["storage"] == postgres_url
    finally:
        optuna.delete_study(study_name=name, storage=storage)


# ---- 4. resume semantics, dedupe, failures, SLOs, objectives -------------------------------------


def test_same_command_again_reuses_the_finished_study(tmp_path: Path) -> None:
    args = (
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--trials",
        "12",
        "--noise",
        "1",
        "--results-dir",
        tmp_path,
    )
    assert_ok(run(*args))
    first = load(rfile(tmp_path, 72))
    assert_ok(run(*args))
    second = load(rfile(tmp_path, 72))
    assert len(journal_study(tmp_path).trials) == 12  # nothing new, not even a queued seed
    for doc in (first, second):
        del doc["provenance"]["timestamp"]
    assert first == second


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_duplicate_keys_reuse_the_measured_value(tmp_path: Path, sampler: str) -> None:
    # A 0.25 MiB cap leaves each knob 0 or 1 unit of KEY_GRANULARITY: at most 16 distinct keys,
    # so 30 trials must repeat some.
    CountingSim.calls.clear()
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--cap-mib",
        "0.25",
        "--backend",
        "counting",
        "--sampler",
        sampler,
        "--trials",
        "30",
        "--results-dir",
        tmp_path,
    )
    assert_ok(r)
    trials = journal_study(tmp_path).trials
    dups = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert dups
    for t in dups:
        prior = trials[t.user_attrs["duplicate_of"]]
        assert "duplicate_of" not in prior.user_attrs
        assert t.user_attrs["key"] == prior.user_attrs["key"]
        assert t.value == prior.value
    first_runs = [key for key, repeat in CountingSim.calls if repeat == 0]
    assert len(first_runs) == len(set(first_runs)), "a config was paid for twice"
    paid = [
        t for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
    ]
    assert len(first_runs) == len(paid)
    remeasured = [c for c in CountingSim.calls if c[1] > 0]
    assert len(remeasured) == len(set(remeasured))
    assert load(rfile(tmp_path, 72, options=resolve_options(False, 0.25), backend="counting"))[
        "study"
    ]["duplicates"] == len(dups)


@pytest.mark.slow
def test_grid_sampler_stops_when_the_grid_is_exhausted(tmp_path: Path) -> None:
    # native-0.23 leaves 3 live knobs: 6**3 grid points, plus the off and default seeds.
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--semantics",
        "native-0.23",
        "--sampler",
        "grid",
        "--trials",
        "300",
        "--repeats",
        "1",
        "--results-dir",
        tmp_path,
    )
    assert_ok(r)
    assert "every grid point was tried" in r.stderr
    trials = journal_study(tmp_path).trials
    assert len(trials) == 6**3 + 2
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_backend_failure_becomes_a_fail_trial(tmp_path: Path) -> None:
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--backend",
        "crashy",
        "--trials",
        "20",
        "--results-dir",
        tmp_path,
    )
    assert_ok(r)
    trials = journal_study(tmp_path).trials
    assert len(trials) == 20
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed
    for t in failed:
        assert t.user_attrs["failure_class"] in ("server_crash", "skipped")
        if t.user_attrs["failure_class"] == "server_crash":
            assert t.user_attrs["failure"] == "boom"
    assert any(t.state == TrialState.COMPLETE for t in trials[trials.index(failed[0]) :])
    doc = load(rfile(tmp_path, 72, backend="crashy"))
    assert doc["study"]["failures"] == len(failed)
    assert "server_crash" in doc["study"]["failure_classes"]
    assert doc["baselines"]["default"]["rejected"].startswith("run 1 failed: boom")
    winner = parse_weight_prefetch_config(doc["winner"]["weight_prefetch_config"])
    assert winner.active_ratio("mlp.down") <= build_space(point(72)).bound("mlp.down") / 2


def test_slo_is_respected_by_the_winner(tmp_path: Path) -> None:
    p = point(72, hardware=GAINFUL)
    off_p99 = evaluate_point(PrefetchConfig.off(), p)[0]["p99_tpot_ms"]
    bound = off_p99 * 0.985  # off fails it; the tuned configs (about 2.5% faster) meet it
    r = run(
        "search",
        *MODEL,
        "--hardware",
        GAINFUL,
        "--max-num-seqs",
        "72",
        "--trials",
        "20",
        "--slo",
        f"p99_tpot_ms<={bound:.4f}",
        "--results-dir",
        tmp_path,
    )
    assert_ok(r)
    doc = load(rfile(tmp_path, 72, hardware=GAINFUL))
    assert doc["constraints"] == [f"p99_tpot_ms<={float(f'{bound:.4f}'):g}"]
    assert not doc["winner"]["is_off"]
    assert doc["winner"]["metrics_median"]["p99_tpot_ms"] <= bound
    assert "violates" in doc["baselines"]["off"]["rejected"]
    trials = journal_study(tmp_path).trials
    assert all("constraints" in t.user_attrs for t in trials if t.state == TrialState.COMPLETE)


def test_latency_objective_is_minimised(tmp_path: Path) -> None:
    r = run(
        "search",
        *MODEL,
        "--hardware",
        GAINFUL,
        "--max-num-seqs",
        "72",
        "--trials",
        "15",
        "--objective",
        "mean_tpot_ms",
        "--results-dir",
        tmp_path,
    )
    assert_ok(r)
    doc = load(rfile(tmp_path, 72, hardware=GAINFUL))
    assert doc["objective"] == {"metric": "mean_tpot_ms", "direction": "minimize"}
    study = journal_study(tmp_path)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    w = doc["winner"]["objective_median"]
    assert w < doc["baselines"]["off"]["objective_median"]
    assert w <= doc["baselines"]["default"]["objective_median"]
    assert w <= 1.01 * min(t.value for t in study.trials if t.value is not None)
    assert doc["improvement"]["vs_off"]["pct"] > 0  # positive means better, also for latencies
    # The same study cannot be resumed with the opposite direction.
    again = run(
        "search",
        *MODEL,
        "--hardware",
        GAINFUL,
        "--max-num-seqs",
        "72",
        "--trials",
        "15",
        "--results-dir",
        tmp_path,
    )
    assert_bad_input(again, "--objective output_throughput", "minimize")


def test_winner_is_off_with_a_note_when_nothing_beats_it(tmp_path: Path) -> None:
    # At max-num-seqs 8 the best prefetch gains ~1.2% over off; at 5% noise three rounds of the
    # race cannot tell that from zero.
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "8",
        "--trials",
        "10",
        "--noise",
        "5",
        "--repeats",
        "3",
        "--max-repeats",
        "3",
        "--results-dir",
        tmp_path,
    )
    assert_ok(r)
    doc = load(rfile(tmp_path, 8))
    assert doc["winner"]["is_off"] is True
    assert doc["winner"]["weight_prefetch_config"] == {"enabled": False}
    assert doc["winner"]["total_effective_mib"] == 0
    assert any("winner is off" in note for note in doc["notes"])
    assert json.loads(shlex.split(doc["additional_config"])[1]) == {
        "weight_prefetch_config": {"enabled": False}
    }
    assert "winner is off" in r.stderr


# ---- 5. apply on stored results -------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path: Path) -> Iterator[Path]:
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "8",
        "--max-num-seqs",
        "72",
        "--trials",
        "10",
        "--results-dir",
        tmp_path,
    )
    assert_ok(r)
    yield tmp_path


def _applied(stdout: str) -> dict[str, Any]:
    flag, value = shlex.split(stdout.strip())
    assert flag == "--additional-config"
    cfg: dict[str, Any] = json.loads(value)["weight_prefetch_config"]
    return cfg


def test_apply_result_prints_the_winner_with_a_simulated_warning(stored: Path) -> None:
    path = rfile(stored, 72)
    r = run("apply", "--result", path)
    assert_ok(r)
    stored_cfg = parse_weight_prefetch_config(load(path)["winner"]["weight_prefetch_config"])
    assert parse_weight_prefetch_config(_applied(r.stdout)) == rounded(stored_cfg)  # 4 decimals
    assert "SIMULATED" in r.stderr
    by_model = run("apply", *MODEL, "--max-num-seqs", "72", "--results-dir", stored)
    assert_ok(by_model)
    assert by_model.stdout == r.stdout


def test_apply_untuned_concurrency_lists_the_tuned_ones(stored: Path) -> None:
    r = run("apply", *MODEL, "--max-num-seqs", "16", "--results-dir", stored)
    assert r.exit_code == 1, r.stderr
    assert r.stdout == ""
    assert "tuned: 8, 72" in r.stderr
    assert "Traceback" not in r.stderr


def test_apply_prefers_measured_over_simulated(stored: Path) -> None:
    doc = load(rfile(stored, 72))
    doc["simulated"] = False
    doc["label"] = "measured"
    measured_cfg = {"enabled": True, "prefetch_ratio": {"mlp": {"down": 0.125}}}
    doc["winner"]["weight_prefetch_config"] = measured_cfg
    # Sorts after the simulated file by name, so only the measured flag can make it win.
    (stored / "zz-measured-copy.json").write_text(json.dumps(doc))
    r = run("apply", *MODEL, "--max-num-seqs", "72", "--results-dir", stored)
    assert_ok(r)
    got = _applied(r.stdout)
    assert got["prefetch_ratio"]["mlp"]["down"] == 0.125
    assert got != load(rfile(stored, 72))["winner"]["weight_prefetch_config"]
    assert "SIMULATED" not in r.stderr


# ---- 6. bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--sampler", "bayes"), "--sampler bayes"),
        (("--slo", "p99<50"), "--slo p99<50"),
        (("--trials", "0"), "--trials 0"),
        (("--objective", "no_such_metric"), "--objective no_such_metric"),
    ],
)
def test_bad_search_flags_exit_2(tmp_path: Path, extra: tuple[str, ...], needle: str) -> None:
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--trials",
        "3",
        "--results-dir",
        tmp_path / "R",
        *extra,
    )
    assert_bad_input(r, needle)
    assert not list((tmp_path / "R").glob("*.json"))


def test_unwritable_results_dir_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    r = run(
        "search", *MODEL, "--max-num-seqs", "72", "--trials", "3", "--results-dir", blocker / "R"
    )
    assert_bad_input(r, str(blocker / "R"))


def test_apply_damaged_result_exits_2(tmp_path: Path) -> None:
    damaged = tmp_path / "cut.json"
    damaged.write_text('{"schema_version": 1, "winner": {"weight_pre')
    assert_bad_input(run("apply", "--result", damaged), str(damaged), "damaged")


def test_search_keeps_a_damaged_result_aside(tmp_path: Path) -> None:
    path = rfile(tmp_path, 72)
    original = b'{"schema_version": 1, "winner": {"weight_pre'
    path.write_bytes(original)
    r = run("search", *MODEL, "--max-num-seqs", "72", "--trials", "3", "--results-dir", tmp_path)
    assert_ok(r)
    (aside,) = tmp_path.glob(f"{path.stem}.damaged-*.json")
    assert aside.read_bytes() == original
    assert load(path)["schema_version"] == 1
    assert "damaged" in r.stderr


def test_tune_file_unknown_key_exits_2(tmp_path: Path) -> None:
    toml = tmp_path / "tune.toml"
    toml.write_text('model = "qwen3-32b"\ntp = 4\nmax_num_seqs = [72]\ntrails = 3\n')
    assert_bad_input(
        run("search", "--config", toml, "--results-dir", tmp_path / "R"), str(toml), "'trails'"
    )


def test_flags_win_over_the_tune_file(tmp_path: Path) -> None:
    toml = tmp_path / "tune.toml"
    toml.write_text(
        textwrap.dedent(f"""
        model = "qwen3-32b"
        tp = 4
        max-num-seqs = [72]
        trials = 9
        sampler = "random"
        repeats = 2
        results_dir = "{tmp_path / "from-file"}"
    """)
    )
    r = run("search", "--config", toml, "--trials", "4", "--results-dir", tmp_path / "R")
    assert_ok(r)
    assert not (tmp_path / "from-file").exists()
    doc = load(rfile(tmp_path / "R", 72))
    assert doc["study"]["trials"] == 4  # flag
    assert doc["study"]["sampler"] == "random"  # file
    assert doc["repeats"] == 2  # file
