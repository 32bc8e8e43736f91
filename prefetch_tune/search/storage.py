"""Opening a study's storage safely: absolute journal paths, a journal lock that knows its
owner (so the lock of a dead process is broken instead of waited on forever), and a journal
check that turns damage into one line naming the file and line before Optuna reads it.

Optuna's own `JournalFileSymlinkLock` points its lock symlink at the journal path as given; with
a relative path the link dangles, `os.stat` on it fails and the waiter spins without end. Here
every path is made absolute first and the lock's symlink target records `host:pid:start`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import BaseJournalFileLock

from prefetch_tune.errors import ConfigError

LOCK_SUFFIX = ".lock"
OWNER_TAG = "prefetch-tune-lock"
# A journal write holds the lock for milliseconds; a lock of another host untouched this long is
# taken as left by a dead process (its pid cannot be checked from here).
FOREIGN_STALE_S = 30.0
WARN_EVERY_S = 10.0


def _say(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


notify: Callable[[str], None] = _say


def absolute(path: str | Path) -> Path:
    """`path` made absolute against the current directory (no symlink resolution)."""
    return Path(path).expanduser().absolute()


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2 :].split()[19]


def process_alive(pid: int, start: str = "") -> bool:
    """A process of this host with this pid (and, if known, this start time) exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _start_time(pid) in ("", start)


class OwnedJournalLock(BaseJournalFileLock):
    """A symlink lock like Optuna's (interoperates with it), whose target names its owner."""

    def __init__(self, journal: str | Path) -> None:
        self.journal = absolute(journal)
        self.lock_file = Path(f"{self.journal}{LOCK_SUFFIX}")
        self._target = ""

    def _my_target(self) -> str:
        host, pid = socket.gethostname(), os.getpid()
        return f"{OWNER_TAG}:{host}:{pid}:{_start_time(pid)}:{uuid.uuid4().hex}"

    def acquire(self) -> bool:
        sleep = 0.001
        waited_since = time.monotonic()
        warned = waited_since
        target = self._my_target()
        while True:
            try:
                self.lock_file.symlink_to(target)
                self._target = target
                return True
            except FileExistsError:
                pass
            stale = self.stale_reason()
            if stale is not None:
                self.break_lock(stale)
                sleep = 0.001
                continue
            now = time.monotonic()
            if now - warned > WARN_EVERY_S:
                notify(f"{self.lock_file}: waited {now - waited_since:.0f} s for the journal lock")
                warned = now
            time.sleep(sleep)
            sleep = min(sleep * 2, 0.1)

    def stale_reason(self) -> str | None:
        """Why the present lock is left by a dead process, or None if it may be live."""
        try:
            target = str(self.lock_file.readlink())
            age = time.time() - os.lstat(self.lock_file).st_mtime
        except OSError:
            return None  # gone meanwhile (or not a symlink: leave it to the age rule below)
        parts = target.split(":")
        if len(parts) == 5 and parts[0] == OWNER_TAG:
            host, pid, start = parts[1], parts[2], parts[3]
            if host == socket.gethostname():
                if pid.isdigit() and not process_alive(int(pid), start):
                    return f"its owner, process {pid} on this host, is gone"
                return None
            if age > FOREIGN_STALE_S:
                return f"held by {host}:{pid} for {age:.0f} s (> {FOREIGN_STALE_S:.0f} s)"
            return None
        if age > FOREIGN_STALE_S:  # Optuna's own lock (target: the journal path)
            return f"untouched for {age:.0f} s (> {FOREIGN_STALE_S:.0f} s)"
        return None

    def break_lock(self, reason: str) -> None:
        """Remove a stale lock; if another waiter replaced it meanwhile, put theirs back."""
        aside = Path(f"{self.lock_file}.{uuid.uuid4().hex}.stale")
        try:
            before = self.lock_file.readlink()
            self.lock_file.rename(aside)
        except OSError:
            return
        try:
            if aside.readlink() != before:  # a fresh lock of someone else: restore it
                with contextlib.suppress(OSError):
                    os.link(aside, self.lock_file, follow_symlinks=False)
                return
            notify(f"{self.lock_file}: broke a stale journal lock ({reason})")
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            if str(self.lock_file.readlink()) != self._target:
                notify(f"{self.lock_file}: the journal lock was taken from this process")
                return
            aside = Path(f"{self.lock_file}.{uuid.uuid4().hex}.rel")
            self.lock_file.rename(aside)
            aside.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            notify(f"{self.lock_file}: the journal lock vanished while held")
        finally:
            self._target = ""


def check_journal(path: Path) -> None:
    """Refuse a journal damaged before its last record; repair a torn last record.

    A writer killed mid-append leaves a partial last line (with or without its newline); it is
    cut, after a backup, so no record is ever appended behind it (Optuna could not read the
    journal again). Damage anywhere else is a ConfigError naming the file and line. Called with
    the journal lock held, so no live writer is mid-append.
    """
    if not path.exists():
        return
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    offset = 0
    for number, line in enumerate(lines, start=1):
        problem = _record_problem(line)
        if problem is not None:
            if number < len(lines):
                raise ConfigError(
                    f"{path}:{number}: damaged journal record ({problem}); Optuna cannot read "
                    "this study; restore a backup or move the journal aside to start afresh"
                )
            backup = Path(f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.copy2(path, backup)
            with path.open("rb+") as fh:
                fh.truncate(offset)
                os.fsync(fh.fileno())
            notify(
                f"{path}:{number}: cut a half-written last record ({problem}), left by a killed "
                f"run; the original is kept as {backup}"
            )
            return
        offset += len(line)


def _record_problem(line: bytes) -> str | None:
    if not line.endswith(b"\n"):
        return "no line end"
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not JSON"
    if not isinstance(record, dict) or not isinstance(record.get("op_code"), int):
        return "no op_code"
    return None


def open_journal(path: str | Path) -> tuple[optuna.storages.JournalStorage, str]:
    """A JournalStorage on an absolute path with an owner-aware lock, after `check_journal`."""
    journal = absolute(path)
    journal.parent.mkdir(parents=True, exist_ok=True)
    lock = OwnedJournalLock(journal)
    lock.acquire()
    try:
        check_journal(journal)
    finally:
        lock.release()
    try:
        storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal), lock_obj=lock))
    except (ValueError, KeyError, TypeError) as exc:  # a record Optuna cannot replay
        raise ConfigError(
            f"{journal}: damaged journal ({type(exc).__name__}: {exc}); restore a backup or "
            "move it aside to start afresh"
        ) from None
    return storage, str(journal)


def absolute_url(url: str) -> str:
    """A storage URL whose relative sqlite path is made absolute (no lock may point nowhere)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        url = prefix + str(absolute(url[len(prefix) :]))
    return url


def open_url(url: str) -> tuple[optuna.storages.BaseStorage, str]:
    """An RDB (or other) storage URL; a relative sqlite path is made absolute first."""
    url = absolute_url(url)
    try:
        return optuna.storages.get_storage(url), url
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"--storage {url}: cannot open ({type(exc).__name__}: {first})") from None
