"""The one check every numeric option passes (flags, tune/plan/profile TOML values, JSON):
a real, finite number inside its range, or a ConfigError that names the option and the value.

NaN slips through every `<`/`>` test (all comparisons are false), so a range check alone lets it
in; JSON's `NaN`/`Infinity` literals are rejected at decoding (`json_loads`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from prefetch_tune.errors import ConfigError


def _bound(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def number(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """`value` as a float after the checks; `name` is the flag or `file: key` to blame."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(f"{name} {value!r}: must be {kind}")
    f = float(value)  # type: ignore[arg-type]
    if not math.isfinite(f):
        raise ConfigError(f"{name} {value}: must be a finite number")
    too_low = low is not None and (f <= low if low_open else f < low)
    too_high = high is not None and (f >= high if high_open else f > high)
    if too_low or too_high:
        raise ConfigError(f"{name} {value}: must be {_bound(low, high, low_open, high_open)}")
    return f


def positive(value: object, name: str, *, integer: bool = False) -> float:
    return number(value, name, low=0, low_open=True, integer=integer)


def non_negative(value: object, name: str, *, integer: bool = False) -> float:
    return number(value, name, low=0, integer=integer)


def _no_constant(literal: str) -> Any:
    raise ValueError(f"{literal} is not a finite number")


def json_loads(text: str | bytes) -> Any:
    """`json.loads` that refuses NaN, Infinity and -Infinity (ValueError, like bad JSON)."""
    return json.loads(text, parse_constant=_no_constant)


def finite_tree(obj: Any, where: str, key: str = "") -> None:
    """Every float anywhere in a decoded TOML/JSON value is finite (TOML allows nan and inf);
    `where` is the file, `key` the dotted path inside it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ConfigError(f"{where}: {key or 'value'} {obj}: must be a finite number")
    if isinstance(obj, dict):
        for k, value in obj.items():
            finite_tree(value, where, f"{key}.{k}" if key else str(k))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            finite_tree(value, where, f"{key}[{i}]")
