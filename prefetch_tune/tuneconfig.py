"""Tune files (`--config tune.toml`): the same options as `search`'s flags, plus a `[vllm]`
table for real runs. Keys are the flag names with `_` or `-`; unknown keys are errors, and flags
given on the command line win over the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from prefetch_tune.errors import ConfigError

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
    "results_dir": (str,),
    "input_len": (int,),
    "output_len": (int,),
    "tie_tolerance": (int, float),
}
TABLES = ("vllm",)


def load_tune_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(search options, `[vllm]` table) from a tune TOML; ConfigError names the bad key."""
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from None
    options: dict[str, Any] = {}
    tables: dict[str, Any] = {}
    for raw_key, value in doc.items():
        key = raw_key.replace("-", "_")
        if key in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{raw_key}] must be a table")
            tables[key] = value
            continue
        if key not in SEARCH_KEYS:
            import difflib

            close = difflib.get_close_matches(key, [*SEARCH_KEYS, *TABLES], n=1)
            hint = f", did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {raw_key!r}{hint}")
        types = SEARCH_KEYS[key]
        if isinstance(value, bool) and bool not in types:
            raise ConfigError(f"{path}: {raw_key} must be {types[0].__name__}, got a boolean")
        if not isinstance(value, types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{path}: {raw_key} must be {names}, got {value!r}")
        options[key] = value
    return options, tables.get("vllm", {})
