"""Result files (one per model, layout, hardware, backend, semantics and max-num-seqs) and trial
tables. Writes are atomic (temp file + rename); a damaged file is never overwritten silently.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.errors import ConfigError
from prefetch_tune.paths import TMP_SUFFIX, clean_stale_tmp, ensure_output_dir, tmp_prefix

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
    "objective",
)
# Files kept beside a result: a damaged one moved aside, or a less trustworthy newer result.
# `apply --model`, sweeps and seeding never read them (give `apply --result FILE` to use one).
ASIDE_MARKERS = (".damaged-", ".alt-")


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
    """Fail early (exit 2) when the results directory cannot be made or written; remove the
    temporary files a killed earlier run left in it."""
    ensure_output_dir(results_dir, "--results-dir")
    for folder in (results_dir, results_dir / "trials"):
        clean_stale_tmp(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file and rename, with the mode a plain `open` would give (0666 & ~umask):
    mkstemp makes 0600 files that other users of a shared results directory cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=tmp_prefix(path.name), suffix=TMP_SUFFIX)
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
    bad = _wrong_type(doc)
    if bad:
        raise ConfigError(f"{path}: damaged result file ({bad})")
    return doc


_NUM = (int, float)
# The fields the commands read, and the types they must have (dotted paths; None allowed where
# a result may lack a value, e.g. an objective median of a winner never re-measured).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (dict,),
    "model.name": (str,),
    "model.quant": (str,),
    "layout": (dict,),
    "layout.tp": (int,),
    "layout.dp": (int,),
    "layout.ep": (bool,),
    "max_num_seqs": (int,),
    "hardware": (str,),
    "backend": (str,),
    "semantics": (str,),
    "simulated": (bool,),
    "winner": (dict,),
    "winner.weight_prefetch_config": (dict,),
    "winner.is_off": (bool,),
    "winner.total_effective_mib": _NUM,
    "winner.effective_mib": (dict,),
    "winner.objective_median": (*_NUM, type(None)),
    "baselines": (dict,),
    "additional_config": (str,),
    "objective": (dict,),
    "objective.metric": (str,),
    "constraints": (list,),
    "repeats": (int,),
    "improvement": (dict,),
    "improvement.vs_off": (dict,),
    "improvement.vs_off.pct": (*_NUM, type(None)),
    "study": (dict,),
    "study.trials": (int,),
    "study.failures": (int,),
}


def _wrong_type(doc: dict[str, Any]) -> str | None:
    """The first field of FIELD_TYPES present with a wrong type, as `field: expected ...`."""
    for key, types in FIELD_TYPES.items():
        node: Any = doc
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = _ABSENT
                break
            node = node[part]
        if node is _ABSENT:
            continue
        wrong_bool = isinstance(node, bool) and bool not in types
        if wrong_bool or not isinstance(node, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"field {key} must be {names}, got {json.dumps(node)[:40]}"
    return None


_ABSENT = object()


def write_result(path: Path, doc: dict[str, Any]) -> Path | None:
    """Atomically replace `path`; a damaged existing file is kept aside, never lost.

    Returns where a damaged previous file was moved, if it was.
    """
    moved: Path | None = None
    if path.exists():
        try:
            load_result(path)
        except ConfigError:
            moved = path.with_name(f"{path.stem}.damaged-{_stamp()}.json")
            path.replace(moved)
    atomic_write(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return moved


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def is_aside(path: Path) -> bool:
    return any(marker in path.name for marker in ASIDE_MARKERS)


def budget(doc: dict[str, Any]) -> int:
    """Trials that produced a measurement (the study's trials minus its failures)."""
    study = doc.get("study") or {}
    return int(study.get("trials", 0)) - int(study.get("failures", 0))


def trust_gap(stored: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why `new` is less trustworthy than `stored`, or None when it may replace it: the same
    objective and constraints, measured if the stored one is, and no smaller budget (trials
    measured, repeats per finalist)."""
    if stored.get("objective") != new.get("objective"):
        a, b = stored.get("objective") or {}, new.get("objective") or {}
        return (
            f"another objective (stored {a.get('metric')} {a.get('direction')}, "
            f"new {b.get('metric')} {b.get('direction')})"
        )
    if sorted(stored.get("constraints") or []) != sorted(new.get("constraints") or []):
        return (
            f"other constraints (stored [{', '.join(stored.get('constraints') or [])}], "
            f"new [{', '.join(new.get('constraints') or [])}])"
        )
    if new["simulated"] and not stored["simulated"]:
        return "it is simulated and the stored one measured"
    if budget(new) < budget(stored):
        return f"a smaller budget ({budget(new)} measured trials, stored {budget(stored)})"
    if int(new.get("repeats", 0)) < int(stored.get("repeats", 0)):
        return f"fewer repeats ({new.get('repeats')}, stored {stored.get('repeats')})"
    return None


@dataclass(frozen=True)
class Stored:
    """Where `store_result` put a new result, and what `apply --model` will use."""

    written: Path
    used: Path  # the file `apply --model` reads for this operating point
    reason: str  # why `used` is the one
    moved_damaged: Path | None = None

    @property
    def beside(self) -> bool:
        return self.written != self.used


def store_result(path: Path, doc: dict[str, Any], replace: bool = False) -> Stored:
    """Write a new result for an operating point without losing a more trustworthy one.

    The stored result is replaced when the new one is at least as trustworthy (`trust_gap`) or
    `replace` forces it; otherwise the new one goes beside it as `<name>.alt-<time>.json`.
    """
    gap: str | None = None
    existed = path.exists()
    if existed and not replace:
        try:
            gap = trust_gap(load_result(path), doc)
        except ConfigError:
            gap = None  # damaged: write_result keeps it aside
    if gap is None:
        moved = write_result(path, doc)
        why = "--replace" if replace and existed else "the newest result, at least as trustworthy"
        return Stored(path, path, why, moved)
    alt = path.with_name(f"{path.stem}.alt-{_stamp()}.json")
    atomic_write(alt, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return Stored(alt, path, f"the new result has {gap}")


def iter_results(
    results_dir: Path, include_aside: bool = False
) -> Iterator[tuple[Path, dict[str, Any] | ConfigError]]:
    """Every result file under a directory, loaded, or the error that stops it loading; files
    kept aside (damaged copies, weaker alternatives) only with `include_aside`."""
    if not results_dir.is_dir():
        return
    for path in sorted(results_dir.glob("*.json")):
        if is_aside(path) and not include_aside:
            continue
        try:
            yield path, load_result(path)
        except ConfigError as exc:
            yield path, exc


@dataclass(frozen=True)
class PointQuery:
    """The operating point `apply --model` asks for; None matches any value."""

    model: str
    quant: str | None
    tp: int
    dp: int
    ep: bool
    source: str | None = None  # a model directory's resolved path (else match by name)
    hardware: str | None = None
    semantics: str | None = None
    backend: str | None = None
    sequence_parallel: bool | None = None

    def matches(self, doc: dict[str, Any]) -> bool:
        model = doc["model"]
        named = model.get("source") == self.source or model["name"] == self.model
        return (
            named
            and (self.quant is None or model["quant"] == self.quant)
            and doc["layout"] == {"tp": self.tp, "dp": self.dp, "ep": self.ep}
            and (self.hardware is None or _same_hardware(doc["hardware"], self.hardware))
            and (self.semantics is None or doc["semantics"] == self.semantics)
            and (self.backend is None or doc["backend"] == self.backend)
            and (
                self.sequence_parallel is None
                or bool(doc.get("sequence_parallel", False)) == self.sequence_parallel
            )
        )


def _same_hardware(stored: str, asked: str) -> bool:
    """Same profile name (a profile file counts by its stem, as in the result file name)."""
    return stored == asked or Path(stored).stem == Path(asked).stem


def describe_point(doc: dict[str, Any]) -> str:
    sp = " sp" if doc.get("sequence_parallel") else ""
    sim = " SIMULATED" if doc["simulated"] else ""
    return (
        f"{doc['model']['name']} {doc['model']['quant']} tp{doc['layout']['tp']} "
        f"dp{doc['layout']['dp']}{' ep' if doc['layout']['ep'] else ''} "
        f"mns{doc['max_num_seqs']} {doc['hardware']} {doc['semantics']}{sp} "
        f"{doc['backend']}{sim}"
    )


def matching_results(results_dir: Path, query: PointQuery) -> list[tuple[Path, dict[str, Any]]]:
    """Readable stored results (none kept aside) at the queried point, any max-num-seqs."""
    found = []
    for path, doc in iter_results(results_dir):
        if not isinstance(doc, ConfigError) and query.matches(doc):
            found.append((path, doc))
    if query.source is not None:  # a directory: its own results first, then by name
        own = [(p, d) for p, d in found if d["model"].get("source") == query.source]
        found = own or found
    return found
