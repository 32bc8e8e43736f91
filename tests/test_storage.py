"""Study storage: journal lock of a killed writer through a relative path, stale-lock rules, and
damaged journals (real processes, real Optuna journals)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
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
from prefetch_tune.cli import app
from prefetch_tune.search.storage import FOREIGN_STALE_S, OwnedJournalLock

MODEL = ("--model", "qwen3-32b", "--tp", "4", "--max-num-seqs", "72")


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def env() -> dict[str, str]:
    e = dict(os.environ)
    here = str(Path(prefetch_tune.__file__).resolve().parents[1])
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [here, e.get("PYTHONPATH")]))
    return e


def journal_of(results: Path) -> Path:
    (path,) = (results / "studies").glob("*.journal")
    return path


def trials_in(journal: Path) -> list[optuna.trial.FrozenTrial]:
    storage = JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).trials


# A writer that takes the journal lock through a RELATIVE path, writes half a record and stalls:
# SIGKILLed there, it leaves the lock and a torn record, as a search killed mid-append does.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from prefetch_tune.search.storage import OwnedJournalLock
    lock = OwnedJournalLock(sys.argv[1])
    lock.acquire()
    with open(sys.argv[1], "ab") as fh:
        fh.write(b'{"op_code":8,"worker_id":"x","trial_id":0,"user_attr":{"own')
        fh.flush()
    print("held", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.slow
def test_survivor_finishes_after_lock_holder_is_killed_mid_write_via_relative_path(
    tmp_path: Path,
) -> None:
    first = subprocess.run(
        [sys.executable, "-m", "prefetch_tune", "search", *MODEL, "--trials", "4"],
        cwd=tmp_path,  # default --results-dir: the relative `results`
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    journal = journal_of(tmp_path / "results")
    relative = journal.relative_to(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(relative)],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    survivor: subprocess.Popen[str] | None = None
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = Path(f"{journal}.lock")
        assert lock.is_symlink()
        survivor = subprocess.Popen(
            [sys.executable, "-m", "prefetch_tune", "search", *MODEL, "--trials", "8"],
            cwd=tmp_path,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        time.sleep(3)
        assert survivor.poll() is None, "the survivor did not wait for a live lock holder"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        _, err = survivor.communicate(timeout=90)
        took = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            holder.kill()
        holder.wait(timeout=10)
        if survivor is not None and survivor.poll() is None:
            os.killpg(survivor.pid, signal.SIGKILL)
            survivor.wait(timeout=10)
    assert survivor.returncode == 0, err
    print(f"survivor finished {took:.2f} s after the kill")
    assert took < 30, f"survivor took {took:.1f} s after the kill"
    assert "broke a stale journal lock" in err and f"process {holder.pid}" in err
    assert "cut a half-written last record" in err
    assert not lock.exists() and not lock.is_symlink()
    trials = trials_in(journal)  # Optuna itself can read the journal again
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 8
    assert list(journal.parent.glob("*.journal.damaged-*")), "no backup of the torn journal"


def _lock_with(tmp_path: Path, target: str, age_s: float = 0.0) -> OwnedJournalLock:
    journal = tmp_path / "x.journal"
    journal.touch()
    lock = OwnedJournalLock(journal)
    lock.lock_file.symlink_to(target)
    if age_s:
        then = time.time() - age_s
        os.utime(lock.lock_file, (then, then), follow_symlinks=False)
    return lock


def test_a_live_holder_on_this_host_is_never_taken_as_stale(tmp_path: Path) -> None:
    lock = _lock_with(tmp_path, f"prefetch-tune-lock:{socket.gethostname()}:{os.getpid()}::a", 3600)
    assert lock.stale_reason() is None


def test_a_dead_holder_on_this_host_is_stale_at_once(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = _lock_with(tmp_path, f"prefetch-tune-lock:{socket.gethostname()}:{dead.pid}::a")
    assert lock.stale_reason() == f"its owner, process {dead.pid} on this host, is gone"
    assert lock.acquire() is True
    assert f":{socket.gethostname()}:{os.getpid()}:" in str(lock.lock_file.readlink())
    lock.release()
    assert not lock.lock_file.is_symlink()


def test_another_hosts_lock_is_stale_only_past_the_age_bound(tmp_path: Path) -> None:
    fresh = _lock_with(tmp_path, "prefetch-tune-lock:elsewhere:1::a", FOREIGN_STALE_S / 2)
    assert fresh.stale_reason() is None
    fresh.lock_file.unlink()
    old = _lock_with(tmp_path, "prefetch-tune-lock:elsewhere:1::a", FOREIGN_STALE_S + 5)
    reason = old.stale_reason()
    assert reason is not None and "elsewhere:1" in reason


def test_optunas_own_lock_format_follows_the_age_bound(tmp_path: Path) -> None:
    fresh = _lock_with(tmp_path, "studies/x.journal", 1)  # dangling, as with a relative path
    assert fresh.stale_reason() is None
    fresh.lock_file.unlink()
    assert _lock_with(tmp_path, "studies/x.journal", FOREIGN_STALE_S + 5).stale_reason()


# ---- damaged journals -----------------------------------------------------------------------


def _searched(tmp_path: Path, trials: int = 4) -> Path:
    r = run("search", *MODEL, "--trials", trials, "--results-dir", tmp_path)
    assert r.exit_code == 0, r.stderr
    return journal_of(tmp_path)


def test_damage_mid_journal_is_one_line_with_file_and_line_and_nothing_is_appended(
    tmp_path: Path,
) -> None:
    journal = _searched(tmp_path)
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"op_code": 5, "worker_id": \n'
    journal.write_bytes(b"".join(lines))
    before = journal.read_bytes()
    r = run("search", *MODEL, "--trials", "6", "--results-dir", tmp_path)
    assert_bad_input(r, f"{journal}:3:", "damaged journal record")
    assert journal.read_bytes() == before


def test_torn_last_record_with_a_newline_is_cut_with_a_backup_and_said(tmp_path: Path) -> None:
    journal = _searched(tmp_path)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code":8,"worker_id":"x","tri\n')
    r = run("search", *MODEL, "--trials", "6", "--results-dir", tmp_path)
    assert r.exit_code == 0, r.stderr
    n = whole.count(b"\n") + 1
    assert f"{journal}:{n}: cut a half-written last record" in " ".join(r.stderr.split())
    (backup,) = journal.parent.glob("*.journal.damaged-*")
    assert backup.read_bytes() == whole + b'{"op_code":8,"worker_id":"x","tri\n'
    assert len(trials_in(journal)) >= 6  # the rerun appended after a whole record only


def test_a_record_optuna_cannot_replay_is_one_line(tmp_path: Path) -> None:
    journal = _searched(tmp_path)
    before = journal.read_bytes() + b'{"op_code":5,"worker_id":"x"}\n{"op_code":0}\n'
    journal.write_bytes(before)
    r = run("search", *MODEL, "--trials", "6", "--results-dir", tmp_path)
    assert_bad_input(r, str(journal), "damaged journal")
    assert journal.read_bytes() == before


def test_a_relative_sqlite_url_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("sqlalchemy")
    from prefetch_tune.search.storage import open_url

    monkeypatch.chdir(tmp_path)
    _, url = open_url("sqlite:///sub.db")
    assert url == f"sqlite:///{tmp_path / 'sub.db'}"
    assert (tmp_path / "sub.db").exists()


@pytest.mark.parametrize(
    "bad", [("--hardware", "atlas-z9"), ("--cap-mib", "nan"), ("--seed", "-1")]
)
def test_a_failed_start_leaves_no_study_file(tmp_path: Path, bad: tuple[str, str]) -> None:
    r = run("search", *MODEL, "--trials", "3", "--results-dir", tmp_path / "R", *bad)
    assert_bad_input(r, bad[0])
    assert not (tmp_path / "R").exists() or not list((tmp_path / "R").rglob("*"))
