"""The weight_prefetch_config contract: parse, canonical JSON, merge, native translation, emit."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefetch_tune.errors import ConfigError
from prefetch_tune.prefetch import (
    KNOBS,
    PrefetchConfig,
    deep_merge,
    emit,
    load_json_object,
    native_translation,
    parse_additional_config,
    parse_config_json,
    parse_set_options,
    parse_weight_prefetch_config,
)

ALL_KNOBS = ("attn.qkv", "attn.o", "moe.gate_up", "mlp.gate_up", "mlp.down")


def ratios(
    qkv: float = 0.0, o: float = 0.0, moe: float = 0.0, gate_up: float = 0.0, down: float = 0.0
) -> tuple[tuple[str, float], ...]:
    return (
        ("attn.qkv", qkv),
        ("attn.o", o),
        ("moe.gate_up", moe),
        ("mlp.gate_up", gate_up),
        ("mlp.down", down),
    )


DEFAULTS = ratios(1.0, 1.0, 0.8, 1.0, 1.0)


def test_knob_names() -> None:
    assert ALL_KNOBS == KNOBS


# ---- PrefetchConfig ---------------------------------------------------------------------


def test_default_is_vllm_ascend_documented_default() -> None:
    assert PrefetchConfig.default() == PrefetchConfig(enabled=True, ratios=DEFAULTS)


def test_off_has_zero_ratios() -> None:
    assert PrefetchConfig.off() == PrefetchConfig(enabled=False, ratios=ratios())


def test_make_unnamed_modules_take_defaults_named_module_missing_knob_is_off() -> None:
    cfg = PrefetchConfig.make(ratios={"mlp.down": 0.5})
    assert cfg.ratios == ratios(qkv=1.0, o=1.0, moe=0.8, gate_up=0.0, down=0.5)


def test_make_rejects_unknown_knob_and_bad_ratio() -> None:
    with pytest.raises(ConfigError, match=r"mlp\.up"):
        PrefetchConfig.make(ratios={"mlp.up": 0.5})
    with pytest.raises(ConfigError, match=r"mlp\.down: 1\.5 is outside \[0, 1\]"):
        PrefetchConfig.make(ratios={"mlp.down": 1.5})


def test_disabled_config_normalises_ratios() -> None:
    # Disabled prefetches nothing; two disabled configs mean the same and must compare equal.
    cfg = PrefetchConfig.make(enabled=False, ratios={"mlp.down": 0.5})
    assert cfg.ratios == ratios()
    assert cfg == PrefetchConfig.off()


def test_active_ratio() -> None:
    cfg = PrefetchConfig.make(ratios={"mlp.down": 0.5})
    assert cfg.active_ratio("mlp.down") == 0.5
    assert PrefetchConfig.off().active_ratio("mlp.down") == 0.0


def test_with_ratios_keeps_others_and_enables() -> None:
    cfg = PrefetchConfig.default().with_ratios({"mlp.down": 0.25})
    assert cfg == PrefetchConfig(True, ratios(1.0, 1.0, 0.8, 1.0, 0.25))
    assert PrefetchConfig.off().with_ratios({"attn.o": 0.5}) == PrefetchConfig(True, ratios(o=0.5))
    with pytest.raises(ConfigError, match="outside"):
        PrefetchConfig.default().with_ratios({"mlp.down": -0.1})


def test_canonical_json_is_sorted_compact_and_explicit() -> None:
    cfg = PrefetchConfig.make(ratios={"mlp.gate_up": 0.3, "mlp.down": 0.5})
    assert cfg.canonical_json() == (
        '{"enabled":true,"prefetch_ratio":{"attn":{"o":1.0,"qkv":1.0},'
        '"mlp":{"down":0.5,"gate_up":0.3},"moe":{"gate_up":0.8}}}'
    )
    assert PrefetchConfig.off().canonical_json() == '{"enabled":false}'


def test_label() -> None:
    cfg = PrefetchConfig(True, ratios(0.5, 0.0, 0.8, 0.123456, 1.0))
    assert cfg.label() == "attn.qkv=0.5 attn.o=0 moe.gate_up=0.8 mlp.gate_up=0.1235 mlp.down=1"
    assert PrefetchConfig.off().label() == "off"


# ---- parse_weight_prefetch_config ------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"enabled": True}, PrefetchConfig(True, DEFAULTS)),
        ({}, PrefetchConfig(False, ratios())),
        ({"enabled": False, "prefetch_ratio": {"mlp": {"down": 0.5}}}, PrefetchConfig.off()),
        (
            {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 0.5}}},
            PrefetchConfig(True, ratios(qkv=0.5, moe=0.8, gate_up=1.0, down=1.0)),
        ),
        (
            # An empty module object means that module's defaults (as vLLM-Ascend reads it).
            {"enabled": True, "prefetch_ratio": {"attn": {}, "mlp": {"down": 0.2}}},
            PrefetchConfig(True, ratios(1.0, 1.0, 0.8, 0.0, 0.2)),
        ),
        (
            {"enabled": True, "prefetch_ratio": {"mlp": {"gate_up": 0, "down": 1}}},
            PrefetchConfig(True, ratios(1.0, 1.0, 0.8, 0.0, 1.0)),
        ),
        ({"enabled": True, "prefetch_ratio": {}}, PrefetchConfig(True, DEFAULTS)),
    ],
)
def test_parse_weight_prefetch_config(obj: dict[str, Any], expected: PrefetchConfig) -> None:
    assert parse_weight_prefetch_config(obj) == expected


@pytest.mark.parametrize(
    ("obj", "needles"),
    [
        ({"enable": True}, ["weight_prefetch_config.enable", "did you mean 'enabled'"]),
        (
            {"enabled": True, "prefetch_ratio": {"mlpp": {"down": 0.5}}},
            ["weight_prefetch_config.prefetch_ratio.mlpp", "did you mean 'mlp'"],
        ),
        (
            {"enabled": True, "prefetch_ratio": {"mlp": {"up": 0.5}}},
            ["weight_prefetch_config.prefetch_ratio.mlp.up", "unknown key"],
        ),
        (
            {"enabled": True, "prefetch_ratio": {"mlp": {"down": 1.5}}},
            ["weight_prefetch_config.prefetch_ratio.mlp.down", "1.5 is outside [0, 1]"],
        ),
        (
            {"enabled": True, "prefetch_ratio": {"attn": {"o": -0.25}}},
            ["prefetch_ratio.attn.o", "-0.25 is outside [0, 1]"],
        ),
        (
            {"enabled": True, "prefetch_ratio": {"mlp": {"down": "0.5"}}},
            ["prefetch_ratio.mlp.down", '"0.5" is not a number'],
        ),
        (
            {"enabled": True, "prefetch_ratio": {"mlp": {"down": True}}},
            ["prefetch_ratio.mlp.down", "true is not a number"],
        ),
        ({"enabled": True, "prefetch_ratio": {"mlp": {"down": float("nan")}}}, ["outside"]),
        ({"enabled": "yes"}, ["weight_prefetch_config.enabled", "not true or false"]),
        ({"enabled": True, "prefetch_ratio": [0.5]}, ["prefetch_ratio: expected an object"]),
        ({"enabled": True, "prefetch_ratio": {"mlp": 0.5}}, ["prefetch_ratio.mlp: expected"]),
    ],
)
def test_parse_rejects_bad_input_naming_the_key(obj: Any, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_weight_prefetch_config(obj)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg
    assert "\n" not in msg


def test_parse_rejects_non_object() -> None:
    with pytest.raises(ConfigError, match="expected an object"):
        parse_weight_prefetch_config([1, 2])


# ---- whole --additional-config ---------------------------------------------------------------


FOREIGN_ADDITIONAL = (
    '{"pa_shape_list":[48,64],"ascend_scheduler_config":{"enabled":true,"x":{"y":1}},'
    '"weight_prefetch_config":{"enabled":true,"prefetch_ratio":{"mlp":{"down":0.5}}}}'
)


def test_parse_additional_config_with_foreign_keys() -> None:
    assert parse_additional_config(FOREIGN_ADDITIONAL) == PrefetchConfig(
        True, ratios(1.0, 1.0, 0.8, 0.0, 0.5)
    )


def test_parse_additional_config_without_prefetch_key_is_off() -> None:
    assert parse_additional_config('{"pa_shape_list":[48]}') == PrefetchConfig.off()


def test_parse_additional_config_near_miss_root_key() -> None:
    with pytest.raises(ConfigError, match="did you mean 'weight_prefetch_config'"):
        parse_additional_config('{"weight_prefetch_confg":{"enabled":true}}')


def test_parse_additional_config_malformed() -> None:
    with pytest.raises(ConfigError, match=r"--additional-config: malformed JSON"):
        parse_additional_config('{"a":')


def test_parse_config_json_accepts_bare_or_whole() -> None:
    bare = parse_config_json('{"enabled":true,"prefetch_ratio":{"mlp":{"down":0.5}}}')
    whole = parse_config_json(FOREIGN_ADDITIONAL)
    assert bare == whole == PrefetchConfig(True, ratios(1.0, 1.0, 0.8, 0.0, 0.5))


def test_parse_config_json_near_miss_enabled() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_json('{"enable": true}')
    assert "enable" in str(info.value)
    assert "did you mean 'enabled'" in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{", "--x: malformed JSON"),
        ("[1]", "--x: expected a JSON object, got list"),
        ('"s"', "--x: expected a JSON object, got str"),
    ],
)
def test_load_json_object_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_json_object(text, "--x")
    assert needle in str(info.value)


# ---- --set --------------------------------------------------------------------------------------


def test_parse_set_options() -> None:
    assert parse_set_options(["mlp.gate_up=0.3", " mlp.down =0.5", "attn.o=0"]) == {
        "mlp.gate_up": 0.3,
        "mlp.down": 0.5,
        "attn.o": 0.0,
    }


@pytest.mark.parametrize(
    ("item", "needles"),
    [
        ("mlp.down=1.5", ["mlp.down", "1.5 is outside [0, 1]"]),
        ("mlp.up=0.3", ["mlp.up", "unknown knob", "did you mean 'mlp.gate_up'"]),
        ("mlp.down", ["expected KNOB=RATIO"]),
        ("mlp.down=abc", ["'abc' is not a number"]),
        ("mlp.down=nan", ["outside"]),
    ],
)
def test_parse_set_options_errors(item: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_set_options([item])
    for needle in needles:
        assert needle in str(info.value)


# ---- merge and emit ------------------------------------------------------------------------------


def test_deep_merge_keeps_nested_foreign_keys() -> None:
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    overlay = {"a": {"c": {"f": 3}}, "g": 4}
    assert deep_merge(base, overlay) == {"a": {"b": 1, "c": {"d": 2, "f": 3}}, "e": [1], "g": 4}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}  # not mutated


def test_emit_merges_keeping_foreign_keys_and_replacing_prefetch_object() -> None:
    cfg = PrefetchConfig.make(ratios={"mlp.gate_up": 0.3, "mlp.down": 0.5})
    base = (
        '{"pa_shape_list":[48,64],"ascend_scheduler_config":{"enabled":true,"x":{"y":"z"}},'
        '"weight_prefetch_config":{"enabled":true,"prefetch_ratio":{"attn":{"qkv":0.5},'
        '"mlp":{"down":0.9}}}}'
    )
    out = emit(cfg, merge_into=base)
    assert out.additional_config == {
        "pa_shape_list": [48, 64],
        "ascend_scheduler_config": {"enabled": True, "x": {"y": "z"}},
        "weight_prefetch_config": {
            "enabled": True,
            "prefetch_ratio": {
                "attn": {"qkv": 1.0, "o": 1.0},
                "moe": {"gate_up": 0.8},
                "mlp": {"gate_up": 0.3, "down": 0.5},
            },
        },
    }
    assert out.notes == ()


def test_emit_disabled_replaces_prefetch_object() -> None:
    base = '{"weight_prefetch_config":{"enabled":true,"prefetch_ratio":{"attn":{"qkv":0.5}}}}'
    out = emit(PrefetchConfig.off(), merge_into=base)
    assert out.json == '{"weight_prefetch_config":{"enabled":false}}'


def test_emit_without_merge() -> None:
    out = emit(PrefetchConfig.off())
    assert out.flag == """--additional-config '{"weight_prefetch_config":{"enabled":false}}'"""


def test_emit_flag_is_shell_safe() -> None:
    base = json.dumps({"note": 'it\'s a "quoted" $HOME `x` value', "n": {"m": [1, 2]}})
    out = emit(PrefetchConfig.make(ratios={"attn.o": 0.25}), merge_into=base)
    argv = shlex.split(out.flag)
    assert argv[0] == "--additional-config"
    assert len(argv) == 2
    decoded = json.loads(argv[1])
    assert decoded["note"] == 'it\'s a "quoted" $HOME `x` value'
    assert decoded["n"] == {"m": [1, 2]}
    assert decoded["weight_prefetch_config"]["prefetch_ratio"]["attn"] == {"qkv": 0.0, "o": 0.25}


@pytest.mark.parametrize(
    ("base", "needle"),
    [
        ('{"a":', "--merge-into: malformed JSON"),
        ("[]", "--merge-into: expected a JSON object"),
        ('{"weight_prefetch_confg":{}}', "did you mean 'weight_prefetch_config'"),
        (
            '{"weight_prefetch_config":{"enabled":true,"prefetch_ratio":{"mlp":{"down":2}}}}',
            "--merge-into weight_prefetch_config.prefetch_ratio.mlp.down: 2 is outside",
        ),
    ],
)
def test_emit_rejects_bad_merge_into(base: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        emit(PrefetchConfig.default(), merge_into=base)
    assert needle in str(info.value)


def test_emit_blank_merge_into_is_empty_base() -> None:
    assert emit(PrefetchConfig.off(), merge_into="  ").json == (
        '{"weight_prefetch_config":{"enabled":false}}'
    )


# ---- native translation -------------------------------------------------------------------------


def test_native_translation_zero_next_to_active_knob_becomes_smallest_ratio() -> None:
    cfg = PrefetchConfig(True, ratios(qkv=0.5, o=0.0, moe=0.8, gate_up=0.0, down=0.0))
    obj, notes = native_translation(cfg)
    assert obj == {
        "enabled": True,
        "prefetch_ratio": {
            "attn": {"qkv": 0.5, "o": 1e-4},  # o would be the whole weight as 0
            "moe": {"gate_up": 0.8},
            "mlp": {"gate_up": 0.0, "down": 0.0},  # all zero: native turns mlp off
        },
    }
    assert len(notes) == 1
    assert notes[0].startswith("attn.o:")
    assert "0.0001" in notes[0]


def test_native_translation_disabled_is_untouched() -> None:
    assert native_translation(PrefetchConfig.off()) == ({"enabled": False}, ())


def test_emit_native_returns_notes_and_plugin_does_not() -> None:
    cfg = PrefetchConfig(True, ratios(gate_up=0.3))
    native = emit(cfg, semantics="native-0.23")
    plugin = emit(cfg, semantics="plugin")
    assert native.additional_config["weight_prefetch_config"]["prefetch_ratio"] == {
        "attn": {"qkv": 0.0, "o": 0.0},
        "moe": {"gate_up": 0.0},
        "mlp": {"gate_up": 0.3, "down": 1e-4},
    }
    assert [n.split(":")[0] for n in native.notes] == ["mlp.down"]
    assert plugin.additional_config["weight_prefetch_config"]["prefetch_ratio"]["mlp"] == {
        "gate_up": 0.3,
        "down": 0.0,
    }
    assert plugin.notes == ()


# ---- properties ----------------------------------------------------------------------------------

ratio_values = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, 1e-4]),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False),
)
configs = st.builds(
    lambda enabled, values: PrefetchConfig(enabled, tuple(zip(ALL_KNOBS, values, strict=True))),
    st.booleans(),
    st.tuples(*[ratio_values] * len(ALL_KNOBS)),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Foreign top-level keys: anything but the prefetch key and its near misses (which are refused).
foreign_keys = st.one_of(
    st.sampled_from(["pa_shape_list", "ascend_scheduler_config", "torchair_graph_config", ""]),
    st.text(alphabet="abcdefxyz_ '\"$", max_size=10),
)
foreign_objects = st.dictionaries(foreign_keys, json_values, max_size=4)


@settings(max_examples=150, deadline=None)
@given(configs)
def test_property_parse_canonical_round_trip(cfg: PrefetchConfig) -> None:
    assert parse_weight_prefetch_config(json.loads(cfg.canonical_json())) == cfg


@settings(max_examples=150, deadline=None)
@given(configs, foreign_objects)
def test_property_emit_flag_round_trip(cfg: PrefetchConfig, foreign: dict[str, Any]) -> None:
    out = emit(cfg, merge_into=json.dumps(foreign))
    argv = shlex.split(out.flag)
    assert argv[0] == "--additional-config"
    assert len(argv) == 2
    decoded = json.loads(argv[1])
    assert parse_additional_config(argv[1]) == cfg
    assert {k: v for k, v in decoded.items() if k != "weight_prefetch_config"} == foreign


@settings(max_examples=150, deadline=None)
@given(configs)
def test_property_native_translation_leaves_no_zero_in_active_module(
    cfg: PrefetchConfig,
) -> None:
    obj, notes = native_translation(cfg)
    if not cfg.enabled:
        assert obj == {"enabled": False}
        assert notes == ()
        return
    translated = 0
    for module, knobs in obj["prefetch_ratio"].items():
        given_values = [cfg.ratio(f"{module}.{name}") for name in knobs]
        if any(given_values):
            assert all(v > 0 for v in knobs.values()), (module, knobs)
            translated += sum(1 for v in given_values if v == 0)
        else:
            assert all(v == 0 for v in knobs.values())  # an off module stays off
        for name, v in knobs.items():
            if cfg.ratio(f"{module}.{name}") != 0:
                assert v == cfg.ratio(f"{module}.{name}")  # non-zero ratios unchanged
    assert len(notes) == translated
    # What native receives is still a valid config that parses back.
    parse_weight_prefetch_config(obj)
