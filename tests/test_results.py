"""Result replacement (a weaker search never replaces a stronger stored result) and `apply
--model` selection by the full operating point, through the real typer app and sim searches."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import MakeModelDir
from helpers import assert_bad_input
from typer.testing import CliRunner

from prefetch_tune.cli import app
from prefetch_tune.cli.apply import rounded
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
    assert applied(by_model) == rounded(  # apply prints 4 decimals (summaries.RATIO_DECIMALS)
        parse_weight_prefetch_config(strong["winner"]["weight_prefetch_config"])
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


# ---- damaged and wrong-typed result files ---------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("winner.total_effective_mib", "a lot"),
        ("winner.objective_median", [1]),
        ("improvement.vs_off.pct", "12%"),
        ("objective", "output_throughput"),
        ("layout.ep", 1),
        ("max_num_seqs", 7.5),
    ],
)
def test_show_and_apply_name_a_wrong_typed_field(tmp_path: Path, field: str, value: Any) -> None:
    search(tmp_path)
    path = only_result(tmp_path)
    doc = load_result(path)
    node = doc
    *parents, last = field.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(json.dumps(doc))
    before = path.read_bytes()
    shown = run("show", "--results-dir", tmp_path)
    assert shown.exit_code == 0, shown.stderr
    assert "Traceback" not in shown.stderr and "unreadable" in shown.stderr
    assert field in " ".join(shown.stderr.split())
    assert_bad_input(run("apply", "--result", path), str(path), f"field {field}")
    assert path.read_bytes() == before


def test_show_lists_a_result_kept_beside(tmp_path: Path) -> None:
    search(tmp_path, trials=8)
    shutil.rmtree(tmp_path / "studies")
    search(tmp_path, trials=3)
    (alt,) = tmp_path.glob("*.alt-*.json")
    shown = run("show", "--results-dir", tmp_path)
    assert shown.exit_code == 0
    assert alt.name[:20] in shown.stderr


WRITER = """
import sys, tempfile, time
from prefetch_tune.paths import TMP_SUFFIX, tmp_prefix
for folder in sys.argv[1:]:
    fd, name = tempfile.mkstemp(dir=folder, prefix=tmp_prefix("r.json"), suffix=TMP_SUFFIX)
    open(fd, "w").write("half a resu")
print("written", flush=True)
time.sleep(600)
"""


def test_tmp_files_of_a_killed_writer_are_gone_after_the_next_run(tmp_path: Path) -> None:
    search(tmp_path)
    folders = [tmp_path, tmp_path / "trials"]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, *map(str, folders)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    left = [p for f in folders for p in f.glob(".*.tmp")]
    assert len(left) == 2
    live = tmp_path / f".{os.getpid()}-live.json.{socket.gethostname()}.{os.getpid()}.x.tmp"
    live.write_text("being written by a live process")
    old = tmp_path / ".ancient.json.abc.tmp"
    old.write_text("from a crash long ago")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    shutil.rmtree(tmp_path / "studies")
    search(tmp_path, "--replace")
    assert not any(p.exists() for p in left) and not old.exists()
    assert live.exists()
