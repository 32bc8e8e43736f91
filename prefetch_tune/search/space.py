"""The search space, cut from the runtime plan: live knobs only, each up to where it goes flat.

Beyond a knob's flat-above ratio the cap makes every ratio prefetch the same bytes, and a dead
knob prefetches nothing, so neither is worth a trial. Candidates are identified by a canonical
key: the bytes each knob effectively prefetches per layer, rounded to `KEY_GRANULARITY`, so the
same effective config is never paid for twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.models import MiB
from prefetch_tune.prefetch import DEFAULT_RATIOS, KNOBS, PrefetchConfig
from prefetch_tune.runtime.plan import flat_above, live_knobs, plan_layer

# 256 KiB of prefetch is ~0.25 us of fill at 1 TB/s: below what a benchmark can resolve.
KEY_GRANULARITY = 256 * 1024

# Each knob's sampling range starts at -OFF_ZONE x its bound; anything <= 0 means "this knob off".
# A prefetch too small to pay for its issue and sync costs is worse than none (docs/design.md
# section 3, property 3), so optima often have some knobs exactly off (Qwen3-32B TP4 at max-num-seqs 8:
# mlp.gate_up alone). A continuous [0, bound] range almost never samples an exact 0.
OFF_ZONE = 0.75
# ... and ends at (1 + FLAT_ZONE) x its bound; anything above the bound is the bound (the cap, or
# the whole weight), where optima often sit too (mlp.gate_up at its 18 MiB cap), and which a
# continuous range would almost never hit either. Both zones only reshape the sampling density.
FLAT_ZONE = 0.25


@dataclass(frozen=True)
class SearchSpace:
    """Live knobs and their upper ratio bounds for one operating point."""

    point: OperatingPoint
    knobs: tuple[str, ...]
    upper: tuple[tuple[str, float], ...]

    def bound(self, knob: str) -> float:
        return dict(self.upper)[knob]

    def low(self, knob: str) -> float:
        """Lower end of a knob's sampling range; the part below 0 is the knob's off zone."""
        return -OFF_ZONE * self.bound(knob)

    def high(self, knob: str) -> float:
        """Upper end of a knob's sampling range; the part above the bound is its flat zone."""
        return (1.0 + FLAT_ZONE) * self.bound(knob)

    def ratio(self, knob: str, param: float) -> float:
        """A sampled param as a ratio: the off zone is 0, the flat zone is the bound."""
        return min(max(0.0, float(param)), self.bound(knob))

    def config(self, params: Mapping[str, float]) -> PrefetchConfig:
        """The config a trial's params describe; dead knobs off; all knobs off means off."""
        ratios = {k: self.ratio(k, params.get(k, 0.0)) if k in self.knobs else 0.0 for k in KNOBS}
        if not any(ratios.values()):
            return PrefetchConfig.off()
        return PrefetchConfig(enabled=True, ratios=tuple((k, ratios[k]) for k in KNOBS))

    def params(self, config: PrefetchConfig) -> dict[str, float]:
        """Trial params for a config (clipped into the space: equal effective bytes)."""
        return {k: min(config.active_ratio(k), self.bound(k)) for k in self.knobs}

    def effective_bytes(self, config: PrefetchConfig) -> dict[str, int]:
        """Per knob, the bytes per layer it prefetches whenever it fires."""
        p = self.point
        return plan_layer(p.model, p.layout, config, None, p.semantics, p.options).effective_bytes()

    def effective_mib(self, config: PrefetchConfig) -> dict[str, float]:
        return {k: v / MiB for k, v in self.effective_bytes(config).items() if k in self.knobs}

    def key(self, config: PrefetchConfig) -> str:
        """Canonical identity: effective bytes per live knob in units of KEY_GRANULARITY."""
        eff = self.effective_bytes(config)
        units = [round(eff[k] / KEY_GRANULARITY) for k in self.knobs]
        if not any(units):
            return "off"
        return ",".join(f"{k}={u}" for k, u in zip(self.knobs, units, strict=True))

    def total_bytes(self, config: PrefetchConfig) -> int:
        return sum(self.effective_bytes(config)[k] for k in self.knobs)

    def default_params(self) -> dict[str, float]:
        return self.params(PrefetchConfig.make(True, {}))

    def off_params(self) -> dict[str, float]:
        return dict.fromkeys(self.knobs, 0.0)


def build_space(point: OperatingPoint) -> SearchSpace:
    knobs = live_knobs(point.model, point.semantics, point.options)
    flat = flat_above(point.model, point.layout, point.semantics, point.options)
    upper = tuple((k, 1.0 if (f := flat[k]) is None else round(f, 6)) for k in knobs)
    return SearchSpace(point=point, knobs=knobs, upper=upper)


__all__ = [
    "DEFAULT_RATIOS",
    "FLAT_ZONE",
    "KEY_GRANULARITY",
    "OFF_ZONE",
    "SearchSpace",
    "build_space",
]
