"""The `weight_prefetch_config` contract: strict parsing, canonical JSON, merging, emission.

prefetch-tune's own meaning of a config (used everywhere inside the tool):

* `enabled: false` -> nothing is prefetched.
* A module (`attn`, `moe`, `mlp`) missing from `prefetch_ratio` takes vLLM-Ascend's default
  ratios for that module, as vLLM-Ascend itself does.
* A knob missing from a module that is given, or a ratio of 0, means **off**.

Native vLLM-Ascend (v0.11-v0.23) reads 0 or a missing knob as "the whole weight" once its
module is on. `emit_weight_prefetch_config(..., semantics="native-0.23")` therefore translates:
a module whose knobs are all off is emitted with explicit zeros (native keeps it off), and an
off knob next to an active one gets `NATIVE_OFF_RATIO`, the smallest prefetch, because native
has no way to switch a single knob off. Every such change is returned as a note.
"""

from __future__ import annotations

import difflib
import json
import math
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prefetch_tune.errors import ConfigError
from prefetch_tune.numbers import json_loads

Semantics = Literal["plugin", "native-0.23"]
SEMANTICS: tuple[Semantics, ...] = ("plugin", "native-0.23")

MODULE_KNOBS: dict[str, tuple[str, ...]] = {
    "attn": ("qkv", "o"),
    "moe": ("gate_up",),
    "mlp": ("gate_up", "down"),
}
KNOBS: tuple[str, ...] = tuple(f"{m}.{k}" for m, ks in MODULE_KNOBS.items() for k in ks)
DEFAULT_RATIOS: dict[str, float] = {
    "attn.qkv": 1.0,
    "attn.o": 1.0,
    "moe.gate_up": 0.8,
    "mlp.gate_up": 1.0,
    "mlp.down": 1.0,
}
ROOT_KEY = "weight_prefetch_config"
# Native reads 0 as "whole weight"; this is the smallest ratio that still means "a tiny part".
NATIVE_OFF_RATIO = 1e-4


def module_of(knob: str) -> str:
    return knob.split(".", 1)[0]


@dataclass(frozen=True)
class PrefetchConfig:
    """A resolved prefetch config: `ratios` always holds all five knobs (0 = off)."""

    enabled: bool
    ratios: tuple[tuple[str, float], ...]

    def __post_init__(self) -> None:
        # Disabled means nothing is prefetched, whatever the ratios; normalise them so that
        # equal meanings compare equal and round-trip through `{"enabled": false}`.
        if not self.enabled and any(v != 0.0 for _, v in self.ratios):
            object.__setattr__(self, "ratios", tuple((k, 0.0) for k, _ in self.ratios))

    @classmethod
    def make(
        cls, enabled: bool = True, ratios: Mapping[str, float] | None = None
    ) -> PrefetchConfig:
        """Build from a partial knob->ratio map: unnamed modules take defaults, as in parsing."""
        given = dict(ratios or {})
        for knob, value in given.items():
            _check_knob(knob, f"{ROOT_KEY}.prefetch_ratio")
            _check_ratio(value, f"{ROOT_KEY}.prefetch_ratio.{knob}")
        named_modules = {module_of(k) for k in given}
        resolved = {
            knob: float(given.get(knob, 0.0))
            if module_of(knob) in named_modules
            else DEFAULT_RATIOS[knob]
            for knob in KNOBS
        }
        return cls(enabled=enabled, ratios=tuple((k, resolved[k]) for k in KNOBS))

    @classmethod
    def off(cls) -> PrefetchConfig:
        return cls(enabled=False, ratios=tuple((k, 0.0) for k in KNOBS))

    @classmethod
    def default(cls) -> PrefetchConfig:
        """vLLM-Ascend's documented defaults (`{"enabled": true}`)."""
        return cls.make(enabled=True)

    def ratio(self, knob: str) -> float:
        return dict(self.ratios)[knob]

    def active_ratio(self, knob: str) -> float:
        """The ratio in effect: 0 when the whole config is disabled."""
        return self.ratio(knob) if self.enabled else 0.0

    def with_ratios(self, updates: Mapping[str, float]) -> PrefetchConfig:
        """Set knobs one by one (other knobs keep their value); enables the config."""
        current = dict(self.ratios)
        for knob, value in updates.items():
            _check_knob(knob, "--set")
            _check_ratio(value, f"{ROOT_KEY}.prefetch_ratio.{knob}")
            current[knob] = float(value)
        return PrefetchConfig(enabled=True, ratios=tuple((k, current[k]) for k in KNOBS))

    def to_json_obj(self) -> dict[str, Any]:
        """Canonical object: every knob explicit, so no reader has to guess a default."""
        if not self.enabled:
            return {"enabled": False}
        ratios: dict[str, dict[str, float]] = {}
        for knob, value in self.ratios:
            module, name = knob.split(".")
            ratios.setdefault(module, {})[name] = value
        return {"enabled": True, "prefetch_ratio": ratios}

    def canonical_json(self) -> str:
        return canonical_dumps(self.to_json_obj())

    def label(self) -> str:
        """Short human form, e.g. `mlp.gate_up=0.3 mlp.down=0.5` or `off`."""
        if not self.enabled:
            return "off"
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.ratios)


def canonical_dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def _unknown(path: str, key: str, known: Iterable[str]) -> ConfigError:
    known = list(known)
    hint = _suggest(key, known) or f" (known: {', '.join(known)})"
    return ConfigError(f"{path}.{key}: unknown key{hint}")


def _check_knob(knob: str, where: str) -> None:
    if knob not in KNOBS:
        raise ConfigError(
            f"{where}: unknown knob {knob!r}{_suggest(knob, KNOBS) or ''}"
            f" (knobs: {', '.join(KNOBS)})"
        )


def _check_ratio(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}: {json.dumps(value)} is not a number")
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{path}: {value} is outside [0, 1]")
    return float(value)


def parse_weight_prefetch_config(obj: object, path: str = ROOT_KEY) -> PrefetchConfig:
    """Strictly parse a `weight_prefetch_config` object (already JSON-decoded)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected an object, got {json.dumps(obj)}")
    for key in obj:
        if key not in ("enabled", "prefetch_ratio"):
            raise _unknown(path, key, ("enabled", "prefetch_ratio"))
    enabled = obj.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}.enabled: {json.dumps(enabled)} is not true or false")
    ratio_obj = obj.get("prefetch_ratio", {})
    if not isinstance(ratio_obj, dict):
        raise ConfigError(f"{path}.prefetch_ratio: expected an object, got {json.dumps(ratio_obj)}")
    given: dict[str, float] = {}
    for module, knobs in ratio_obj.items():
        if module not in MODULE_KNOBS:
            raise _unknown(f"{path}.prefetch_ratio", module, MODULE_KNOBS)
        mpath = f"{path}.prefetch_ratio.{module}"
        if not isinstance(knobs, dict):
            raise ConfigError(f"{mpath}: expected an object, got {json.dumps(knobs)}")
        for name, value in knobs.items():
            if name not in MODULE_KNOBS[module]:
                raise _unknown(mpath, name, MODULE_KNOBS[module])
            given[f"{module}.{name}"] = _check_ratio(value, f"{mpath}.{name}")
        if not knobs:
            # An empty module object means "defaults" to vLLM-Ascend; keep that meaning.
            given.update({k: DEFAULT_RATIOS[k] for k in KNOBS if module_of(k) == module})
    if not enabled:
        return PrefetchConfig.off()
    return PrefetchConfig.make(enabled=True, ratios=given)


def load_json_object(text: str, what: str) -> dict[str, Any]:
    """Decode JSON text that must be an object; errors name `what` (a flag or path)."""
    try:
        obj = json_loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{what}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except ValueError as exc:  # NaN / Infinity literals
        raise ConfigError(f"{what}: {exc}") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _check_root_keys(additional: Mapping[str, Any]) -> None:
    for key in additional:
        if key != ROOT_KEY and difflib.get_close_matches(key, [ROOT_KEY], n=1, cutoff=0.8):
            raise ConfigError(
                f"{key}: unknown key, did you mean {ROOT_KEY!r}? "
                "(vLLM-Ascend would silently ignore it)"
            )


def parse_additional_config(text: str, what: str = "--additional-config") -> PrefetchConfig:
    """Parse a whole `--additional-config` JSON; a missing prefetch key means off."""
    obj = load_json_object(text, what)
    _check_root_keys(obj)
    if ROOT_KEY not in obj:
        return PrefetchConfig.off()
    return parse_weight_prefetch_config(obj[ROOT_KEY])


def parse_config_json(text: str, what: str = "--config-json") -> PrefetchConfig:
    """Accept either a whole `--additional-config` or a bare `weight_prefetch_config` object."""
    obj = load_json_object(text, what)
    if ROOT_KEY in obj:
        _check_root_keys(obj)
        return parse_weight_prefetch_config(obj[ROOT_KEY])
    return parse_weight_prefetch_config(obj)


def parse_set_options(items: Iterable[str]) -> dict[str, float]:
    """Parse repeated `--set KNOB=RATIO` flags."""
    out: dict[str, float] = {}
    for item in items:
        knob, sep, raw = item.partition("=")
        knob = knob.strip()
        if not sep:
            raise ConfigError(f"--set {item}: expected KNOB=RATIO, e.g. mlp.down=0.5")
        _check_knob(knob, f"--set {item}")
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"--set {item}: {raw!r} is not a number") from None
        out[knob] = _check_ratio(value, f"--set {knob}")
    return out


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Recursively merge `overlay` into a copy of `base`; keys only in `base` survive."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class Emission:
    """What to hand to vLLM: the full `--additional-config` object plus translation notes."""

    additional_config: dict[str, Any]
    notes: tuple[str, ...]

    @property
    def json(self) -> str:
        return canonical_dumps(self.additional_config)

    @property
    def flag(self) -> str:
        return f"--additional-config {shlex.quote(self.json)}"


def native_translation(config: PrefetchConfig) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The `weight_prefetch_config` object that makes native v0.11-v0.23 do what `config` says."""
    obj = config.to_json_obj()
    if not config.enabled:
        return obj, ()
    notes: list[str] = []
    ratios: dict[str, dict[str, float]] = obj["prefetch_ratio"]
    for module, knobs in ratios.items():
        if not any(knobs.values()):
            continue  # all zeros: native turns the whole module off, which is what we mean
        for name, value in knobs.items():
            if value == 0.0:
                knobs[name] = NATIVE_OFF_RATIO
                notes.append(
                    f"{module}.{name}: native vLLM-Ascend reads 0 as the whole weight while "
                    f"{module} is on; emitted {NATIVE_OFF_RATIO} (the smallest prefetch) instead"
                )
    return obj, tuple(notes)


def emit(
    config: PrefetchConfig,
    semantics: Semantics = "plugin",
    merge_into: str | None = None,
) -> Emission:
    """Deep-merge `config` into an existing `--additional-config` JSON for the given runtime."""
    base: dict[str, Any] = {}
    if merge_into is not None and merge_into.strip():
        base = load_json_object(merge_into, "--merge-into")
        _check_root_keys(base)
        if ROOT_KEY in base:
            parse_weight_prefetch_config(base[ROOT_KEY], f"--merge-into {ROOT_KEY}")
    if semantics == "native-0.23":
        obj, notes = native_translation(config)
    else:
        obj, notes = config.to_json_obj(), ()
    # The candidate is complete, so it replaces the user's prefetch object rather than mixing.
    merged = deep_merge({k: v for k, v in base.items() if k != ROOT_KEY}, {ROOT_KEY: obj})
    return Emission(additional_config=merged, notes=notes)
