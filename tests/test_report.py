"""`prefetch-tune report`: a self-contained HTML report and PNGs of sim results."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import typer
from typer.testing import CliRunner

from prefetch_tune.backends.base import OperatingPoint, get_backend
from prefetch_tune.cli.report import report
from prefetch_tune.models import Layout, load_model
from prefetch_tune.regress.report import StudyEntry, load_entries, study_figures
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.tuner import search_point

pytest.importorskip("plotly")
pytest.importorskip("matplotlib")


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXTERNAL = re.compile(
    r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", re.IGNORECASE
)


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.callback()
    def root() -> None:
        """prefetch-tune (test app)."""

    app.command("report")(report)
    return app


APP = _app()


def run(*args: str) -> Any:
    return CliRunner().invoke(APP, ["report", *args])


@pytest.fixture(scope="module")
def fresh_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("report") / "results"
    spec = load_model("qwen3-32b", "w8a8")
    backend = get_backend("sim")
    settings = SearchSettings(results_dir=results, trials=20)
    for n in (8, 72):
        search_point(
            OperatingPoint(model=spec, layout=Layout(tp=4), max_num_seqs=n), backend, settings
        )
    return results


@pytest.fixture(scope="module")
def built(fresh_results: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("out") / "report"
    result = run("--results-dir", str(fresh_results), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    return out, result


def test_html_is_self_contained(built: tuple[Path, Any]) -> None:
    out, result = built
    page = out / "report.html"
    assert result.stdout.strip() == str(page)
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not EXTERNAL.search(text), EXTERNAL.search(text)
    assert "<script src=" not in text.lower()
    assert not re.search(r"<link\b[^>]*href=[\"']?https?:", text, re.IGNORECASE)
    assert "Plotly.newPlot" in text
    assert len(text) > 1_000_000  # the plotly.js bundle is inline


def test_html_holds_the_plot_data(built: tuple[Path, Any], fresh_results: Path) -> None:
    text = (built[0] / "report.html").read_text()
    assert "SIMULATED" in text
    for doc_path in sorted(fresh_results.glob("*.json")):
        doc = json.loads(doc_path.read_text())
        assert doc_path.stem in text
        # The trial values of the study (optimisation history) appear in the page.
        entries, _ = load_entries(fresh_results)
        entry = next(e for e in entries if e.path == doc_path)
        assert entry.study is not None
        values = [t.value for t in entry.study.trials if t.value is not None]
        assert len(values) >= 10
        for v in values[:5]:
            assert json.dumps(v) in text
        # The winner's repeats (error bars) too.
        for v in doc["winner"]["objective_values"]:
            assert f"{v:.6g}" in text
    for title in (
        "optimisation history",
        "parameter importances",
        "mlp.down ratio",
        "winner vs off vs default",
        "winning prefetch vs max-num-seqs",
        "flat above",
    ):
        assert title in text, title


def test_pngs_exist_and_are_pngs(built: tuple[Path, Any]) -> None:
    pngs = sorted((built[0] / "png").glob("*.png"))
    names = {p.name for p in pngs}
    assert "qwen3-32b-w8a8-tp4-dp1-atlas-a2-sim-plugin-trend.png" in names
    assert any(n.endswith("mns72-history.png") for n in names)
    assert any(n.endswith("mns72-baselines.png") for n in names)
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
        assert p.stat().st_size > 5000


def test_report_without_studies_still_works(fresh_results: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(fresh_results, results, ignore=shutil.ignore_patterns("studies"))
    # The result's own study.storage points into the module's results; hide it too.
    for p in results.glob("*.json"):
        doc = json.loads(p.read_text())
        doc["study"]["storage"] = str(tmp_path / "gone.journal")
        p.write_text(json.dumps(doc))
    out = tmp_path / "out"
    result = run("--results-dir", str(results), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    text = (out / "report.html").read_text()
    assert "winner vs off vs default" in text and "not found" in text


def test_few_trials_or_one_knob_has_no_importances(fresh_results: Path) -> None:
    entries, _ = load_entries(fresh_results)
    entry = entries[0]
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"mlp.down": 0.2},
            distributions={"mlp.down": optuna.distributions.FloatDistribution(0.0, 0.576)},
            value=1.0,
        )
    )
    figs = study_figures(StudyEntry(entry.path, entry.doc, study))
    captions = [c for c, _ in figs]
    assert "Parameter importances" not in captions
    assert "Slice: mlp.down" in captions and "Winner vs off vs default" in captions


def test_bad_input_is_exit_2(tmp_path: Path) -> None:
    result = run("--results-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --results-dir {tmp_path / 'nope'}: no such directory"
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("--results-dir", str(empty), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "no result files" in result.stderr


def test_missing_extra_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    result = run("--results-dir", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'prefetch-tune[report]'" in lines[0]


FLAT = {"mlp.gate_up": 0.288, "mlp.down": 0.576}  # plan --json, qwen3-32b TP4; attn never flat


def _slices(e: StudyEntry) -> dict[str, Any]:
    return {c.removeprefix("Slice: "): f for c, f in study_figures(e) if c.startswith("Slice: ")}


def test_slice_plots_draw_every_trial_at_its_ratio_with_the_plans_flat_line(
    fresh_results: Path,
) -> None:
    """mlp.gate_up goes flat at 0.288 at qwen3-32b TP4 (`plan --json`), not at the sampling
    range's top (0.36); trials sampled below 0 ran with the knob off and sit at x = 0."""
    entries, _ = load_entries(fresh_results)
    for e in entries:
        assert e.study is not None
        done = [
            t
            for t in e.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
            if t.value is not None
        ]
        slices = _slices(e)
        assert set(slices) == {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"}
        for knob, fig in slices.items():
            (trace,) = fig.data
            xs = list(trace.x)
            assert len(xs) == len(done)  # every trial is drawn
            lo, hi = fig.layout.xaxis.range
            assert all(lo < x < hi for x in xs), (knob, lo, hi, xs)
            flat = FLAT.get(knob)
            wanted = sorted(min(max(0.0, t.params[knob]), flat or 1.0) for t in done)
            assert sorted(xs) == pytest.approx(wanted)
            assert any(t.params[knob] < 0 for t in done)  # the off zone was sampled ...
            assert 0.0 in xs  # ... and is drawn
            lines = [s.x0 for s in fig.layout.shapes if s.type == "line"]
            assert lines == ([] if flat is None else [pytest.approx(flat)])
