"""Bad input across every command, as one table: flags, TOML files (tune, sweep plan, hardware),
result files, journals and profiler traces.

Each case must exit 2 with exactly one `error:` line naming the offender, no traceback, and leave
every stored file byte-identical (no file changed, added or removed: no stray journal, `.tmp` or
output). All cases share one world of stored files, run in-process through typer's CliRunner.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_bad_input
from typer.testing import CliRunner

from prefetch_tune.cli import app

MODEL = ("--model", "qwen3-32b", "--tp", "4")
SEARCH = ("search", *MODEL, "--max-num-seqs", "72", "--trials", "4")
APPLY = ("apply", *MODEL, "--max-num-seqs", "72")
SIMULATE = ("simulate", *MODEL, "--max-num-seqs", "72")
PLAN = ("plan", *MODEL, "--max-num-seqs", "72")


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


@dataclass(frozen=True)
class World:
    root: Path

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def f(self, name: str) -> Path:
        """One of the bad input files."""
        return self.root / "files" / name


def _hardware_with(src: Path, dst: Path, field: str, value: str) -> None:
    """A copy of a hardware profile with one field's value replaced."""
    text = src.read_text()
    head, sep, rest = text.partition(f"[{field}]\nvalue = ")
    assert sep, field
    dst.write_text(head + sep + value + rest[rest.index("\n") :])


def _build(root: Path) -> None:
    """One stored search (result, trials CSV, journal) and every bad file the table reads."""
    r = run(*SEARCH, "--results-dir", root / "R")
    assert r.exit_code == 0, r.stderr
    (result,) = (root / "R").glob("*.json")
    doc = json.loads(result.read_text())
    files = root / "files"
    files.mkdir()
    # results: a second one for the same point on other hardware makes `apply --model` ambiguous
    amb = root / "AMB"
    shutil.copytree(root / "R", amb)
    other = json.loads(result.read_text())
    other["hardware"] = "atlas-a3"
    (amb / result.name.replace("atlas-a2", "atlas-a3")).write_text(json.dumps(other))
    (files / "cut.json").write_text(result.read_text()[:200])
    (files / "tp-string.json").write_text(
        json.dumps({**doc, "layout": {**doc["layout"], "tp": "4"}})
    )
    (files / "v99.json").write_text(json.dumps({**doc, "schema_version": 99}))
    (files / "nan.json").write_text(
        result.read_text().replace('"simulated": true', '"simulated": NaN')
    )
    (files / "list.json").write_text("[1, 2]\n")
    # journals: damaged mid-file, and a record Optuna cannot replay, each on a copy of R
    for name in ("JMID", "JREPLAY"):
        shutil.copytree(root / "R", root / name)
    (jmid,) = (root / "JMID" / "studies").glob("*.journal")
    lines = jmid.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"op_code": 5, "worker\n'
    jmid.write_bytes(b"".join(lines))
    (jrep,) = (root / "JREPLAY" / "studies").glob("*.journal")
    jrep.write_bytes(jrep.read_bytes() + b'{"op_code":5,"worker_id":"w"}\n{"op_code":0}\n')
    # tune files
    tune = 'model = "qwen3-32b"\ntp = 4\nmax_num_seqs = [72]\ntrials = 4\n'
    for name, extra in {
        "cap-nan": "cap_mib = nan\n",
        "noise-inf": "noise = inf\n",
        "seed-neg": "seed = -1\n",
        "timeout-neg-inf": "timeout = -inf\n",
        "max-repeats-zero": "max_repeats = 0\n",
        "trails": "trails = 3\n",
        "trials-str": "",
        "repeats-zero": "repeats = 0\n",
        "slo-nan": 'slo = "p99_tpot_ms<=1e999"\n',
        "vllm-nan": "[vllm]\nport = nan\n",
    }.items():
        body = tune.replace("trials = 4", 'trials = "four"') if name == "trials-str" else tune
        (files / f"{name}.toml").write_text(body + extra)
    (files / "broken.toml").write_text('model = "qwen3-32b\n')
    # sweep plans
    point = '[[point]]\nmodel = "qwen3-32b"\ntp = 4\nmax_num_seqs = 72\n'
    for name, text in {
        "plan-tol-nan": "tolerance = nan\n" + point,
        "plan-tol-neg": "tolerance = -1\n" + point,
        "plan-rep-zero": "repeats = 0\n" + point,
        "plan-unknown": "tolerence = 2\n" + point,
        "plan-mns-zero": point.replace("72", "0"),
        "plan-empty": "",
        "plan-ok": point,
    }.items():
        (files / f"{name}.toml").write_text(text)
    # hardware profiles
    a2 = Path(__file__).resolve().parents[1] / "prefetch_tune" / "configs" / "hardware"
    a2 = a2 if a2.is_dir() else Path(__file__).resolve().parents[1] / "configs" / "hardware"
    _hardware_with(a2 / "atlas-a2.toml", files / "hw-nan.toml", "hbm_bw", "nan")
    _hardware_with(a2 / "atlas-a2.toml", files / "hw-inf.toml", "l2_bw", "inf")
    _hardware_with(a2 / "atlas-a2.toml", files / "hw-neg.toml", "hbm_bw", "-1.0")
    # profiler traces
    (files / "cut").mkdir()
    (files / "cut" / "trace_view.json").write_text('{"traceEvents": [{"ph": "X", "name": "a"')
    (files / "nan").mkdir()
    (files / "nan" / "trace_view.json").write_text(
        '{"traceEvents": [{"ph": "X", "name": "a", "pid": 1, "tid": 1, "ts": NaN, "dur": 1}]}'
    )
    (files / "csv").mkdir()
    (files / "csv" / "kernel_details.csv").write_text("Foo,Bar\n1,2\n")
    (files / "csvnan").mkdir()
    (files / "csvnan" / "kernel_details.csv").write_text(
        "Name,Type,Start Time(us),Duration(us)\nCMO,CMO,nan,1.0\n"
    )
    (files / "ok").mkdir()
    (files / "ok" / "kernel_details.csv").write_text(
        "Name,Type,Start Time(us),Duration(us)\nMatMul,MatMul,1.0,1.0\n"
    )
    (files / "a-file").write_text("not a directory\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("world")
    _build(root)
    return World(root)


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


Case = tuple[str, Callable[[World], list[str | Path]], Callable[[World], list[str]]]


def c(cid: str, args: Callable[[World], list[Any]], *needles: str | Callable[[World], str]) -> Any:
    def need(w: World) -> list[str]:
        return [n(w) if callable(n) else n for n in needles]

    return pytest.param(args, need, id=cid)


def R(w: World) -> list[Any]:
    return ["--results-dir", w / "R"]


CASES = [
    # ---- search flags
    c("search-cap-nan", lambda w: [*SEARCH, *R(w), "--cap-mib", "nan"], "--cap-mib nan"),
    c("search-cap-inf", lambda w: [*SEARCH, *R(w), "--cap-mib", "inf"], "--cap-mib inf"),
    c("search-cap-zero", lambda w: [*SEARCH, *R(w), "--cap-mib", "0"], "--cap-mib 0"),
    c("search-noise-nan", lambda w: [*SEARCH, *R(w), "--noise", "nan"], "--noise nan"),
    c("search-noise-neg", lambda w: [*SEARCH, *R(w), "--noise", "-1"], "--noise -1"),
    c("search-noise-huge", lambda w: [*SEARCH, *R(w), "--noise", "500"], "--noise 500"),
    c("search-seed-neg", lambda w: [*SEARCH, *R(w), "--seed", "-1"], "--seed -1"),
    c("search-seed-huge", lambda w: [*SEARCH, *R(w), "--seed", str(2**40)], "--seed"),
    c("search-timeout-nan", lambda w: [*SEARCH, *R(w), "--timeout", "nan"], "--timeout nan"),
    c("search-timeout-zero", lambda w: [*SEARCH, *R(w), "--timeout", "0"], "--timeout 0"),
    c("search-max-repeats-0", lambda w: [*SEARCH, *R(w), "--max-repeats", "0"], "--max-repeats"),
    c("search-heartbeat-0", lambda w: [*SEARCH, *R(w), "--heartbeat", "0"], "--heartbeat 0"),
    c("search-trials-zero", lambda w: [*SEARCH, *R(w), "--trials", "0"], "--trials 0"),
    c("search-repeats-zero", lambda w: [*SEARCH, *R(w), "--repeats", "0"], "--repeats 0"),
    c(
        "search-mns-zero",
        lambda w: ["search", *MODEL, "--max-num-seqs", "0", *R(w)],
        "--max-num-seqs 0",
    ),
    c("search-input-len-zero", lambda w: [*SEARCH, *R(w), "--input-len", "0"], "--input-len 0"),
    c("search-sampler", lambda w: [*SEARCH, *R(w), "--sampler", "bayes"], "--sampler bayes"),
    c("search-slo-inf", lambda w: [*SEARCH, *R(w), "--slo", "p99_tpot_ms<=1e999"], "--slo"),
    c("search-slo-form", lambda w: [*SEARCH, *R(w), "--slo", "p99<50"], "--slo p99<50"),
    c("search-objective", lambda w: [*SEARCH, *R(w), "--objective", "speed"], "--objective speed"),
    c(
        "search-hardware-name",
        lambda w: [*SEARCH, *R(w), "--hardware", "atlas-z9"],
        "--hardware atlas-z9",
    ),
    c(
        "search-hardware-missing",
        lambda w: [*SEARCH, *R(w), "--hardware", w / "no.toml"],
        "no.toml",
    ),
    c(
        "search-hardware-nan",
        lambda w: [*SEARCH, *R(w), "--hardware", w.f("hw-nan.toml")],
        "hw-nan.toml",
        "hbm_bw",
    ),
    c(
        "search-hardware-inf",
        lambda w: [*SEARCH, *R(w), "--hardware", w.f("hw-inf.toml")],
        "hw-inf.toml",
        "l2_bw",
    ),
    c(
        "search-hardware-neg",
        lambda w: [*SEARCH, *R(w), "--hardware", w.f("hw-neg.toml")],
        "hw-neg.toml",
        "hbm_bw",
    ),
    c(
        "search-semantics",
        lambda w: [*SEARCH, *R(w), "--semantics", "native"],
        "--semantics native",
    ),
    c("search-quant", lambda w: [*SEARCH, *R(w), "--quant", "int4"], "--quant int4"),
    c(
        "search-tp",
        lambda w: ["search", "--model", "qwen3-32b", "--tp", "3", "--max-num-seqs", "8", *R(w)],
        "--tp 3",
    ),
    c(
        "search-model",
        lambda w: ["search", "--model", "qwen9", "--max-num-seqs", "8", *R(w)],
        "--model qwen9",
    ),
    c("search-backend", lambda w: [*SEARCH, *R(w), "--backend", "tpu"], "tpu"),
    c(
        "search-storage",
        lambda w: [*SEARCH, *R(w), "--storage", "nosuch://x"],
        "--storage nosuch://x",
    ),
    c(
        "search-results-dir-file",
        lambda w: [*SEARCH, "--results-dir", w.f("a-file") / "R"],
        "a-file",
    ),
    # ---- tune files
    c(
        "tune-cap-nan",
        lambda w: ["search", "--config", w.f("cap-nan.toml"), *R(w)],
        "cap-nan.toml",
        "cap_mib",
    ),
    c(
        "tune-noise-inf",
        lambda w: ["search", "--config", w.f("noise-inf.toml"), *R(w)],
        "noise-inf.toml",
        "noise",
    ),
    c(
        "tune-seed-neg",
        lambda w: ["search", "--config", w.f("seed-neg.toml"), *R(w)],
        "seed-neg.toml",
        "seed",
    ),
    c(
        "tune-timeout-neg-inf",
        lambda w: ["search", "--config", w.f("timeout-neg-inf.toml"), *R(w)],
        "timeout",
    ),
    c(
        "tune-max-repeats-zero",
        lambda w: ["search", "--config", w.f("max-repeats-zero.toml"), *R(w)],
        "max-repeats-zero.toml",
        "max_repeats",
    ),
    c("tune-unknown-key", lambda w: ["search", "--config", w.f("trails.toml"), *R(w)], "'trails'"),
    c("tune-wrong-type", lambda w: ["search", "--config", w.f("trials-str.toml"), *R(w)], "trials"),
    c(
        "tune-repeats-zero",
        lambda w: ["search", "--config", w.f("repeats-zero.toml"), *R(w)],
        "repeats",
    ),
    c(
        "tune-slo-inf",
        lambda w: ["search", "--config", w.f("slo-nan.toml"), *R(w)],
        "slo-nan.toml: slo",
    ),
    c("tune-vllm-nan", lambda w: ["search", "--config", w.f("vllm-nan.toml"), *R(w)], "vllm.port"),
    c("tune-broken", lambda w: ["search", "--config", w.f("broken.toml"), *R(w)], "broken.toml"),
    c("tune-missing", lambda w: ["search", "--config", w / "none.toml", *R(w)], "none.toml"),
    # ---- journals
    c(
        "journal-mid-damage",
        lambda w: [*SEARCH, "--results-dir", w / "JMID"],
        lambda w: f"{next((w / 'JMID' / 'studies').glob('*.journal'))}:2:",
    ),
    c(
        "journal-unreplayable",
        lambda w: [*SEARCH, "--results-dir", w / "JREPLAY"],
        "damaged journal",
    ),
    # ---- apply
    c(
        "apply-merge-nan",
        lambda w: ["apply", "--disabled", "--merge-into", '{"a": NaN}'],
        "--merge-into",
        "NaN",
    ),
    c(
        "apply-merge-inf",
        lambda w: ["apply", "--disabled", "--merge-into", '{"a": [-Infinity]}'],
        "--merge-into",
    ),
    c(
        "apply-merge-bad",
        lambda w: ["apply", "--disabled", "--merge-into", "{oops"],
        "--merge-into",
    ),
    c("apply-merge-list", lambda w: ["apply", "--disabled", "--merge-into", "[1]"], "--merge-into"),
    c("apply-set-nan", lambda w: ["apply", "--set", "mlp.down=nan"], "mlp.down"),
    c("apply-set-big", lambda w: ["apply", "--set", "mlp.down=2"], "mlp.down"),
    c("apply-set-knob", lambda w: ["apply", "--set", "mlp.dwn=0.5"], "mlp.dwn"),
    c("apply-result-cut", lambda w: ["apply", "--result", w.f("cut.json")], "cut.json", "damaged"),
    c(
        "apply-result-type",
        lambda w: ["apply", "--result", w.f("tp-string.json")],
        "tp-string.json",
        "layout.tp",
    ),
    c(
        "apply-result-nan",
        lambda w: ["apply", "--result", w.f("nan.json")],
        "nan.json",
        "simulated",
    ),
    c(
        "apply-result-v99",
        lambda w: ["apply", "--result", w.f("v99.json")],
        "v99.json",
        "schema_version",
    ),
    c("apply-result-list", lambda w: ["apply", "--result", w.f("list.json")], "list.json"),
    c("apply-result-missing", lambda w: ["apply", "--result", w / "none.json"], "none.json"),
    c(
        "apply-ambiguous",
        lambda w: [*APPLY, "--results-dir", w / "AMB"],
        "2 stored results match",
        "atlas-a3",
    ),
    c("apply-format", lambda w: [*APPLY, *R(w), "--format", "yaml"], "--format yaml"),
    c("apply-semantics", lambda w: [*APPLY, *R(w), "--semantics", "v0.23"], "--semantics v0.23"),
    c("apply-backend", lambda w: [*APPLY, *R(w), "--backend", "tpu"], "--backend tpu"),
    c("apply-quant", lambda w: [*APPLY, *R(w), "--quant", "fp8"], "--quant fp8"),
    c(
        "apply-contradiction",
        lambda w: ["apply", "--disabled", "--set", "mlp.down=0.5"],
        "--disabled",
    ),
    c("apply-no-mns", lambda w: ["apply", *MODEL, *R(w)], "--max-num-seqs"),
    # ---- simulate / plan
    c("simulate-cap-nan", lambda w: [*SIMULATE, "--cap-mib", "nan"], "--cap-mib nan"),
    c("simulate-noise-nan", lambda w: [*SIMULATE, "--noise", "nan"], "--noise nan"),
    c("simulate-seed-neg", lambda w: [*SIMULATE, "--noise", "1", "--seed", "-1"], "--seed -1"),
    c(
        "simulate-mns-zero",
        lambda w: ["simulate", *MODEL, "--max-num-seqs", "0"],
        "--max-num-seqs 0",
    ),
    c(
        "simulate-config-nan",
        lambda w: [
            *SIMULATE,
            "--config-json",
            '{"enabled": true, "prefetch_ratio": {"mlp": {"down": NaN}}}',
        ],
        "--config-json",
    ),
    c(
        "simulate-trace-missing-dir",
        lambda w: [*SIMULATE, "--trace", w / "nodir" / "t.json"],
        "--trace",
    ),
    c(
        "simulate-hardware-nan",
        lambda w: [*SIMULATE, "--hardware", w.f("hw-nan.toml")],
        "hw-nan.toml",
    ),
    c("plan-cap-neg", lambda w: [*PLAN, "--cap-mib", "-1"], "--cap-mib -1"),
    c("plan-cap-nan", lambda w: [*PLAN, "--cap-mib", "nan"], "--cap-mib nan"),
    c("plan-tokens-zero", lambda w: [*PLAN, "--tokens", "0"], "--tokens 0"),
    # ---- show / report
    c("show-missing-dir", lambda w: ["show", "--results-dir", w / "none"], "--results-dir"),
    c("report-out-file", lambda w: ["report", *R(w), "--out", w.f("a-file")], "--out", "a-file"),
    c(
        "report-out-missing-parent",
        lambda w: ["report", *R(w), "--out", w / "nodir" / "rep"],
        "--out",
    ),
    # ---- sweep
    c(
        "sweep-tol-nan",
        lambda w: ["sweep", w.f("plan-ok.toml"), *R(w), "--tolerance", "nan"],
        "--tolerance nan",
    ),
    c(
        "sweep-tol-neg",
        lambda w: ["sweep", w.f("plan-ok.toml"), *R(w), "--tolerance", "-1"],
        "--tolerance -1",
    ),
    c(
        "sweep-repeats-zero",
        lambda w: ["sweep", w.f("plan-ok.toml"), *R(w), "--repeats", "0"],
        "--repeats 0",
    ),
    c(
        "sweep-plan-tol-nan",
        lambda w: ["sweep", w.f("plan-tol-nan.toml"), *R(w)],
        "plan-tol-nan.toml",
        "tolerance",
    ),
    c(
        "sweep-plan-tol-neg",
        lambda w: ["sweep", w.f("plan-tol-neg.toml"), *R(w)],
        "plan-tol-neg.toml",
        "tolerance",
    ),
    c(
        "sweep-plan-repeats",
        lambda w: ["sweep", w.f("plan-rep-zero.toml"), *R(w)],
        "plan-rep-zero.toml",
        "repeats",
    ),
    c("sweep-plan-unknown", lambda w: ["sweep", w.f("plan-unknown.toml"), *R(w)], "'tolerence'"),
    c("sweep-plan-mns", lambda w: ["sweep", w.f("plan-mns-zero.toml"), *R(w)], "max_num_seqs"),
    c("sweep-plan-empty", lambda w: ["sweep", w.f("plan-empty.toml"), *R(w)], "plan-empty.toml"),
    c("sweep-plan-missing", lambda w: ["sweep", w / "none.toml", *R(w)], "none.toml"),
    c(
        "sweep-junit-missing-dir",
        lambda w: ["sweep", w.f("plan-ok.toml"), *R(w), "--junit", w / "nodir" / "j.xml"],
        "--junit",
    ),
    c(
        "sweep-csv-is-dir",
        lambda w: ["sweep", w.f("plan-ok.toml"), *R(w), "--csv", w / "R"],
        "--csv",
    ),
    c("sweep-backend", lambda w: ["sweep", w.f("plan-ok.toml"), *R(w), "--backend", "tpu"], "tpu"),
    # ---- profile
    c(
        "profile-late-nan",
        lambda w: ["profile", w.f("ok"), "--late-tol-us", "nan"],
        "--late-tol-us nan",
    ),
    c(
        "profile-late-neg",
        lambda w: ["profile", w.f("ok"), "--late-tol-us", "-1"],
        "--late-tol-us -1",
    ),
    c(
        "profile-cap-nan",
        lambda w: ["profile", w.f("ok"), "-m", "qwen3-32b", "--cap-mib", "nan"],
        "--cap-mib nan",
    ),
    c("profile-missing", lambda w: ["profile", w / "none"], "none"),
    c("profile-trace-cut", lambda w: ["profile", w.f("cut"), "-m", "qwen3-32b"], "trace_view.json"),
    c("profile-trace-nan", lambda w: ["profile", w.f("nan"), "-m", "qwen3-32b"], "trace_view.json"),
    c(
        "profile-csv-columns",
        lambda w: ["profile", w.f("csv"), "-m", "qwen3-32b"],
        "kernel_details.csv",
    ),
    c(
        "profile-csv-nan",
        lambda w: ["profile", w.f("csvnan"), "-m", "qwen3-32b"],
        "kernel_details.csv",
    ),
    c(
        "profile-calibrate-missing-dir",
        lambda w: ["profile", w.f("ok"), "--calibrate", w / "nodir" / "hw.toml"],
        "--calibrate",
    ),
    c(
        "simulate-hardware-inf",
        lambda w: [*SIMULATE, "--hardware", w.f("hw-inf.toml")],
        "hw-inf.toml",
        "l2_bw",
    ),
    # ---- runtime-check
    c(
        "runtime-check-timeout-nan",
        lambda w: ["runtime-check", "--timeout", "nan"],
        "--timeout nan",
    ),
    c("runtime-check-timeout-zero", lambda w: ["runtime-check", "--timeout", "0"], "--timeout 0"),
]


@pytest.mark.parametrize(("args", "needles"), CASES)
def test_bad_input(
    world: World, args: Callable[[World], list[Any]], needles: Callable[[World], list[str]]
) -> None:
    before = snapshot(world.root)
    result = run(*args(world))
    assert_bad_input(result, *needles(world))
    after = snapshot(world.root)
    assert sorted(after) == sorted(before), "files appeared or vanished"
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, changed


def test_the_table_covers_every_command_and_enough_cases() -> None:
    commands = {p.id.split("-")[0] for p in CASES}
    assert {
        "search",
        "tune",
        "journal",
        "apply",
        "simulate",
        "plan",
        "show",
        "report",
        "sweep",
        "profile",
        "runtime",
    } <= commands
    assert len(CASES) >= 60
