"""Acceptance checks of the plan / apply / models commands through the real typer app."""

from __future__ import annotations

import json
import shlex
from functools import partial
from typing import Any

import pytest
from helpers import assert_bad_input as _assert_bad_input
from typer.testing import CliRunner

from prefetch_tune.cli import app

# The CLI commands tested here print nothing on stdout when the input is bad.
assert_bad_input = partial(_assert_bad_input, empty_stdout=True)

MIB = 1048576


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def ops_by_site(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["knob"], o["weight"]): o for o in doc["ops"]}


# ---- plan -------------------------------------------------------------------------------------------


def test_plan_qwen3_32b_tp4_json() -> None:
    result = run("plan", "--model", "qwen3-32b", "--tp", "4", "--max-num-seqs", "72", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"] == "qwen3-32b"
    assert doc["quant"] == "w8a8"
    assert doc["semantics"] == "plugin"
    assert doc["tokens"] == 72
    ops = ops_by_site(doc)
    gate_up = ops[("mlp.gate_up", "gate_up_proj")]
    assert gate_up["weight_mib"] == 62.5
    assert gate_up["mib"] == 18.0
    assert gate_up["bytes"] == 18 * MIB
    assert gate_up["capped"] is True
    down = ops[("mlp.down", "down_proj")]
    assert down["weight_mib"] == 31.25
    assert down["mib"] == 18.0
    assert down["capped"] is True
    assert doc["flat_above"]["mlp.gate_up"] == pytest.approx(0.288)
    assert doc["flat_above"]["mlp.down"] == pytest.approx(0.576)
    assert doc["flat_above"]["attn.qkv"] is None
    assert ops[("attn.qkv", "qkv_proj")]["mib"] == 12.5
    assert ops[("attn.o", "o_proj")]["mib"] == 10.0
    assert doc["prefetch_mib_per_layer"] == pytest.approx(58.5)
    assert doc["prefetch_mib_per_step"] == pytest.approx(3744)


def test_plan_native_without_sequence_parallel_kills_mlp_gate_up() -> None:
    base = ("plan", "--model", "qwen3-32b", "--tp", "4", "--max-num-seqs", "72", "--json")
    result = run(*base, "--semantics", "native-0.23")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    gate_up = ops_by_site(doc)[("mlp.gate_up", "gate_up_proj")]
    assert gate_up["fires"] is False
    assert "sequence parallel" in gate_up["reason"]
    assert "sequence parallel" in doc["dead_knobs"]["mlp.gate_up"]
    # attn.o also lands on down_proj under native: 31.25 MiB, uncapped.
    down_by_o = ops_by_site(doc)[("attn.o", "down_proj")]
    assert (down_by_o["mib"], down_by_o["capped"]) == (31.25, False)

    with_sp = run(*base, "--semantics", "native-0.23", "--sequence-parallel")
    assert with_sp.exit_code == 0, with_sp.stderr
    doc = json.loads(with_sp.stdout)
    assert ops_by_site(doc)[("mlp.gate_up", "gate_up_proj")]["fires"] is True
    assert "mlp.gate_up" not in doc["dead_knobs"]


def test_plan_235b_ep_json() -> None:
    result = run(
        "plan", "-m", "qwen3-235b-a22b", "--tp", "4", "--dp", "4", "--ep",
        "--max-num-seqs", "128", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    w13 = ops_by_site(json.loads(result.stdout))[("moe.gate_up", "experts.w13")]
    assert (w13["weight_mib"], w13["mib"], w13["fires"]) == (96.0, 18.0, True)


def test_plan_set_and_config_json() -> None:
    result = run(
        "plan", "-m", "qwen3-32b", "--tp", "4", "--json",
        "--config-json", '{"enabled":true,"prefetch_ratio":{"mlp":{"down":0.5}}}',
        "--set", "mlp.gate_up=0.2",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ops = ops_by_site(json.loads(result.stdout))
    assert ops[("mlp.gate_up", "gate_up_proj")]["bytes"] == 13107200  # 0.2 x 62.5 MiB
    assert ops[("mlp.down", "down_proj")]["bytes"] == 16384000  # 0.5 x 31.25 MiB


def test_plan_table_goes_to_stderr() -> None:
    result = run("plan", "--model", "qwen3-32b", "--tp", "4", "--max-num-seqs", "72")
    assert result.exit_code == 0, result.stderr
    assert "mlp.gate_up" in result.stderr
    assert "3744.0 MiB" in result.stderr


# ---- apply ------------------------------------------------------------------------------------------


def test_apply_merge_into_keeps_foreign_keys() -> None:
    result = run(
        "apply", "--set", "mlp.gate_up=0.3", "--set", "mlp.down=0.5",
        "--merge-into", '{"pa_shape_list":[48,64]}',
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    argv = shlex.split(result.stdout.strip())
    assert argv[0] == "--additional-config"
    assert len(argv) == 2
    doc = json.loads(argv[1])
    assert doc["pa_shape_list"] == [48, 64]
    assert doc["weight_prefetch_config"]["enabled"] is True
    assert doc["weight_prefetch_config"]["prefetch_ratio"]["mlp"] == {"gate_up": 0.3, "down": 0.5}
    assert set(doc) == {"pa_shape_list", "weight_prefetch_config"}
    assert result.stderr == ""


def test_apply_format_json_and_disabled() -> None:
    result = run("apply", "--disabled", "--format", "json", "--merge-into", '{"x":{"y":1}}')
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "x": {"y": 1},
        "weight_prefetch_config": {"enabled": False},
    }


def test_apply_native_translates_zero_with_note_and_keeps_zero_module() -> None:
    result = run(
        "apply", "--semantics", "native-0.23",
        "--set", "mlp.gate_up=0.3", "--set", "mlp.down=0",
        "--set", "attn.qkv=0", "--set", "attn.o=0",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ratios = json.loads(shlex.split(result.stdout)[1])["weight_prefetch_config"]["prefetch_ratio"]
    assert ratios["mlp"] == {"gate_up": 0.3, "down": 0.0001}
    assert ratios["attn"] == {"qkv": 0.0, "o": 0.0}
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1
    assert notes[0].startswith("note: mlp.down")
    assert "whole weight" in notes[0]


def test_apply_plugin_keeps_zero_without_note() -> None:
    result = run("apply", "--set", "mlp.gate_up=0.3", "--set", "mlp.down=0")
    assert result.exit_code == 0
    ratios = json.loads(shlex.split(result.stdout)[1])["weight_prefetch_config"]["prefetch_ratio"]
    assert ratios["mlp"] == {"gate_up": 0.3, "down": 0.0}
    assert result.stderr == ""


# ---- models -----------------------------------------------------------------------------------------


def test_models_json() -> None:
    result = run("models", "--json")
    assert result.exit_code == 0, result.stderr
    names = [m["name"] for m in json.loads(result.stdout)]
    assert names == ["qwen3-235b-a22b", "qwen3-30b-a3b", "qwen3-32b", "qwen3-8b"]


# ---- model directories -------------------------------------------------------------------------------


def test_plan_model_dir_bf16_and_w8a8(make_model_dir, w8a8_description) -> None:
    bf16_dir = make_model_dir(name="plain")
    result = run("plan", "--model", str(bf16_dir), "--tp", "4", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["quant"] == "bf16"
    assert doc["model"] == "plain"
    assert ops_by_site(doc)[("mlp.gate_up", "gate_up_proj")]["weight_mib"] == 125.0
    assert ops_by_site(doc)[("attn.qkv", "qkv_proj")]["fires"] is False

    w8a8_dir = make_model_dir(name="quant", description=w8a8_description)
    result = run("plan", "--model", str(w8a8_dir), "--tp", "4", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["quant"] == "w8a8"
    assert ops_by_site(doc)[("mlp.gate_up", "gate_up_proj")]["weight_mib"] == 62.5
    assert ops_by_site(doc)[("attn.qkv", "qkv_proj")]["fires"] is True


# ---- bad input: exit 2, one line --------------------------------------------------------------------


def test_bad_ratio_via_set() -> None:
    line = assert_bad_input(run("apply", "--set", "mlp.down=1.5"), "1.5 is outside [0, 1]")
    assert "mlp.down" in line


def test_bad_ratio_via_plan_set() -> None:
    result = run("plan", "-m", "qwen3-32b", "--tp", "4", "--set", "mlp.gate_up=1.5")
    assert_bad_input(result, "1.5 is outside [0, 1]", "mlp.gate_up")


def test_bad_ratio_via_config_json() -> None:
    result = run(
        "plan", "-m", "qwen3-32b", "--tp", "4",
        "--config-json", '{"enabled":true,"prefetch_ratio":{"mlp":{"down":1.5}}}',
    )  # fmt: skip
    assert_bad_input(result, "1.5 is outside [0, 1]", "prefetch_ratio.mlp.down")


def test_unknown_knob() -> None:
    assert_bad_input(run("apply", "--set", "mlp.up=0.3"), "mlp.up", "unknown knob")


def test_near_miss_enabled_in_config_json() -> None:
    result = run("plan", "-m", "qwen3-32b", "--tp", "4", "--config-json", '{"enable": true}')
    assert_bad_input(result, "enable", "did you mean 'enabled'")


def test_malformed_config_json() -> None:
    result = run("plan", "-m", "qwen3-32b", "--tp", "4", "--config-json", '{"enabled": tru')
    assert_bad_input(result, "--config-json", "malformed JSON")


def test_malformed_merge_into() -> None:
    result = run("apply", "--set", "mlp.down=0.5", "--merge-into", '{"pa_shape_list": [48,')
    assert_bad_input(result, "--merge-into", "malformed JSON")


def test_unknown_model() -> None:
    assert_bad_input(run("plan", "--model", "qwen3-33b"), "qwen3-33b", "unknown model")


def test_model_dir_without_config_json(make_model_dir) -> None:
    d = make_model_dir(name="empty", config=None)
    assert_bad_input(run("plan", "--model", str(d)), str(d), "no config.json")


def test_tp_not_dividing_heads() -> None:
    result = run("plan", "--model", "qwen3-32b", "--tp", "3")
    assert_bad_input(result, "--tp 3", "64 attention heads")


def test_max_num_seqs_zero() -> None:
    result = run("plan", "--model", "qwen3-32b", "--tp", "4", "--max-num-seqs", "0")
    assert_bad_input(result, "--max-num-seqs 0")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("plan", "-m", "qwen3-32b", "--semantics", "native"), "--semantics native"),
        (("plan", "-m", "qwen3-32b", "--quant", "int4"), "--quant int4"),
        (("plan", "-m", "qwen3-32b", "--cap-mib", "0"), "--cap-mib"),
        (("plan", "-m", "qwen3-32b", "--tp", "4", "--ep"), "dense model"),
        (("apply",), "nothing to apply"),
        (("apply", "--disabled", "--set", "mlp.down=0.5"), "contradict"),
        (("apply", "--set", "mlp.down=0.5", "--format", "yaml"), "--format yaml"),
    ],
)
def test_other_bad_input(args: tuple[str, ...], needle: str) -> None:
    assert_bad_input(run(*args), needle)


def test_apply_finds_a_result_searched_for_a_model_directory(
    tmp_path: Any, make_model_dir: Any
) -> None:
    """`--model DIR` names and detects the model as search stored it (bf16 here), so the
    result a search wrote for a directory is found again (seen with the real-vLLM tests)."""
    model = make_model_dir("tiny-dense")
    results = tmp_path / "R"
    searched = run(
        "search", "--model", str(model), "--tp", "4", "--max-num-seqs", "8", "--trials", "3",
        "--repeats", "1", "--results-dir", str(results),
    )  # fmt: skip
    assert searched.exit_code == 0, searched.stderr
    doc = json.loads(next(results.glob("*.json")).read_text())
    assert doc["model"]["quant"] == "bf16"
    applied = run(
        "apply", "--model", str(model), "--tp", "4", "--max-num-seqs", "8",
        "--results-dir", str(results),
    )  # fmt: skip
    assert applied.exit_code == 0, applied.stderr
    assert applied.stdout.strip() == doc["additional_config"]
