"""The prefetch runtime's decisions, in one pure module (no torch).

Given a model, a parallel layout, a prefetch config, the tokens in one forward and a semantics,
`plan_layer` returns the prefetch operations of one decoder layer: which weight, how many bytes
after caps, which compute op starts it, after which compute op the compute stream joins it, and
whether it fires at all (and if not, why). The simulator models exactly these operations, the
vLLM plugin executes exactly these operations, `plan` prints them and the search space is cut
from them. Never copy these rules elsewhere.

Two semantics:

* `native-0.23` is vLLM-Ascend v0.23.0 as shipped, quirks included: 0 or a missing knob means the
  whole weight once its module is on; only the MLP paths are capped (18 MiB); the `attn.o` ratio
  hits every RowParallelLinear, so dense models prefetch down_proj twice; `mlp.gate_up` starts
  only with sequence parallel; `moe.gate_up` never fires; MLP only below 500 tokens, MoE only
  from 96; attn only in static W8A8 linears.
* `plugin` is prefetch-tune's own runtime: 0 is off, `attn.o` hits only o_proj, MoE prefetches
  its own layer's w13, one cap (default 18 MiB) on every path, the same thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from prefetch_tune.models import Layout, MiB, ModelSpec
from prefetch_tune.prefetch import KNOBS, MODULE_KNOBS, PrefetchConfig, Semantics, module_of

DEFAULT_CAP_MIB = 18.0  # vLLM-Ascend's MAX_PREFETCH_WEIGHT_SIZE
DEFAULT_CAP_BYTES = int(DEFAULT_CAP_MIB * MiB)
NATIVE_CAP_BYTES = DEFAULT_CAP_BYTES  # a constant in v0.23.0: `cap_bytes` does not change it
MLP_TOKEN_LIMIT = 500  # MLP prefetch only when a forward has fewer tokens than this
MOE_TOKEN_MIN = 96  # MoE prefetch only when a forward has at least this many tokens

# Compute-stream ops of one decoder layer. The sim lays its timeline out with these names and
# the plugin's hooks sit at them, so a plan op's start/join points mean the same everywhere.
INPUT_NORM = "input_layernorm"
QKV_QUANT = "qkv_quant"
QKV_PROJ = "qkv_proj"
QK_NORM_ROPE = "qk_norm_rope"
ATTENTION = "attention"
O_QUANT = "o_quant"
O_PROJ = "o_proj"
O_REDUCE = "o_allreduce"
POST_NORM = "post_attention_layernorm"
GATE_UP_QUANT = "gate_up_quant"
GATE_UP_PROJ = "gate_up_proj"
SWIGLU = "swiglu"
DOWN_QUANT = "down_quant"
DOWN_PROJ = "down_proj"
DOWN_REDUCE = "down_allreduce"
ROUTER = "router_gate"
GATING = "gating_topk"
DISPATCH = "moe_dispatch"
MOE_QUANT = "moe_quant"
W13_GMM = "w13_gmm"
MOE_SWIGLU = "moe_swiglu"
W2_GMM = "w2_gmm"
COMBINE = "moe_combine"


@dataclass(frozen=True)
class PlanOptions:
    """Serving options the runtime's decisions depend on."""

    sequence_parallel: bool = False  # FlashComm1 / SP: native mlp.gate_up needs it
    cap_bytes: int = DEFAULT_CAP_BYTES  # the plugin's single cap (native: fixed 18 MiB, MLP only)


@dataclass(frozen=True)
class PrefetchOp:
    """One prefetch of one decoder layer: started as `start_before` begins on the compute
    stream, joined (compute waits for it) right after `join_after` ends."""

    knob: str
    weight: str
    weight_bytes: int
    ratio: float
    requested_bytes: int
    bytes: int
    capped: bool
    start_before: str
    join_after: str
    consumer: str  # the matmul that reads the prefetched weight
    fires: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "knob": self.knob,
            "weight": self.weight,
            "weight_mib": self.weight_bytes / MiB,
            "ratio": self.ratio,
            "requested_mib": self.requested_bytes / MiB,
            "mib": self.bytes / MiB,
            "bytes": self.bytes,
            "capped": self.capped,
            "start_before": self.start_before,
            "join_after": self.join_after,
            "consumer": self.consumer,
            "fires": self.fires,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class LayerPlan:
    """What the runtime does in one decoder layer, plus what the search space needs to know."""

    model: ModelSpec
    layout: Layout
    config: PrefetchConfig
    tokens: int | None
    semantics: Semantics
    options: PlanOptions
    ops: tuple[PrefetchOp, ...]
    dead: dict[str, str] = field(default_factory=dict)
    flat_above: dict[str, float | None] = field(default_factory=dict)

    @property
    def firing(self) -> tuple[PrefetchOp, ...]:
        return tuple(op for op in self.ops if op.fires)

    @property
    def bytes_per_layer(self) -> int:
        return sum(op.bytes for op in self.firing)

    @property
    def bytes_per_step(self) -> int:
        return self.bytes_per_layer * self.model.layers

    def effective_bytes(self) -> dict[str, int]:
        """Bytes per layer each knob actually prefetches (0 when it does not fire)."""
        out = dict.fromkeys(KNOBS, 0)
        for op in self.firing:
            out[op.knob] += op.bytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "quant": self.model.quant,
            "layout": {"tp": self.layout.tp, "dp": self.layout.dp, "ep": self.layout.ep},
            "semantics": self.semantics,
            "sequence_parallel": self.options.sequence_parallel,
            "cap_mib": _cap(self.semantics, self.options) / MiB,
            "tokens": self.tokens,
            "config": self.config.to_json_obj(),
            "ops": [op.to_dict() for op in self.ops],
            "dead_knobs": self.dead,
            "flat_above": self.flat_above,
            "prefetch_mib_per_layer": self.bytes_per_layer / MiB,
            "prefetch_mib_per_step": self.bytes_per_step / MiB,
        }


@dataclass(frozen=True)
class _Site:
    """A place in the layer where a knob's prefetch can be issued."""

    knob: str
    weight: str
    start_before: str
    join_after: str
    consumer: str


@lru_cache(maxsize=256)
def _sites(model: ModelSpec, semantics: Semantics) -> tuple[_Site, ...]:
    sites = [
        _Site("attn.qkv", "qkv_proj", QKV_QUANT, QKV_QUANT, QKV_PROJ),
        _Site("attn.o", "o_proj", O_QUANT, O_QUANT, O_PROJ),
    ]
    if model.is_moe:
        sites.append(_Site("moe.gate_up", "experts.w13", GATING, MOE_QUANT, W13_GMM))
    else:
        if semantics == "native-0.23":
            # Class-name match: every AscendRowParallelLinear takes the attn.o ratio.
            sites.append(_Site("attn.o", "down_proj", DOWN_QUANT, DOWN_QUANT, DOWN_PROJ))
        sites.append(_Site("mlp.gate_up", "gate_up_proj", POST_NORM, SWIGLU, GATE_UP_PROJ))
        sites.append(_Site("mlp.down", "down_proj", SWIGLU, SWIGLU, DOWN_PROJ))
    return tuple(sites)


@lru_cache(maxsize=256)
def _weights(model: ModelSpec, layout: Layout) -> dict[str, int]:
    """`model.weight_bytes(layout)`, computed once per model and layout (callers only read it)."""
    return model.weight_bytes(layout)


def dead_knobs(model: ModelSpec, semantics: Semantics, options: PlanOptions) -> dict[str, str]:
    """Knobs that can never fire for this model, semantics and options, with the reason."""
    return dict(_dead_knobs(model, semantics, options))


@lru_cache(maxsize=256)
def _dead_knobs(
    model: ModelSpec, semantics: Semantics, options: PlanOptions
) -> tuple[tuple[str, str], ...]:
    dead: dict[str, str] = {}
    if model.quant != "w8a8":
        for knob in ("attn.qkv", "attn.o"):
            dead[knob] = (
                "attn prefetch lives only in static W8A8 linears "
                f"(AscendW8A8LinearMethod.apply); {model.name} is {model.quant}"
            )
    if model.is_moe:
        for knob in ("mlp.gate_up", "mlp.down"):
            dead[knob] = "MoE model: the mlp module is only used on dense models"
        if semantics == "native-0.23":
            dead["moe.gate_up"] = (
                "v0.23.0 looks the weight up at layers[layer_idx - 1] while "
                "layer_idx never advances on MoE models; its layer_idx <= 0 "
                "guard then returns None, so it never fires"
            )
        elif model.quant != "w8a8":
            dead["moe.gate_up"] = (
                "bf16 experts run unquant_apply_mlp, which has no join point, "
                "so the runtime never starts it"
            )
    else:
        dead["moe.gate_up"] = "dense model: no experts"
        if semantics == "native-0.23" and not options.sequence_parallel:
            dead["mlp.gate_up"] = (
                "v0.23.0 starts it only in CustomRowParallelOp, which o_proj "
                "uses only with sequence parallel / FlashComm1 "
                "(--sequence-parallel)"
            )
    return tuple(dead.items())


def _is_capped(semantics: Semantics, knob: str) -> bool:
    return semantics == "plugin" or module_of(knob) == "mlp"


def _cap(semantics: Semantics, options: PlanOptions) -> int:
    return options.cap_bytes if semantics == "plugin" else NATIVE_CAP_BYTES


def flat_above(
    model: ModelSpec, layout: Layout, semantics: Semantics, options: PlanOptions
) -> dict[str, float | None]:
    """Per knob, the ratio above which larger ratios prefetch the same bytes (None: never)."""
    return dict(_flat_above(model, layout, semantics, options))


@lru_cache(maxsize=256)
def _flat_above(
    model: ModelSpec, layout: Layout, semantics: Semantics, options: PlanOptions
) -> tuple[tuple[str, float | None], ...]:
    weights = _weights(model, layout)
    out: dict[str, float | None] = {}
    for knob in KNOBS:
        sizes = [weights[s.weight] for s in _sites(model, semantics) if s.knob == knob]
        if not sizes or not _is_capped(semantics, knob):
            out[knob] = None
            continue
        ratio = _cap(semantics, options) / max(sizes)
        out[knob] = ratio if ratio < 1.0 else None
    return tuple(out.items())


def _op_bytes(
    semantics: Semantics, knob: str, weight_bytes: int, ratio: float, cap: int
) -> tuple[int, int, bool, str]:
    """(requested, after cap, capped, note) for one prefetch."""
    requested = int(weight_bytes * ratio)
    if semantics == "plugin":
        size = min(requested, cap)
        return requested, size, size < requested, ""
    # native-0.23: the MLP paths clamp first; then 0 (or anything above the tensor) means all.
    size = min(requested, cap) if module_of(knob) == "mlp" else requested
    capped = size < requested
    note = ""
    if size <= 0:
        size = weight_bytes
        note = "native reads 0 as the whole weight (uncapped)"
        requested = weight_bytes
    return requested, size, capped, note


def _module_on(config: PrefetchConfig, module: str) -> bool:
    return config.enabled and any(config.ratio(f"{module}.{k}") > 0 for k in MODULE_KNOBS[module])


def plan_layer(
    model: ModelSpec,
    layout: Layout,
    config: PrefetchConfig,
    tokens: int | None,
    semantics: Semantics = "plugin",
    options: PlanOptions | None = None,
) -> LayerPlan:
    """The prefetch operations of one decoder layer for a forward of `tokens` tokens.

    `tokens=None` skips the token thresholds: what the layer prefetches whenever it does.
    """
    options = options or PlanOptions()
    weights = _weights(model, layout)
    dead = dead_knobs(model, semantics, options)
    ops: list[PrefetchOp] = []
    for site in _sites(model, semantics):
        knob = site.knob
        ratio = config.ratio(knob)
        wbytes = weights[site.weight]
        requested, size, capped, note = _op_bytes(
            semantics, knob, wbytes, ratio, _cap(semantics, options)
        )
        why = _why_not(model, config, tokens, semantics, knob, dead)
        fires = not why
        ops.append(
            PrefetchOp(
                knob=knob,
                weight=site.weight,
                weight_bytes=wbytes,
                ratio=ratio,
                requested_bytes=requested if fires else 0,
                bytes=size if fires else 0,
                capped=capped and fires,
                start_before=site.start_before,
                join_after=site.join_after,
                consumer=site.consumer,
                fires=fires,
                reason=why or note,
            )
        )
    return LayerPlan(
        model=model,
        layout=layout,
        config=config,
        tokens=tokens,
        semantics=semantics,
        options=options,
        ops=tuple(ops),
        dead=dead,
        flat_above=flat_above(model, layout, semantics, options),
    )


def _why_not(
    model: ModelSpec,
    config: PrefetchConfig,
    tokens: int | None,
    semantics: Semantics,
    knob: str,
    dead: dict[str, str],
) -> str:
    """Empty when the op fires; otherwise the one-line reason it does not."""
    if not config.enabled:
        return "prefetch disabled"
    if knob in dead:
        return f"dead: {dead[knob]}"
    module = module_of(knob)
    if semantics == "plugin" and config.ratio(knob) == 0:
        return "ratio 0 (off)"
    if semantics == "native-0.23" and not _module_on(config, module):
        return f"all {module} ratios are 0, so native turns the module off"
    if tokens is None:  # structural question: would it fire at some token count?
        return ""
    if module == "mlp" and tokens >= MLP_TOKEN_LIMIT:
        return f"{tokens} tokens in this forward; MLP prefetch only below {MLP_TOKEN_LIMIT}"
    if module == "moe" and tokens < MOE_TOKEN_MIN:
        return f"{tokens} tokens in this forward; MoE prefetch only from {MOE_TOKEN_MIN}"
    return ""


def live_knobs(model: ModelSpec, semantics: Semantics, options: PlanOptions) -> tuple[str, ...]:
    """The knobs a search should vary: all but the dead ones."""
    dead = dead_knobs(model, semantics, options)
    return tuple(k for k in KNOBS if k not in dead)
