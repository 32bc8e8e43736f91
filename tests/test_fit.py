"""prefetch-tune next to the tools users already run: optuna-dashboard, shells, scripts, CI logs
and shared results directories (issue 16)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from prefetch_tune.cli import COMMANDS, app
from prefetch_tune.results import atomic_write

MODEL = ("--model", "qwen3-32b", "--tp", "4")


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    results = tmp_path_factory.mktemp("fit") / "results"
    out = run(
        "search", *MODEL, "--max-num-seqs", "72", "--max-num-seqs", "8",
        "--trials", "8", "--repeats", "1", "--results-dir", results, "--json",
    )  # fmt: skip
    assert out.exit_code == 0, (out.stdout, out.stderr)
    return results, out


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_results_are_written_with_the_umask_mode(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "r.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~mask


def test_search_json_is_data_on_stdout_sorted_numerically(searched: tuple[Path, Any]) -> None:
    results, out = searched
    rows = json.loads(out.stdout)
    assert [r["max_num_seqs"] for r in rows] == [8, 72]
    assert all(Path(r["file"]).is_file() and r["simulated"] for r in rows)
    for path in (results / "trials").glob("*.csv"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044  # others can read it


def test_show_json_matches_and_sorts_numerically(searched: tuple[Path, Any]) -> None:
    results, out = searched
    added = run("search", *MODEL, "--max-num-seqs", "16", "--trials", "4", "--repeats", "1",
        "--results-dir", results)  # fmt: skip
    assert added.exit_code == 0, added.stderr  # "16" < "72" < "8" as strings
    shown = run("show", "--results-dir", results, "--json")
    assert shown.exit_code == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert [r["max_num_seqs"] for r in rows] == [8, 16, 72]
    by_n = {r["max_num_seqs"]: r for r in json.loads(out.stdout)}
    assert rows[2] == by_n[72]
    for r in rows:  # ratios rounded to what the runtime can tell apart
        assert all(round(v, 4) == v for v in r["winner_ratios"].values())


def test_plain_progress_lines_outside_a_terminal(searched: tuple[Path, Any]) -> None:
    _, out = searched
    lines = out.stderr.splitlines()
    assert "max-num-seqs 72: trial 8/8, best" in " ".join(lines)
    remeasured = [ln for ln in lines if "re-measured" in ln or "selection:" in ln]
    assert remeasured and all(ln.startswith("max-num-seqs ") for ln in remeasured)


def test_winner_ratios_are_not_cut_at_120_columns(searched: tuple[Path, Any]) -> None:
    results, _ = searched
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "prefetch_tune", "search", *MODEL, "--max-num-seqs", "72",
         "--trials", "8", "--repeats", "1", "--results-dir", str(results), "--json"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    (row,) = json.loads(proc.stdout)
    text = ", ".join(f"{k}={v:g}" for k, v in row["winner_ratios"].items()) or "off"
    assert f"max-num-seqs 72 winner: {text}" in proc.stderr


def _shell_words(command: str) -> list[str]:
    script = f'for w in {command}; do printf "%s\\n" "$w"; done'
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_apply_args_and_json_reach_a_program_without_quotes() -> None:
    words = _shell_words("$(prefetch-tune apply --format args --set mlp.down=0.123456789)")
    (word,) = words
    flag, _, value = word.partition("=")
    assert flag == "--additional-config"
    doc = json.loads(value)  # no literal quotes around it
    assert doc["weight_prefetch_config"]["prefetch_ratio"]["mlp"]["down"] == 0.1235
    words = _shell_words('"$(prefetch-tune apply --format json --set mlp.down=0.5)"')
    assert json.loads(words[0])["weight_prefetch_config"]["enabled"] is True


def test_help_lists_every_command_and_short_help_matches() -> None:
    out = run("--help")
    assert out.exit_code == 0
    for name in COMMANDS:
        assert name in out.stdout
        sub = run(name, "--help")
        assert sub.exit_code == 0, (name, sub.stdout)


def test_help_imports_no_command_module() -> None:
    code = (
        "import sys; from prefetch_tune.cli import main; sys.argv=['prefetch-tune','--help']\n"
        "try:\n main()\nexcept SystemExit: pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('optuna','pandas','prefetch_tune.cli.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['prefetch_tune.cli.common']"


def test_optuna_dashboard_shows_metric_name_and_ratios(searched: tuple[Path, Any]) -> None:
    import webtest
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna_dashboard import wsgi

    results, _ = searched
    (journal,) = (results / "studies").glob("*mns72.journal")
    client = webtest.TestApp(wsgi(JournalStorage(JournalFileBackend(str(journal)))))
    (summary,) = client.get("/api/studies").json["study_summaries"]
    detail = client.get(f"/api/studies/{summary['study_id']}").json
    assert detail["objective_names"] == ["output_throughput"]  # set_metric_names
    attrs = {a["key"]: a["value"] for a in summary["user_attrs"]}
    assert json.loads(attrs["flat_above"])["mlp.gate_up"] == 0.288
    trial = detail["trials"][-1]
    tattrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
    assert 0.0 <= float(tattrs["ratio.mlp.gate_up"]) <= 0.288
    assert float(tattrs["metric.output_throughput"]) == pytest.approx(trial["values"][0])
