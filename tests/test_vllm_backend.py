"""The vllm backend against the fake `vllm` (tests/fake_vllm): real processes, real HTTP.

Every server and benchmark a test starts carries a unique token in its environment (the [vllm]
env table), so "nothing is left behind" is checked by scanning /proc for that token, not for
anything another test run on this machine may own.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from helpers import processes_with_env, toml_value

from prefetch_tune.backends.base import OperatingPoint, Workload
from prefetch_tune.backends.server import FailureClass
from prefetch_tune.backends.vllm import (
    VllmBackend,
    detect_serving_runtime,
    parse_vllm_table,
    semantics_for,
)
from prefetch_tune.errors import BackendError, ConfigError
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig, Semantics
from prefetch_tune.runtime.versions import PROBE_MARK
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.tuner import search_point
from prefetch_tune.tuneconfig import load_tune_file

REPO = Path(__file__).resolve().parents[1]
FAKE_DIR = REPO / "tests" / "fake_vllm"
TOKEN_VAR = "PT_VLLM_BACKEND_TEST"
ADDITIONAL = '{"pa_shape_list":[48,64,72,80]}'
COMPILATION = '{"cudagraph_mode":"FULL_DECODE_ONLY","cudagraph_capture_sizes":[1,2,4,8]}'
SERVE_ARGS = [
    "--max-model-len",
    "5500",
    "--compilation-config",
    COMPILATION,
    "--additional-config",
    ADDITIONAL,
]
# Runs the real CLI; importing the backend first registers it even where base.py's built-in
# list does not name it yet.
RUNNER = (
    "import sys, prefetch_tune.backends.vllm; from prefetch_tune.cli import main; "
    "sys.argv[0] = 'prefetch-tune'; main()"
)


@pytest.fixture(autouse=True)
def fake_vllm_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FAKE_VLLM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def token() -> str:
    return uuid.uuid4().hex


def survivors(token: str) -> list[int]:
    return processes_with_env(TOKEN_VAR, token)


def assert_nothing_left(token: str) -> None:
    deadline = time.monotonic() + 5.0
    while survivors(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert survivors(token) == [], "a server or benchmark process survived"


def vllm_table(token: str, **extra: Any) -> dict[str, Any]:
    env = {
        TOKEN_VAR: token,
        "FAKE_VLLM_TTFT_MS": "5",
        "FAKE_VLLM_TPOT_MS": "1",
        "FAKE_VLLM_ORPHAN_LINGER": "20",
        **extra.pop("env", {}),
    }
    return {
        "model": "qwen3-32b",
        "serve_args": list(SERVE_ARGS),
        "env": env,
        "ready_timeout": 20,
        "stop_grace": 5,
        **extra,
    }


def write_tune(path: Path, table: dict[str, Any], **top: Any) -> Path:
    opts: dict[str, Any] = {
        "model": "qwen3-32b",
        "tp": 4,
        "max_num_seqs": [4],
        "backend": "vllm",
        "semantics": "native-0.23",
        "input_len": 32,
        "output_len": 8,
        **top,
    }
    lines = [f"{k} = {toml_value(v)}" for k, v in opts.items()]
    lines.append("[vllm]")
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(args: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def point(semantics: Semantics = "native-0.23", mns: int = 4) -> OperatingPoint:
    return OperatingPoint(
        model=load_model("qwen3-32b"),
        layout=Layout(tp=4),
        max_num_seqs=mns,
        workload=Workload(input_len=32, output_len=8),
        semantics=semantics,
    )


# ------------------------------------------------------------------ settings and commands


def test_unknown_and_bad_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"\[vllm\] serve_arg: unknown key, did you mean"):
        parse_vllm_table({"serve_arg": []})
    with pytest.raises(ConfigError, match=r"\[vllm.bench\] prompts: unknown key"):
        parse_vllm_table({"bench": {"prompts": 3}})
    with pytest.raises(ConfigError, match=r"env.X: must be a string"):
        parse_vllm_table({"env": {"X": 1}})
    with pytest.raises(ConfigError, match="--max-num-seqs is not allowed"):
        parse_vllm_table({"serve_args": ["--max-num-seqs", "8"]})
    with pytest.raises(ConfigError, match="already holds weight_prefetch_config"):
        parse_vllm_table(
            {"serve_args": ["--additional-config", '{"weight_prefetch_config":{"enabled":true}}']}
        )
    with pytest.raises(ConfigError, match="malformed JSON"):
        parse_vllm_table({"serve_args": ["--additional-config={"]})
    with pytest.raises(ConfigError, match="--max-concurrency is set by prefetch-tune"):
        parse_vllm_table({"bench": {"extra_args": ["--max-concurrency", "3"]}})
    with pytest.raises(ConfigError, match="port: must be an integer"):
        parse_vllm_table({"port": "80"})


@pytest.mark.parametrize("name", ["qwen3-32b", "qwen3-235b-a22b"])
def test_shipped_tune_files_load_and_validate(name: str) -> None:
    opts, table = load_tune_file(REPO / "configs" / "tune" / f"{name}.toml")
    settings = parse_vllm_table(table)
    assert opts["backend"] == "vllm" and settings.user_additional_config
    capture = json.loads(
        settings.serve_args[settings.serve_args.index("--compilation-config") + 1]
    )["cudagraph_capture_sizes"]
    assert set(opts["max_num_seqs"]) <= set(capture)  # graphs exist for every concurrency


def test_version_to_semantics() -> None:
    assert semantics_for("0.23.0") == "native-0.23"
    assert semantics_for("v0.15.0rc1") == "native-0.23"
    assert semantics_for("0.24.0rc1") == "plugin"
    assert semantics_for("0.25.1rc1") == "plugin"
    with pytest.raises(ConfigError, match="only the attn and moe ratios"):
        semantics_for("0.14.0rc1")
    with pytest.raises(ConfigError, match="no weight_prefetch_config"):
        semantics_for("0.10.2rc1")


def test_runtime_check_falls_back_to_vllm_version_and_refuses_a_semantics_mismatch(
    tmp_path: Path, token: str
) -> None:
    backend = VllmBackend(
        vllm=vllm_table(token, env={"FAKE_VLLM_VERSION": "0.24.0"}),
        python=sys.executable,
        results_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match="needs --semantics plugin"):
        backend.check_semantics(point("native-0.23"))
    info = backend.check_semantics(point("plugin"))
    assert info.semantics == "plugin" and info.vllm == "0.24.0"
    assert "vllm --version" in info.source and any("vllm-ascend not found" in n for n in info.notes)
    assert backend.provenance()["vllm_version"] == "0.24.0"


def test_plugin_semantics_need_prefetch_tune_in_the_serving_env(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text(  # answers the shared probe (runtime.versions) like such a Python
        "#!/bin/sh\necho '"
        + PROBE_MARK
        + json.dumps(
            {
                "python": "x",
                "versions": {"vllm": "0.25.1", "vllm-ascend": "0.25.1rc1", "prefetch-tune": None},
                "vllm_ascend_importable": True,
                "native_module": False,
                "prefetch_tune_importable": False,
                "entry_points": [],
            }
        )
        + "'\n"
    )
    fake_python.chmod(0o755)
    with pytest.raises(ConfigError, match=r"-m pip install prefetch-tune"):
        detect_serving_runtime(str(fake_python), "vllm", {})


@pytest.mark.slow
def test_dry_run_prints_exact_commands_with_the_candidate_merged(
    tmp_path: Path, token: str
) -> None:
    table = vllm_table(token, port=18123)
    tune = write_tune(tmp_path / "t.toml", table)
    proc = cli(["search", "--config", str(tune), "--dry-run", "--results-dir", str(tmp_path / "R")])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    serve = [shlex.split(line) for line in out.splitlines() if line.startswith("vllm serve")]
    bench = [shlex.split(line) for line in out.splitlines() if line.startswith("vllm bench")]
    assert len(serve) == 2 and len(bench) == 2
    wanted = {"off": {"enabled": False}, "default": PrefetchConfig.default().to_json_obj()}
    for argv, label in zip(serve, ("off", "default"), strict=True):
        assert argv[:-1] == [
            "vllm",
            "serve",
            "qwen3-32b",
            "--max-model-len",
            "5500",
            "--compilation-config",
            COMPILATION,
            "--tensor-parallel-size",
            "4",
            "--host",
            "127.0.0.1",
            "--port",
            "18123",
            "--max-num-seqs",
            "4",
            "--additional-config",
        ]
        merged = json.loads(argv[-1])
        assert merged["pa_shape_list"] == [48, 64, 72, 80]
        assert merged["weight_prefetch_config"] == wanted[label]
    argv = bench[0]
    assert argv[argv.index("--max-concurrency") + 1] == "4"
    assert argv[argv.index("--num-prompts") + 1] == "16"
    assert argv[argv.index("--random-input-len") + 1] == "32"
    assert f"export {TOKEN_VAR}={token}" in out.splitlines()
    assert not (tmp_path / "R" / "logs").exists()
    assert survivors(token) == []


# ------------------------------------------------------------------ failure classes


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "extra", "failure", "reason"),
    [
        (
            {"FAKE_VLLM_CRASH_AT_START": "1"},
            {},
            FailureClass.SERVER_CRASH,
            "exited with exit code 1",
        ),
        ({"FAKE_VLLM_OOM": "1"}, {}, FailureClass.OUT_OF_MEMORY, "ran out of device memory"),
        (
            {"FAKE_VLLM_HANG": "1"},
            {"ready_timeout": 1.0},
            FailureClass.STARTUP_TIMEOUT,
            "startup timeout",
        ),
        (
            {"FAKE_VLLM_CRASH_AFTER_REQUESTS": "3"},
            {},
            FailureClass.SERVER_CRASH,
            "server died during the benchmark",
        ),
        (
            {},
            {"serve_args": ["--max-model-len", "20"]},
            FailureClass.INCOMPLETE_BENCHMARK,  # vLLM 0.32's client exits 0 when all fail
            "incomplete benchmark: 0 of",
        ),
        (
            {},
            {
                "serve_args": ["--max-model-len", "44"],
                "bench": {"extra_args": ["--random-range-ratio", "0.5"]},
            },
            FailureClass.INCOMPLETE_BENCHMARK,
            "incomplete benchmark",
        ),
    ],
    ids=["crash", "oom", "hang", "crash-mid-bench", "bench-fails", "incomplete"],
)
def test_each_failure_class_is_recorded_and_the_study_goes_on(
    tmp_path: Path,
    token: str,
    env: dict[str, str],
    extra: dict[str, Any],
    failure: FailureClass,
    reason: str,
) -> None:
    backend = VllmBackend(
        vllm=vllm_table(token, env=env, **extra), python=sys.executable, results_dir=tmp_path
    )
    settings = SearchSettings(results_dir=tmp_path, trials=3, repeats=1)
    try:
        started = time.monotonic()
        outcome = search_point(point(), backend, settings)
        elapsed = time.monotonic() - started
    finally:
        backend.close()
    assert outcome.result is not None  # every trial failed, and still the search finished
    study = outcome.result["study"]
    assert study["failures"] == 3 and failure.value in study["failure_classes"]
    assert outcome.trials_csv is not None
    trials = pd.read_csv(outcome.trials_csv)
    measured = trials[trials["failure_class"] != "skipped"]
    assert set(measured["failure_class"]) == {failure.value}
    assert all(reason in text for text in measured["failure"])
    assert outcome.result["winner"]["label"] == "off"  # rejected finalists: nothing beats off
    if failure is FailureClass.STARTUP_TIMEOUT:  # each hanging server stopped at its deadline
        assert elapsed < 3 * 1.0 + 2 * 1.0 + 8
    assert_nothing_left(token)


@pytest.mark.slow
def test_hanging_server_is_stopped_at_its_deadline(tmp_path: Path, token: str) -> None:
    backend = VllmBackend(
        vllm=vllm_table(token, env={"FAKE_VLLM_HANG": "1"}, ready_timeout=1.5),
        python=sys.executable,
        results_dir=tmp_path,
    )
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        backend.evaluate(PrefetchConfig.off(), point())
    elapsed = time.monotonic() - started
    assert info.value.failure_class == FailureClass.STARTUP_TIMEOUT
    assert 1.5 <= elapsed < 5.0
    assert_nothing_left(token)
    assert "Starting vLLM API server" in Path(backend.last_artifacts["log"]).read_text()


@pytest.mark.slow
def test_repeats_reuse_the_running_server_and_close_stops_it(tmp_path: Path, token: str) -> None:
    backend = VllmBackend(vllm=vllm_table(token), python=sys.executable, results_dir=tmp_path)
    p = point()
    try:
        first = backend.evaluate(PrefetchConfig.default(), p, repeat=1)
        server_log = backend.last_artifacts["log"]
        second = backend.evaluate(PrefetchConfig.default(), p, repeat=2)
        assert backend.last_artifacts["log"] == server_log  # same server
        assert survivors(token)  # kept alive between calls
        backend.evaluate(PrefetchConfig.off(), p, repeat=1)
        assert backend.last_artifacts["log"] != server_log  # config changed: new server
    finally:
        backend.close()
    assert first["completed"] == second["completed"] == p.num_prompts
    assert_nothing_left(token)
    prov = backend.provenance()
    assert prov["semantics_detected"] == "native-0.23" and prov["vllm_version"] == "0.23.0"
    assert "weight_prefetch_config" in prov["serve_command"]
    assert shlex.split(prov["bench_command"])[:3] == ["vllm", "bench", "serve"]


@pytest.mark.slow
def test_require_runtime_marker_refuses_a_server_without_the_plugin(
    tmp_path: Path, token: str
) -> None:
    table = vllm_table(token, env={"FAKE_VLLM_VERSION": "0.24.0"}, require_runtime_marker=True)
    backend = VllmBackend(vllm=table, python=sys.executable, results_dir=tmp_path)
    try:
        with pytest.raises(ConfigError, match="plugin did not run this candidate"):
            backend.evaluate(PrefetchConfig.default(), point("plugin"))
    finally:
        backend.close()
    serve = shlex.split(backend.last_artifacts["serve_command"])
    assert serve[:2] == ["vllm", "serve"]
    assert_nothing_left(token)


# ------------------------------------------------------------------ whole searches (CLI)


@pytest.mark.slow
def test_search_with_the_vllm_backend_end_to_end(tmp_path: Path, token: str) -> None:
    tune = write_tune(
        tmp_path / "t.toml",
        vllm_table(
            token,
            env={"FAKE_VLLM_TTFT_MS": "", "FAKE_VLLM_TPOT_MS": "", "FAKE_VLLM_TIME_SCALE": "0.01"},
        ),
    )
    results = tmp_path / "R"
    proc = cli(
        [
            "search",
            "--config",
            str(tune),
            "--trials",
            "6",
            "--repeats",
            "2",
            "--max-repeats",
            "3",
            "--results-dir",
            str(results),
        ]
    )
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    path = Path(out.strip().splitlines()[-1])
    doc = json.loads(path.read_text())
    assert doc["backend"] == "vllm" and doc["simulated"] is False
    assert doc["provenance"]["vllm_version"] == "0.23.0"
    assert "--additional-config" in doc["provenance"]["serve_command"]
    assert doc["study"]["trials"] == 6 and doc["study"]["failures"] == 0
    logs = results / "logs" / "qwen3-32b-w8a8-tp4-dp1-atlas-a2-vllm-native-0.23-mns4"
    runs = {p: json.loads(p.read_text()) for p in logs.glob("trial-*-bench.json")}
    cost = doc["cost"]
    assert len(list(logs.glob("trial-*-bench.log"))) == len(runs) == cost["total"]["backend_runs"]
    assert cost["selection"]["backend_runs"] >= 2 * 2  # off and default, two rounds at least
    # The race interleaves configs, so each of its runs starts that config's server.
    assert cost["selection"]["server_starts"] == cost["selection"]["backend_runs"]
    assert len(list(logs.glob("trial-*-serve.log"))) == cost["total"]["server_starts"]
    assert list(logs.glob("*-r2-serve.log"))
    # The numbers are the parsed benchmark results, not anything made up on the way.
    values = [r["output_throughput"] for r in runs.values()]
    trials = pd.read_csv(results / "trials" / f"{path.stem}.csv")
    for value in trials[trials["state"] == "COMPLETE"]["value"]:
        assert any(value == pytest.approx(v, rel=1e-12) for v in values)
    for value in doc["winner"]["objective_values"]:
        assert any(value == pytest.approx(v, rel=1e-12) for v in values)
    assert_nothing_left(token)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_current_trial(tmp_path: Path, token: str) -> None:
    table = vllm_table(token, env={"FAKE_VLLM_STARTUP_DELAY": "0.3", "FAKE_VLLM_TPOT_MS": "20"})
    tune = write_tune(tmp_path / "t.toml", table)
    results = tmp_path / "R"
    proc = cli(["search", "--config", str(tune), "--trials", "20", "--results-dir", str(results)])
    deadline = time.monotonic() + 30
    while not list(results.glob("logs/*/trial-*-serve.log")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopping after the current trial" in err
    assert "resume with the same command" in err and "prefetch-tune search" in err
    assert not list(results.glob("*.json"))  # no result from an interrupted search
    trials = list(results.glob("logs/*/trial-*-serve.log"))
    assert 1 <= len(trials) < 20
    assert_nothing_left(token)
