"""Model specs: catalog facts, local model directories, per-rank bytes of each weight.

Every expected byte count below was computed by hand from the config.json facts:

    qkv_proj      = hidden x (heads/tp + 2 x kv_per_rank) x head_dim x B
                    kv_per_rank = kv_heads/tp while kv_heads >= tp, else 1 (replicated)
    o_proj        = (heads/tp) x head_dim x hidden x B
    gate_up_proj  = hidden x 2 x (intermediate/tp) x B
    down_proj     = (intermediate/tp) x hidden x B
    experts.w13   = local_experts x 2 x expert_inter x hidden x B
    experts.w2    = local_experts x expert_inter x hidden x B
                    EP on:  local_experts = experts/(tp x dp), expert_inter = moe_intermediate
                    EP off: local_experts = experts,           expert_inter = moe_intermediate/tp
    B = 1 byte for w8a8, 2 for bf16; 1 MiB = 1048576 bytes.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, ModelSpec, catalog_names, load_model

MIB = 1048576


def mib(x: float) -> int:
    """MiB -> bytes; every value in these tables is an exact multiple of 1/64 MiB."""
    out = x * MIB
    assert out == int(out)
    return int(out)


DENSE = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
MOE = ("qkv_proj", "o_proj", "experts.w13", "experts.w2")

# (model, tp, dp, ep) -> per-rank MiB of (qkv, o, gate_up|w13, down|w2), W8A8.
W8A8_TABLE: list[tuple[str, int, int, bool, tuple[float, float, float, float]]] = [
    # Qwen3-8B: H 4096, I 12288, 32 heads / 8 kv x 128.
    #   qkv tp1 = 4096 x (32+16) x 128 = 24 MiB; o = 4096 x 4096 = 16 MiB;
    #   gate_up = 4096 x 24576 = 96 MiB; down = 48 MiB; all halve with each tp doubling.
    ("qwen3-8b", 1, 1, False, (24, 16, 96, 48)),
    ("qwen3-8b", 2, 1, False, (12, 8, 48, 24)),
    ("qwen3-8b", 4, 1, False, (6, 4, 24, 12)),
    ("qwen3-8b", 8, 1, False, (3, 2, 12, 6)),  # 4 q + 1 + 1 kv heads per rank
    # Qwen3-32B: H 5120, I 25600, 64 heads / 8 kv x 128.
    #   qkv tp1 = 5120 x 80 x 128 = 50 MiB; o = 8192 x 5120 = 40 MiB;
    #   gate_up = 5120 x 51200 = 250 MiB; down = 125 MiB.
    ("qwen3-32b", 1, 1, False, (50, 40, 250, 125)),
    ("qwen3-32b", 2, 1, False, (25, 20, 125, 62.5)),
    ("qwen3-32b", 4, 1, False, (12.5, 10, 62.5, 31.25)),
    ("qwen3-32b", 8, 1, False, (6.25, 5, 31.25, 15.625)),
    # Qwen3-30B-A3B: H 2048, 32 heads / 4 kv x 128, 128 experts x moe_inter 768.
    #   qkv tp1 = 2048 x 40 x 128 = 10 MiB; tp8: 4 q + 1 + 1 (kv replicated) = 768 -> 1.5 MiB.
    #   o tp1 = 4096 x 2048 = 8 MiB.  w13 no EP = 128 x 2 x (768/tp) x 2048 = 384/tp MiB.
    ("qwen3-30b-a3b", 1, 1, False, (10, 8, 384, 192)),
    ("qwen3-30b-a3b", 2, 1, False, (5, 4, 192, 96)),
    ("qwen3-30b-a3b", 4, 1, False, (2.5, 2, 96, 48)),
    ("qwen3-30b-a3b", 8, 1, False, (1.5, 1, 48, 24)),
    # Qwen3-235B-A22B: H 4096, 64 heads / 4 kv x 128, 128 experts x moe_inter 1536.
    #   qkv tp1 = 4096 x 72 x 128 = 36 MiB; tp8: 8 q + 1 + 1 (kv replicated) = 1280 -> 5 MiB.
    #   o tp1 = 8192 x 4096 = 32 MiB.  w13 no EP = 128 x 2 x (1536/tp) x 4096 = 1536/tp MiB.
    ("qwen3-235b-a22b", 1, 1, False, (36, 32, 1536, 768)),
    ("qwen3-235b-a22b", 2, 1, False, (18, 16, 768, 384)),
    ("qwen3-235b-a22b", 4, 1, False, (9, 8, 384, 192)),
    ("qwen3-235b-a22b", 8, 1, False, (5, 4, 192, 96)),
    # Expert parallel: one expert's w13 = 2 x 1536 x 4096 = 12 MiB, w2 = 6 MiB.
    #   tp4 dp4 ep: 128/16 = 8 experts -> w13 96 MiB, w2 48 MiB (the high-throughput layout).
    ("qwen3-235b-a22b", 4, 4, True, (9, 8, 96, 48)),
    #   tp8 ep (dp1): 16 experts -> w13 192 MiB.
    ("qwen3-235b-a22b", 8, 1, True, (5, 4, 192, 96)),
    #   tp16 ep: 4 q + 1 + 1 kv -> 768 x 4096 = 3 MiB qkv; o 2 MiB; 8 experts -> 96 MiB.
    ("qwen3-235b-a22b", 16, 1, True, (3, 2, 96, 48)),
    # Qwen3-30B-A3B tp2 dp2 ep: 128/4 = 32 experts x (2 x 768 x 2048 = 3 MiB) = 96 MiB,
    # whereas tp2 dp2 without EP keeps all experts at 768/2: 192 MiB.
    ("qwen3-30b-a3b", 2, 2, True, (5, 4, 96, 48)),
    ("qwen3-30b-a3b", 2, 2, False, (5, 4, 192, 96)),
]


@pytest.mark.parametrize(
    ("name", "tp", "dp", "ep", "expected"),
    W8A8_TABLE,
    ids=[f"{n}-tp{tp}-dp{dp}{'-ep' if ep else ''}" for n, tp, dp, ep, _ in W8A8_TABLE],
)
def test_per_rank_bytes_w8a8(
    name: str, tp: int, dp: int, ep: bool, expected: tuple[float, ...]
) -> None:
    spec = load_model(name)
    keys = MOE if name.startswith("qwen3-30b") or name.startswith("qwen3-235b") else DENSE
    want = {k: mib(v) for k, v in zip(keys, expected, strict=True)}
    assert spec.weight_bytes(Layout(tp=tp, dp=dp, ep=ep)) == want


def test_235b_tp4_dp4_ep_w13_is_96_mib_in_bytes() -> None:
    # 8 local experts x 2 x 1536 x 4096 x 1 B = 100663296 bytes.
    got = load_model("qwen3-235b-a22b").weight_bytes(Layout(tp=4, dp=4, ep=True))
    assert got["experts.w13"] == 100663296
    assert got["experts.w2"] == 50331648


@pytest.mark.parametrize(
    ("name", "tp", "dp", "ep", "expected"),
    [
        # bf16 = 2 bytes per weight: twice the W8A8 numbers above.
        ("qwen3-32b", 4, 1, False, (25, 20, 125, 62.5)),
        ("qwen3-8b", 1, 1, False, (48, 32, 192, 96)),
        ("qwen3-235b-a22b", 4, 4, True, (18, 16, 192, 96)),
    ],
)
def test_per_rank_bytes_bf16(
    name: str, tp: int, dp: int, ep: bool, expected: tuple[float, ...]
) -> None:
    spec = load_model(name, "bf16")
    assert spec.quant == "bf16"
    keys = DENSE if not spec.is_moe else MOE
    want = {k: mib(v) for k, v in zip(keys, expected, strict=True)}
    assert spec.weight_bytes(Layout(tp=tp, dp=dp, ep=ep)) == want


def test_kv_heads_split_then_replicated() -> None:
    spec = load_model("qwen3-235b-a22b")  # 4 KV heads
    assert [spec.kv_heads_per_rank(Layout(tp=t)) for t in (1, 2, 4, 8, 16)] == [4, 2, 1, 1, 1]


def test_local_experts_and_expert_intermediate() -> None:
    spec = load_model("qwen3-235b-a22b")
    assert spec.local_experts(Layout(tp=4, dp=4, ep=True)) == 8
    assert spec.expert_intermediate_per_rank(Layout(tp=4, dp=4, ep=True)) == 1536
    assert spec.local_experts(Layout(tp=4, dp=4, ep=False)) == 128
    assert spec.expert_intermediate_per_rank(Layout(tp=4, dp=4, ep=False)) == 384


# ---- layouts that cannot shard ---------------------------------------------------------


def _custom(**changes: int) -> ModelSpec:
    base = ModelSpec(
        name="custom",
        hidden=4096,
        intermediate=12288,
        layers=4,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=1000,
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("spec", "layout", "needle"),
    [
        (load_model("qwen3-32b"), Layout(tp=3), "--tp 3 does not divide the 64 attention heads"),
        (load_model("qwen3-32b"), Layout(tp=0), ">= 1"),
        (load_model("qwen3-32b"), Layout(tp=4, dp=0), ">= 1"),
        (_custom(heads=24, kv_heads=8), Layout(tp=6), "8 KV heads"),
        (_custom(intermediate=1002), Layout(tp=4), "intermediate size 1002"),
        (load_model("qwen3-235b-a22b"), Layout(tp=4, dp=3, ep=True), "expert parallel size 12"),
        (
            dataclasses.replace(load_model("qwen3-235b-a22b"), moe_intermediate=1000),
            Layout(tp=16),
            "expert intermediate size 1000",
        ),
        (load_model("qwen3-32b"), Layout(tp=4, ep=True), "dense model"),
    ],
    ids=["heads", "tp0", "dp0", "kv-heads", "intermediate", "ep-size", "moe-inter", "dense-ep"],
)
def test_unshardable_layouts_raise_config_error(
    spec: ModelSpec, layout: Layout, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        spec.weight_bytes(layout)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_kv_heads_multiple_of_tp_is_fine() -> None:
    # 24 heads / 8 kv at tp 8 (kv split 1 each) and tp 24 (kv replicated): both shard.
    spec = _custom(heads=24, kv_heads=8, intermediate=24576)
    spec.check_layout(Layout(tp=8))
    spec.check_layout(Layout(tp=24))


# ---- catalog -------------------------------------------------------------------------


def test_catalog_names() -> None:
    assert catalog_names() == ["qwen3-235b-a22b", "qwen3-30b-a3b", "qwen3-32b", "qwen3-8b"]


@pytest.mark.parametrize(
    ("name", "facts"),
    [
        ("qwen3-8b", (4096, 12288, 36, 32, 8, 128, 0, 0, 0)),
        ("qwen3-32b", (5120, 25600, 64, 64, 8, 128, 0, 0, 0)),
        ("qwen3-30b-a3b", (2048, 6144, 48, 32, 4, 128, 128, 8, 768)),
        ("qwen3-235b-a22b", (4096, 12288, 94, 64, 4, 128, 128, 8, 1536)),
    ],
)
def test_catalog_facts(name: str, facts: tuple[int, ...]) -> None:
    s = load_model(name)
    got = (
        s.hidden,
        s.intermediate,
        s.layers,
        s.heads,
        s.kv_heads,
        s.head_dim,
        s.experts,
        s.experts_per_token,
        s.moe_intermediate,
    )
    assert got == facts
    assert s.vocab == 151936
    assert s.quant == "w8a8"  # the catalog describes the W8A8 releases
    assert s.is_moe == (facts[6] > 0)


def test_catalog_name_is_case_insensitive() -> None:
    assert load_model("Qwen3-32B").name == "qwen3-32b"


def test_unknown_catalog_name_suggests_close_match() -> None:
    with pytest.raises(ConfigError) as info:
        load_model("qwen3-33b")
    msg = str(info.value)
    assert "qwen3-33b" in msg
    assert "did you mean 'qwen3-32b'" in msg


def test_missing_path_is_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such model directory"):
        load_model(str(tmp_path / "nope"))


# ---- local model directories --------------------------------------------------------------


def test_model_dir_without_description_is_bf16(make_model_dir) -> None:
    d = make_model_dir()
    s = load_model(str(d))
    assert s.quant == "bf16"
    assert s.name == "Qwen3-32B-local"
    assert (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim) == (
        5120,
        25600,
        64,
        64,
        8,
        128,
    )
    assert not s.is_moe
    # bf16 at tp4: gate_up 2 x 62.5 MiB.
    assert s.weight_bytes(Layout(tp=4))["gate_up_proj"] == mib(125)


def test_model_dir_with_w8a8_description_is_w8a8(make_model_dir, w8a8_description) -> None:
    d = make_model_dir(description=w8a8_description)
    s = load_model(str(d))
    assert s.quant == "w8a8"
    assert s.weight_bytes(Layout(tp=4))["gate_up_proj"] == mib(62.5)


def test_model_dir_with_float_only_description_is_bf16(make_model_dir) -> None:
    d = make_model_dir(description={"model.embed_tokens.weight": "FLOAT"})
    assert load_model(str(d)).quant == "bf16"


def test_model_dir_quantization_config_w8a8(make_model_dir, hf_config) -> None:
    cfg = {**hf_config, "quantization_config": {"quant_method": "w8a8"}}
    assert load_model(str(make_model_dir(config=cfg))).quant == "w8a8"


def test_explicit_quant_overrides_detection(make_model_dir, w8a8_description) -> None:
    d = make_model_dir(description=w8a8_description)
    assert load_model(str(d), "bf16").quant == "bf16"


def test_model_dir_moe_facts(make_model_dir, w8a8_description) -> None:
    cfg = {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 94,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 1536,
    }
    d = make_model_dir(name="Qwen3-235B-A22B-W8A8", config=cfg, description=w8a8_description)
    s = load_model(str(d))
    assert s.is_moe and s.quant == "w8a8"
    assert s.weight_bytes(Layout(tp=4, dp=4, ep=True))["experts.w13"] == mib(96)


def test_model_dir_without_config_json(make_model_dir) -> None:
    d = make_model_dir(config=None)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_model(str(d))


def test_model_dir_missing_required_key(make_model_dir, hf_config) -> None:
    cfg = {k: v for k, v in hf_config.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="hidden_size"):
        load_model(str(make_model_dir(config=cfg)))


def test_model_dir_unreadable_json(make_model_dir) -> None:
    d = make_model_dir(config=None)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: cannot read JSON"):
        load_model(str(d))


def test_mla_model_dir_is_rejected(make_model_dir, hf_config) -> None:
    cfg = {**hf_config, "kv_lora_rank": 512}
    with pytest.raises(ConfigError, match="MLA"):
        load_model(str(make_model_dir(config=cfg)))


def test_summary_is_json_ready() -> None:
    summary = load_model("qwen3-30b-a3b").summary()
    assert json.loads(json.dumps(summary))["moe_intermediate"] == 768
    assert summary["name"] == "qwen3-30b-a3b"
