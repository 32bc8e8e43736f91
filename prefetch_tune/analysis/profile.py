"""Analyse a torch_npu profile: read the export, pair prefetches with the plan, judge each knob.

The steps live in their own modules: `exports` (reading), `pairing` (plan ops and matching),
`verdicts` (statistics and the guide's rule), `calibration` (fitting a hardware profile).
"""

from __future__ import annotations

import statistics
import time
from array import array
from dataclasses import dataclass
from typing import Any

from prefetch_tune.analysis.exports import ProfileData
from prefetch_tune.analysis.pairing import (
    ROLE_BITS,
    Instance,
    PlanChoice,
    label_layers,
    match_device,
)
from prefetch_tune.analysis.verdicts import KnobReport, Rules, knob_reports, no_prefetch_causes
from prefetch_tune.models import MiB
from prefetch_tune.runtime import plan as P


@dataclass
class ProfileReport:
    """The whole analysis: per-knob reports, the matched prefetches and what went unmatched."""

    data: ProfileData
    plan: PlanChoice | None
    rules: Rules
    instances: list[Instance]
    knobs: list[KnobReport]
    unassigned: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    notes: list[str]
    no_prefetch_causes: list[str]
    analyse_seconds: float
    roles: dict[str, array[int]]  # per device: plan-op role masks of its compute ops

    @property
    def found_prefetch(self) -> bool:
        return self.data.prefetch_tasks > 0

    def to_dict(self) -> dict[str, Any]:
        pl = self.plan
        return {
            "path": str(self.data.path),
            "sources": [str(s) for s in self.data.sources],
            "format": self.data.fmt,
            "simulated": self.data.simulated,
            "plan": None
            if pl is None
            else {
                "model": pl.plan.model.name,
                "quant": pl.plan.model.quant,
                "layout": {
                    "tp": pl.plan.layout.tp,
                    "dp": pl.plan.layout.dp,
                    "ep": pl.plan.layout.ep,
                },
                "semantics": pl.plan.semantics,
                "tokens": pl.plan.tokens,
                "sequence_parallel": pl.plan.options.sequence_parallel,
                "config": pl.plan.config.to_json_obj(),
                "provenance": pl.provenance,
            },
            "rules": self.rules.__dict__,
            "devices": self.devices,
            "events_read": self.data.events_read,
            "tasks_kept": self.data.tasks_kept,
            "prefetch_tasks": self.data.prefetch_tasks,
            "matched": len(self.instances),
            "unassigned": self.unassigned[:20],
            "unassigned_count": len(self.unassigned),
            "knobs": [k.to_dict() for k in self.knobs],
            "prefetch_found": self.found_prefetch,
            "no_prefetch_causes": self.no_prefetch_causes,
            "notes": self.notes,
            "seconds": {
                "read": round(self.data.read_seconds, 3),
                "analyse": round(self.analyse_seconds, 3),
            },
        }


def analyse(
    data: ProfileData, plan: PlanChoice | None, rules: Rules | None = None
) -> ProfileReport:
    """Match every prefetch to the plan and the compute stream; statistics and verdicts."""
    t0 = time.perf_counter()
    rules = rules or Rules()
    instances: list[Instance] = []
    unassigned: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    notes: list[str] = []
    sites: dict[int, P.PrefetchOp] = {}
    roles_by_device: dict[str, array[int]] = {}
    if plan is not None:
        for op in sorted(plan.plan.ops, key=lambda o: not o.fires):
            sites.setdefault(ROLE_BITS[op.start_before], op)
    for dev in data.devices:
        roles, layers = label_layers(dev.cat)
        roles_by_device[dev.name] = roles
        n_layers = max(layers) + 1 if len(layers) else 0
        devices.append(
            {
                "device": dev.name,
                "compute_stream": dev.compute_stream,
                "streams": dev.streams,
                "kernels": len(dev.start),
                "prefetch_tasks": len(dev.cmos),
                "prefetch_on_compute_stream": dev.inline_cmos,
                "layers_seen": n_layers,
            }
        )
        if dev.inline_cmos:
            notes.append(
                f"{dev.name}: {dev.inline_cmos} prefetch task(s) on the compute stream itself "
                "(not overlapped with anything; not analysed)"
            )
        if plan is None:
            continue
        instances.extend(match_device(dev, roles, layers, sites, rules.lead_us, unassigned))
    knobs = knob_reports(instances, plan, rules)
    if plan is not None:
        notes.extend(_plan_mismatch_notes(plan, knobs, instances))
    if unassigned:
        notes.append(
            f"{len(unassigned)} prefetch task(s) could not be tied to a plan op (started at an op "
            "no knob starts at, or outside a recognisable decoder layer)"
        )
    causes = [] if data.prefetch_tasks else no_prefetch_causes(data, plan)
    return ProfileReport(
        data=data,
        plan=plan,
        rules=rules,
        instances=instances,
        knobs=knobs,
        unassigned=unassigned,
        devices=devices,
        notes=notes,
        no_prefetch_causes=causes,
        analyse_seconds=time.perf_counter() - t0,
        roles=roles_by_device,
    )


def _plan_mismatch_notes(
    plan: PlanChoice, knobs: list[KnobReport], instances: list[Instance]
) -> list[str]:
    """Where the profile disagrees with the plan: CMO sizes, or knobs firing that should not."""
    notes: list[str] = []
    seen = {(k.knob, k.weight) for k in knobs}
    for k in knobs:
        measured = [
            i.nbytes
            for i in instances
            if (i.knob, i.weight) == (k.knob, k.weight)
            and i.bytes_source == "size(B)"
            and i.nbytes is not None
        ]
        if k.plan_fires and k.plan_bytes and measured:
            med = statistics.median(measured)
            if abs(med - k.plan_bytes) > 0.01 * k.plan_bytes:
                notes.append(
                    f"{k.knob} ({k.weight}): the profile's CMO size is {med / MiB:.2f} MiB, "
                    f"the plan's {k.plan_bytes / MiB:.2f} MiB: check --tp/--dp/--ep, --quant, "
                    "--cap-mib and the config"
                )
    for op in plan.plan.ops:
        if not op.fires and (op.knob, op.weight) in seen:
            notes.append(
                f"the plan says {op.knob} ({op.weight}) does not fire ({op.reason}), yet the "
                "profile shows it: check --tokens/--max-num-seqs, --semantics, "
                "--sequence-parallel and the config"
            )
    return notes
