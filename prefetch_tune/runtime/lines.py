"""The hook table per released vLLM-Ascend line: where the plugin hooks, and what it relies on.

Each `Line` covers a version range (from `first` up to the next line's `first`) and lists the
hook points the plugin wraps there: module, class and method, the parameters the wrapper reads
by name or position, the attributes it reads, and the plan ops (runtime/plan.py names) each one
starts or joins. A knob without a practical hook point on a line is `dead` there, with the
reason, so the plan, the search space and `runtime-check` drop it and say why.

`runtime.static_check` resolves every entry of a line in a real wheel or sdist (ast only), and
the `wheels` tests do so for every release, so a rename upstream fails CI naming line and symbol.
Pure data and stdlib: the plugin imports this in every vLLM process.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from prefetch_tune.runtime.plan import (
    DOWN_QUANT,
    GATE_UP_QUANT,
    O_QUANT,
    POST_NORM,
    QKV_QUANT,
    SWIGLU,
)
from prefetch_tune.runtime.versions import parse_version

_LINEAR_QUANT_POINTS = (QKV_QUANT, O_QUANT, GATE_UP_QUANT, DOWN_QUANT)


@dataclass(frozen=True)
class HookSpec:
    """One function the plugin wraps on a line, and what the wrapper relies on."""

    name: str
    module: str
    attr: str  # "Class.method" or "function"
    params: tuple[str, ...] = ()  # leading parameters, in order (the wrapper passes them on)
    reads: tuple[str, ...] = ()  # attributes the wrapper reads; must be used in `module`
    starts: tuple[str, ...] = ()
    joins: tuple[str, ...] = ()
    knobs: tuple[str, ...] = ()  # the knobs it serves (for per-knob readiness)

    @property
    def target(self) -> str:
        return f"{self.module}:{self.attr}"


@dataclass(frozen=True)
class Line:
    """A released vLLM-Ascend line: its first version, hook points and dead knobs."""

    name: str
    first: str
    hooks: tuple[HookSpec, ...]
    dead: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


W8A8_APPLY = HookSpec(
    "w8a8_apply",
    "vllm_ascend.quantization.methods.w8a8_static",
    "AscendW8A8LinearMethod.apply",
    params=("self", "layer", "x"),
    reads=(
        "aclnn_input_scale",
        "aclnn_input_scale_reciprocal",
        "aclnn_input_offset",
    ),
    starts=_LINEAR_QUANT_POINTS,
    joins=_LINEAR_QUANT_POINTS,
    knobs=("attn.qkv", "attn.o"),
)
# v0.24.0rc1 still has flashcomm2: its o_proj apply quantizes and all-to-alls when
# `layer._quant_comm_config["communication_fn"]` is set; the wrapper passes that path through.
W8A8_APPLY_FLASHCOMM2 = replace(W8A8_APPLY, reads=(*W8A8_APPLY.reads, "_quant_comm_config"))
ROW_PARALLEL_FORWARD = HookSpec(
    "row_parallel_forward",
    "vllm_ascend.ops.linear",
    "AscendRowParallelLinear.forward",
    params=("self", "input_"),
    reads=("prefix",),
    starts=(POST_NORM,),
    knobs=("mlp.gate_up",),
)
SILU_AND_MUL = HookSpec(
    "silu_and_mul",
    "vllm_ascend.ops.activation",
    "AscendSiluAndMul.forward_oot",
    params=("self", "x"),
    starts=(SWIGLU,),
    joins=(SWIGLU,),
    knobs=("mlp.gate_up", "mlp.down"),
)
SILU_AND_MUL_CLAMP = HookSpec(
    "silu_and_mul_clamp",
    "vllm_ascend.ops.activation",
    "AscendSiluAndMulWithClamp.forward_oot",
    params=("self", "x"),
    starts=(SWIGLU,),
    joins=(SWIGLU,),
    knobs=("mlp.gate_up", "mlp.down"),
)
# Not a prefetch site: where the runtime installs its hooks and indexes the loaded model.
WORKER_LOAD_MODEL = HookSpec(
    "worker_load_model", "vllm_ascend.worker.worker", "NPUWorker.load_model", params=("self",)
)

_MOE_DEAD_FUNCTION = (
    "no practical hook point: experts are selected by the plain function "
    "vllm_ascend/ops/fused_moe/experts_selector.py:select_experts, imported by name into "
    "fused_moe.py and every MoE quant method (w8a8_dynamic.py, w4a8.py, ...), so no class "
    "method to patch reaches all callers; the plugin does not start MoE prefetch on this line"
)

_MOE_DEAD_UNJOINED = (
    "AscendRoutedExperts._select_experts can start it, but with fused MC2 (FusedMC2CommImpl) "
    "the experts never run quant_apply_mlp, so no join point is reached on every path; the "
    "plugin does not start a prefetch it cannot join before the forward ends"
)
W8A8_APPLY_MOVED = replace(W8A8_APPLY, module="vllm_ascend.quantization.methods.w8a8.w8a8_static")

LINES: tuple[Line, ...] = (
    Line(
        "0.24",
        "0.24.0rc1",
        hooks=(W8A8_APPLY_FLASHCOMM2, ROW_PARALLEL_FORWARD, SILU_AND_MUL, SILU_AND_MUL_CLAMP),
        dead={"moe.gate_up": _MOE_DEAD_FUNCTION},
        notes=(
            "weight prefetch removed upstream (#11949); flashcomm2 still present: its "
            "communicating W8A8 o_proj path is passed through untouched",
        ),
    ),
    Line(
        "0.25",
        "0.25.1rc1",
        hooks=(W8A8_APPLY, ROW_PARALLEL_FORWARD, SILU_AND_MUL, SILU_AND_MUL_CLAMP),
        dead={"moe.gate_up": _MOE_DEAD_FUNCTION},
        notes=("flashcomm2 removed (#12117); experts still selected by a plain function",),
    ),
    Line(
        "0.27",
        "0.27.1rc1",
        hooks=(W8A8_APPLY_MOVED, ROW_PARALLEL_FORWARD, SILU_AND_MUL, SILU_AND_MUL_CLAMP),
        dead={"moe.gate_up": _MOE_DEAD_UNJOINED},
        notes=("W8A8 methods moved to quantization/methods/w8a8/; AscendRoutedExperts added",),
    ),
)


def worker_hook() -> HookSpec:
    return WORKER_LOAD_MODEL


def line_for(version: str | None) -> Line:
    """The line `version` belongs to (the newest line when unknown or newer than all; the
    first line for native versions, which the plugin does not hook)."""
    key = parse_version(version) if version else None
    if key is None:
        return LINES[-1]
    chosen = LINES[0]
    for line in LINES:
        first = parse_version(line.first)
        if first is not None and key >= first:
            chosen = line
    return chosen


def line_named(name: str) -> Line:
    """The line called `name` (KeyError names the known ones)."""
    for line in LINES:
        if line.name == name:
            return line
    raise KeyError(f"no vllm-ascend line {name!r}; known: {', '.join(x.name for x in LINES)}")


def all_hooks(line: Line) -> tuple[HookSpec, ...]:
    return (*line.hooks, WORKER_LOAD_MODEL)


__all__ = ["LINES", "HookSpec", "Line", "all_hooks", "line_for", "line_named", "worker_hook"]
