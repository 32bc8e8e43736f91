"""Per-knob statistics of the paired prefetches and the guide's verdict for each knob.

Per knob: counts, medians and p90s, and a verdict (raise / keep / lower / off) following the
feature guide: the CMO should overlap the vector op it hides behind and end no later than it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prefetch_tune.analysis.exports import ProfileData
from prefetch_tune.analysis.pairing import Instance, PlanChoice
from prefetch_tune.models import MiB
from prefetch_tune.runtime import plan as P

KnobVerdict = Literal["raise", "keep", "lower", "off"]


@dataclass(frozen=True)
class Rules:
    """Thresholds of the verdict (the guide's rule made numeric)."""

    late_tol_us: float = 0.5  # a CMO ending up to this long after its vector op is not late
    min_useful_bytes: float = 1024 * 1024  # a prefetch smaller than this cannot pay its sync
    slack_frac: float = 0.2  # ending this share of the vector op early or more is slack
    late_share: float = 0.5  # late in more than this share of instances -> lower / off
    borderline_share: float = 0.1  # late in more than this share -> no raise
    hidden_frac: float = 0.9  # overlap fraction needed to call a CMO hidden
    lead_us: float = 1.0  # a CMO may start this long before the op it belongs to


@dataclass
class KnobReport:
    """Statistics and the verdict of one knob (one plan site) across devices and steps."""

    knob: str
    weight: str
    count: int
    overlap_median: float
    overlap_p90: float
    hidden_median_us: float
    late_count: int
    late_share: float
    late_median_us: float  # over all instances (negative: ends before the vector op)
    late_p90_us: float
    late_when_late_median_us: float  # over the late ones only (0 when none)
    stall_median_us: float | None
    stall_p90_us: float | None
    stall_source: str
    cmo_median_us: float
    vector_op: str
    vector_median_us: float
    consumer: str | None
    consumer_margin_median_us: float | None
    bytes_median: float | None
    bytes_source: str
    bandwidth_median: float | None  # B/s
    verdict: KnobVerdict
    reason: str
    ratio_hint: float | None
    plan_ratio: float | None
    plan_bytes: int | None
    plan_fires: bool | None
    plan_reason: str
    devices: int

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = round(v, 4) if isinstance(v, float) else v
        out["bandwidth_gbps"] = (
            round(self.bandwidth_median / 1e9, 3) if self.bandwidth_median else None
        )
        return out


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def knob_reports(
    instances: list[Instance], plan: PlanChoice | None, rules: Rules
) -> list[KnobReport]:
    """One report per knob (in the plan's op order), its statistics and verdict."""
    groups: dict[tuple[str, str], list[Instance]] = {}
    for inst in instances:
        groups.setdefault((inst.knob, inst.weight), []).append(inst)
    order = [(o.knob, o.weight) for o in plan.plan.ops] if plan else []
    out: list[KnobReport] = []
    for key in sorted(groups, key=lambda k: order.index(k) if k in order else len(order)):
        g = groups[key]
        op = next((o for o in plan.plan.ops if (o.knob, o.weight) == key), None) if plan else None
        overlaps = [i.overlap_frac for i in g]
        late = [i.late_us for i in g]
        late_ones = [x for x in late if x > rules.late_tol_us]
        stalls = [i.stall_us for i in g if i.stall_us is not None]
        margins = [i.consumer_margin_us for i in g if i.consumer_margin_us is not None]
        nbytes = [float(i.nbytes) for i in g if i.nbytes is not None]
        bws = [b for i in g if (b := i.bandwidth) is not None]
        sources = sorted({i.stall_source for i in g if i.stall_source})
        vec_names = sorted({i.vector_op for i in g})
        consumers = sorted({i.consumer for i in g if i.consumer})
        rep = KnobReport(
            knob=key[0],
            weight=key[1],
            count=len(g),
            overlap_median=_median(overlaps),
            overlap_p90=percentile(overlaps, 0.9),
            hidden_median_us=_median([i.overlap_us for i in g]),
            late_count=len(late_ones),
            late_share=len(late_ones) / len(g),
            late_median_us=_median(late),
            late_p90_us=percentile(late, 0.9),
            late_when_late_median_us=_median(late_ones) if late_ones else 0.0,
            stall_median_us=_median(stalls) if stalls else None,
            stall_p90_us=percentile(stalls, 0.9) if stalls else None,
            stall_source="+".join(sources),
            cmo_median_us=_median([i.cmo_dur for i in g]),
            vector_op=", ".join(vec_names[:3]) + (" ..." if len(vec_names) > 3 else ""),
            vector_median_us=_median([i.vector_dur for i in g]),
            consumer=", ".join(consumers[:3]) if consumers else None,
            consumer_margin_median_us=_median(margins) if margins else None,
            bytes_median=_median(nbytes) if nbytes else None,
            bytes_source="+".join(sorted({i.bytes_source for i in g if i.bytes_source})),
            bandwidth_median=_median(bws) if bws else None,
            verdict="keep",
            reason="",
            ratio_hint=None,
            plan_ratio=op.ratio if op else None,
            plan_bytes=op.bytes if op else None,
            plan_fires=op.fires if op else None,
            plan_reason=op.reason if op else "",
            devices=len({i.device for i in g}),
        )
        rep.verdict, rep.reason, rep.ratio_hint = knob_verdict(rep, op, rules)
        out.append(rep)
    return out


def knob_verdict(
    k: KnobReport, op: P.PrefetchOp | None, rules: Rules
) -> tuple[KnobVerdict, str, float | None]:
    """raise / keep / lower / off for one knob, the reason in one line, and a ratio to try.

    Longer than 80 lines on purpose: one ordered list of rules, the first that matches wins;
    split up, the order (which is the rule) would be spread over several functions.

    The guide: the CMO should overlap the vector op it hides behind and end no later than it.
    Fully hidden with slack -> raise; hidden and ending near the op's end -> keep; late ->
    lower; late by more than the part it hides, or a join stall larger than that -> off.
    """
    vec = k.vector_op.split(",")[0]
    hidden = k.hidden_median_us
    stall = k.stall_median_us or 0.0
    pct = f"{100 * k.late_share:.0f}% of {k.count}"
    current = None
    if op is not None and op.weight_bytes > 0 and k.bytes_median:
        current = min(1.0, k.bytes_median / op.weight_bytes)
    fit = k.vector_median_us / k.cmo_median_us if k.cmo_median_us > 0 else 0.0
    hint = round(min(1.0, current * fit), 3) if current is not None else None
    if (
        op is not None
        and op.join_after != op.start_before
        and k.late_share > rules.late_share
        and stall <= rules.late_tol_us
    ):
        return (
            "keep",
            f"runs {k.late_median_us:.1f} µs past {vec} but is joined only after "
            f"{op.join_after}: no stall",
            None,
        )
    if k.late_share > rules.late_share and hidden <= rules.late_tol_us:
        return (
            "off",
            f"hides nothing behind {vec} (overlap {k.overlap_median:.0%}); the compute stream "
            f"waits {stall:.1f} µs for it",
            0.0,
        )
    if k.late_share > rules.late_share:
        fits_bytes = hint * op.weight_bytes if hint is not None and op is not None else None
        if fits_bytes is not None and fits_bytes < rules.min_useful_bytes:
            return (
                "off",
                f"ends {k.late_median_us:.1f} µs after {vec} in {pct}; only "
                f"{fits_bytes / MiB:.2f} MiB fits behind it, too little to pay for its "
                "issue and sync",
                0.0,
            )
        return (
            "lower",
            f"ends {k.late_median_us:.1f} µs after {vec} ({k.vector_median_us:.1f} µs) in {pct}"
            + (
                f"; the {stall:.1f} µs join stall exceeds the {hidden:.1f} µs it hides"
                if stall > hidden
                else ""
            ),
            hint,
        )
    if stall > max(hidden, rules.late_tol_us):
        return (
            "off",
            f"{stall:.1f} µs join stall outweighs the {hidden:.1f} µs it hides",
            0.0,
        )
    if k.late_share > rules.borderline_share:
        return (
            "keep",
            f"borderline: late in {pct} (median ends {-k.late_median_us:.1f} µs before {vec})",
            None,
        )
    slack = -k.late_median_us
    if k.overlap_median >= rules.hidden_frac and slack >= rules.slack_frac * k.vector_median_us:
        why = f"hidden behind {vec} with {slack:.1f} µs slack ({100 * slack / k.vector_median_us:.0f}%)"
        if op is not None and op.capped:
            return "keep", f"{why}, but already at the {op.bytes / MiB:.0f} MiB cap", None
        if current is not None and current >= 0.999:
            return "keep", f"{why}, but already the whole weight", None
        return "raise", why, hint
    if k.overlap_median < rules.hidden_frac:
        return (
            "keep",
            f"ends in time but only {100 * k.overlap_median:.0f}% overlaps {vec} "
            "(starts before it)",
            None,
        )
    return "keep", f"hidden behind {vec}, ends {slack:.1f} µs before it", None


def no_prefetch_causes(data: ProfileData, plan: PlanChoice | None) -> list[str]:
    """Why a profile may show no prefetch task: the plan's reasons first, then the usual ones."""
    causes: list[str] = []
    if plan is not None:
        p = plan.plan
        for op in p.ops:
            if not op.fires:
                causes.append(f"{op.knob} ({op.weight}): {op.reason}")
        firing = p.firing
        if firing:
            causes.append(
                f"the plan says {len(firing)} prefetch(es) per layer should fire for "
                f"{p.model.name} at {p.tokens} tokens ({', '.join(o.knob for o in firing)}): "
                "check the config reached the server (--additional-config) and the tokens "
                "per forward of the profiled steps"
            )
    else:
        causes.append(
            "no model given: pass --model (and --tp/--dp/--ep, --max-num-seqs or --tokens, the "
            "config) to see which knobs the runtime plan fires"
        )
    causes.append(
        "weight_prefetch_config not enabled, or vLLM-Ascend >= v0.24.0rc1 (native prefetch "
        "removed; the key is silently ignored) without the prefetch-tune plugin"
    )
    causes.append(
        f"token thresholds: MLP prefetch only below {P.MLP_TOKEN_LIMIT} tokens per forward, MoE "
        f"only from {P.MOE_TOKEN_MIN}; "
        "attn prefetch only in static W8A8 linears"
    )
    if data.fmt == "kernel_details":
        causes.append(
            "kernel_details.csv lists compute kernels; CMO tasks may only appear in "
            "trace_view.json: profile again and point at the directory or trace_view.json"
        )
    return causes
