"""Hardware profiles: every number carries its provenance, bad files are named, own files work."""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_bad_input
from typer.testing import CliRunner

from prefetch_tune.cli import app
from prefetch_tune.errors import ConfigError
from prefetch_tune.hardware import (
    KINDS,
    HardwareProfile,
    builtin_profiles,
    load_hardware,
    parse_profile,
)
from prefetch_tune.resources import configs_dir

BUILTIN = ("atlas-a2", "atlas-a3")
NUMERIC = [f.name for f in fields(HardwareProfile) if f.name not in ("name", "source", "ranges")]
MIB = 1048576
SIMULATE = ("simulate", "-m", "qwen3-32b", "--tp", "4", "--max-num-seqs", "72")


def raw(name: str) -> dict[str, Any]:
    return tomllib.loads((configs_dir() / "hardware" / f"{name}.toml").read_text())


def dump_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for a profile: top-level scalars, then one table per field."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    lines = [f"{k} = {scalar(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for key, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {scalar(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def write_profile(tmp_path: Path, doc: dict[str, Any], name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(dump_toml(doc))
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------- the built-in profiles


def test_both_builtin_profiles_ship() -> None:
    assert set(BUILTIN) <= set(builtin_profiles())


@pytest.mark.parametrize("name", BUILTIN)
def test_every_field_carries_value_unit_kind_source(name: str) -> None:
    doc = raw(name)
    assert doc["name"] == name
    tables = {k for k, v in doc.items() if isinstance(v, dict)} - {"calibration"}
    assert tables == set(NUMERIC)  # no field missing, none the model ignores
    for key in NUMERIC:
        entry = doc[key]
        assert set(entry) == {"value", "unit", "kind", "source", "range", "range_why"}, key
        assert isinstance(entry["value"], int | float) and not isinstance(entry["value"], bool)
        assert entry["value"] >= 0, key
        assert isinstance(entry["unit"], str) and entry["unit"].strip(), key
        assert entry["kind"] in KINDS, key
        assert isinstance(entry["source"], str) and len(entry["source"].strip()) >= 10, key


@pytest.mark.parametrize("name", BUILTIN)
def test_loaded_profile_is_the_file(name: str) -> None:
    doc = raw(name)
    hw = load_hardware(name)
    assert hw.name == name
    for key in NUMERIC:
        assert getattr(hw, key) == float(doc[key]["value"]), key
    assert hw.source.endswith(f"{name}.toml")


@pytest.mark.parametrize("name", BUILTIN)
def test_calibrated_fields_are_estimates(name: str) -> None:
    """Calibration adjusts only estimated (or fitted) numbers, never published ones."""
    doc = raw(name)
    names = doc["calibration"]["fitted"].split("(")[0]  # a note in parentheses may follow
    fitted = [f.strip() for f in names.split(",") if f.strip()]
    assert fitted
    for key in fitted:
        assert key in NUMERIC, key
        assert doc[key]["kind"] in ("estimated", "fitted"), key


@pytest.mark.parametrize("name", BUILTIN)
def test_profile_numbers_are_physically_ordered(name: str) -> None:
    hw = load_hardware(name)
    assert hw.l2_bytes == 192 * MIB  # published (CANN platform ini, per rank)
    assert hw.hbm_bytes == 64 * 1024 * MIB  # published (ini memory_size, per rank)
    assert hw.l2_bw > hw.hbm_bw  # L2 hits are worth something
    assert hw.prefetch_bw <= hw.hbm_bw  # a fill reads HBM
    assert hw.prefetch_bw < hw.l2_bw  # a matmul can catch up with a running fill
    assert hw.hbm_bw <= 1.6e12  # physical HBM bandwidth per rank (reference §1.2)
    assert hw.cube_int8_ops == pytest.approx(2 * hw.cube_bf16_flops, rel=0.05)
    assert 0 < hw.vector_bw_fraction <= 1
    assert 0 <= hw.prefetch_contention <= 1


# ---------------------------------------------------------------- ranges from the mechanisms


@pytest.mark.parametrize("name", BUILTIN)
def test_shipped_values_lie_inside_their_documented_ranges(name: str) -> None:
    """Read from the file itself (not through the loader): a shipped value outside the range
    its own profile documents fails here."""
    doc = raw(name)
    for key in NUMERIC:
        low, high = doc[key]["range"]
        assert low <= doc[key]["value"] <= high, (key, doc[key]["value"], (low, high))
        assert len(doc[key]["range_why"].strip()) >= 20, key
    hw = load_hardware(name)
    assert {k for k, _, _ in hw.ranges} == set(NUMERIC)
    for key in NUMERIC:
        assert hw.allowed(key) == tuple(float(b) for b in doc[key]["range"]), key


# Bounds the mechanisms themselves impose (docs/model.md): a profile may narrow a range, never
# widen it past these, so no range can be stretched until a property holds.
MECHANISM_BOUNDS = {
    "mte_interference": (0.0, 1.0),  # 1 = cube and memory fully serialised at the ridge point
    "prefetch_contention": (0.0, 1.0),  # a share of the fill's own bandwidth
    "vector_bw_fraction": (0.5, 0.7),  # reference 5.3
    "kernel_overhead_us": (3.0, 5.0),  # graph mode, reference 5.3
    "prefetch_bw": (0.2e12, 0.5e12),  # the pto-isa measurement 0.31-0.32e12, +-50%
    "hbm_bw": (1.0e12, 1.6e12),  # physical HBM bandwidth per rank
}


@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("key", sorted(MECHANISM_BOUNDS))
def test_documented_ranges_stay_inside_the_mechanism(name: str, key: str) -> None:
    low, high = load_hardware(name).allowed(key)
    floor, ceiling = MECHANISM_BOUNDS[key]
    assert floor <= low <= high <= ceiling, (key, (low, high), (floor, ceiling))


@pytest.mark.parametrize("name", BUILTIN)
def test_prefetch_range_never_exceeds_the_hbm_it_reads(name: str) -> None:
    hw = load_hardware(name)
    assert hw.allowed("prefetch_bw")[1] <= hw.allowed("hbm_bw")[0]
    assert hw.allowed("l2_bw")[0] > hw.allowed("hbm_bw")[1]


OUTSIDE = [(key, "above") for key in NUMERIC] + [
    (key, "below") for key in NUMERIC if raw("atlas-a2")[key]["range"][0] > 0
]  # a range starting at 0 has no "below" but negatives, rejected on their own (CHANGES)


@pytest.mark.parametrize(("key", "side"), OUTSIDE)
def test_a_value_outside_its_range_is_a_profile_error_naming_the_key(key: str, side: str) -> None:
    doc = raw("atlas-a2")
    low, high = doc[key]["range"]
    doc[key]["value"] = low * 0.9 if side == "below" else high * 1.1 + 1e-3
    with pytest.raises(ConfigError, match=rf"field {key}\.value .* outside its allowed range"):
        parse_profile(doc, "mine.toml")


def test_simulate_with_a_value_outside_its_range_exits_2(tmp_path: Path) -> None:
    doc = raw("atlas-a2")
    doc["mte_interference"]["value"] = 1.5  # past full serialisation
    path = write_profile(tmp_path, doc)
    line = assert_bad_input(run(*SIMULATE, "--hardware", str(path)), "mte_interference", "range")
    assert "[0, 1]" in line


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda e: e.pop("range"), "range"),
        (lambda e: e.update(range=[1.0]), "range"),
        (lambda e: e.update(range=[2.0, 1.0]), "range"),
        (lambda e: e.update(range=["a", 1.0]), "range"),
        (lambda e: e.pop("range_why"), "range_why"),
        (lambda e: e.update(range_why=" "), "range_why"),
    ],
    ids=["no-range", "one-bound", "reversed", "string-bound", "no-why", "blank-why"],
)
def test_malformed_range_names_the_field(change: Any, needle: str) -> None:
    doc = raw("atlas-a2")
    change(doc["stream_sync_us"])
    with pytest.raises(ConfigError, match=rf"stream_sync_us\.{needle}"):
        parse_profile(doc, "mine.toml")


def test_a_fill_faster_than_hbm_is_a_profile_error() -> None:
    doc = raw("atlas-a2")
    doc["hbm_bw"]["range"] = [0.1e12, 1.6e12]
    doc["hbm_bw"]["value"] = 0.3e12
    with pytest.raises(ConfigError, match=r"prefetch_bw\.value must not exceed hbm_bw"):
        parse_profile(doc, "mine.toml")


# ---------------------------------------------------------------- malformed profiles


def broken(change: str) -> tuple[dict[str, Any], str]:
    """A copy of atlas-a2 with one thing wrong, and the field the error must name."""
    doc = raw("atlas-a2")
    if change == "missing":
        del doc["prefetch_bw"]
        return doc, "prefetch_bw"
    if change == "no-kind":
        del doc["cmo_issue_us"]["kind"]
        return doc, "cmo_issue_us"
    if change == "bad-kind":
        doc["cmo_issue_us"]["kind"] = "guessed"
        return doc, "cmo_issue_us"
    if change == "no-source":
        del doc["stream_sync_us"]["source"]
        return doc, "stream_sync_us"
    if change == "blank-source":
        doc["stream_sync_us"]["source"] = "  "
        return doc, "stream_sync_us"
    if change == "negative":
        doc["kernel_overhead_us"]["value"] = -4.0
        return doc, "kernel_overhead_us"
    if change == "negative-bandwidth":
        doc["hbm_bw"]["value"] = -1.3e12
        return doc, "hbm_bw"
    if change == "string-value":
        doc["l2_bw"]["value"] = "fast"
        return doc, "l2_bw"
    if change == "bool-value":
        doc["mte_interference"]["value"] = True
        return doc, "mte_interference"
    if change == "not-a-table":
        doc["link_bw"] = 1.96e11
        return doc, "link_bw"
    if change == "zero-bandwidth":
        doc["prefetch_bw"]["value"] = 0
        return doc, "prefetch_bw"
    if change == "fraction-above-1":
        doc["vector_bw_fraction"]["value"] = 1.5
        return doc, "vector_bw_fraction"
    if change == "unknown-field":
        doc["hbm_bw_typo"] = dict(doc["hbm_bw"])
        return doc, "hbm_bw_typo"
    if change == "no-name":
        del doc["name"]
        return doc, "name"
    raise AssertionError(change)


CHANGES = [
    "missing",
    "no-kind",
    "bad-kind",
    "no-source",
    "blank-source",
    "negative",
    "negative-bandwidth",
    "string-value",
    "bool-value",
    "not-a-table",
    "zero-bandwidth",
    "fraction-above-1",
    "unknown-field",
    "no-name",
]


@pytest.mark.parametrize("change", CHANGES)
def test_malformed_profile_names_the_field(change: str) -> None:
    doc, field = broken(change)
    with pytest.raises(ConfigError, match=field):
        parse_profile(doc, "mine.toml")


@pytest.mark.parametrize("change", ["missing", "no-kind", "no-source", "negative", "not-a-table"])
def test_simulate_with_a_malformed_profile_exits_2(change: str, tmp_path: Path) -> None:
    doc, field = broken(change)
    path = write_profile(tmp_path, doc)
    assert_bad_input(run(*SIMULATE, "--hardware", str(path)), field, str(path))


def test_unknown_hardware_name_lists_the_builtin_ones() -> None:
    line = assert_bad_input(run(*SIMULATE, "--hardware", "atlas-z9"), "--hardware atlas-z9")
    assert "atlas-a2" in line and "atlas-a3" in line


def test_missing_profile_file_and_unparseable_toml_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert_bad_input(run(*SIMULATE, "--hardware", str(missing)), str(missing))
    garbage = tmp_path / "garbage.toml"
    garbage.write_text("name = 'x'\n[hbm_bw\nvalue = 1\n")
    assert_bad_input(run(*SIMULATE, "--hardware", str(garbage)), str(garbage), "TOML")


# ---------------------------------------------------------------- a user's own profile


def simulate_json(*args: str) -> dict[str, Any]:
    result = run(*SIMULATE, "--json", *args)
    assert result.exit_code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_own_profile_file_works(tmp_path: Path) -> None:
    doc = raw("atlas-a2")
    doc["name"] = "my-a2"
    doc["description"] = "a copy of atlas-a2"
    same = write_profile(tmp_path, doc, "my-a2.toml")
    builtin = simulate_json("--hardware", "atlas-a2")
    mine = simulate_json("--hardware", str(same))
    assert mine["point"]["hardware"] == str(same)
    assert mine["metrics"] == builtin["metrics"]  # same numbers, same model
    assert load_hardware(str(same)).name == "my-a2"

    faster_hbm = 2 * doc["hbm_bw"]["value"]  # another chip: its own range around its own value
    doc["hbm_bw"] = {**doc["hbm_bw"], "value": faster_hbm, "range": [2e12, 3e12], "kind": "fitted"}
    faster = write_profile(tmp_path, doc, "my-faster-a2.toml")
    quick = simulate_json("--hardware", str(faster))
    for key in ("output_throughput", "sim_decode_step_ms"):
        assert quick["metrics"][key] != builtin["metrics"][key]
    assert quick["metrics"]["output_throughput"] > builtin["metrics"]["output_throughput"]
    assert quick["metrics"]["mean_tpot_ms"] < builtin["metrics"]["mean_tpot_ms"]


def test_own_profile_without_suffix_is_looked_up_by_name(tmp_path: Path) -> None:
    """A bare word is a built-in name, never a file in the working directory."""
    result = run(*SIMULATE, "--hardware", "my-a2")
    assert_bad_input(result, "--hardware my-a2", "unknown profile")
