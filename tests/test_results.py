"""Result replacement (a weaker search never replaces a stronger stored result) and `apply
--model` selection by the full operating point, through the real typer app and sim searches."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import MakeModelDir
from helpers import assert_bad_input
from typer.testing import CliRunner

from prefetch_tune.cli import app
from prefetch_tune.prefetch import (
    PrefetchConfig,
    parse_additional_config,
    parse_weight_prefetch_config,
)
from prefetch_tune.results import iter_results, load_result

optuna.logging.set_verbosity(optuna.logging.WARNING)

MODEL = ("--model", "qwen3-32b", "--tp", "4")
ODD_JSON = {"enabled": True, "prefetch_ratio": {"mlp": {"down": 0.125}}}  # no search picks this
ODD = parse_weight_prefetch_config(ODD_JSON)


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def search(results: Path, *extra: str | Path, trials: int = 4) -> Any:
    r = run(
        "search",
        *MODEL,
        "--max-num-seqs",
        "72",
        "--trials",
        trials,
        "--results-dir",
        results,
        *extra,
    )
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


def applied(r: Any) -> PrefetchConfig:
    assert r.exit_code == 0, r.stderr
    flag, value = shlex.split(r.stdout.strip())
    assert flag == "--additional-config"
    return parse_additional_config(value)


def winner(path: Path) -> PrefetchConfig:
    return parse_weight_prefetch_config(load_result(path)["winner"]["weight_prefetch_config"])


def only_result(results: Path) -> Path:
    (path,) = [p for p, _ in iter_results(results)]
    return path


# ---- replacement -----------------------------------------------------------------------------


def test_a_weaker_search_is_written_beside_and_apply_keeps_the_stronger(tmp_path: Path) -> None:
    search(tmp_path, trials=14)
    stored = only_result(tmp_path)
    before = stored.read_bytes()
    strong = load_result(stored)
    shutil.rmtree(tmp_path / "studies")  # a fresh study, as with another --storage
    r = search(tmp_path, trials=3)
    assert stored.read_bytes() == before
    (alt,) = tmp_path.glob(f"{stored.stem}.alt-*.json")
    assert r.stdout.strip().splitlines()[-1] == str(alt)
    said = " ".join(r.stderr.split())
    assert f"kept {stored}: `apply` uses it" in said
    assert "smaller budget" in said and "--replace" in said
    weak = load_result(alt)
    assert weak["study"]["trials"] < strong["study"]["trials"]
    by_model = run("apply", *MODEL, "--max-num-seqs", "72", "--results-dir", tmp_path)
    assert applied(by_model) == parse_weight_prefetch_config(
        strong["winner"]["weight_prefetch_config"]
    )


def test_an_impossible_slo_never_replaces_a_tuned_winner(tmp_path: Path) -> None:
    search(tmp_path, trials=8)
    stored = only_result(tmp_path)
    doc = load_result(stored)
    doc["winner"]["weight_prefetch_config"] = ODD_JSON  # tell the kept result from a new one
    stored.write_text(json.dumps(doc))
    before = stored.read_bytes()
    shutil.rmtree(tmp_path / "studies")
    r = search(tmp_path, "--slo", "p99_tpot_ms<=0.001", trials=8)
    assert stored.read_bytes() == before
    assert "other constraints" in " ".join(r.stderr.split())
    (alt,) = tmp_path.glob(f"{stored.stem}.alt-*.json")
    assert load_result(alt)["constraints"] == ["p99_tpot_ms<=0.001"]
    assert applied(run("apply", *MODEL, "--max-num-seqs", "72", "--results-dir", tmp_path)) == ODD


def test_a_stronger_or_equal_search_replaces_and_replace_forces(tmp_path: Path) -> None:
    search(tmp_path, trials=4)
    stored = only_result(tmp_path)
    shutil.rmtree(tmp_path / "studies")
    r = search(tmp_path, trials=8)
    assert not list(tmp_path.glob("*.alt-*.json")), r.stderr
    assert load_result(stored)["study"]["trials"] >= 8
    shutil.rmtree(tmp_path / "studies")
    r = search(tmp_path, "--replace", trials=3)
    assert not list(tmp_path.glob("*.alt-*.json"))
    assert load_result(stored)["study"]["trials"] < 8
    assert f"replaced {stored} (--replace)" in " ".join(r.stderr.split())


# ---- apply --model picks the right file -----------------------------------------------------


def _with_winner(path: Path, config: dict[str, Any]) -> None:
    doc = load_result(path)
    doc["winner"]["weight_prefetch_config"] = config
    path.write_text(json.dumps(doc, indent=2))


@pytest.fixture
def side_by_side(tmp_path: Path) -> Path:
    """plugin and native-0.23 results of one point; the native one sorts first by name."""
    search(tmp_path)
    search(tmp_path, "--semantics", "native-0.23")
    (native,) = tmp_path.glob("*native-0.23*-mns72.json")
    _with_winner(native, ODD_JSON)
    return tmp_path


def test_apply_selects_by_semantics_and_lists_candidates_when_ambiguous(side_by_side: Path) -> None:
    (plugin,) = side_by_side.glob("*-plugin-mns72.json")
    (native,) = side_by_side.glob("*native-0.23*-mns72.json")
    base = ("apply", *MODEL, "--max-num-seqs", "72", "--results-dir", side_by_side)
    got = applied(run(*base, "--semantics", "plugin"))
    assert got == winner(plugin) != ODD
    assert applied(run(*base, "--semantics", "native-0.23", "--format", "flag")) != got
    line = assert_bad_input(run(*base), "2 stored results match", empty_stdout=True)
    assert str(plugin) in line and str(native) in line and "--semantics" in line


def test_apply_never_reads_a_damaged_or_alternative_copy(tmp_path: Path) -> None:
    search(tmp_path)
    stored = only_result(tmp_path)
    good = winner(stored)
    for tag in ("damaged-00000000-000000", "alt-00000000-000000"):
        copy = stored.with_name(f"{stored.stem}.{tag}.json")
        shutil.copy(stored, copy)
        _with_winner(copy, ODD_JSON)
    assert sorted(p.name for p in tmp_path.glob("*.json"))[0] != stored.name
    r = run("apply", *MODEL, "--max-num-seqs", "72", "--results-dir", tmp_path)
    assert applied(r) == good


def test_apply_selects_by_hardware_and_backend(tmp_path: Path) -> None:
    search(tmp_path)
    search(tmp_path, "--hardware", "atlas-a3")
    (a3,) = tmp_path.glob("*atlas-a3*-mns72.json")
    _with_winner(a3, ODD_JSON)
    base = ("apply", *MODEL, "--max-num-seqs", "72", "--results-dir", tmp_path)
    assert applied(run(*base, "--hardware", "atlas-a3")) == ODD
    assert applied(run(*base, "--hardware", "atlas-a2")) != ODD
    assert_bad_input(run(*base), "2 stored results match", "--hardware")
    r = run(*base, "--hardware", "atlas-a2", "--backend", "vllm")
    assert r.exit_code == 1 and "was not tuned" in r.stderr


def test_apply_finds_a_model_directory_by_its_path(
    tmp_path: Path, make_model_dir: MakeModelDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = make_model_dir()
    results = tmp_path / "R"
    r = run(
        "search",
        "--model",
        model_dir,
        "--tp",
        "4",
        "--max-num-seqs",
        "8",
        "--trials",
        "3",
        "--results-dir",
        results,
    )
    assert r.exit_code == 0, r.stderr
    want = winner(only_result(results))
    for ref in (str(model_dir), model_dir.name):
        got = run(
            "apply", "--model", ref, "--tp", "4", "--max-num-seqs", "8", "--results-dir", results
        )
        assert applied(got) == want, ref
    monkeypatch.chdir(tmp_path)
    rel = run(
        "apply",
        "--model",
        f"./{model_dir.name}",
        "--tp",
        "4",
        "--max-num-seqs",
        "8",
        "--results-dir",
        "R",
    )
    assert applied(rel) == want
