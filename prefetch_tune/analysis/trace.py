"""Chrome-trace export of a modelled decode step, laid out like the Ascend profiler's
`trace_view.json`: process "Ascend Hardware", one thread per stream named `Stream N`, device
tasks as complete (`X`) events in microseconds, prefetches as CMO tasks on their own stream.
Perfetto and chrome://tracing open it; `prefetch-tune profile` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefetch_tune.backends.sim import Event, StepResult
from prefetch_tune.runtime import plan as P

PID = 1
COMPUTE_STREAM = 2
PREFETCH_STREAM = 7

# Plan op names -> the kernel type names an Ascend profile shows for them.
OP_TYPES: dict[str, tuple[str, str]] = {
    P.INPUT_NORM: ("AddRmsNorm", "AI_VECTOR_CORE"),
    P.QKV_QUANT: ("AscendQuantV2", "AI_VECTOR_CORE"),
    P.QKV_PROJ: ("QuantBatchMatmulV3", "AI_CORE"),
    P.QK_NORM_ROPE: ("RmsNorm", "AI_VECTOR_CORE"),
    P.ATTENTION: ("PagedAttention", "MIX_AIC"),
    P.O_QUANT: ("AscendQuantV2", "AI_VECTOR_CORE"),
    P.O_PROJ: ("QuantBatchMatmulV3", "AI_CORE"),
    P.O_REDUCE: ("hcom_allReduce_", "COMMUNICATION"),
    P.POST_NORM: ("AddRmsNorm", "AI_VECTOR_CORE"),
    P.GATE_UP_QUANT: ("AscendQuantV2", "AI_VECTOR_CORE"),
    P.GATE_UP_PROJ: ("QuantBatchMatmulV3", "AI_CORE"),
    P.SWIGLU: ("SwiGlu", "AI_VECTOR_CORE"),
    P.DOWN_QUANT: ("AscendQuantV2", "AI_VECTOR_CORE"),
    P.DOWN_PROJ: ("QuantBatchMatmulV3", "AI_CORE"),
    P.DOWN_REDUCE: ("hcom_allReduce_", "COMMUNICATION"),
    P.ROUTER: ("MatMulV2", "AI_CORE"),
    P.GATING: ("MoeGatingTopKSoftmax", "AI_VECTOR_CORE"),
    P.DISPATCH: ("hcom_alltoallv_", "COMMUNICATION"),
    P.MOE_QUANT: ("DynamicQuant", "AI_VECTOR_CORE"),
    P.W13_GMM: ("GroupedMatmul", "AI_CORE"),
    P.MOE_SWIGLU: ("SwiGlu", "AI_VECTOR_CORE"),
    P.W2_GMM: ("GroupedMatmul", "AI_CORE"),
    P.COMBINE: ("hcom_alltoallv_", "COMMUNICATION"),
    "CMO": ("CMO", "SDMA_SQE"),
    "EVENT_WAIT": ("EVENT_WAIT", "EVENT_WAIT_SQE"),
}


def _metadata(device: int) -> list[dict[str, Any]]:
    meta: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": PID, "args": {"name": "Ascend Hardware"}},
        {"ph": "M", "name": "process_labels", "pid": PID, "args": {"labels": f"NPU {device}"}},
        {"ph": "M", "name": "process_sort_index", "pid": PID, "args": {"sort_index": 0}},
    ]
    for stream in (COMPUTE_STREAM, PREFETCH_STREAM):
        meta.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": PID,
                "tid": stream,
                "args": {"name": f"Stream {stream}"},
            }
        )
        meta.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": PID,
                "tid": stream,
                "args": {"sort_index": stream},
            }
        )
    return meta


def step_trace(step: StepResult, device: int = 0) -> dict[str, Any]:
    """The Chrome-trace document of one modelled forward: every decoder layer's events."""
    events = _metadata(device)
    layer_us = step.layer.time_s * 1e6
    task_id = 0
    for layer in range(step.layer_plan.model.layers):
        offset = layer * layer_us
        for ev in step.layer.events:
            task_id += 1
            events.append(_event(ev, offset, layer, task_id))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {
            "generator": "prefetch-tune simulate (SIMULATED timeline, not a measurement)",
            "model": step.layer_plan.model.name,
            "quant": step.layer_plan.model.quant,
            "layout": {
                "tp": step.layer_plan.layout.tp,
                "dp": step.layer_plan.layout.dp,
                "ep": step.layer_plan.layout.ep,
            },
            "sequence_parallel": step.layer_plan.options.sequence_parallel,
            "semantics": step.layer_plan.semantics,
            "tokens_per_forward": step.tokens,
            "config": step.layer_plan.config.to_json_obj(),
            "layers": step.layer_plan.model.layers,
            "layer_us": layer_us,
        },
    }


def _event(ev: Event, offset_us: float, layer: int, task_id: int) -> dict[str, Any]:
    op_type, task_type = OP_TYPES.get(ev.name, (ev.name, "AI_CORE"))
    stream = PREFETCH_STREAM if ev.stream == "prefetch" else COMPUTE_STREAM
    args: dict[str, Any] = {
        "Model Id": 0,
        "Task Type": task_type,
        "Physic Stream Id": stream,
        "Task Id": task_id,
        "Batch Id": 0,
        "Subtask Id": 4294967295,
        "layer": layer,
        "op": ev.name,
    }
    args.update({k: v for k, v in ev.args.items() if k != "kind"})
    name = f"{op_type}" if ev.name in ("CMO", "EVENT_WAIT") else f"{op_type}_{ev.name}"
    return {
        "name": name,
        "ph": "X",
        "pid": PID,
        "tid": stream,
        "ts": offset_us + ev.start * 1e6,
        "dur": ev.dur * 1e6,
        "args": args,
    }


def write_trace(step: StepResult, path: Path) -> None:
    path.write_text(json.dumps(step_trace(step)))
