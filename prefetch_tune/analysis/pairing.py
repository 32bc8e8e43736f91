"""Pair each prefetch task of a profile with the runtime plan's op it belongs to.

* The compute stream is labelled with the runtime plan's op names (`runtime.plan` constants):
  attention kernels anchor each decoder layer; the matmul before attention is `qkv_proj`, the
  quantize / norm before it `qkv_quant` / `input_layernorm`, the first matmul after it `o_proj`,
  the next norm `post_attention_layernorm`, then either gating top-k and grouped matmuls (MoE)
  or gate_up, SwiGlu, down (dense). Fused ops (`AddRmsNormQuant`) carry both roles.
* Each prefetch is tied to the compute op it starts at (the op in progress when it starts),
  and that op's role picks the plan op whose `start_before` it is: that gives the knob, the
  vector op it hides behind, the consumer matmul and the join op. A `knob` argument in the
  trace (simulated traces carry one) is recorded but never used for the matching.
* Per prefetch: overlap = |CMO ∩ vector op| / CMO duration; late = CMO end - vector op end;
  stall = the compute stream's wait at the join (EVENT_WAIT tasks there, else the gap before
  the next kernel, bounded by how long the CMO ran past the join op); bandwidth = bytes
  (`size(B)`, else the plan's) / CMO duration.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prefetch_tune.analysis.exports import CmoTask, DeviceTimeline
from prefetch_tune.analysis.kernels import (
    ATTN,
    COMM,
    GATING,
    MATMUL,
    NORM,
    NORM_QUANT,
    QUANT,
    SWIGLU,
)
from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, ModelSpec, Quant, load_model
from prefetch_tune.prefetch import PrefetchConfig, Semantics, parse_weight_prefetch_config
from prefetch_tune.runtime import plan as P

# ---------------------------------------------------------------- the plan the profile ran


@dataclass(frozen=True)
class PlanChoice:
    """The runtime plan used to read the profile, and where each of its inputs came from."""

    plan: P.LayerPlan
    provenance: dict[str, str]


def choose_plan(
    other_data: Mapping[str, Any],
    *,
    model: str | None = None,
    quant: Quant | None = None,
    tp: int | None = None,
    dp: int | None = None,
    ep: bool | None = None,
    tokens: int | None = None,
    config: PrefetchConfig | None = None,
    semantics: Semantics | None = None,
    options: P.PlanOptions | None = None,
) -> PlanChoice | None:
    """The plan for the profile: explicit options first, then the trace's `otherData` (simulated
    traces carry model, semantics, tokens and config), then defaults. None without a model."""
    prov: dict[str, str] = {}

    def pick(name: str, given: Any, key: str, default: Any) -> Any:
        if given is not None:
            prov[name] = "options"
            return given
        if key in other_data and other_data[key] is not None:
            prov[name] = "trace otherData"
            return other_data[key]
        prov[name] = "default"
        return default

    model_ref = pick("model", model, "model", None)
    if model_ref is None:
        return None
    spec: ModelSpec = load_model(str(model_ref), quant)
    raw_layout = other_data.get("layout")
    lay: dict[str, Any] = raw_layout if isinstance(raw_layout, dict) else {}

    def from_layout(name: str, given: Any, default: Any) -> Any:
        if given is not None:
            prov[name] = "options"
            return given
        if name in lay:
            prov[name] = "trace otherData"
            return lay[name]
        prov[name] = "default"
        return default

    try:
        layout = Layout(
            tp=int(from_layout("tp", tp, 1)),
            dp=int(from_layout("dp", dp, 1)),
            ep=bool(from_layout("ep", ep, False)),
        )
        n_tokens = int(pick("tokens", tokens, "tokens_per_forward", 256))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trace otherData: bad layout or tokens_per_forward ({exc})") from None
    spec.check_layout(layout)
    if n_tokens <= 0:
        raise ConfigError(f"--tokens {n_tokens}: must be > 0")
    if config is None and isinstance(other_data.get("config"), dict):
        config = parse_weight_prefetch_config(other_data["config"], "trace otherData.config")
        prov["config"] = "trace otherData"
    elif config is None:
        config = PrefetchConfig.default()
        prov["config"] = "default (vLLM-Ascend's documented ratios)"
    else:
        prov["config"] = "options"
    sem = pick("semantics", semantics, "semantics", "plugin")
    if sem not in ("plugin", "native-0.23"):
        raise ConfigError(f"trace otherData.semantics {sem!r}: expected plugin or native-0.23")
    if options is None:
        sp = other_data.get("sequence_parallel")
        options = P.PlanOptions(sequence_parallel=bool(sp)) if sp is not None else P.PlanOptions()
    plan = P.plan_layer(spec, layout, config, n_tokens, sem, options)
    return PlanChoice(plan, prov)


# ---------------------------------------------------------------- labelling the compute stream

ROLE_BITS: dict[str, int] = {
    name: 1 << i
    for i, name in enumerate(
        (
            P.INPUT_NORM,
            P.QKV_QUANT,
            P.QKV_PROJ,
            P.QK_NORM_ROPE,
            P.ATTENTION,
            P.O_QUANT,
            P.O_PROJ,
            P.POST_NORM,
            P.GATE_UP_QUANT,
            P.GATE_UP_PROJ,
            P.SWIGLU,
            P.DOWN_QUANT,
            P.DOWN_PROJ,
            P.ROUTER,
            P.GATING,
            P.MOE_QUANT,
            P.W13_GMM,
            P.MOE_SWIGLU,
            P.W2_GMM,
        )
    )
}
DENSE_MATMULS = (P.QKV_PROJ, P.O_PROJ, P.GATE_UP_PROJ, P.DOWN_PROJ)


def roles_of(mask: int) -> list[str]:
    return [name for name, bit in ROLE_BITS.items() if mask & bit]


def label_layers(cat: Sequence[int]) -> tuple[array[int], array[int]]:
    """Plan op roles (bit masks over ROLE_BITS) and decoder-layer numbers for a compute stream.

    Attention kernels anchor each layer (a run of attention kernels with no matmul between them
    is one block); the ops around each anchor are named by position and category. Longer than
    80 lines on purpose: one walk over a layer in execution order, sharing the `mark` / `first`
    / `last_in` helpers over the same arrays; the order of the marks mirrors the layer.
    """
    n = len(cat)
    roles: array[int] = array("i", bytes(4 * n))
    layer: array[int] = array("i", [-1]) * n
    blocks: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if cat[i] != ATTN:
            i += 1
            continue
        last = k = i
        while k + 1 < n and cat[k + 1] != MATMUL:
            k += 1
            if cat[k] == ATTN:
                last = k
        blocks.append((i, last))
        i = last + 1

    def mark(idx: int | None, role: str, lay: int) -> None:
        if idx is not None:
            roles[idx] |= ROLE_BITS[role]
            layer[idx] = lay

    def first(lo: int, hi: int, cats: frozenset[int]) -> int | None:
        for j in range(lo, hi):
            if cat[j] in cats:
                return j
        return None

    def last_in(lo: int, hi: int, cats: frozenset[int]) -> int | None:
        for j in range(hi - 1, lo - 1, -1):
            if cat[j] in cats:
                return j
        return None

    mm = frozenset({MATMUL})
    quant = frozenset({QUANT})
    norms = frozenset({NORM, NORM_QUANT})
    for b, (a0, a1) in enumerate(blocks):
        lo = blocks[b - 1][1] + 1 if b else 0
        hi = blocks[b + 1][0] if b + 1 < len(blocks) else n
        for j in range(a0, a1 + 1):
            if cat[j] == ATTN:
                mark(j, P.ATTENTION, b)
        # Before attention: [input norm] [qkv quant] qkv_proj [qk norm / rope] attention.
        q = last_in(lo, a0, mm)
        if q is not None:
            mark(q, P.QKV_PROJ, b)
            mark(first(q + 1, a0, norms), P.QK_NORM_ROPE, b)
            got_quant = False
            for j in range(q - 1, lo - 1, -1):
                c = cat[j]
                if c in (MATMUL, COMM, ATTN, SWIGLU, GATING):
                    break
                if c == QUANT and not got_quant:
                    mark(j, P.QKV_QUANT, b)
                    got_quant = True
                elif c in norms:
                    mark(j, P.INPUT_NORM, b)
                    if c == NORM_QUANT and not got_quant:
                        mark(j, P.QKV_QUANT, b)
                    break
        # After attention: [o quant] o_proj [all-reduce] post norm, then MLP or MoE.
        o = first(a1 + 1, hi, mm)
        if o is None:
            continue
        mark(o, P.O_PROJ, b)
        mark(last_in(a1 + 1, o, quant), P.O_QUANT, b)
        p = first(o + 1, hi, norms)
        if p is None or first(o + 1, p, mm) is not None:
            continue
        mark(p, P.POST_NORM, b)
        gate = first(p + 1, hi, frozenset({GATING}))
        glu = first(p + 1, hi, frozenset({SWIGLU}))
        if gate is not None and (glu is None or gate < glu):
            mark(last_in(p + 1, gate, mm), P.ROUTER, b)
            mark(gate, P.GATING, b)
            w13 = first(gate + 1, hi, mm)
            if w13 is None:
                continue
            mark(w13, P.W13_GMM, b)
            mark(last_in(gate + 1, w13, quant), P.MOE_QUANT, b)
            sw = first(w13 + 1, hi, frozenset({SWIGLU}))
            if sw is not None:
                mark(sw, P.MOE_SWIGLU, b)
                mark(first(sw + 1, hi, mm), P.W2_GMM, b)
            continue
        gu = first(p + 1, hi, mm)
        if gu is None:
            continue
        mark(gu, P.GATE_UP_PROJ, b)
        gq = last_in(p + 1, gu, quant)
        if gq is None and cat[p] == NORM_QUANT:
            gq = p
        mark(gq, P.GATE_UP_QUANT, b)
        sw = first(gu + 1, hi, frozenset({SWIGLU}))
        if sw is None:
            continue
        mark(sw, P.SWIGLU, b)
        dn = first(sw + 1, hi, mm)
        if dn is not None:
            mark(dn, P.DOWN_PROJ, b)
            mark(last_in(sw + 1, dn, quant), P.DOWN_QUANT, b)
    return roles, layer


@dataclass(slots=True)
class Instance:
    """One prefetch matched to the compute stream (times in µs)."""

    device: str
    layer: int
    step: str | None
    knob: str
    weight: str
    cmo_start: float
    cmo_dur: float
    busy_dur: float  # from max(start, previous CMO's end on that stream) to its end
    nbytes: int | None
    bytes_source: str
    vector_op: str
    vector_role: str
    vector_start: float
    vector_dur: float
    overlap_us: float
    overlap_frac: float
    late_us: float
    consumer: str | None
    consumer_margin_us: float | None  # consumer start - CMO end (< 0: the matmul raced the fill)
    stall_us: float | None
    stall_source: str
    knob_arg: str | None

    @property
    def cmo_end(self) -> float:
        return self.cmo_start + self.cmo_dur

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second over the whole CMO duration."""
        if self.nbytes is None or self.cmo_dur <= 0:
            return None
        return self.nbytes / (self.cmo_dur * 1e-6)


def _find_forward(roles: array[int], start: int, bit: int, limit: int = 48) -> int | None:
    for j in range(start, min(len(roles), start + limit)):
        if roles[j] & bit:
            return j
    return None


def _site_for(
    dev: DeviceTimeline,
    roles: array[int],
    cmo: CmoTask,
    sites: dict[int, P.PrefetchOp],
    lead_us: float,
) -> tuple[int, P.PrefetchOp] | tuple[int, None]:
    """The compute op this CMO starts at and the plan op it belongs to."""
    n = len(dev.start)
    if n == 0:
        return -1, None
    i = bisect_right(dev.start, cmo.start + 1e-6) - 1
    s = i if i >= 0 and dev.end[i] > cmo.start else i + 1
    candidates: list[int] = []
    if 0 <= s < n:
        candidates.append(s)
    nxt = s + 1 if 0 <= s < n and dev.start[s] <= cmo.start else s
    if nxt not in candidates and 0 <= nxt < n and dev.start[nxt] - cmo.start <= lead_us:
        candidates.append(nxt)
    matmuls = 0
    for j in range(min(s, n) - 1, max(-1, s - 12), -1):  # a CMO that started late
        if dev.cat[j] == MATMUL:
            matmuls += 1
            if matmuls > 1:
                break
        candidates.append(j)
    for j in candidates:
        for bit, op in sites.items():
            if roles[j] & bit:
                return j, op
    return (s if 0 <= s < n else -1), None


def match_device(
    dev: DeviceTimeline,
    roles: array[int],
    layers: array[int],
    sites: dict[int, P.PrefetchOp],
    lead_us: float,
    unassigned: list[dict[str, Any]],
) -> list[Instance]:
    """The prefetches of one device tied to their plan op; the ones that tie to none go to
    `unassigned`. `lead_us`: how long a CMO may start before the op it belongs to."""
    out: list[Instance] = []
    busy_until: dict[int, float] = {}
    # prefetches joined after the same op: the compute stream waits for them in end order
    joins: dict[int, list[tuple[float, int]]] = {}
    pending: list[Instance] = []
    for cmo in dev.cmos:
        busy_start = max(cmo.start, busy_until.get(cmo.stream, -math.inf))
        busy_until[cmo.stream] = max(busy_until.get(cmo.stream, -math.inf), cmo.end)
        s, op = _site_for(dev, roles, cmo, sites, lead_us)
        if op is None:
            unassigned.append(
                {
                    "device": dev.name,
                    "start_us": round(cmo.start, 3),
                    "dur_us": round(cmo.dur, 3),
                    "name": cmo.name,
                    "started_at": dev.op_name(s) if s >= 0 else None,
                }
            )
            continue
        vs, ve = dev.start[s], dev.end[s]
        overlap = max(0.0, min(cmo.end, ve) - max(cmo.start, vs))
        consumer = _find_forward(roles, s, ROLE_BITS[op.consumer])
        if consumer is None:
            consumer = next((j for j in range(s + 1, len(dev.cat)) if dev.cat[j] == MATMUL), None)
        join = _find_forward(roles, s, ROLE_BITS[op.join_after])
        if join is None and consumer is not None and consumer > s:
            join = consumer - 1
        if cmo.size is not None:
            nbytes: int | None = cmo.size
            src = "size(B)"
        elif op.fires:
            nbytes, src = op.bytes, "plan"
        else:
            nbytes, src = None, ""
        inst = Instance(
            device=dev.name,
            layer=layers[s],
            step=cmo.step,
            knob=op.knob,
            weight=op.weight,
            cmo_start=cmo.start,
            cmo_dur=cmo.dur,
            busy_dur=max(0.0, cmo.end - busy_start),
            nbytes=nbytes,
            bytes_source=src,
            vector_op=dev.op_name(s),
            vector_role=op.start_before,
            vector_start=vs,
            vector_dur=ve - vs,
            overlap_us=overlap,
            overlap_frac=overlap / cmo.dur if cmo.dur > 0 else 1.0,
            late_us=cmo.end - ve,
            consumer=dev.op_name(consumer) if consumer is not None else None,
            consumer_margin_us=dev.start[consumer] - cmo.end if consumer is not None else None,
            stall_us=None,
            stall_source="",
            knob_arg=cmo.knob_arg,
        )
        out.append(inst)
        if join is not None:
            joins.setdefault(join, []).append((cmo.end, len(pending)))
            pending.append(inst)
    _assign_stalls(dev, joins, pending)
    return out


def _assign_stalls(
    dev: DeviceTimeline, joins: dict[int, list[tuple[float, int]]], pending: list[Instance]
) -> None:
    """Share the compute stream's wait after each join op among the prefetches joined there,
    in the order they end (EVENT_WAIT tasks there, else the gap before the next kernel)."""
    for j, group in joins.items():
        j_end = dev.end[j]
        nxt = bisect_right(dev.start, j_end - 1e-9)
        gap_end = dev.start[nxt] if nxt < len(dev.start) else math.inf
        w0 = bisect_right(dev.wait_start, j_end - 1e-6)
        w1 = bisect_right(dev.wait_start, gap_end)
        waits = sum(dev.wait_end[k] - dev.wait_start[k] for k in range(w0, w1))
        budget, source = (waits, "EVENT_WAIT") if w1 > w0 else (gap_end - j_end, "gap")
        done = j_end
        for end, k in sorted(group):
            stall = min(max(0.0, end - done), max(0.0, budget))
            budget -= stall
            done = max(done, end)
            inst = pending[k]
            inst.stall_us = stall
            inst.stall_source = source
