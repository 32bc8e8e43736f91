"""Result files (one per model, layout, hardware, backend, semantics and max-num-seqs) and trial
tables. Writes are atomic (temp file + rename); a damaged file is never overwritten silently.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.errors import ConfigError

SCHEMA_VERSION = 1
REQUIRED = (
    "schema_version",
    "model",
    "layout",
    "max_num_seqs",
    "hardware",
    "backend",
    "semantics",
    "simulated",
    "winner",
    "baselines",
    "additional_config",
)


def point_slug(point: OperatingPoint, backend: str) -> str:
    """A file-name-safe identity of an operating point (without max-num-seqs)."""
    sp = "-sp" if point.options.sequence_parallel else ""
    hw = Path(point.hardware).stem
    return (
        f"{point.model.name}-{point.model.quant}-{point.layout.label()}-{hw}-{backend}-"
        f"{point.semantics}{sp}"
    )


def result_path(results_dir: Path, point: OperatingPoint, backend: str) -> Path:
    return results_dir / f"{point_slug(point, backend)}-mns{point.max_num_seqs}.json"


def trials_path(results_dir: Path, point: OperatingPoint, backend: str) -> Path:
    return results_dir / "trials" / f"{point_slug(point, backend)}-mns{point.max_num_seqs}.csv"


def check_writable(results_dir: Path) -> None:
    """Fail early (exit 2) when the results directory cannot be created or written."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results_dir, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--results-dir {results_dir}: not writable ({exc.strerror})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file and rename, with the mode a plain `open` would give (0666 & ~umask):
    mkstemp makes 0600 files that other users of a shared results directory cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_result(path: Path) -> dict[str, Any]:
    """Read and check a result file; a damaged or unknown-version file is a ConfigError."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such result file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: damaged result file ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: damaged result file (not a JSON object)")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: unsupported result schema_version {version!r} "
            f"(this prefetch-tune reads {SCHEMA_VERSION})"
        )
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise ConfigError(f"{path}: damaged result file (missing {', '.join(missing)})")
    return doc


def write_result(path: Path, doc: dict[str, Any]) -> Path | None:
    """Atomically replace `path`; a damaged existing file is kept aside, never lost.

    Returns where a damaged previous file was moved, if it was.
    """
    moved: Path | None = None
    if path.exists():
        try:
            load_result(path)
        except ConfigError:
            moved = path.with_name(f"{path.stem}.damaged-{time.strftime('%Y%m%d-%H%M%S')}.json")
            path.replace(moved)
    atomic_write(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return moved


def iter_results(results_dir: Path) -> Iterator[tuple[Path, dict[str, Any] | ConfigError]]:
    """Every result file under a directory, loaded, or the error that stops it loading."""
    if not results_dir.is_dir():
        return
    for path in sorted(results_dir.glob("*.json")):
        try:
            yield path, load_result(path)
        except ConfigError as exc:
            yield path, exc


def matching_results(
    results_dir: Path, model: str, quant: str, tp: int, dp: int, ep: bool
) -> list[tuple[Path, dict[str, Any]]]:
    """Stored results for a model and layout, any hardware, backend and max-num-seqs."""
    found = []
    for path, doc in iter_results(results_dir):
        if isinstance(doc, ConfigError):
            continue
        layout = doc["layout"]
        if (
            doc["model"]["name"] == model
            and doc["model"]["quant"] == quant
            and layout == {"tp": tp, "dp": dp, "ep": ep}
        ):
            found.append((path, doc))
    return found
