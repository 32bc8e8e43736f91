"""Tune files (`--config tune.toml`): the same options as `search`'s flags, plus a `[vllm]`
table for real runs. Keys are the flag names with `_` or `-`; unknown keys are errors, and flags
given on the command line win over the file.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

from prefetch_tune.errors import ConfigError
from prefetch_tune.numbers import finite_tree

# Top-level keys and the Python types they accept (flag name with `-` -> `_`).
SEARCH_KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "quant": (str,),
    "tp": (int,),
    "dp": (int,),
    "ep": (bool,),
    "max_num_seqs": (list, int),
    "backend": (str,),
    "hardware": (str,),
    "semantics": (str,),
    "sequence_parallel": (bool,),
    "cap_mib": (int, float),
    "trials": (int,),
    "timeout": (int, float),
    "repeats": (int,),
    "objective": (str,),
    "slo": (list, str),
    "sampler": (str,),
    "seed": (int,),
    "noise": (int, float),
    "storage": (str,),
    "heartbeat": (int,),
    "results_dir": (str,),
    "input_len": (int,),
    "output_len": (int,),
    "max_repeats": (int,),
}


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; a missing, unreadable or invalid file is a ConfigError."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what}") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML for a {what} ({exc})") from None
    finite_tree(doc, str(path))
    return doc


def check_keys(raw: dict[str, Any], allowed: dict[str, tuple[type, ...]], where: str) -> None:
    """Unknown keys (with a did-you-mean) and wrongly typed values are ConfigErrors."""
    for key, value in raw.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f", did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        types = allowed[key]
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"{where}: {key} must be {types[0].__name__}, got a boolean")
        if not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where}: {key} must be {names}, got {value!r}")


def load_tune_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(search options, `[vllm]` table) from a tune TOML; ConfigError names the bad key."""
    doc = {k.replace("-", "_"): v for k, v in read_toml(path, "tune file").items()}
    vllm = doc.pop("vllm", {})
    if not isinstance(vllm, dict):
        raise ConfigError(f"{path}: [vllm] must be a table")
    check_keys(doc, {**SEARCH_KEYS, "vllm": (dict,)}, str(path))
    return doc, vllm
