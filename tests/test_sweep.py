"""`prefetch-tune sweep`: re-measure stored winners against the stored results (sim backend)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import tomllib
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import typer
from helpers import assert_bad_input, processes_with_env
from typer.testing import CliRunner

from prefetch_tune.backends.base import OperatingPoint, Workload, get_backend
from prefetch_tune.cli.sweep import sweep
from prefetch_tune.errors import BackendError
from prefetch_tune.models import Layout, load_model
from prefetch_tune.regress.outcomes import SweepReport
from prefetch_tune.regress.outputs import csv_text, junit_xml, markdown
from prefetch_tune.regress.sweep import SweepOptions, run_sweep
from prefetch_tune.regress.sweep_plan import load_plan
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.tuner import search_point

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "configs" / "sweeps" / "example.toml"
STEM = "qwen3-32b-w8a8-tp4-dp1-atlas-a2-sim-plugin-mns{}"


def _app() -> typer.Typer:
    # The command on its own app, so the tests do not depend on its registration in cli/__init__.
    app = typer.Typer(add_completion=False)

    @app.callback()
    def root() -> None:
        """prefetch-tune (test app)."""

    app.command("sweep")(sweep)
    return app


APP = _app()


def run(*args: str) -> Any:
    return CliRunner().invoke(APP, ["sweep", *args])


@pytest.fixture(scope="module")
def fresh_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sim search of qwen3-32b tp4 at max-num-seqs 8 and 72 (20 trials each)."""
    results = tmp_path_factory.mktemp("fresh") / "results"
    spec = load_model("qwen3-32b", "w8a8")
    backend = get_backend("sim")
    settings = SearchSettings(results_dir=results, trials=20)
    for n in (8, 72):
        point = OperatingPoint(model=spec, layout=Layout(tp=4), max_num_seqs=n)
        outcome = search_point(point, backend, settings)
        assert outcome.path is not None and outcome.path.exists()
    return results


@pytest.fixture
def results(fresh_results: Path, tmp_path: Path) -> Path:
    """A private copy of the fresh results, free to edit."""
    dest = tmp_path / "results"
    shutil.copytree(fresh_results, dest)
    return dest


def outputs(tmp_path: Path) -> tuple[Path, Path, Path, list[str]]:
    junit, md, csv = tmp_path / "out" / "s.xml", tmp_path / "out" / "s.md", tmp_path / "s.csv"
    junit.parent.mkdir(exist_ok=True)  # output files need an existing folder
    return junit, md, csv, ["--junit", str(junit), "--markdown", str(md), "--csv", str(csv)]


def junit_cases(junit: Path) -> dict[str, ET.Element]:
    root = ET.parse(junit).getroot()
    return {str(c.get("name")): c for c in root.iter("testcase")}


def case_for(cases: dict[str, ET.Element], mns: int) -> ET.Element:
    matches = [c for name, c in cases.items() if name.split(" ")[0].endswith(f"-mns{mns}")]
    assert len(matches) == 1, list(cases)
    return matches[0]


def write_plan(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- passes on fresh results -------------------------------------------------------------------


def test_example_plan_holds_on_fresh_results(results: Path, tmp_path: Path) -> None:
    junit, md, csv, flags = outputs(tmp_path)
    result = run(str(EXAMPLE), "--results-dir", str(results), *flags)
    assert result.exit_code == 0, result.stderr
    cases = junit_cases(junit)
    assert len(cases) == 2
    for mns in (8, 72):
        case = case_for(cases, mns)
        assert case.find("failure") is None and case.find("error") is None
        assert "SIMULATED" in str(case.get("name"))
    root = ET.parse(junit).getroot()
    assert root.get("failures") == "0" and "SIMULATED" in str(root.get("name"))
    summary = md.read_text()
    assert "all points hold" in summary and "SIMULATED" in summary
    assert STEM.format(72) in summary
    frame = pd.read_csv(csv)
    assert list(frame["status"]) == ["pass", "pass"]
    assert set(frame["label"]) == {"SIMULATED"} and frame["simulated"].all()
    assert frame["change_pct"].abs().max() < 1e-9  # the sim without noise re-measures exactly
    # The stored 72 winner beat off and default; the re-measurement says so again.
    row72 = frame[frame["max_num_seqs"] == 72].iloc[0]
    assert bool(row72["vs_off_holds"]) and bool(row72["vs_default_holds"])


def test_every_stored_result_and_explicit_backend(results: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "all.toml", "every_stored_result = true\n")
    junit, _, _, flags = outputs(tmp_path)
    result = run(str(plan), "--results-dir", str(results), "--backend", "sim", *flags)
    assert result.exit_code == 0, result.stderr
    assert len(junit_cases(junit)) == 2


# ---- a regression fails -------------------------------------------------------------------------


def _raise_winner(path: Path, factor: float) -> float:
    doc = json.loads(path.read_text())
    w = doc["winner"]
    metric = doc["objective"]["metric"]
    w["objective_median"] *= factor
    w["objective_values"] = [v * factor for v in w["objective_values"]]
    for key in ("output_throughput", "total_token_throughput", "request_throughput"):
        w["metrics_median"][key] *= factor
    assert metric == "output_throughput"
    path.write_text(json.dumps(doc, indent=2))
    return float(w["objective_median"])


def test_raised_stored_winner_is_a_regression(results: Path, tmp_path: Path) -> None:
    path = results / f"{STEM.format(72)}.json"
    measured = json.loads(path.read_text())["winner"]["objective_median"]
    stored = _raise_winner(path, 1.10)
    junit, md, csv, flags = outputs(tmp_path)
    result = run(str(EXAMPLE), "--results-dir", str(results), *flags)
    assert result.exit_code == 1, result.stderr
    cases = junit_cases(junit)
    assert case_for(cases, 8).find("failure") is None
    failure = case_for(cases, 72).find("failure")
    assert failure is not None
    message = str(failure.get("message"))
    assert "output_throughput" in message
    assert f"{stored:.2f}" in message and f"{measured:.2f}" in message
    assert "tolerance 2%" in message and "noise band" in message
    assert "SIMULATED" in message
    assert "REGRESSION" in md.read_text()
    frame = pd.read_csv(csv).set_index("max_num_seqs")
    assert frame.loc[72, "status"] == "fail" and frame.loc[8, "status"] == "pass"
    assert frame.loc[72, "change_pct"] == pytest.approx(-100 / 11, rel=1e-6)


def test_wide_tolerance_absorbs_the_drop(results: Path, tmp_path: Path) -> None:
    _raise_winner(results / f"{STEM.format(72)}.json", 1.10)
    result = run(str(EXAMPLE), "--results-dir", str(results), "--tolerance", "12")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(("drop_pct", "code"), [(1.5, 0), (3.0, 1)])
def test_allowed_drop_is_the_tolerance_on_a_noise_free_backend(
    results: Path, tmp_path: Path, drop_pct: float, code: int
) -> None:
    # The noise-free sim has no noise band, so the allowed drop is exactly --tolerance (2%).
    _raise_winner(results / f"{STEM.format(72)}.json", 1 / (1 - drop_pct / 100))
    junit, _, _, flags = outputs(tmp_path)
    result = run(str(EXAMPLE), "--results-dir", str(results), "--tolerance", "2", *flags)
    assert result.exit_code == code, result.stderr
    frame = pd.read_csv(tmp_path / "s.csv").set_index("max_num_seqs")
    assert frame.loc[72, "change_pct"] == pytest.approx(-drop_pct, rel=1e-6)
    if code:
        failure = case_for(junit_cases(junit), 72).find("failure")
        assert failure is not None and "allowed 2.00% below" in str(failure.get("message"))


def test_winner_that_no_longer_beats_default(results: Path, tmp_path: Path) -> None:
    """The stored 72 winner said it beat default significantly; make it default's bytes."""
    path = results / f"{STEM.format(72)}.json"
    doc = json.loads(path.read_text())
    assert doc["improvement"]["vs_default"]["significant"]
    doc["winner"]["weight_prefetch_config"] = doc["baselines"]["default"]["weight_prefetch_config"]
    path.write_text(json.dumps(doc))
    junit, _, _, flags = outputs(tmp_path)
    result = run(str(EXAMPLE), "--results-dir", str(results), *flags)
    assert result.exit_code == 1, result.stderr
    failure = case_for(junit_cases(junit), 72).find("failure")
    assert failure is not None
    assert "default" in str(failure.get("message"))


# ---- missing points -----------------------------------------------------------------------------


MISSING_PLAN = """
[[point]]
model = "qwen3-32b"
tp = 4
max_num_seqs = [8, 16]
"""


def test_missing_point_fails_unless_allowed(results: Path, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.toml", MISSING_PLAN)
    junit, md, csv, flags = outputs(tmp_path)
    result = run(str(plan), "--results-dir", str(results), *flags)
    assert result.exit_code == 1, result.stderr
    case = case_for(junit_cases(junit), 16)
    failure = case.find("failure")
    assert failure is not None and failure.get("type") == "missing"
    assert "no stored result" in str(failure.get("message"))
    assert "missing" in md.read_text()
    assert list(pd.read_csv(csv)["status"]) == ["pass", "missing"]

    result = run(str(plan), "--results-dir", str(results), "--allow-missing", *flags)
    assert result.exit_code == 0, result.stderr
    case = case_for(junit_cases(junit), 16)
    assert case.find("failure") is None and case.find("skipped") is not None


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[[point]]\nmodel = "qwen3-32b"\ntp = 4\nmax_num_seqs = 8\nmodle = "x"\n', "'modle'"),
        ('tolerence = 3\n[[point]]\nmodel = "qwen3-32b"\nmax_num_seqs = 8\n', "'tolerence'"),
        ('[[point]]\nmodel = "no-such-model"\nmax_num_seqs = 8\n', "no-such-model"),
        ('[[point]]\nmodel = "qwen3-32b"\nmax_num_seqs = "eight"\n', "max_num_seqs"),
        ('[[point]]\nmodel = "qwen3-32b"\ntp = 3\nmax_num_seqs = 8\n', "--tp 3"),
        ("[[point\n", "not valid TOML"),
    ],
)
def test_bad_plan_is_exit_2(results: Path, tmp_path: Path, text: str, needle: str) -> None:
    plan = write_plan(tmp_path / "bad.toml", text)
    junit = tmp_path / "j.xml"
    line = assert_bad_input(
        run(str(plan), "--results-dir", str(results), "--junit", str(junit)), needle
    )
    assert str(plan) in line
    assert not junit.exists()


def test_unwritable_output_is_exit_2(results: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = blocker / "sweep.xml"
    assert_bad_input(
        run(str(EXAMPLE), "--results-dir", str(results), "--junit", str(bad)), "--junit", str(bad)
    )
    assert_bad_input(
        run(str(EXAMPLE), "--results-dir", str(results), "--csv", str(tmp_path)),
        "--csv",
        "is a directory",
    )


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--tolerance", "-1"], "--tolerance -1"), (["--repeats", "0"], "--repeats 0")],
)
def test_bad_flags_are_exit_2(results: Path, flags: list[str], needle: str) -> None:
    assert_bad_input(run(str(EXAMPLE), "--results-dir", str(results), *flags), needle)


def test_every_stored_result_with_nothing_stored_is_exit_2(tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "all.toml", "every_stored_result = true\n")
    (tmp_path / "empty").mkdir()
    assert_bad_input(run(str(plan), "--results-dir", str(tmp_path / "empty")), "nothing to check")


def test_missing_plan_and_unknown_backend_are_exit_2(results: Path, tmp_path: Path) -> None:
    assert_bad_input(run(str(tmp_path / "nope.toml")), "nope.toml")
    assert_bad_input(
        run(str(EXAMPLE), "--results-dir", str(results), "--backend", "nope"), "--backend nope"
    )


# ---- a measured backend (a stand-in wrapping the sim), through the library ---------------------


class FakeMeasured:
    """Sim numbers scaled per repeat, labelled as measured; optionally failing."""

    name = "fake"
    measured = True

    def __init__(self, factors: dict[int, float], fail: bool = False) -> None:
        self.sim = get_backend("sim")
        self.factors = factors
        self.fail = fail
        self.calls = 0

    def evaluate(self, config: Any, point: OperatingPoint, repeat: int = 0) -> dict[str, float]:
        self.calls += 1
        if self.fail:
            raise BackendError("server died during the benchmark", failure_class="server_crash")
        metrics = dict(self.sim.evaluate(config, point, repeat))
        f = self.factors.get(repeat, 1.0)
        for key in ("output_throughput", "total_token_throughput", "request_throughput"):
            metrics[key] *= f
        return metrics


def _as_measured(results: Path) -> Path:
    """Turn the stored sim result for 72 into a 'fake' measured one (same numbers)."""
    src = results / f"{STEM.format(72)}.json"
    doc = json.loads(src.read_text())
    doc["backend"], doc["simulated"], doc["label"] = "fake", False, "measured"
    dest = results / src.name.replace("-sim-", "-fake-")
    dest.write_text(json.dumps(doc))
    return dest


def _sweep(results: Path, backend: FakeMeasured, **kw: Any) -> SweepReport:
    plan = load_plan(EXAMPLE)
    plan.points = [p for p in plan.points if p.max_num_seqs == 72]
    opts = SweepOptions(results_dir=results, backend="fake", **kw)
    return run_sweep(plan, opts, backend_factory=lambda name: backend)


def test_measured_backend_is_labelled_measured(results: Path) -> None:
    _as_measured(results)
    backend = FakeMeasured({})
    report = _sweep(results, backend)
    assert report.ok and not report.simulated
    (o,) = report.outcomes
    assert o.label == "measured" and o.backend == "fake"
    stored = json.loads((results / f"{STEM.format(72)}.json").read_text())
    configs = 2 if stored["winner"]["is_off"] else 3  # winner (unless off), off and default
    assert backend.calls == configs * 3  # 3 repeats each (stored repeats)
    assert "SIMULATED" not in junit_xml(report) + markdown(report) + csv_text(report)


def test_noise_band_wider_than_tolerance_is_allowed(results: Path) -> None:
    _as_measured(results)
    # Median 3% low but a 5% MAD: the band (~15%) is wider than the 2% tolerance.
    report = _sweep(results, FakeMeasured({1: 0.97, 2: 0.92, 3: 1.02}), repeats=3)
    (o,) = report.outcomes
    main = next(c for c in o.checks if c.name == "winner vs stored")
    assert main.pct == pytest.approx(-3.0, abs=0.01)
    assert main.band_pct is not None and main.band_pct > 10
    assert main.ok and main.limit_pct == main.band_pct
    # The same noise on every config: the stored wins over off/default are now within it.
    beats = [c for c in o.checks if c.name.startswith("winner beats")]
    assert beats and all(not c.ok for c in beats) and o.status == "fail"


def test_failed_remeasurement_fails_the_point(results: Path) -> None:
    _as_measured(results)
    report = _sweep(results, FakeMeasured({}, fail=True), repeats=2)
    (o,) = report.outcomes
    assert o.status == "fail" and not report.ok
    assert "rejected" in o.summary() and "server died" in o.summary()
    failure = ET.fromstring(junit_xml(report)).find(".//failure")
    assert failure is not None and "[measured]" in str(failure.get("message"))


# ---- the vllm backend against the fake `vllm` (tests/fake_vllm) ---------------------------------

FAKE_VLLM = REPO / "tests" / "fake_vllm"
TOKEN_VAR = "PT_SWEEP_TEST"
VLLM_TABLE = """
[vllm]
model = "qwen3-32b"
serve_args = ["--max-model-len", "5500"]
env = {{ FAKE_VLLM_TTFT_MS = "20", FAKE_VLLM_TPOT_MS = "10", {token_var} = "{token}" }}
ready_timeout = 20
stop_grace = 5
"""


def _survivors(token: str) -> list[int]:
    return processes_with_env(TOKEN_VAR, token)


@pytest.mark.slow
def test_vllm_backend_sweep_against_the_fake_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nightly CI path: a measured result, then `sweep --backend vllm` with a [vllm] table."""
    vllm_mod = pytest.importorskip("prefetch_tune.backends.vllm")
    if not (FAKE_VLLM / "vllm").exists():
        pytest.skip("tests/fake_vllm is not there")
    for key in list(os.environ):
        if key.startswith("FAKE_VLLM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", f"{FAKE_VLLM}{os.pathsep}{os.environ.get('PATH', '')}")
    token = uuid.uuid4().hex
    table_text = VLLM_TABLE.format(token_var=TOKEN_VAR, token=token)
    results = tmp_path / "R"
    point = OperatingPoint(
        model=load_model("qwen3-32b"),
        layout=Layout(tp=4),
        max_num_seqs=4,
        workload=Workload(input_len=32, output_len=8),
        semantics="native-0.23",
    )
    backend = vllm_mod.VllmBackend(
        vllm=tomllib.loads(table_text)["vllm"], python=sys.executable, results_dir=results
    )
    try:
        outcome = search_point(
            point, backend, SearchSettings(results_dir=results, trials=2, repeats=2)
        )
    finally:
        backend.close()
    assert outcome.path is not None and "-vllm-native-0.23-mns4" in outcome.path.name
    # The fake's timings are wall-clock noise, and this test is about the plumbing (backend,
    # [vllm] table, labels, no process left behind), so no rule may depend on them: drop any
    # "beats off/default" claim the noise made; re-measure once (a MAD of one run is 0, so no
    # "unstable" rejection); allow a 100% drop (a throughput cannot fall further). Failed or
    # incomplete benchmarks still fail the point.
    doc = json.loads(outcome.path.read_text())
    for cmp in doc["improvement"].values():
        cmp["significant"] = False
    outcome.path.write_text(json.dumps(doc))
    plan = write_plan(
        tmp_path / "plan.toml",
        'tolerance = 100\nrepeats = 1\n[[point]]\nmodel = "qwen3-32b"\ntp = 4\n'
        'semantics = "native-0.23"\nmax_num_seqs = 4\n' + table_text,
    )
    junit, md, csv, flags = outputs(tmp_path)
    result = run(str(plan), "--backend", "vllm", "--results-dir", str(results), *flags)
    assert result.exit_code == 0, result.stderr
    case = case_for(junit_cases(junit), 4)
    assert "[measured]" in str(case.get("name")) and case.find("failure") is None
    assert "SIMULATED" not in md.read_text()
    frame = pd.read_csv(csv)
    assert list(frame["label"]) == ["measured"] and list(frame["backend"]) == ["vllm"]
    deadline = time.monotonic() + 5.0
    while _survivors(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _survivors(token) == [], "a server or benchmark process survived the sweep"


def test_sweep_json_is_data_on_stdout_sorted_by_max_num_seqs(results: Path, tmp_path: Path) -> None:
    result = run(str(EXAMPLE), "--results-dir", str(results), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert [r["max_num_seqs"] for r in data] == [8, 72]
    assert {r["status"] for r in data} == {"pass"} and all(r["simulated"] for r in data)
