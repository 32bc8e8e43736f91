"""Calibration record of the sim's hardware fields against the five properties of docs/design.md §3.

Prints (SIMULATED numbers throughout):

1. each property's figures and status at the documented point with the profile as shipped;
2. per estimated field: its value, the range its mechanism allows (from the profile), and each
   property's margin with the field moved to the low and to the high end of that range, the
   other fields as shipped (the sensitivity). A margin > 0 means the property holds.

Margins (units in brackets):
  P1 [MiB/step]  optimum bytes at the documented point - the most at max-num-seqs 8/16, or,
                     when the higher point prefetches less, higher - documented (negative)
  P2 [pp]        min(default vs off - 1 %, 10 % - default vs off, default vs optimum + 2 %)
  P3 [pp]        - (the worst 64 KiB-per-knob prefetch vs off), over the live modules
  P4 [pp]        - |difference| between two configs of equal effective bytes (0 when it holds)
  P5 [pp]        min(-(defaults vs optimum at max-num-seqs 8) - 1 %, -(whole weights with the
                     cap raised to the largest weight vs the optimum at the documented point))

The optimum is a brute-force grid (--levels per live knob over [0, flat-above]; 6 as in
tests/test_sim.py). Run:

  python benchmarks/calibrate.py --case dense                  # qwen3-32b tp4 atlas-a2, 72
  python benchmarks/calibrate.py --case moe --semantics native-0.23
  python benchmarks/calibrate.py --case dense --quick          # only the shipped profile
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from dataclasses import dataclass

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.backends.sim import evaluate_point
from prefetch_tune.hardware import HardwareProfile, load_hardware
from prefetch_tune.models import Layout, ModelSpec, load_model
from prefetch_tune.prefetch import MODULE_KNOBS, PrefetchConfig, Semantics, module_of
from prefetch_tune.runtime.plan import PlanOptions, plan_layer
from prefetch_tune.search.space import build_space

OBJ = "output_throughput"
OFF, DEFAULT = PrefetchConfig.off(), PrefetchConfig.default()
TINY = 64 * 1024


@dataclass(frozen=True)
class Case:
    model: ModelSpec
    layout: Layout
    hardware: str
    doc: int
    low: tuple[int, ...]
    high: int


CASES = {
    "dense": Case(load_model("qwen3-32b"), Layout(tp=4), "atlas-a2", 72, (8, 16), 128),
    # 176: the largest multiple of 16 whose KV cache fits (192 x 5000 tokens does not).
    "moe": Case(
        load_model("qwen3-235b-a22b"), Layout(tp=4, dp=4, ep=True), "atlas-a3", 144, (8, 16), 176
    ),
}


def point(case: Case, n: int, semantics: Semantics, cap: int | None = None) -> OperatingPoint:
    options = PlanOptions(sequence_parallel=True, **({"cap_bytes": cap} if cap else {}))
    return OperatingPoint(
        case.model, case.layout, n, hardware=case.hardware, semantics=semantics, options=options
    )


def value(config: PrefetchConfig, p: OperatingPoint, hw: HardwareProfile) -> float:
    return evaluate_point(config, p, hw)[0][OBJ]


def optimum(p: OperatingPoint, hw: HardwareProfile, levels: int) -> tuple[float, float]:
    """(best output_throughput, its prefetched MiB per decode step) over a grid of live knobs."""
    space = build_space(p)
    grids = [[space.bound(k) * i / (levels - 1) for i in range(levels)] for k in space.knobs]
    best = (0.0, 0.0)
    for combo in itertools.product(*grids):
        m = evaluate_point(space.config(dict(zip(space.knobs, combo, strict=True))), p, hw)[0]
        if m[OBJ] > best[0]:
            best = (m[OBJ], m["sim_prefetch_mib_per_step"])
    return best


def tiny_configs(p: OperatingPoint) -> list[PrefetchConfig]:
    """Per live module, every live knob of it at 64 KiB (native reads a 0 sibling as 'all')."""
    space = build_space(p)
    sizes = {
        op.knob: op.weight_bytes
        for op in plan_layer(p.model, p.layout, DEFAULT, None, p.semantics, p.options).ops
    }
    out = []
    for module in sorted({module_of(k) for k in space.knobs}):
        knobs = [k for k in MODULE_KNOBS[module] if f"{module}.{k}" in space.knobs]
        out.append(OFF.with_ratios({f"{module}.{k}": TINY / sizes[f"{module}.{k}"] for k in knobs}))
    return out


def pct(a: float, b: float) -> float:
    return (a / b - 1) * 100


def properties(case: Case, sem: Semantics, hw: HardwareProfile, levels: int) -> dict[str, float]:
    """Each property's margin (> 0: holds) plus the figures behind it."""
    doc = point(case, case.doc, sem)
    best = {n: optimum(point(case, n, sem), hw, levels) for n in (*case.low, case.doc, case.high)}
    off, default = value(OFF, doc, hw), value(DEFAULT, doc, hw)
    d_off, d_opt = pct(default, off), pct(default, best[case.doc][0])
    rise = best[case.high][1] - best[case.doc][1]  # may be 0 ("not less")
    p1 = best[case.doc][1] - max(best[n][1] for n in case.low) if rise >= 0 else rise
    p3 = -max(pct(value(c, doc, hw), off) for c in tiny_configs(doc))
    space = build_space(doc)
    capped = [k for k in space.knobs if space.bound(k) < 1.0] or list(space.knobs)
    a = OFF.with_ratios(dict.fromkeys(capped, 1.0))
    b = OFF.with_ratios({k: space.bound(k) for k in capped})
    p4 = -abs(pct(value(a, doc, hw), value(b, doc, hw)))
    low8 = point(case, 8, sem)
    d8 = pct(value(DEFAULT, low8, hw), optimum(low8, hw, levels)[0])
    biggest = max(case.model.weight_bytes(case.layout).values())
    whole = OFF.with_ratios(dict.fromkeys(space.knobs, 1.0))
    raised = pct(value(whole, point(case, case.doc, sem, cap=biggest), hw), best[case.doc][0])
    return {
        "P1": p1,
        "P2": min(d_off - 1, 10 - d_off, d_opt + 2),
        "P3": p3,
        "P4": p4,
        "P5": min(-d8 - 1, -raised),
        "default_vs_off_pct": d_off,
        "default_vs_optimum_pct": d_opt,
        "optimum_vs_off_pct": pct(best[case.doc][0], off),
        "optimum_mib": best[case.doc][1],
        **{f"optimum_mib_at_{n}": best[n][1] for n in (*case.low, case.high)},
        "defaults_vs_optimum_at_8_pct": d8,
        "whole_weights_vs_optimum_pct": raised,
        "off_tpot_ms": evaluate_point(OFF, doc, hw)[0]["mean_tpot_ms"],
    }


PROPS = ("P1", "P2", "P3", "P4", "P5")


def holds(prop: str, margin: float) -> str:
    """P4 holds at margin 0 (identical), every other property needs a positive margin."""
    return "yes" if margin > 0 or (prop == "P4" and margin == 0) else "NO"


def estimated(hw: HardwareProfile, path: str) -> list[str]:
    """The fields calibration may move: kind estimated or fitted in the profile file."""
    import tomllib

    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    return [k for k, _, _ in hw.ranges if doc[k]["kind"] in ("estimated", "fitted")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="dense")
    ap.add_argument("--semantics", choices=["plugin", "native-0.23"], default="plugin")
    ap.add_argument("--levels", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="only the profile as shipped")
    args = ap.parse_args()
    case = CASES[args.case]
    base = load_hardware(case.hardware)
    t0 = time.perf_counter()
    shipped = properties(case, args.semantics, base, args.levels)
    print(
        f"SIMULATED: {case.model.name} {case.layout.label()} on {case.hardware}, documented "
        f"max-num-seqs {case.doc}, semantics {args.semantics} (sequence parallel on)"
    )
    print("as shipped: " + "  ".join(f"{k} {v:+.2f}" for k, v in shipped.items()))
    print("holds:      " + "  ".join(f"{p} {holds(p, shipped[p])}" for p in PROPS))
    if args.quick:
        print(f"({time.perf_counter() - t0:.1f} s)")
        return
    print("\nfield | value | allowed range | margin at low end: P1 P2 P3 P4 P5 | at high end")
    for key in estimated(base, base.source):
        low, high = base.allowed(key)
        cells = []
        for end in (low, high):
            m = properties(
                case, args.semantics, dataclasses.replace(base, **{key: end}), args.levels
            )
            cells.append(" ".join(f"{m[p]:+.2f}" for p in PROPS))
        rng = f"[{low:g}, {high:g}]"
        print(f"{key} | {getattr(base, key):g} | {rng} | {cells[0]} | {cells[1]}", flush=True)
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
