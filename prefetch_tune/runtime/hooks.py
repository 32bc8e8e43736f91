"""Where prefetch-tune's runtime hooks into vLLM-Ascend, and how it runs the plan's operations.

The plan (`runtime/plan.py`) says, per token count, which prefetch starts at which compute op of a
decoder layer and after which compute op the compute stream joins it. This module only executes
that: it never decides which knob fires, how many bytes, or where a threshold lies.

Pieces:

* `HOOK_POINTS`: the vLLM-Ascend functions (as of HEAD, v0.24.0rc1 and later) that are wrapped, and
  which compute ops (the plan's op names) each one provides as start or join point.
* `ModelIndex`: one walk over the loaded model. Every hooked module learns its decoder layer (from
  its own prefix / path) and the compute op it stands for, as plain attributes, so the hooks only
  read attributes (cheap, and traceable by torch.compile). Weights are looked up per layer from the
  module that holds them.
* Two custom ops in prefetch-tune's namespace, `prefetch_tune::prefetch_start(dependency, layer,
  point)` and `prefetch_tune::prefetch_join(after, point)`. They are registered as side-effecting
  (never dead-code eliminated) with no-op fake implementations. Their real implementation asks the
  active `Runtime`: the token count (vLLM's forward context, else the tensor's first dimension)
  picks a cached `LayerPlan`, whose operations starting (or joining) at `point` are issued on the
  `DeviceOps`. Deciding inside the op keeps every decision at run (or graph-capture) time: under
  torch.compile the token count is symbolic at trace time and must not be baked into the graph.
* `DeviceOps`: `NpuDeviceOps` (one side stream per device, `torch_npu.npu_prefetch`) and
  `RecordingDeviceOps` for tests.

torch, torch_npu and vllm_ascend are imported only inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prefetch_tune.models import Layout, ModelSpec
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.runtime.control import ControlChannel
from prefetch_tune.runtime.plan import (
    DOWN_QUANT,
    GATE_UP_QUANT,
    GATING,
    MOE_QUANT,
    O_QUANT,
    POST_NORM,
    QKV_QUANT,
    SWIGLU,
    LayerPlan,
    PlanOptions,
    PrefetchOp,
    plan_layer,
)

logger = logging.getLogger("vllm.prefetch_tune")

OPS_NAMESPACE = "prefetch_tune"

# Attributes the model index sets on hooked modules (read by the hooks).
LAYER_ATTR = "_prefetch_tune_layer"  # int: the decoder layer the module belongs to
QUANT_POINT_ATTR = "_prefetch_tune_quant_point"  # W8A8 linear: its quantize op (start + join)
AFTER_POINT_ATTR = "_prefetch_tune_after_point"  # o_proj: the op that begins once it returns
OP_POINT_ATTR = "_prefetch_tune_point"  # SwiGLU / experts: the op the hooked method runs
_ATTRS = (LAYER_ATTR, QUANT_POINT_ATTR, AFTER_POINT_ATTR, OP_POINT_ATTR)
HOOK_MARK = "__prefetch_tune_hook__"  # set on every wrapper; holds the wrapped original

# W8A8 static linears carry these once weights are processed; the hook quantizes with them.
_W8A8_INPUT_ATTRS = ("aclnn_input_scale", "aclnn_input_scale_reciprocal", "aclnn_input_offset")


@dataclass(frozen=True)
class HookPoint:
    """One vLLM-Ascend function that is wrapped, and the plan ops it can start or join at."""

    name: str
    module: str
    attr: str  # "Class.method" or "function", inside `module`
    starts: tuple[str, ...] = ()
    joins: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        return f"{self.module}:{self.attr}"


def hook_points_for(version: str | None) -> tuple[HookPoint, ...]:
    """The hook points of the line `version` belongs to (runtime/lines.py; None: newest)."""
    from prefetch_tune.runtime.lines import line_for

    return tuple(
        HookPoint(h.name, h.module, h.attr, h.starts, h.joins) for h in line_for(version).hooks
    )


# The newest line's hook points; `activate` installs those of the running vLLM-Ascend's line.
# MoE hooks (_wrap_select_experts / _wrap_quant_apply_mlp) are on no released line: see the
# dead reasons in runtime/lines.py.
HOOK_POINTS: tuple[HookPoint, ...] = hook_points_for(None)

# Not a prefetch site: the worker method during which the runtime installs the hooks (before the
# model is built, so CustomOps bind the wrapped forward_oot) and indexes the loaded model.
WORKER_HOOK = HookPoint("worker_load_model", "vllm_ascend.worker.worker", "NPUWorker.load_model")

# Module roles inside a decoder layer (path after `layers.<i>.`), and the compute ops they run.
_LINEAR_ROLES: dict[str, tuple[str, str]] = {
    # path suffix -> (role, quantize op)
    "self_attn.qkv_proj": ("qkv_proj", QKV_QUANT),
    "self_attn.o_proj": ("o_proj", O_QUANT),
    "mlp.gate_up_proj": ("gate_up_proj", GATE_UP_QUANT),
    "mlp.down_proj": ("down_proj", DOWN_QUANT),
}
_ACT_FN_PATH = "mlp.act_fn"
# The plan's weight names -> (module role, tensor attribute on that module).
_WEIGHT_OF: dict[str, tuple[str, str]] = {
    "qkv_proj": ("qkv_proj", "weight"),
    "o_proj": ("o_proj", "weight"),
    "gate_up_proj": ("gate_up_proj", "weight"),
    "down_proj": ("down_proj", "weight"),
    "experts.w13": ("experts", "w13_weight"),
    "experts.w2": ("experts", "w2_weight"),
}

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def layer_index_of(prefix: str) -> tuple[int, str] | None:
    """`model.layers.3.self_attn.o_proj` -> (3, "self_attn.o_proj"); None outside decoder layers."""
    match = _LAYER_RE.search(prefix)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


# --------------------------------------------------------------------------- device operations


class DeviceOps(Protocol):
    """What the runtime needs from a device: start a prefetch on a side stream, join it."""

    name: str

    def start(self, weight: Any, dependency: Any, nbytes: int, knob: str) -> None:
        """The side stream waits for the compute stream, then prefetches `nbytes` of `weight`."""

    def join(self, knob: str | None = None) -> None:
        """The compute stream waits for the side stream (for the prefetch of `knob`)."""


@dataclass(frozen=True)
class DeviceEvent:
    """One recorded device operation."""

    kind: str  # "start" or "join"
    knob: str | None
    weight: Any = None
    nbytes: int = 0
    dependency: Any = None


@dataclass
class RecordingDeviceOps:
    """Records starts and joins in order (which weight, bytes, dependency); for tests."""

    name: str = "recording"
    events: list[DeviceEvent] = field(default_factory=list)

    def start(self, weight: Any, dependency: Any, nbytes: int, knob: str) -> None:
        self.events.append(DeviceEvent("start", knob, weight, nbytes, dependency))

    def join(self, knob: str | None = None) -> None:
        self.events.append(DeviceEvent("join", knob))

    def starts(self) -> list[DeviceEvent]:
        return [e for e in self.events if e.kind == "start"]

    def joins(self) -> list[DeviceEvent]:
        return [e for e in self.events if e.kind == "join"]

    def clear(self) -> None:
        self.events.clear()


class NpuDeviceOps:
    """One side stream per device; `torch_npu.npu_prefetch` on it (torch_npu imported lazily)."""

    name = "npu"

    def __init__(self) -> None:
        self._streams: dict[int, Any] = {}

    def _side_stream(self, npu: Any) -> Any:
        device = int(npu.current_device())
        stream = self._streams.get(device)
        if stream is None:
            stream = npu.Stream()
            self._streams[device] = stream
        return stream

    def prepare(self) -> None:
        """Create this device's side stream now (at model load), never during graph capture."""
        import torch_npu

        self._side_stream(torch_npu.npu)

    def start(self, weight: Any, dependency: Any, nbytes: int, knob: str) -> None:
        import torch_npu

        npu = torch_npu.npu
        side = self._side_stream(npu)
        side.wait_stream(npu.current_stream())
        with npu.stream(side):
            torch_npu.npu_prefetch(weight, dependency, nbytes, 0)

    def join(self, knob: str | None = None) -> None:
        import torch_npu

        npu = torch_npu.npu
        side = self._streams.get(int(npu.current_device()))
        if side is not None:
            npu.current_stream().wait_stream(side)


# --------------------------------------------------------------------------------- model index


def _calls_wrapper(module: Any, method: str) -> bool:
    """True when calling `module.<method>` (or the bound copy a vLLM CustomOp keeps) reaches a
    prefetch-tune wrapper, i.e. the hook was installed before the module was built."""
    func = getattr(type(module), method, None)
    if func is None or not hasattr(func, HOOK_MARK):
        return False
    bound = module.__dict__.get("_forward_method")
    if bound is not None and method == "forward_oot":
        return hasattr(getattr(bound, "__func__", bound), HOOK_MARK)
    return True


def _looks_quantized(experts: Any) -> bool:
    """Quantized experts run quant_apply_mlp (the MoE join point); unquantized ones do not."""
    quant_type = getattr(experts, "quant_type", None)
    if quant_type is None:
        return True
    return str(getattr(quant_type, "name", quant_type)).upper() not in ("NONE", "QUANTTYPE.NONE")


@dataclass
class ModelIndex:
    """Per decoder layer: the hooked modules (by role) and the compute ops reachable in it."""

    modules: dict[int, dict[str, Any]] = field(default_factory=dict)
    points: dict[int, set[str]] = field(default_factory=dict)
    _annotated: list[Any] = field(default_factory=list)

    @classmethod
    def build(cls, model: Any, used_points: Iterable[str]) -> ModelIndex:
        """Walk `model` once; annotate the modules whose compute op the plan uses."""
        used = set(used_points)
        index = cls()
        for path, module in model.named_modules():
            # The module's own prefix (vLLM linears keep it) names its layer; modules built
            # without one (SwiGLU, experts) are placed by their path in the model.
            prefix = getattr(module, "prefix", None)
            found = (layer_index_of(prefix) if isinstance(prefix, str) else None) or (
                layer_index_of(path)
            )
            if found is not None:
                index._classify(found[0], found[1], module, used)
        return index

    def _annotate(self, layer: int, module: Any, attr: str, point: str) -> None:
        setattr(module, LAYER_ATTR, layer)
        setattr(module, attr, point)
        self.points.setdefault(layer, set()).add(point)
        self._annotated.append(module)

    def _classify(self, layer: int, rest: str, module: Any, used: set[str]) -> None:
        roles = self.modules.setdefault(layer, {})
        if rest in _LINEAR_ROLES:
            role, quant_point = _LINEAR_ROLES[rest]
            roles[role] = module
            if quant_point in used and all(hasattr(module, a) for a in _W8A8_INPUT_ATTRS):
                self._annotate(layer, module, QUANT_POINT_ATTR, quant_point)
            if role == "o_proj" and POST_NORM in used:
                self._annotate(layer, module, AFTER_POINT_ATTR, POST_NORM)
        elif rest == _ACT_FN_PATH:
            roles["act_fn"] = module
            if SWIGLU in used and _calls_wrapper(module, "forward_oot"):
                self._annotate(layer, module, OP_POINT_ATTR, SWIGLU)
        elif callable(getattr(module, "_select_experts", None)) and "shared" not in rest:
            roles["experts"] = module
            if GATING in used and _calls_wrapper(module, "_select_experts"):
                self._annotate(layer, module, OP_POINT_ATTR, GATING)
                if _looks_quantized(module):
                    self.points[layer].add(MOE_QUANT)

    @property
    def layers(self) -> int:
        return len(self.modules)

    def weight_source(self, layer: int, weight: str) -> tuple[Any, str] | None:
        """(module, attribute) holding the tensor the plan calls `weight` in `layer`."""
        role, attr = _WEIGHT_OF.get(weight, (weight, "weight"))
        module = self.modules.get(layer, {}).get(role)
        return None if module is None else (module, attr)

    def weight(self, layer: int, weight: str) -> Any:
        """The tensor the plan calls `weight` in `layer`, read from its module now (None if absent)."""
        source = self.weight_source(layer, weight)
        return None if source is None else getattr(source[0], source[1], None)

    def reaches(self, layer: int, point: str) -> bool:
        return point in self.points.get(layer, ())

    def clear(self) -> None:
        """Remove every annotation (the hooks then pass straight through)."""
        for module in self._annotated:
            for attr in _ATTRS:
                module.__dict__.pop(attr, None)
        self._annotated.clear()
        self.modules.clear()
        self.points.clear()


# ------------------------------------------------------------------------------------- runtime


def forward_tokens() -> int | None:
    """Tokens of the current forward from vLLM's forward context (padded size under graphs)."""
    mod = sys.modules.get("vllm.forward_context")
    if mod is None:
        return None
    try:
        available = getattr(mod, "is_forward_context_available", None)
        if available is not None and not available():
            return None
        ctx = mod.get_forward_context()
    except Exception:
        return None
    extra = getattr(ctx, "additional_kwargs", None)
    candidates = (
        getattr(ctx, "num_tokens", None),
        extra.get("num_tokens") if isinstance(extra, dict) else None,
        getattr(getattr(ctx, "batch_descriptor", None), "num_tokens", None),
    )
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _nbytes(tensor: Any) -> int:
    return int(tensor.numel()) * int(tensor.element_size())


@dataclass(frozen=True)
class _Steps:
    """One token count's plan, with its firing operations grouped by start point."""

    plan: LayerPlan
    starts: dict[str, tuple[PrefetchOp, ...]]


@dataclass(frozen=True)
class _Pending:
    knob: str
    join_after: str
    layer: int


@dataclass(frozen=True)
class _Action:
    """One prefetch to issue at a start point of a layer: the weight's module and attribute."""

    module: Any
    attr: str
    nbytes: int
    knob: str
    join_after: str


_ACTION_CACHE_LIMIT = 1 << 15


class Runtime:
    """Executes the plan's operations for one worker: model facts, plan cache, pending starts."""

    semantics = "plugin"

    def __init__(
        self,
        model: ModelSpec,
        layout: Layout,
        config: PrefetchConfig,
        options: PlanOptions,
        device: DeviceOps,
        start_points: Iterable[str],
        join_points: Iterable[str],
        tokens_fn: Callable[[], int | None] = forward_tokens,
    ) -> None:
        self.model = model
        self.layout = layout
        self.config = config
        self.options = options
        self.device = device
        self.start_points = frozenset(start_points)
        self.join_points = frozenset(join_points)
        self.tokens_fn = tokens_fn
        self.index = ModelIndex()
        self.pending: list[_Pending] = []
        self._steps: dict[int, _Steps] = {}
        self._actions: dict[tuple[int, str, int], tuple[_Action, ...]] = {}
        self._warned: set[str] = set()
        self.control: ControlChannel | None = None  # set by the plugin under --screen
        self.vllm_config: Any = None
        self._last_layer = -1
        any_plan = self.plan_for(1)
        sites = any_plan.ops  # every site appears in ops, firing or not
        self.used_points = frozenset(
            {op.start_before for op in sites} | {op.join_after for op in sites}
        )
        self.unexecutable: dict[str, str] = {}
        for op in sites:
            if op.knob in any_plan.dead:
                continue
            key = f"{op.knob} ({op.weight})"
            if op.start_before not in self.start_points:
                self.unexecutable[key] = f"start point {op.start_before} is not hooked"
            elif op.join_after not in self.join_points:
                self.unexecutable[key] = f"join point {op.join_after} is not hooked"

    # -- plan ----------------------------------------------------------------------------------
    def plan_for(self, tokens: int) -> LayerPlan:
        return self._steps_for(tokens).plan

    def _steps_for(self, tokens: int) -> _Steps:
        steps = self._steps.get(tokens)
        if steps is None:
            plan = plan_layer(self.model, self.layout, self.config, tokens, "plugin", self.options)
            grouped: dict[str, list[PrefetchOp]] = {}
            for op in plan.firing:
                grouped.setdefault(op.start_before, []).append(op)
            steps = _Steps(plan, {k: tuple(v) for k, v in grouped.items()})
            self._steps[tokens] = steps
        return steps

    # -- model ---------------------------------------------------------------------------------
    def attach_model(self, model: Any) -> int:
        """Index `model` (annotating its hooked modules); returns the decoder layers found."""
        self.index.clear()
        self._actions.clear()
        self.index = ModelIndex.build(model, self.used_points)
        return self.index.layers

    # -- execution (called from the custom ops) ------------------------------------------------
    def tokens_of(self, tensor: Any) -> int:
        tokens = self.tokens_fn()
        return tokens if tokens is not None else int(tensor.shape[0])

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("prefetch-tune runtime: " + message, *args)

    def _actions_for(self, tokens: int, point: str, layer: int) -> tuple[_Action, ...]:
        """The plan's operations starting at `point` for `tokens`, resolved to `layer`'s modules
        and checked once (join reachable, weight present, bytes); cached."""
        key = (tokens, point, layer)
        actions = self._actions.get(key)
        if actions is not None:
            return actions
        resolved: list[_Action] = []
        for op in self._steps_for(tokens).starts.get(point, ()):
            if op.join_after not in self.join_points or not self.index.reaches(
                layer, op.join_after
            ):
                self._warn_once(
                    f"unjoinable:{op.knob}:{layer}",
                    "%s not started in layer %d: its join point %s is not hooked there",
                    op.knob,
                    layer,
                    op.join_after,
                )
                continue
            source = self.index.weight_source(layer, op.weight)
            weight = None if source is None else getattr(source[0], source[1], None)
            if source is None or weight is None:
                self._warn_once(
                    f"noweight:{op.weight}",
                    "%s skipped: layer %d has no %s weight",
                    op.knob,
                    layer,
                    op.weight,
                )
                continue
            held = _nbytes(weight)
            if held != op.weight_bytes:
                self._warn_once(
                    f"size:{op.weight}",
                    "%s holds %d bytes per rank, the model spec says %d; prefetching the "
                    "plan's %d bytes, at most the tensor",
                    op.weight,
                    held,
                    op.weight_bytes,
                    op.bytes,
                )
            nbytes = min(op.bytes, held)
            if nbytes > 0:
                resolved.append(_Action(source[0], source[1], nbytes, op.knob, op.join_after))
        if len(self._actions) >= _ACTION_CACHE_LIMIT:
            self._actions.clear()  # prefill token counts vary without bound; stay small
        actions = self._actions[key] = tuple(resolved)
        return actions

    def reconfigure(self, config: PrefetchConfig) -> None:
        """Run `config` from the next operation on (the control channel, at a forward boundary)."""
        self.join_all()
        self.config = config
        self._steps.clear()
        self._actions.clear()

    def _at_layer(self, layer: int) -> None:
        """A layer index that does not grow means a new forward began: the channel's tick."""
        if layer <= self._last_layer and self.control is not None:
            self.join_all()
            self.control.tick()
        self._last_layer = layer

    def start_at(self, point: str, layer: int, dependency: Any) -> None:
        """Issue the plan's operations that start before compute op `point` of `layer`."""
        if layer != self._last_layer:
            self._at_layer(layer)
        tokens = self.tokens_fn() or int(dependency.shape[0])
        for action in self._actions_for(tokens, point, layer):
            if self.pending and any(p.knob == action.knob for p in self.pending):
                self._join_stale(action.knob)
            weight = getattr(action.module, action.attr)  # read now: weights may be replaced
            self.device.start(weight, dependency, action.nbytes, action.knob)
            self.pending.append(_Pending(action.knob, action.join_after, layer))

    def join_at(self, point: str) -> None:
        """The compute stream waits for every pending prefetch the plan joins after `point`."""
        if not self.pending:
            return
        keep: list[_Pending] = []
        for entry in self.pending:
            if entry.join_after == point:
                self.device.join(entry.knob)
            else:
                keep.append(entry)
        self.pending = keep

    def _join_stale(self, knob: str) -> None:
        """A prefetch of `knob` still pending from an earlier layer missed its join: join it now
        (a start without a join inside a captured graph fails the capture)."""
        stale = [p for p in self.pending if p.knob == knob]
        if not stale:
            return
        self._warn_once(
            f"stale:{knob}",
            "%s from layer %d was not joined at %s; joined before the next start",
            knob,
            stale[0].layer,
            stale[0].join_after,
        )
        for entry in stale:
            self.device.join(entry.knob)
        self.pending = [p for p in self.pending if p.knob != knob]

    def join_all(self) -> None:
        """Join everything pending (end of a forward, or tear-down)."""
        for entry in self.pending:
            self.device.join(entry.knob)
        self.pending = []

    def describe(self) -> dict[str, Any]:
        return {
            "semantics": self.semantics,
            "device": self.device.name,
            "model": self.model.summary(),
            "layout": {"tp": self.layout.tp, "dp": self.layout.dp, "ep": self.layout.ep},
            "config": self.config.to_json_obj(),
            "cap_bytes": self.options.cap_bytes,
            "indexed_layers": self.index.layers,
            "unexecutable_ops": dict(self.unexecutable),
        }


_ACTIVE: Runtime | None = None


def set_active(runtime: Runtime | None) -> None:
    """Make `runtime` the one the custom ops dispatch to (None: the ops do nothing)."""
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE is not runtime:
        _ACTIVE.index.clear()
    _ACTIVE = runtime


def active() -> Runtime | None:
    return _ACTIVE


# ---------------------------------------------------------------------------------- custom ops


def _start_impl(dependency: Any, layer: int, point: str) -> None:
    runtime = _ACTIVE
    if runtime is not None:
        runtime.start_at(point, layer, dependency)


def _join_impl(after: Any, point: str) -> None:
    runtime = _ACTIVE
    if runtime is not None:
        runtime.join_at(point)


def _start_fake(dependency: Any, layer: int, point: str) -> None:
    return None


def _join_fake(after: Any, point: str) -> None:
    return None


_LIBRARY: Any = None  # keeps the torch.library registration alive


def ensure_ops() -> None:
    """Register `prefetch_tune::prefetch_start` / `prefetch_join` once per process.

    Plain `torch.library.Library` ops (as vLLM's own custom ops): a third of the dispatch cost of
    `torch.library.custom_op`. Returning nothing and mutating nothing, they are marked
    side-effecting, or FX / inductor dead-code elimination drops them.
    """
    global _LIBRARY
    import torch
    import torch.fx

    namespace = getattr(torch.ops, OPS_NAMESPACE)
    if not hasattr(namespace, "prefetch_start"):
        library: Any = torch.library.Library  # untyped in torch; Any keeps mypy quiet either way
        lib = library(OPS_NAMESPACE, "FRAGMENT")
        lib.define("prefetch_start(Tensor dependency, int layer, str point) -> ()")
        lib.define("prefetch_join(Tensor after, str point) -> ()")
        lib.impl("prefetch_start", _start_impl, "CompositeExplicitAutograd")
        lib.impl("prefetch_join", _join_impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{OPS_NAMESPACE}::prefetch_start", _start_fake, lib=lib)
        torch.library.register_fake(f"{OPS_NAMESPACE}::prefetch_join", _join_fake, lib=lib)
        _LIBRARY = lib
    torch.fx.node.has_side_effect(namespace.prefetch_start.default)
    torch.fx.node.has_side_effect(namespace.prefetch_join.default)


def _hook_failed(where: str, exc: Exception) -> None:
    """A hook raised: join what is pending if possible, then switch the runtime off (one log
    line, the marker) and let vLLM's own code run on, without prefetch."""
    runtime = _ACTIVE
    if runtime is not None:
        with contextlib.suppress(Exception):
            runtime.join_all()
    from prefetch_tune.runtime import plugin

    plugin.disable(f"{where} failed: {type(exc).__name__}: {exc}")


def _callers() -> tuple[Callable[[Any, int, str], None], Callable[[Any, str], None]]:
    """(start, join) for the hooks: the custom ops while torch.compile traces (so the graph keeps
    an opaque, side-effecting node), a direct call otherwise (eager mode and ACL graph capture
    record the same device work, without the dispatcher's cost)."""
    import torch

    namespace = getattr(torch.ops, OPS_NAMESPACE)
    op_start = namespace.prefetch_start.default
    op_join = namespace.prefetch_join.default
    compiler = getattr(torch, "compiler", None)
    is_compiling: Callable[[], bool] = getattr(compiler, "is_compiling", None) or (
        torch._dynamo.is_compiling
    )

    def start(dependency: Any, layer: int, point: str) -> None:
        try:
            if is_compiling():
                op_start(dependency, layer, point)
            else:
                _start_impl(dependency, layer, point)
        except Exception as exc:
            _hook_failed(f"prefetch start at {point}", exc)

    def join(after: Any, point: str) -> None:
        try:
            if is_compiling():
                op_join(after, point)
            else:
                _join_impl(after, point)
        except Exception as exc:
            _hook_failed(f"prefetch join at {point}", exc)

    return start, join


# ------------------------------------------------------------------------------------ wrappers


def _mark(wrapper: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    setattr(wrapper, HOOK_MARK, original)
    return wrapper


def _communicates(layer: Any) -> bool:
    """True when v0.24.0rc1's W8A8 apply would quantize and run flashcomm2's o_proj
    all-to-all (`layer._quant_comm_config["communication_fn"]`, w8a8_static.py apply)."""
    config = layer.__dict__.get("_quant_comm_config") if hasattr(layer, "__dict__") else None
    if config is None:
        config = getattr(layer, "_quant_comm_config", None)
    return isinstance(config, dict) and config.get("communication_fn") is not None


def _wrap_w8a8_apply(original: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    start, join = _callers()

    @functools.wraps(original)
    def apply(self: Any, layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        point = getattr(layer, QUANT_POINT_ATTR, None)
        if point is None or x.dtype == torch.int8 or _communicates(layer):
            # Input already quantized (fused norm+quant): no quantize to hide a prefetch behind.
            # flashcomm2 (v0.24.0rc1): the original quantizes, then all-to-alls; untouched.
            return original(self, layer, x, *args, **kwargs)
        start(x, getattr(layer, LAYER_ATTR), point)
        quantized = torch.ops.vllm.quantize(
            x,
            layer.aclnn_input_scale,
            layer.aclnn_input_scale_reciprocal,
            layer.aclnn_input_offset,
        )
        join(quantized, point)
        # The original sees int8 input and goes straight to its matmul.
        return original(self, layer, quantized, *args, **kwargs)

    return _mark(apply, original)


def _wrap_row_parallel_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    start, _ = _callers()

    @functools.wraps(original)
    def forward(self: Any, input_: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, input_, *args, **kwargs)
        point = getattr(self, AFTER_POINT_ATTR, None)
        if point is not None:
            start(out[0] if isinstance(out, tuple) else out, getattr(self, LAYER_ATTR), point)
        return out

    return _mark(forward, original)


def _wrap_swiglu(original: Callable[..., Any]) -> Callable[..., Any]:
    start, join = _callers()

    @functools.wraps(original)
    def forward_oot(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        point = getattr(self, OP_POINT_ATTR, None)
        if point is None:
            return original(self, x, *args, **kwargs)
        start(x, getattr(self, LAYER_ATTR), point)
        out = original(self, x, *args, **kwargs)
        join(out, point)
        return out

    return _mark(forward_oot, original)


def _wrap_select_experts(original: Callable[..., Any]) -> Callable[..., Any]:
    start, _ = _callers()

    @functools.wraps(original)
    def _select_experts(self: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        point = getattr(self, OP_POINT_ATTR, None)
        if point is not None and getattr(self, "_ascend_moe_lora_context", None) is None:
            start(hidden_states, getattr(self, LAYER_ATTR), point)
        return original(self, hidden_states, *args, **kwargs)

    return _mark(_select_experts, original)


def _wrap_quant_apply_mlp(original: Callable[..., Any]) -> Callable[..., Any]:
    _, join = _callers()

    @functools.wraps(original)
    def quant_apply_mlp(hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
        # Joined as the experts' MLP begins (native joined right after its dynamic quant).
        join(hidden_states, MOE_QUANT)
        return original(hidden_states, *args, **kwargs)

    return _mark(quant_apply_mlp, original)


_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "w8a8_apply": _wrap_w8a8_apply,
    "row_parallel_forward": _wrap_row_parallel_forward,
    "silu_and_mul": _wrap_swiglu,
    "silu_and_mul_clamp": _wrap_swiglu,
    "select_experts": _wrap_select_experts,
    "quant_apply_mlp": _wrap_quant_apply_mlp,
}


def resolve(point: HookPoint) -> tuple[Any, str, Any]:
    """(owner, attribute name, current value) of a hook point; raises if it cannot be found."""
    owner: Any = importlib.import_module(point.module)
    *path, name = point.attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name, getattr(owner, name)


@dataclass
class InstallReport:
    """Which hook points are wrapped, which are missing (with why), and the ops they provide."""

    installed: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    points: tuple[HookPoint, ...] = HOOK_POINTS  # the line's hook points this report is about

    @property
    def start_points(self) -> frozenset[str]:
        return frozenset(p for hp in self.points if hp.target in self.installed for p in hp.starts)

    @property
    def join_points(self) -> frozenset[str]:
        return frozenset(p for hp in self.points if hp.target in self.installed for p in hp.joins)


# owner, attribute, what the owner's own __dict__ held before (None: it was inherited)
_PATCHED: dict[str, tuple[Any, str, Any]] = {}
_MISSING = object()


def patch(owner: Any, name: str, wrapper: Callable[..., Any]) -> Any:
    """Replace `owner.name` by `wrapper`; returns what to restore (see `unpatch`)."""
    previous = owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING
    setattr(owner, name, wrapper)
    return previous


def unpatch(owner: Any, name: str, previous: Any) -> None:
    if previous is _MISSING:
        with contextlib.suppress(AttributeError):
            delattr(owner, name)
    else:
        setattr(owner, name, previous)


def install_hooks(points: Iterable[HookPoint] = HOOK_POINTS) -> InstallReport:
    """Wrap every hook point that can be found (idempotent); one warning line per missing one."""
    ensure_ops()
    points = tuple(points)
    report = InstallReport(points=points)
    for point in points:
        if point.target in _PATCHED:
            report.installed.append(point.target)
            continue
        try:
            owner, name, current = resolve(point)
        except Exception as exc:  # ImportError, AttributeError, or anything the import raises
            reason = f"{type(exc).__name__}: {exc}"
            report.missing[point.target] = reason
            logger.warning(
                "prefetch-tune runtime: hook point %s not found (%s); its prefetches are skipped",
                point.target,
                reason,
            )
            continue
        if hasattr(current, HOOK_MARK):
            report.installed.append(point.target)
            continue
        wrapper = _WRAPPERS[point.name](current)
        _PATCHED[point.target] = (owner, name, patch(owner, name, wrapper))
        report.installed.append(point.target)
    return report


def uninstall_hooks() -> None:
    """Restore every wrapped function (tests, or switching the runtime off in-process)."""
    for owner, name, previous in _PATCHED.values():
        unpatch(owner, name, previous)
    _PATCHED.clear()
    set_active(None)


def installed_hooks() -> list[str]:
    return list(_PATCHED)


default_device_factory: Callable[[], DeviceOps] = NpuDeviceOps
