"""Where outputs may go, one rule for every command: an output file's folder must exist; an
output directory (`--results-dir`, `report --out`) is created when only its last level is
missing, and the command says so; a missing parent folder is an error naming the flag.

Temporary files of atomic writes carry host and pid in their name, so the next run removes the
ones a killed process left behind (and any older than a day).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

from prefetch_tune.errors import ConfigError

TMP_SUFFIX = ".tmp"
TMP_MAX_AGE_S = 24 * 3600


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def check_output_file(path: Path, flag: str) -> None:
    """Exit 2 unless `path` can be written as a file in an existing folder."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: folder {parent} does not exist")
    _probe(parent, flag, path)


def ensure_output_dir(path: Path, flag: str) -> None:
    """Exit 2 unless `path` is (or, one level deep, can be made) a writable directory."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a directory")
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"{flag} {path}: folder {path.parent} does not exist")
        try:
            path.mkdir()
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot create ({exc.strerror})") from None
        _note(f"created directory {path} ({flag})")
    _probe(path, flag, path)


def _probe(folder: Path, flag: str, path: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=tmp_prefix("probe")):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: not writable ({exc.strerror})") from None


def tmp_prefix(name: str) -> str:
    """`.NAME.HOST.PID.` for mkstemp: the writer is known if it is killed."""
    return f".{name}.{socket.gethostname()}.{os.getpid()}."


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clean_stale_tmp(folder: Path) -> list[Path]:
    """Remove temporary files of writers that died (this host) or that are older than a day."""
    if not folder.is_dir():
        return []
    mine = re.compile(rf"\..+\.{re.escape(socket.gethostname())}\.(\d+)\..*{re.escape(TMP_SUFFIX)}")
    removed = []
    now = time.time()
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        m = mine.fullmatch(tmp.name)
        try:
            old = now - tmp.stat().st_mtime > TMP_MAX_AGE_S
        except OSError:
            continue
        if (m and _dead(int(m.group(1)))) or old:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
