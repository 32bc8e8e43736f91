"""Readiness per knob: for a model on a vLLM-Ascend line, which knobs the plugin can run.

A knob is ready when the plan does not mark it dead for the model on that line and every hook
point serving it resolved in the release's sources; otherwise the reason says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefetch_tune.models import Layout, ModelSpec
from prefetch_tune.prefetch import KNOBS
from prefetch_tune.runtime.plan import PlanOptions, dead_knobs
from prefetch_tune.runtime.static_check import ArchiveCheck


@dataclass(frozen=True)
class KnobReadiness:
    knob: str
    ready: bool
    dead: bool
    reason: str


def knob_readiness(model: ModelSpec, layout: Layout, result: ArchiveCheck) -> list[KnobReadiness]:
    """One entry per knob: ready, dead (with the plan's reason) or not ready (missing hooks)."""
    model.check_layout(layout)
    dead = dead_knobs(model, "plugin", PlanOptions(line=result.line.name))
    by_hook = {c.hook: c for c in result.checks}
    out: list[KnobReadiness] = []
    for knob in KNOBS:
        if knob in dead:
            out.append(KnobReadiness(knob, False, True, dead[knob]))
            continue
        serving = [h for h in result.line.hooks if knob in h.knobs]
        broken = [
            f"{h.target}: {by_hook[h.name].detail}" for h in serving if not by_hook[h.name].ok
        ]
        if not serving:
            out.append(KnobReadiness(knob, False, False, "no hook point serves it on this line"))
        elif broken:
            out.append(KnobReadiness(knob, False, False, "; ".join(broken)))
        else:
            out.append(KnobReadiness(knob, True, False, ""))
    return out


__all__ = ["KnobReadiness", "knob_readiness"]
