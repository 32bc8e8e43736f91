"""The runtime plan: each rule of both semantics and every v0.23.0 quirk.

Per-rank weights used below (W8A8, 1 B/weight, hand-computed in test_models.py):
  qwen3-32b tp4: qkv 12.5 MiB, o 10 MiB, gate_up 62.5 MiB, down 31.25 MiB; 64 layers.
  qwen3-32b tp1: qkv 50 MiB, o 40 MiB, gate_up 250 MiB, down 125 MiB.
  qwen3-235b-a22b tp4 dp4 ep: qkv 9 MiB, o 8 MiB, w13 96 MiB (8 experts x 12 MiB); 94 layers.
The cap is 18 MiB.
"""

from __future__ import annotations

import pytest

from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.runtime.plan import (
    LayerPlan,
    PlanOptions,
    PrefetchOp,
    live_knobs,
    plan_layer,
)

MIB = 1048576
CAP = 18 * MIB
ZERO = {"attn.qkv": 0, "attn.o": 0, "moe.gate_up": 0, "mlp.gate_up": 0, "mlp.down": 0}

Q32 = load_model("qwen3-32b")
Q32_BF16 = load_model("qwen3-32b", "bf16")
Q235 = load_model("qwen3-235b-a22b")
Q30 = load_model("qwen3-30b-a3b")
TP4 = Layout(tp=4)
EP16 = Layout(tp=4, dp=4, ep=True)
SP = PlanOptions(sequence_parallel=True)


def mib(x: float) -> int:
    out = x * MIB
    assert out == int(out)
    return int(out)


def cfg(**ratios: float) -> PrefetchConfig:
    """`cfg(mlp__down=0.5)` -> PrefetchConfig.make({"mlp.down": 0.5})."""
    return PrefetchConfig.make(ratios={k.replace("__", "."): v for k, v in ratios.items()})


def op(p: LayerPlan, knob: str, weight: str) -> PrefetchOp:
    found = [o for o in p.ops if o.knob == knob and o.weight == weight]
    assert len(found) == 1, (knob, weight, [(o.knob, o.weight) for o in p.ops])
    return found[0]


def sites(p: LayerPlan) -> list[tuple[str, str]]:
    return [(o.knob, o.weight) for o in p.ops]


# ---- plugin semantics ------------------------------------------------------------------------------


def test_plugin_default_qwen3_32b_tp4() -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "plugin")
    assert sites(p) == [
        ("attn.qkv", "qkv_proj"),
        ("attn.o", "o_proj"),
        ("mlp.gate_up", "gate_up_proj"),
        ("mlp.down", "down_proj"),
    ]
    qkv, o, gate_up, down = p.ops
    assert (qkv.weight_bytes, qkv.bytes, qkv.capped, qkv.fires) == (13107200, 13107200, False, True)
    assert (o.weight_bytes, o.bytes, o.capped) == (10485760, 10485760, False)
    assert (gate_up.weight_bytes, gate_up.requested_bytes) == (mib(62.5), mib(62.5))
    assert (gate_up.bytes, gate_up.capped) == (CAP, True)
    assert (down.weight_bytes, down.requested_bytes) == (mib(31.25), mib(31.25))
    assert (down.bytes, down.capped) == (CAP, True)
    assert p.effective_bytes() == {
        "attn.qkv": mib(12.5),
        "attn.o": mib(10),
        "moe.gate_up": 0,
        "mlp.gate_up": mib(18),
        "mlp.down": mib(18),
    }
    # 12.5 + 10 + 18 + 18 = 58.5 MiB per layer; x 64 layers = 3744 MiB per decode step.
    assert p.bytes_per_layer == mib(58.5)
    assert p.bytes_per_step == mib(3744)


def test_plugin_start_and_join_points() -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "plugin")
    assert [(o.start_before, o.join_after, o.consumer) for o in p.ops] == [
        ("qkv_quant", "qkv_quant", "qkv_proj"),
        ("o_quant", "o_quant", "o_proj"),
        ("post_attention_layernorm", "swiglu", "gate_up_proj"),
        ("swiglu", "swiglu", "down_proj"),
    ]
    moe = op(plan_layer(Q235, EP16, PrefetchConfig.default(), 128), "moe.gate_up", "experts.w13")
    assert (moe.start_before, moe.join_after, moe.consumer) == (
        "gating_topk",
        "moe_quant",
        "w13_gmm",
    )


def test_plugin_flat_above_qwen3_32b_tp4() -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "plugin")
    # 18 / 62.5 = 0.288, 18 / 31.25 = 0.576; attn weights are below 18 MiB: never flat.
    assert p.flat_above == {
        "attn.qkv": None,
        "attn.o": None,
        "moe.gate_up": None,
        "mlp.gate_up": pytest.approx(0.288),
        "mlp.down": pytest.approx(0.576),
    }


@pytest.mark.parametrize(
    ("tp", "expected"),
    [
        # tp1: 18/50, 18/40, 18/250, 18/125.
        (1, {"attn.qkv": 0.36, "attn.o": 0.45, "mlp.gate_up": 0.072, "mlp.down": 0.144}),
        # tp2: 18/25, 18/20, 18/125, 18/62.5.
        (2, {"attn.qkv": 0.72, "attn.o": 0.9, "mlp.gate_up": 0.144, "mlp.down": 0.288}),
        # tp8: attn small; 18/31.25; down 15.625 MiB < 18: never.
        (8, {"attn.qkv": None, "attn.o": None, "mlp.gate_up": 0.576, "mlp.down": None}),
    ],
)
def test_plugin_flat_above_caps_every_path(tp: int, expected: dict[str, float | None]) -> None:
    p = plan_layer(Q32, Layout(tp=tp), PrefetchConfig.default(), 72, "plugin")
    want = {k: (None if v is None else pytest.approx(v)) for k, v in expected.items()}
    assert p.flat_above == {"moe.gate_up": None, **want}


def test_plugin_caps_every_path_native_only_mlp() -> None:
    plugin = plan_layer(Q32, Layout(tp=1), PrefetchConfig.default(), 72, "plugin")
    native = plan_layer(Q32, Layout(tp=1), PrefetchConfig.default(), 72, "native-0.23", SP)
    # plugin: qkv 50 MiB and o 40 MiB both clamped to 18.
    assert op(plugin, "attn.qkv", "qkv_proj").bytes == CAP
    assert op(plugin, "attn.qkv", "qkv_proj").capped
    assert op(plugin, "attn.o", "o_proj").bytes == CAP
    # native: attn is uncapped; MLP is clamped.
    assert op(native, "attn.qkv", "qkv_proj").bytes == mib(50)
    assert not op(native, "attn.qkv", "qkv_proj").capped
    assert op(native, "attn.o", "o_proj").bytes == mib(40)
    assert op(native, "attn.o", "down_proj").bytes == mib(125)
    assert op(native, "mlp.gate_up", "gate_up_proj").bytes == CAP
    assert op(native, "mlp.down", "down_proj").bytes == CAP
    assert native.flat_above["attn.qkv"] is None
    assert native.flat_above["attn.o"] is None
    assert native.flat_above["mlp.gate_up"] == pytest.approx(0.072)


def test_plugin_cap_is_configurable() -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "plugin", PlanOptions(cap_bytes=8 * MIB))
    assert [o.bytes for o in p.ops] == [8 * MIB] * 4
    assert all(o.capped for o in p.ops)
    # 8/12.5, 8/10, 8/62.5, 8/31.25.
    assert p.flat_above == {
        "attn.qkv": pytest.approx(0.64),
        "attn.o": pytest.approx(0.8),
        "moe.gate_up": None,
        "mlp.gate_up": pytest.approx(0.128),
        "mlp.down": pytest.approx(0.256),
    }


def test_native_cap_is_v023s_fixed_18_mib() -> None:
    # MAX_PREFETCH_WEIGHT_SIZE is a constant in v0.23.0; the plugin's cap option does not move it.
    opts = PlanOptions(sequence_parallel=True, cap_bytes=8 * MIB)
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "native-0.23", opts)
    assert op(p, "mlp.gate_up", "gate_up_proj").bytes == CAP
    assert op(p, "mlp.down", "down_proj").bytes == CAP
    assert op(p, "attn.qkv", "qkv_proj").bytes == mib(12.5)
    assert p.flat_above["mlp.gate_up"] == pytest.approx(0.288)


def test_plugin_ratio_below_cap_is_exact_bytes() -> None:
    # int(62.5 MiB x 0.2) = int(13107200.0) = 13107200 (12.5 MiB), under the cap.
    p = plan_layer(Q32, TP4, cfg(mlp__gate_up=0.2, mlp__down=0.5), 72, "plugin")
    gate_up = op(p, "mlp.gate_up", "gate_up_proj")
    assert (gate_up.ratio, gate_up.bytes, gate_up.capped) == (0.2, 13107200, False)
    # 31.25 MiB x 0.5 = 15.625 MiB = 16384000 bytes.
    assert op(p, "mlp.down", "down_proj").bytes == 16384000


def test_plugin_ratio_zero_is_off() -> None:
    p = plan_layer(Q32, TP4, cfg(attn__qkv=0.5, mlp__down=0.5), 72, "plugin")
    o = op(p, "attn.o", "o_proj")
    assert not o.fires
    assert o.bytes == 0
    assert "ratio 0" in o.reason
    assert not op(p, "mlp.gate_up", "gate_up_proj").fires
    assert op(p, "attn.qkv", "qkv_proj").bytes == 6553600  # 12.5 MiB x 0.5
    assert p.effective_bytes()["attn.o"] == 0
    assert p.effective_bytes()["mlp.gate_up"] == 0


def test_plugin_attn_o_does_not_hit_down_proj() -> None:
    p = plan_layer(Q32, TP4, cfg(attn__o=1.0, attn__qkv=1.0, mlp__down=0.1), 72, "plugin")
    assert [o.knob for o in p.ops if o.weight == "down_proj"] == ["mlp.down"]


# ---- MoE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "fires"), [(1, False), (95, False), (96, True), (4096, True)])
def test_plugin_moe_gate_up_fires_from_96_tokens(tokens: int, fires: bool) -> None:
    p = plan_layer(Q235, EP16, PrefetchConfig.default(), tokens, "plugin")
    assert sites(p) == [
        ("attn.qkv", "qkv_proj"),
        ("attn.o", "o_proj"),
        ("moe.gate_up", "experts.w13"),
    ]
    moe = op(p, "moe.gate_up", "experts.w13")
    assert moe.weight_bytes == mib(96)
    assert moe.fires is fires
    if fires:
        # default 0.8 x 96 MiB = 76.8 MiB requested -> int(80530636.8) = 80530636, capped to 18.
        assert (moe.requested_bytes, moe.bytes, moe.capped) == (80530636, CAP, True)
        assert p.effective_bytes() == {
            **ZERO,
            "attn.qkv": mib(9),
            "attn.o": mib(8),
            "moe.gate_up": CAP,
        }
        # (9 + 8 + 18) MiB x 94 layers = 3290 MiB.
        assert p.bytes_per_step == mib(3290)
    else:
        assert moe.bytes == 0
        assert "96" in moe.reason
        assert p.bytes_per_step == mib(17 * 94)


def test_plugin_moe_ratio_under_cap_and_flat_above() -> None:
    p = plan_layer(Q235, EP16, cfg(moe__gate_up=0.1), 128, "plugin")
    moe = op(p, "moe.gate_up", "experts.w13")
    # 100663296 x 0.1 = 10066329.6 -> 10066329 bytes.
    assert (moe.bytes, moe.capped) == (10066329, False)
    assert p.flat_above["moe.gate_up"] == pytest.approx(0.1875)  # 18 / 96


def test_plugin_moe_30b_a3b_tp4() -> None:
    # 128 experts x 2 x 192 x 2048 = 96 MiB w13 without EP.
    p = plan_layer(Q30, TP4, PrefetchConfig.default(), 256, "plugin")
    moe = op(p, "moe.gate_up", "experts.w13")
    assert (moe.weight_bytes, moe.bytes) == (mib(96), CAP)
    assert op(p, "attn.qkv", "qkv_proj").bytes == mib(2.5)


def test_native_moe_gate_up_is_dead_for_moe_models() -> None:
    p = plan_layer(Q235, EP16, PrefetchConfig.default(), 128, "native-0.23", SP)
    moe = op(p, "moe.gate_up", "experts.w13")
    assert not moe.fires
    assert moe.bytes == 0
    assert moe.reason.startswith("dead:")
    assert "layer_idx" in moe.reason
    assert "moe.gate_up" in p.dead
    assert p.effective_bytes() == {**ZERO, "attn.qkv": mib(9), "attn.o": mib(8)}


def test_moe_models_have_no_mlp_ops_and_mlp_is_dead() -> None:
    for semantics in ("plugin", "native-0.23"):
        p = plan_layer(Q235, EP16, PrefetchConfig.default(), 128, semantics)
        assert not [o for o in p.ops if o.knob.startswith("mlp.")]
        assert "MoE model" in p.dead["mlp.gate_up"]
        assert "MoE model" in p.dead["mlp.down"]


def test_plugin_bf16_moe_gate_up_is_dead() -> None:
    p = plan_layer(load_model("qwen3-235b-a22b", "bf16"), EP16, PrefetchConfig.default(), 128)
    assert not op(p, "moe.gate_up", "experts.w13").fires
    assert "unquant" in p.dead["moe.gate_up"]


# ---- native-0.23 quirks -----------------------------------------------------------------------------


def test_native_default_with_sp_prefetches_down_proj_twice() -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "native-0.23", SP)
    downs = [o for o in p.ops if o.weight == "down_proj" and o.fires]
    assert sorted((o.knob, o.bytes, o.capped) for o in downs) == [
        ("attn.o", mib(31.25), False),  # attn.o ratio on every RowParallelLinear, uncapped
        ("mlp.down", mib(18), True),  # mlp.down, clamped
    ]
    gate_up = op(p, "mlp.gate_up", "gate_up_proj")
    assert gate_up.fires
    assert (gate_up.bytes, gate_up.capped) == (CAP, True)
    assert "mlp.gate_up" not in p.dead
    assert p.effective_bytes() == {
        "attn.qkv": mib(12.5),
        "attn.o": mib(41.25),  # o_proj 10 + down_proj 31.25
        "moe.gate_up": 0,
        "mlp.gate_up": CAP,
        "mlp.down": CAP,
    }
    # 12.5 + 10 + 31.25 + 18 + 18 = 89.75 MiB per layer; x 64 = 5744 MiB.
    assert p.bytes_per_layer == mib(89.75)
    assert p.bytes_per_step == mib(5744)


def test_native_attn_o_down_proj_site_start_join() -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "native-0.23", SP)
    o = op(p, "attn.o", "down_proj")
    assert (o.start_before, o.join_after, o.consumer) == ("down_quant", "down_quant", "down_proj")


def test_native_mlp_gate_up_dead_without_sequence_parallel() -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "native-0.23")
    gate_up = op(p, "mlp.gate_up", "gate_up_proj")
    assert not gate_up.fires
    assert gate_up.bytes == 0
    assert "sequence parallel" in gate_up.reason
    assert "sequence parallel" in p.dead["mlp.gate_up"]
    assert op(p, "mlp.down", "down_proj").fires
    # 89.75 - 18 = 71.75 MiB per layer; x 64 = 4592 MiB.
    assert p.bytes_per_step == mib(4592)


def test_native_zero_knob_is_whole_weight_in_active_module() -> None:
    # {"attn": {"qkv": 0.5}}: o is 0, so native prefetches the WHOLE o_proj and down_proj.
    p = plan_layer(Q32, TP4, cfg(attn__qkv=0.5), 72, "native-0.23", SP)
    assert op(p, "attn.qkv", "qkv_proj").bytes == 6553600
    o = op(p, "attn.o", "o_proj")
    assert o.fires
    assert o.bytes == mib(10)
    assert "whole weight" in o.reason
    assert op(p, "attn.o", "down_proj").bytes == mib(31.25)


def test_native_zero_mlp_knob_is_whole_weight_uncapped() -> None:
    # v0.23: min(0, 18 MiB) = 0 -> "whole tensor", so the cap does not apply.
    p = plan_layer(Q32, TP4, cfg(mlp__down=0.5), 72, "native-0.23", SP)
    gate_up = op(p, "mlp.gate_up", "gate_up_proj")
    assert gate_up.fires
    assert (gate_up.bytes, gate_up.capped) == (mib(62.5), False)
    assert "whole weight" in gate_up.reason
    assert op(p, "mlp.down", "down_proj").bytes == 16384000  # 0.5 x 31.25 MiB, under the cap
    # Under plugin the same config leaves gate_up off.
    plugin = plan_layer(Q32, TP4, cfg(mlp__down=0.5), 72, "plugin")
    assert not op(plugin, "mlp.gate_up", "gate_up_proj").fires


def test_native_module_with_all_zero_ratios_is_off() -> None:
    p = plan_layer(Q32, TP4, cfg(attn__qkv=0, attn__o=0), 72, "native-0.23", SP)
    attn_ops = [o for o in p.ops if o.knob.startswith("attn.")]
    assert len(attn_ops) == 3  # qkv_proj, o_proj, down_proj
    for o in attn_ops:
        assert not o.fires
        assert "all attn ratios are 0" in o.reason
    assert p.effective_bytes() == {**ZERO, "mlp.gate_up": CAP, "mlp.down": CAP}


@pytest.mark.parametrize("semantics", ["plugin", "native-0.23"])
@pytest.mark.parametrize(("tokens", "fires"), [(1, True), (499, True), (500, False), (8192, False)])
def test_mlp_only_below_500_tokens(semantics: str, tokens: int, fires: bool) -> None:
    p = plan_layer(Q32, TP4, PrefetchConfig.default(), tokens, semantics, SP)
    for knob, weight in (("mlp.gate_up", "gate_up_proj"), ("mlp.down", "down_proj")):
        o = op(p, knob, weight)
        assert o.fires is fires
        if not fires:
            assert "500" in o.reason
    assert op(p, "attn.qkv", "qkv_proj").fires  # attn has no token threshold


@pytest.mark.parametrize("semantics", ["plugin", "native-0.23"])
def test_attn_only_for_w8a8(semantics: str) -> None:
    p = plan_layer(Q32_BF16, TP4, PrefetchConfig.default(), 72, semantics, SP)
    attn = [o for o in p.ops if o.knob.startswith("attn.")]
    assert attn
    assert not any(o.fires for o in attn)
    assert "W8A8" in p.dead["attn.qkv"]
    assert "W8A8" in p.dead["attn.o"]
    # MLP is dtype-agnostic: bf16 gate_up 125 MiB and down 62.5 MiB, both clamped.
    assert op(p, "mlp.gate_up", "gate_up_proj").weight_bytes == mib(125)
    assert p.effective_bytes() == {**ZERO, "mlp.gate_up": CAP, "mlp.down": CAP}
    assert p.flat_above["mlp.gate_up"] == pytest.approx(0.144)  # 18 / 125


@pytest.mark.parametrize("semantics", ["plugin", "native-0.23"])
@pytest.mark.parametrize("model", [Q32, Q235, Q30, load_model("qwen3-8b")])
def test_disabled_fires_nothing(model, semantics: str) -> None:
    layout = EP16 if model is Q235 else TP4
    p = plan_layer(model, layout, PrefetchConfig.off(), 128, semantics, SP)
    assert p.ops
    assert not p.firing
    assert all(o.bytes == 0 and o.reason == "prefetch disabled" for o in p.ops)
    assert p.effective_bytes() == ZERO
    assert p.bytes_per_step == 0


def test_live_knobs() -> None:
    plain = PlanOptions()
    assert live_knobs(Q32, "plugin", plain) == ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
    assert live_knobs(Q32, "native-0.23", plain) == ("attn.qkv", "attn.o", "mlp.down")
    assert live_knobs(Q32, "native-0.23", SP) == ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
    assert live_knobs(Q235, "plugin", plain) == ("attn.qkv", "attn.o", "moe.gate_up")
    assert live_knobs(Q235, "native-0.23", plain) == ("attn.qkv", "attn.o")
    assert live_knobs(Q32_BF16, "plugin", plain) == ("mlp.gate_up", "mlp.down")


def test_plan_rejects_unshardable_layout() -> None:
    with pytest.raises(ConfigError, match="--tp 3 does not divide the 64 attention heads"):
        plan_layer(Q32, Layout(tp=3), PrefetchConfig.default(), 72)


def test_to_dict() -> None:
    d = plan_layer(Q32, TP4, PrefetchConfig.default(), 72, "native-0.23").to_dict()
    assert d["prefetch_mib_per_layer"] == pytest.approx(71.75)
    assert d["prefetch_mib_per_step"] == pytest.approx(4592)
    assert d["cap_mib"] == 18.0
    assert d["layout"] == {"tp": 4, "dp": 1, "ep": False}
    assert "sequence parallel" in d["dead_knobs"]["mlp.gate_up"]
    assert len(d["ops"]) == 5
