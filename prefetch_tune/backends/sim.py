"""The `sim` backend: a physical model of one vLLM-Ascend rank's decode steps with prefetch.

Per rank, one forward is a timeline of two streams per decoder layer: the compute stream
(norms, quantize, matmuls, attention reading the KV cache, collectives, SwiGlu, gating, grouped
matmuls over the experts the batch activates) and the prefetch stream (the runtime plan's
operations, each issued as its start op begins and joined after its join op). All decoder
layers of a model are alike, so one layer is laid out and multiplied.

Mechanisms (each has its parameter in the hardware profile; see configs/hardware/*.toml):

* Matmuls stream their weight through the MTE: `max(cube time, HBM bytes x (1 + mte_interference
  x u) / hbm_bw + L2 bytes / l2_bw)` plus a kernel overhead, where `u` is the cube-to-memory time
  ratio. HBM streaming slows as the cube gets busier (memory and cube work do not overlap
  perfectly near the ridge point), so an L2 hit saves more as the batch grows. L2 hits are the
  bytes the prefetch has filled before the matmul reaches them.
* A prefetch is an SDMA CMO task: an issue latency, then a fill at `prefetch_bw`. While it fills
  it takes `prefetch_contention x prefetch_bw` of HBM bandwidth from memory-bound compute ops,
  including the vector op it hides behind. At its join the compute stream waits for the fill
  (stall), and every prefetch costs the compute stream an event record + wait (`stream_sync_us`).
* A join placed after the consuming matmul (mlp.gate_up) lets the fill race the matmul: only the
  bytes filled ahead of the matmul's read pointer hit; the rest is wasted traffic.
* L2 holds `l2_bytes`: everything the compute stream streams between a fill's start and its
  consumer (the KV cache attention reads above all) goes through L2 too, and once that plus the
  fill exceeds L2 the oldest prefetched bytes are evicted before they are read.
* Attention reads the KV cache of the current context; prefill arrives as chunks that raise the
  tokens of some forwards (mixed steps), so the plan's < 500 / >= 96 thresholds bite where they
  do in vLLM.

Every number this backend reports is simulated and labelled so.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from prefetch_tune.backends.base import (
    COUNT_METRICS,
    LOWER_IS_BETTER,
    Metrics,
    OperatingPoint,
    Workload,
    register_backend,
)
from prefetch_tune.capacity import check_capacity
from prefetch_tune.hardware import HardwareProfile, load_hardware
from prefetch_tune.models import Layout, MiB, ModelSpec
from prefetch_tune.numbers import non_negative, number
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.runtime import plan as P

KV_BYTES = 2  # bf16 KV cache
ACT_BYTES = 2  # bf16 activations


@dataclass(frozen=True)
class ComputeOp:
    """One compute-stream kernel of a decoder layer, with its work split by resource."""

    name: str
    kind: str  # vector | matmul | attention | comm
    fixed_s: float  # kernel overhead or collective latency
    hbm_bytes: float = 0.0  # bytes it streams from HBM (a matmul: the weight bytes it reads)
    cube_s: float = 0.0  # cube time at the achievable throughput
    link_bytes: float = 0.0  # bytes over the interconnect
    weight: str = ""  # the prefetchable weight it consumes, if any


@dataclass
class Event:
    """A span of the modelled timeline (for traces and tests)."""

    name: str
    stream: str  # "compute" or "prefetch"
    start: float
    dur: float
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerResult:
    """One decoder layer's timeline and its byte accounting."""

    time_s: float
    stall_s: float
    hit_bytes: float
    hbm_weight_bytes: float
    prefetch_bytes: float
    wasted_bytes: float
    events: list[Event]


# ---------------------------------------------------------------- compute-op construction


def _vector(name: str, nbytes: float, hw: HardwareProfile) -> ComputeOp:
    return ComputeOp(name, "vector", hw.kernel_overhead_us * 1e-6, hbm_bytes=nbytes)


def _matmul(
    name: str,
    tokens: float,
    k: float,
    n: float,
    weight_bytes: float,
    int8: bool,
    hw: HardwareProfile,
    weight: str = "",
) -> ComputeOp:
    rate = hw.cube_int8_ops if int8 else hw.cube_bf16_flops
    return ComputeOp(
        name,
        "matmul",
        hw.kernel_overhead_us * 1e-6,
        hbm_bytes=weight_bytes,
        cube_s=2.0 * tokens * k * n / rate,
        weight=weight or name,
    )


def _allreduce(name: str, nbytes: float, ranks: int, hw: HardwareProfile) -> ComputeOp:
    wire = 2.0 * (ranks - 1) / ranks * nbytes
    return ComputeOp(name, "comm", hw.link_latency_us * 1e-6, link_bytes=wire)


def _alltoall(name: str, nbytes: float, ranks: int, hw: HardwareProfile) -> ComputeOp:
    wire = (ranks - 1) / ranks * nbytes
    return ComputeOp(name, "comm", hw.link_latency_us * 1e-6, link_bytes=wire)


def activated_experts(model: ModelSpec, layout: Layout, tokens: int) -> float:
    """Expected local experts a forward touches: tokens pick top-k of E uniformly at random."""
    group_tokens = tokens * (layout.dp if layout.ep else 1)
    p_hit = 1.0 - (1.0 - model.experts_per_token / model.experts) ** group_tokens
    return model.local_experts(layout) * p_hit


@lru_cache(maxsize=4096)
def compute_ops(
    model: ModelSpec,
    layout: Layout,
    hw: HardwareProfile,
    decode_tokens: int,
    context: int,
    prefill_tokens: int,
) -> tuple[ComputeOp, ...]:
    """The compute-stream kernels of one decoder layer for a forward with this token mix."""
    T = decode_tokens + prefill_tokens
    H = model.hidden
    w8 = model.quant == "w8a8"
    wb = model.weight_bytes(layout)
    q_width = model.heads_per_rank(layout) * model.head_dim
    kv_width = model.kv_heads_per_rank(layout) * model.head_dim
    tp = layout.tp
    ops: list[ComputeOp] = [_vector(P.INPUT_NORM, 3 * T * H * ACT_BYTES, hw)]
    if w8:
        ops.append(_vector(P.QKV_QUANT, T * H * (ACT_BYTES + 1), hw))
    ops.append(_matmul(P.QKV_PROJ, T, H, q_width + 2 * kv_width, wb["qkv_proj"], w8, hw))
    ops.append(_vector(P.QK_NORM_ROPE, 2 * T * (q_width + kv_width) * ACT_BYTES, hw))
    # Decode reads the whole KV cache of every sequence; a prefill chunk attends to itself.
    kv_read = decode_tokens * context * 2 * kv_width * KV_BYTES
    attn_flops = 4.0 * q_width * (decode_tokens * context + prefill_tokens * prefill_tokens / 2)
    ops.append(
        ComputeOp(
            P.ATTENTION,
            "attention",
            hw.kernel_overhead_us * 1e-6,
            hbm_bytes=kv_read,
            cube_s=attn_flops / hw.cube_bf16_flops,
        )
    )
    if w8:
        ops.append(_vector(P.O_QUANT, T * q_width * (ACT_BYTES + 1), hw))
    ops.append(_matmul(P.O_PROJ, T, q_width, H, wb["o_proj"], w8, hw))
    if tp > 1:
        ops.append(_allreduce(P.O_REDUCE, T * H * ACT_BYTES, tp, hw))
    ops.append(_vector(P.POST_NORM, 3 * T * H * ACT_BYTES, hw))
    if model.is_moe:
        ops.extend(_moe_ops(model, layout, hw, T, w8))
        return tuple(ops)
    inter = model.intermediate // tp
    if w8:
        ops.append(_vector(P.GATE_UP_QUANT, T * H * (ACT_BYTES + 1), hw))
    ops.append(_matmul(P.GATE_UP_PROJ, T, H, 2 * inter, wb["gate_up_proj"], w8, hw))
    ops.append(_vector(P.SWIGLU, 3 * T * inter * ACT_BYTES, hw))
    if w8:
        ops.append(_vector(P.DOWN_QUANT, T * inter * (ACT_BYTES + 1), hw))
    ops.append(_matmul(P.DOWN_PROJ, T, inter, H, wb["down_proj"], w8, hw))
    if tp > 1:
        ops.append(_allreduce(P.DOWN_REDUCE, T * H * ACT_BYTES, tp, hw))
    return tuple(ops)


def _moe_ops(
    model: ModelSpec, layout: Layout, hw: HardwareProfile, T: int, w8: bool
) -> list[ComputeOp]:
    H, E, k = model.hidden, model.experts, model.experts_per_token
    inter = model.expert_intermediate_per_rank(layout)
    ep = layout.ep_size
    routed = T * k * (layout.dp if layout.ep else 1) / ep  # token-expert pairs on this rank
    active = activated_experts(model, layout, T)
    b = model.bytes_per_weight
    ops = [
        _matmul(P.ROUTER, T, H, E, H * E * ACT_BYTES, False, hw, weight="router"),
        _vector(P.GATING, T * E * 4 * 2, hw),
    ]
    if layout.ep:
        ops.append(_alltoall(P.DISPATCH, T * k * H * ACT_BYTES, ep, hw))
    if w8:
        ops.append(_vector(P.MOE_QUANT, routed * H * (ACT_BYTES + 1), hw))
    ops.append(
        _matmul(
            P.W13_GMM,
            routed,
            H,
            2 * inter,
            active * 2 * inter * H * b,
            w8,
            hw,
            weight="experts.w13",
        )
    )
    ops.append(_vector(P.MOE_SWIGLU, 3 * routed * inter * ACT_BYTES, hw))
    ops.append(
        _matmul(P.W2_GMM, routed, inter, H, active * inter * H * b, w8, hw, weight="experts.w2")
    )
    if layout.ep:
        ops.append(_alltoall(P.COMBINE, T * k * H * ACT_BYTES, ep, hw))
    elif layout.tp > 1:
        ops.append(_allreduce(P.COMBINE, T * H * ACT_BYTES, layout.tp, hw))
    return ops


# ---------------------------------------------------------------- the two-stream timeline


@dataclass
class _Fill:
    op: P.PrefetchOp
    issue: float
    start: float
    end: float
    rate: float
    streamed_at_start: float  # compute-stream bytes through L2 before the fill began


def _memory_time(op: ComputeOp, hw: HardwareProfile, hit_bytes: float) -> float:
    """Time the op's variable (non-overhead) part needs with the full HBM bandwidth."""
    if op.kind == "vector":
        return op.hbm_bytes / hw.vector_bw
    if op.kind == "comm":
        return op.link_bytes / hw.link_bw
    if op.kind == "attention":
        return max(op.cube_s, op.hbm_bytes / hw.hbm_bw)
    hbm = max(0.0, op.hbm_bytes - hit_bytes)
    u = min(1.0, op.cube_s * hw.hbm_bw / op.hbm_bytes) if op.hbm_bytes else 1.0
    mte = hbm * (1.0 + hw.mte_interference * u) / hw.hbm_bw + hit_bytes / hw.l2_bw
    return max(op.cube_s, mte)


def _contended(start: float, work: float, slow: float, fills: list[_Fill]) -> float:
    """Duration of `work` seconds of memory-bound work begun at `start` while fills run.

    During a fill the op proceeds at (1 - slow) of its speed; fills never overlap each other
    (one prefetch stream), so walk them in order.
    """
    t, left = start, work
    for f in fills:
        if left <= 0 or f.end <= t:
            continue
        if f.start > t:  # free running until this fill begins
            step = min(left, f.start - t)
            t, left = t + step, left - step
            if left <= 0:
                break
        span = f.end - t
        can = span * (1.0 - slow)
        if can >= left:
            return t + left / (1.0 - slow) - start
        t, left = f.end, left - can
    return t + left - start


def simulate_layer(
    ops: tuple[ComputeOp, ...],
    layer_plan: P.LayerPlan,
    hw: HardwareProfile,
    offset: float = 0.0,
    with_events: bool = False,
) -> LayerResult:
    """Lay one decoder layer out on the compute and prefetch streams."""
    firing = layer_plan.firing
    starts: dict[str, list[P.PrefetchOp]] = {}
    joins: dict[str, list[P.PrefetchOp]] = {}
    for pop in firing:
        starts.setdefault(pop.start_before, []).append(pop)
        joins.setdefault(pop.join_after, []).append(pop)
    sync = hw.stream_sync_us * 1e-6
    slow = min(0.95, hw.prefetch_contention * hw.prefetch_bw / hw.hbm_bw)
    t = offset
    side_free = offset
    fills: list[_Fill] = []
    by_op: dict[int, _Fill] = {}
    events: list[Event] = []
    stall = hits_total = hbm_weight = streamed = 0.0
    for op in ops:
        for pop in starts.get(op.name, ()):
            t += sync / 2  # event record on the compute stream for the side stream to wait on
            start = max(t, side_free) + hw.cmo_issue_us * 1e-6
            end = start + pop.bytes / hw.prefetch_bw
            fill = _Fill(pop, t, start, end, hw.prefetch_bw, streamed)
            fills.append(fill)
            by_op[id(pop)] = fill
            side_free = end
            if with_events:
                events.append(
                    Event(
                        "CMO",
                        "prefetch",
                        t,
                        end - t,
                        {
                            "knob": pop.knob,
                            "weight": pop.weight,
                            "size(B)": pop.bytes,
                            "start_before": pop.start_before,
                            "join_after": pop.join_after,
                        },
                    )
                )
        hit = 0.0
        if op.kind == "matmul" and op.weight:
            hit = _hits(op, t, fills, hw, streamed)
            hits_total += hit
            hbm_weight += op.hbm_bytes - hit
        variable = _memory_time(op, hw, hit)
        memory_bound = op.kind != "comm"
        dur = op.fixed_s + (
            _contended(t + op.fixed_s, variable, slow, fills) if memory_bound else variable
        )
        if with_events:
            events.append(Event(op.name, "compute", t, dur, {"kind": op.kind, "l2_hit_bytes": hit}))
        t += dur
        streamed += op.hbm_bytes
        for pop in joins.get(op.name, ()):
            fill = by_op[id(pop)]
            waited = max(0.0, fill.end - t)
            stall += waited
            if with_events and waited > 0:
                events.append(Event("EVENT_WAIT", "compute", t, waited, {"knob": pop.knob}))
            t += waited + sync / 2
    prefetched = sum(f.op.bytes for f in fills)
    wasted = max(0.0, prefetched - hits_total)
    return LayerResult(t - offset, stall, hits_total, hbm_weight, prefetched, wasted, events)


def _hits(
    op: ComputeOp, t: float, fills: list[_Fill], hw: HardwareProfile, streamed: float
) -> float:
    """L2-hit bytes for a matmul starting at `t`: the largest prefix any fill has ready and
    L2 still holds (bytes streamed since the fill began evict the oldest prefetched ones)."""
    best = 0.0
    for f in fills:
        if f.op.weight != op.weight:
            continue
        size = float(f.op.bytes)
        if f.end <= t:
            ready = size
        elif f.start >= t:
            ready = 0.0
        else:
            # The fill keeps running ahead of the matmul's read pointer until it is caught.
            filled = (t - f.start) * f.rate
            ready = (
                min(size, filled * hw.l2_bw / (hw.l2_bw - f.rate)) if hw.l2_bw > f.rate else size
            )
        if op.weight == "experts.w13" and op.hbm_bytes > 0:
            ready *= op.hbm_bytes / max(op.hbm_bytes, f.op.weight_bytes)  # inactive experts
        evicted = max(0.0, streamed - f.streamed_at_start + size - hw.l2_bytes)
        best = max(best, ready - evicted)
    return min(best, op.hbm_bytes)


# ---------------------------------------------------------------- whole steps and metrics


@dataclass(frozen=True)
class StepMix:
    """How a steady-state serving run splits into decode-only and mixed (prefill) forwards."""

    batch: int  # sequences decoding per rank
    context: int  # mean context length of a decoding sequence
    chunk: int  # prefill tokens in a mixed forward
    mixed_fraction: float  # share of forwards that carry a prefill chunk


def step_mix(point: OperatingPoint) -> StepMix:
    w: Workload = point.workload
    per_rank = math.ceil(point.concurrency / point.layout.dp)
    batch = max(1, min(point.max_num_seqs, per_rank))
    chunk = max(1, min(w.input_len, w.max_num_batched_tokens - batch))
    prefill_per_step = batch * w.input_len / w.output_len
    return StepMix(
        batch=batch,
        context=w.input_len + w.output_len // 2,
        chunk=chunk,
        mixed_fraction=min(1.0, prefill_per_step / chunk),
    )


@dataclass
class StepResult:
    time_s: float
    layer: LayerResult
    layer_plan: P.LayerPlan
    tokens: int


def simulate_step(
    config: PrefetchConfig,
    point: OperatingPoint,
    hw: HardwareProfile,
    decode_tokens: int,
    context: int,
    prefill_tokens: int,
    with_events: bool = False,
) -> StepResult:
    """One forward of the whole model: every decoder layer plus lm_head and step overhead."""
    tokens = decode_tokens + prefill_tokens
    layer_plan = P.plan_layer(
        point.model, point.layout, config, tokens, point.semantics, point.options
    )
    ops = compute_ops(point.model, point.layout, hw, decode_tokens, context, prefill_tokens)
    layer = simulate_layer(ops, layer_plan, hw, with_events=with_events)
    m = point.model
    lm_head = _matmul(
        "lm_head",
        max(decode_tokens, 1),
        m.hidden,
        m.vocab / point.layout.tp,
        m.vocab / point.layout.tp * m.hidden * ACT_BYTES,
        False,
        hw,
    )
    tail = lm_head.fixed_s + _memory_time(lm_head, hw, 0.0) + hw.step_overhead_us * 1e-6
    return StepResult(layer.time_s * m.layers + tail, layer, layer_plan, tokens)


def evaluate_point(
    config: PrefetchConfig, point: OperatingPoint, hw: HardwareProfile | None = None
) -> tuple[Metrics, StepResult]:
    """Noise-free metrics (vLLM bench key names) for a config at an operating point."""
    hw = hw or load_hardware(point.hardware)
    mix = step_mix(point)
    dec = simulate_step(config, point, hw, mix.batch, mix.context, 0)
    mixed = simulate_step(config, point, hw, mix.batch, mix.context, mix.chunk)
    p = mix.mixed_fraction
    w = point.workload
    tpot = (1 - p) * dec.time_s + p * mixed.time_s
    spread = (mixed.time_s - dec.time_s) * math.sqrt(p * (1 - p) / max(1, w.output_len - 1))
    prefill_steps = math.ceil(w.input_len / mix.chunk)
    ttft = prefill_steps * mixed.time_s + dec.time_s / 2
    e2el = ttft + tpot * (w.output_len - 1)
    conc = min(point.concurrency, mix.batch * point.layout.dp)
    out_tps = conc / tpot
    req_tps = out_tps / w.output_len
    n = point.num_prompts
    layers = point.model.layers
    metrics: Metrics = {
        "completed": float(n),
        "failed": 0.0,
        "num_prompts": float(n),
        "max_concurrency": float(point.concurrency),
        "duration": n / req_tps,
        "total_input_tokens": float(n * w.input_len),
        "total_output_tokens": float(n * w.output_len),
        "request_throughput": req_tps,
        "output_throughput": out_tps,
        "total_token_throughput": req_tps * (w.input_len + w.output_len),
        "mean_tpot_ms": tpot * 1e3,
        "median_tpot_ms": tpot * 1e3,
        "p99_tpot_ms": (tpot + 2.326 * spread) * 1e3,
        "mean_itl_ms": tpot * 1e3,
        "median_itl_ms": dec.time_s * 1e3 if p < 0.5 else mixed.time_s * 1e3,
        "p99_itl_ms": (mixed.time_s if p > 0.01 else dec.time_s) * 1e3,
        "mean_ttft_ms": ttft * 1e3,
        "median_ttft_ms": ttft * 1e3,
        "p99_ttft_ms": (ttft + dec.time_s) * 1e3,
        "mean_e2el_ms": e2el * 1e3,
        "median_e2el_ms": e2el * 1e3,
        "p99_e2el_ms": (e2el + 2.326 * spread * (w.output_len - 1)) * 1e3,
        "sim_decode_step_ms": dec.time_s * 1e3,
        "sim_mixed_step_ms": mixed.time_s * 1e3,
        "sim_mixed_step_fraction": p,
        "sim_decode_tokens_per_forward": float(dec.tokens),
        "sim_mixed_tokens_per_forward": float(mixed.tokens),
        "sim_prefetch_mib_per_step": dec.layer.prefetch_bytes * layers / MiB,
        "sim_l2_hit_mib_per_step": dec.layer.hit_bytes * layers / MiB,
        "sim_stall_ms_per_step": dec.layer.stall_s * layers * 1e3,
    }
    return metrics, dec


def apply_noise(metrics: Metrics, pct: float, key: str) -> Metrics:
    """Seeded multiplicative noise: one draw per run moves throughputs and latencies together."""
    if pct <= 0:
        return metrics
    digest = hashlib.sha256(key.encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    factor = max(0.5, 1.0 + rng.gauss(0.0, pct / 100.0))
    noisy = dict(metrics)
    for name, value in metrics.items():
        if name.startswith("sim_") or name in COUNT_METRICS:
            continue
        noisy[name] = value / factor if name in LOWER_IS_BETTER else value * factor
    return noisy


@lru_cache(maxsize=256)
def _check_capacity(point: OperatingPoint) -> None:
    """Once per point: a layout that cannot hold its KV cache is bad input (capacity.py)."""
    check_capacity(point)


NOISE_MAX_PCT = 50.0  # a larger sigma pins most draws at apply_noise's 0.5 floor


class SimBackend:
    """The built-in performance model as a backend (simulated numbers, never measured)."""

    name = "sim"
    measured = False

    def __init__(self, noise_pct: float = 0.0, seed: int = 0, **_: Any) -> None:
        number(noise_pct, "--noise", low=0, high=NOISE_MAX_PCT)
        non_negative(seed, "--seed", integer=True)
        self.noise_pct = noise_pct
        self.seed = seed

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        _check_capacity(point)
        metrics, _ = evaluate_point(config, point)
        if self.noise_pct <= 0:
            return metrics  # noise-free: skip building the noise key
        key = f"{self.seed}|{config.canonical_json()}|{point.describe()}|{repeat}"
        return apply_noise(metrics, self.noise_pct, key)


register_backend("sim", SimBackend)
