"""Hardware profiles: per vLLM rank (a chip on Atlas A2, a die on A3), every number with provenance.

A profile is a TOML file (`configs/hardware/<name>.toml` or a user's own path). Each field is a
table `{value, unit, kind, source, range, range_why}` where kind is published / derived /
estimated / fitted and `range = [low, high]` is what the field's mechanism allows (the bound and
why sit next to the provenance). A value outside its range is a profile error, so calibration can
move estimated fields only inside their mechanisms; `[calibration]` records what was set how.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeGuard

from prefetch_tune.errors import ConfigError
from prefetch_tune.numbers import non_negative
from prefetch_tune.resources import configs_dir

KINDS = ("published", "derived", "estimated", "fitted")


@dataclass(frozen=True)
class HardwareProfile:
    """The numbers the performance model uses (SI units: bytes, seconds, ops per second)."""

    name: str
    l2_bytes: float  # L2 cache size per rank
    hbm_bytes: float  # HBM capacity per rank (weights + KV cache must fit)
    hbm_bw: float  # HBM bandwidth a streaming kernel achieves
    l2_bw: float  # L2 read bandwidth for a matmul whose weights are L2-resident
    vector_bw_fraction: float  # share of hbm_bw a vector op (norm, quant, SwiGlu) achieves
    cube_int8_ops: float  # int8 cube throughput the matmul kernels achieve
    cube_bf16_flops: float  # bf16 cube throughput the matmul kernels achieve
    mte_interference: float  # how much cube load slows the matmul's HBM streaming (MTE2)
    kernel_overhead_us: float  # fixed device time per kernel (graph mode)
    prefetch_bw: float  # SDMA CMO fill rate into L2
    cmo_issue_us: float  # side-stream time before the fill starts (CMO SQE issue)
    stream_sync_us: float  # compute-stream cost per prefetch: event record + wait pair
    prefetch_contention: float  # share of the fill's bandwidth taken from co-running ops
    link_bw: float  # collective bandwidth per rank (HCCS)
    link_latency_us: float  # fixed latency per collective
    step_overhead_us: float  # per decode step outside the layers (sampling, scheduling)
    source: str = ""
    # Per numeric field, the (low, high) its mechanism allows (from the profile's `range`).
    ranges: tuple[tuple[str, float, float], ...] = field(default=(), compare=False)

    @property
    def vector_bw(self) -> float:
        return self.hbm_bw * self.vector_bw_fraction

    def allowed(self, key: str) -> tuple[float, float]:
        """The range the field's mechanism allows, as the profile documents it."""
        for name, low, high in self.ranges:
            if name == key:
                return low, high
        raise KeyError(key)


_NUMERIC = [f.name for f in fields(HardwareProfile) if f.name not in ("name", "source", "ranges")]


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _range(entry: dict[str, Any], key: str, where: str) -> tuple[float, float]:
    bounds = entry.get("range")
    if not (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(_number(b) for b in bounds)
        and 0 <= bounds[0] <= bounds[1]
    ):
        raise ConfigError(
            f"{where}: field {key}.range must be [low, high] with 0 <= low <= high "
            f"(the values its mechanism allows; got {bounds!r})"
        )
    why = entry.get("range_why")
    if not isinstance(why, str) or not why.strip():
        raise ConfigError(f"{where}: field {key}.range_why must say why the range is what it is")
    return float(bounds[0]), float(bounds[1])


def _field(doc: dict[str, Any], key: str, where: str) -> tuple[float, float, float]:
    """(value, low, high) of one numeric field, checked against its documented range."""
    entry = doc.get(key)
    if entry is None:
        raise ConfigError(f"{where}: field {key} is missing")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: field {key} must be a table with value, unit, kind, source")
    value = non_negative(entry.get("value"), f"{where}: field {key}.value")
    if entry.get("kind") not in KINDS:
        raise ConfigError(
            f"{where}: field {key}.kind must be one of {', '.join(KINDS)} "
            f"(got {entry.get('kind')!r})"
        )
    if not isinstance(entry.get("source"), str) or not entry["source"].strip():
        raise ConfigError(f"{where}: field {key}.source must say where the number comes from")
    low, high = _range(entry, key, where)
    if not low <= value <= high:
        raise ConfigError(
            f"{where}: field {key}.value {value:g} is outside its allowed range "
            f"[{low:g}, {high:g}] ({entry['range_why'].strip()})"
        )
    return value, low, high


def parse_profile(doc: dict[str, Any], where: str) -> HardwareProfile:
    known = {*_NUMERIC, "name", "description", "calibration"}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{where}: unknown field {key}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: field name is missing")
    checked = {key: _field(doc, key, where) for key in _NUMERIC}
    values = {key: v[0] for key, v in checked.items()}
    for key in ("hbm_bw", "l2_bw", "prefetch_bw", "cube_int8_ops", "cube_bf16_flops", "link_bw"):
        if values[key] <= 0:
            raise ConfigError(f"{where}: field {key}.value must be > 0")
    if not 0 < values["vector_bw_fraction"] <= 1:
        raise ConfigError(f"{where}: field vector_bw_fraction.value must be in (0, 1]")
    if values["prefetch_bw"] > values["hbm_bw"]:
        raise ConfigError(
            f"{where}: field prefetch_bw.value must not exceed hbm_bw (a fill reads HBM)"
        )
    if values["l2_bw"] <= values["hbm_bw"]:
        raise ConfigError(
            f"{where}: field l2_bw.value must exceed hbm_bw (else L2 hits save nothing)"
        )
    ranges = tuple((key, v[1], v[2]) for key, v in checked.items())
    return HardwareProfile(name=name, source=where, ranges=ranges, **values)


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "hardware").glob("*.toml"))


@lru_cache(maxsize=32)
def load_hardware(ref: str) -> HardwareProfile:
    """A built-in profile name (`atlas-a2`) or a path to a TOML profile file."""
    path = Path(ref).expanduser()
    if not path.suffix:
        path = configs_dir() / "hardware" / f"{ref}.toml"
        if not path.is_file():
            raise ConfigError(
                f"--hardware {ref}: unknown profile (built-in: "
                f"{', '.join(builtin_profiles())}; or give a .toml file)"
            )
    if not path.is_file():
        raise ConfigError(f"--hardware {ref}: no such file")
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable TOML profile ({exc})") from None
    return parse_profile(doc, str(path))
