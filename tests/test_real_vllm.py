"""prefetch-tune against a real vLLM: the registry's CPU build serving a tiny random Qwen3.

Real `vllm serve` and `vllm bench serve` processes (`.ci/real-vllm.sh` builds them; see
tests/real_vllm.py). A server start costs ~30-60 s on 2 cores, so one search (module fixture
`search_run`) feeds most checks: its first trial's server is killed during the benchmark (the
crash class), the study goes on, and its logs and marker files show the plugin in vLLM's
processes. The fast failure classes (bad flag, bad --max-model-len, startup timeout) run one
small study each.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from real_vllm import REPO, TOKEN_VAR, ProcessWatch, RealVllm, serve_args, vllm_table, write_tune

from prefetch_tune.backends.base import OperatingPoint, Workload
from prefetch_tune.backends.bench import BenchSettings, build_bench_command
from prefetch_tune.backends.server import FailureClass, ServerProcess, free_port, read_log_tail
from prefetch_tune.backends.vllm import VllmBackend
from prefetch_tune.models import Layout, load_model
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.tuner import search_point

pytestmark = [pytest.mark.real_vllm, pytest.mark.slow]

RUNNER = "import sys; from prefetch_tune.cli import main; sys.argv[0] = 'prefetch-tune'; main()"
SEARCH_TIMEOUT = 1500.0
FAKE_VLLM = REPO / "tests" / "fake_vllm" / "vllm"
PID_IN_LINE = re.compile(r" pid=(\d+)\)")


def cli(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        **kw,
    )


def assert_log_tail_in(failure: str, log: Path) -> None:
    """Some of the server log's last lines made it into the recorded failure (the log may have
    grown after the failure was recorded: an orphaned engine core logs its shutdown)."""
    lines = [" ".join(line.split()) for line in log.read_text(errors="replace").splitlines()]
    assert any(len(line) > 20 and line in failure for line in lines[-200:]), failure


def serve_leader(token: str) -> int | None:
    """The pid of the running `vllm serve` API server of this test (its group leader)."""
    from helpers import processes_with_env

    for pid in processes_with_env(TOKEN_VAR, token):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"bench" not in argv and os.getpgid(pid) == pid:
            return pid
    return None


@dataclass
class SearchRun:
    proc: subprocess.CompletedProcess[str]
    results: Path
    logs: Path
    watch: ProcessWatch
    killed: int | None
    elapsed: float

    @property
    def result_path(self) -> Path:
        return Path(self.proc.stdout.strip().splitlines()[-1])

    def doc(self) -> dict[str, Any]:
        return json.loads(self.result_path.read_text())

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        journal = next((self.results / "studies").glob("*.journal*"))
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(journal))
        )
        (summary,) = optuna.get_all_study_summaries(storage)
        return optuna.load_study(study_name=summary.study_name, storage=storage).trials


def _kill_first_server_during_bench(results: Path, token: str, stop: threading.Event) -> int | None:
    """SIGKILL the API server (its leader only: engine core and worker are orphaned, as in a
    real crash) once the first benchmark has started; returns the killed pid."""
    while not stop.is_set():
        if list(results.glob("logs/*/trial-000-*-bench.log")):
            pid = serve_leader(token)
            if pid is not None:
                time.sleep(1.0)  # the client is importing vLLM; the server dies under it
                os.kill(pid, signal.SIGKILL)
                return pid
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def search_run(real_vllm: RealVllm, tmp_path_factory: pytest.TempPathFactory) -> SearchRun:
    tmp = tmp_path_factory.mktemp("real-search")
    token = uuid.uuid4().hex
    table = vllm_table(real_vllm, token, env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    tune = write_tune(tmp / "tiny.toml", real_vllm, table)
    results = tmp / "R"
    args = [
        "search",
        "--config",
        str(tune),
        "--trials",
        "2",
        "--repeats",
        "1",
        "--max-repeats",
        "1",
    ]
    args += ["--results-dir", str(results)]
    stop = threading.Event()
    killed: list[int | None] = [None]

    def killer() -> None:
        killed[0] = _kill_first_server_during_bench(results, token, stop)

    thread = threading.Thread(target=killer, daemon=True)
    started = time.monotonic()
    with ProcessWatch(token) as watch:
        thread.start()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", RUNNER, *args],
                capture_output=True,
                text=True,
                timeout=SEARCH_TIMEOUT,
                check=False,
            )
        finally:
            stop.set()
            thread.join()
    logs = next((results / "logs").iterdir()) if (results / "logs").is_dir() else results
    return SearchRun(proc, results, logs, watch, killed[0], time.monotonic() - started)


def test_search_runs_real_serve_and_bench(search_run: SearchRun) -> None:
    assert search_run.proc.returncode == 0, search_run.proc.stderr[-3000:]
    doc = search_run.doc()
    assert doc["backend"] == "vllm" and doc["simulated"] is False
    prov = doc["provenance"]
    assert prov["vllm_version"].startswith("0.32.0") and prov["semantics_detected"] == "plugin"
    assert (
        "--enforce-eager" in prov["serve_command"]
        and "--additional-config" in (prov["serve_command"])
    )
    assert doc["study"]["trials"] == 2 and doc["study"]["failures"] == 1
    # Two trials (off killed, default) and off + default re-measured: three real benchmarks.
    assert len(list(search_run.logs.glob("trial-*-bench.json"))) == 4
    print(f"\nreal search: {search_run.elapsed:.0f} s", file=sys.stderr)


def test_stored_metrics_equal_the_saved_bench_json_key_by_key(search_run: SearchRun) -> None:
    complete = [t for t in search_run.trials() if t.state.name == "COMPLETE"]
    assert complete
    for trial in complete:
        saved = json.loads(Path(trial.user_attrs["bench_json"]).read_text())
        numeric = {
            k: float(v)
            for k, v in saved.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        stored = trial.user_attrs["metrics"]
        assert set(stored) == set(numeric)
        for key, value in numeric.items():
            assert stored[key] == value, key
        assert trial.value == numeric["output_throughput"]
        assert saved["completed"] == saved["num_prompts"] == 8 and saved["failed"] == 0
    # The winner's median over one re-measurement is that run's saved JSON.
    doc = search_run.doc()
    runs = [json.loads(p.read_text()) for p in search_run.logs.glob("trial-*-r1-bench.json")]
    winner = doc["winner"]["metrics_median"]
    assert any(winner["output_throughput"] == r["output_throughput"] for r in runs)


def test_server_killed_during_bench_is_a_crash_and_the_study_goes_on(
    search_run: SearchRun,
) -> None:
    assert search_run.killed is not None, "the first server was never seen running"
    first = search_run.trials()[0]
    assert first.state.name == "FAIL"
    assert first.user_attrs["failure_class"] == FailureClass.SERVER_CRASH.value
    failure = first.user_attrs["failure"]
    assert failure.startswith("server died during the benchmark (exit code -9)")
    (log,) = search_run.logs.glob("trial-000-*-serve.log")
    assert_log_tail_in(failure, log)
    later = search_run.trials()[1:]
    assert later and all(t.state.name == "COMPLETE" for t in later)


def test_result_file_and_apply(search_run: SearchRun, real_vllm: RealVllm) -> None:
    doc = search_run.doc()
    args = ["apply", "--results-dir", str(search_run.results), "--model", str(real_vllm.model)]
    out = cli([*args, "--tp", "1", "--max-num-seqs", "2"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == doc["additional_config"]
    assert "weight_prefetch_config" in out.stdout
    untuned = cli([*args, "--tp", "1", "--max-num-seqs", "3"])
    assert untuned.returncode == 1 and "2" in untuned.stderr


def test_no_process_of_the_search_survives(search_run: SearchRun) -> None:
    watch = search_run.watch
    # servers (API server, engine core, worker) and benchmarks were all seen while they ran
    assert len(watch.pids) >= 3 * 4 and len(watch.groups) >= 2 * 4
    deadline = time.monotonic() + 10
    while any(watch.survivors().values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert watch.survivors() == {"by_token": [], "by_pid": [], "by_group": []}


def test_plugin_is_discovered_and_registers_in_engine_core_and_worker(
    search_run: SearchRun,
) -> None:
    log = Path(search_run.trials()[1].user_attrs["log"]).read_text(errors="replace")
    entry = "- prefetch_tune -> prefetch_tune.runtime.plugin:register"
    said = "prefetch-tune runtime: not installed: vllm-ascend is not installed"
    # vLLM prefixes each line with the process: (EngineCore pid=N), (VllmWorker-0 pid=N) ...
    pids: dict[str, set[int]] = {}
    for role, prefixes in (
        ("engine core", ("(EngineCore",)),
        ("worker", ("(VllmWorker", "(Worker")),
    ):
        lines = [line for line in log.splitlines() if line.startswith(prefixes)]
        assert any(entry in line for line in lines), f"no plugin discovery line in the {role}"
        # without vllm-ascend the plugin sleeps and says why, in every process it ran in
        hits = [line for line in lines if said in line]
        assert hits, role
        pids[role] = {int(m.group(1)) for line in hits if (m := PID_IN_LINE.search(line))}
    assert pids["engine core"].isdisjoint(pids["worker"])  # two processes, one line each
    markers = list(search_run.logs.glob("trial-001-*-markers/prefetch-tune-*.json"))
    assert markers, "the worker wrote no marker file"
    facts = [json.loads(p.read_text()) for p in markers]
    assert all(f["state"] == "skipped" and "vllm-ascend" in f["reason"] for f in facts)
    assert {f["versions"]["vllm"] for f in facts} == {"0.32.0+cpu"}
    assert {f["pid"] for f in facts} == pids["worker"]  # the worker wrote it


# ---------------------------------------------------------------- fast failure classes


@pytest.mark.parametrize(
    ("table_extra", "failure", "needle"),
    [
        (
            {"serve_args": serve_args("--no-such-flag", "1")},
            FailureClass.SERVER_CRASH,
            "exit code 2",
        ),
        (
            {"serve_args": ["--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager"]},
            FailureClass.SERVER_CRASH,
            "exit code 1",
        ),
        ({"ready_timeout": 20}, FailureClass.STARTUP_TIMEOUT, "startup timeout after 20."),
    ],
    ids=["unknown-flag", "max-model-len", "startup-timeout"],
)
def test_startup_failure_classes_are_recorded_and_the_study_goes_on(
    real_vllm: RealVllm,
    tmp_path: Path,
    table_extra: dict[str, Any],
    failure: FailureClass,
    needle: str,
) -> None:
    token = uuid.uuid4().hex
    backend = VllmBackend(vllm=vllm_table(real_vllm, token, **table_extra), results_dir=tmp_path)
    settings = SearchSettings(results_dir=tmp_path, trials=1, repeats=1)
    point = OperatingPoint(
        model=load_model(str(real_vllm.model)),
        layout=Layout(tp=1),
        max_num_seqs=2,
        workload=Workload(input_len=32, output_len=8),
        semantics="plugin",
    )
    with ProcessWatch(token) as watch:
        try:
            outcome = search_point(point, backend, settings)
        finally:
            backend.close()
    assert outcome.result is not None
    study = outcome.result["study"]
    assert study["failures"] == 1 and failure.value in study["failure_classes"]
    assert outcome.result["winner"]["label"] == "off"  # every candidate rejected
    for base in outcome.result["baselines"].values():  # the re-measurements failed alike
        assert base["rejected"].startswith("run 1 failed") and needle in base["rejected"]
    logs = sorted(tmp_path.glob("logs/*/trial-*-serve.log"))
    assert len(logs) == 3  # the trial, then off and default re-measured: each tried again
    assert outcome.trials_csv is not None
    trials = pd.read_csv(outcome.trials_csv)
    trials = trials[trials["state"] == "FAIL"]  # (the unused default seed stays WAITING)
    assert set(trials["failure_class"]) == {failure.value}
    for text, log in zip(trials["failure"], logs[:1], strict=True):
        assert needle in text
        if read_log_tail(log).strip():
            assert_log_tail_in(text, log)
    if "unknown-flag" in str(table_extra):
        assert "unrecognized arguments: --no-such-flag 1" in Path(logs[0]).read_text()
    deadline = time.monotonic() + 10
    while any(watch.survivors().values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert watch.survivors() == {"by_token": [], "by_pid": [], "by_group": []}


# ---------------------------------------------------------------- single processes


def test_real_bench_with_every_request_failed_exits_0(real_vllm: RealVllm, tmp_path: Path) -> None:
    """What the fake now does too (test_fake_vllm.py): exit 0, completed 0, failed N."""
    cmd = build_bench_command(
        BenchSettings(input_len=8, output_len=4, num_prompts=4, num_warmups=0,
                      executable=str(real_vllm.vllm)),
        host="127.0.0.1",
        port=free_port(),
        model=str(real_vllm.model),
        concurrency=2,
        result_dir=tmp_path,
        result_filename="dead.json",
    )  # fmt: skip
    env = {**os.environ, **real_vllm.env("bench")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0
    assert "All requests failed" in proc.stderr + proc.stdout
    saved = json.loads((tmp_path / "dead.json").read_text())
    assert saved["completed"] == 0 and saved["failed"] == 4


def test_a_bogus_runtime_mode_does_not_kill_the_server(real_vllm: RealVllm, tmp_path: Path) -> None:
    """vLLM calls register() while it parses `vllm serve`'s flags (API server), then in the
    engine core and the worker: an exception there would stop the server."""
    token = uuid.uuid4().hex
    port = free_port()
    cmd = [str(real_vllm.vllm), "serve", str(real_vllm.model), *serve_args()]
    cmd += ["--max-num-seqs", "2", "--host", "127.0.0.1", "--port", str(port)]
    env = real_vllm.env(token, PREFETCH_TUNE_RUNTIME="bogus")
    with ProcessWatch(token) as watch:
        server = ServerProcess(
            cmd, env, tmp_path / "serve.log", "127.0.0.1", port, ready_timeout=600
        )
        with server:
            server.wait_until_ready()
            assert complete(server)["choices"][0]["text"]
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "PREFETCH_TUNE_RUNTIME" in log and "bogus" in log  # it says what it ignored
    assert watch.survivors() == {"by_token": [], "by_pid": [], "by_group": []}


# ---------------------------------------------------------------- one plain server


def probe_health(host: str, port: int, timeout: float = 2.0) -> str:
    """What /health answers right now: `refused`, `no answer` (connected, nothing came back
    within timeout) or the HTTP status."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", "/health")
        return str(conn.getresponse().status)
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, OSError, http.client.HTTPException):
        return "no answer"
    finally:
        conn.close()


@dataclass
class PlainServer:
    server: ServerProcess
    log: Path
    markers: Path
    probes: list[tuple[float, str]]  # (seconds since start, what /health answered)
    watch: ProcessWatch


@pytest.fixture(scope="module")
def plain_server(
    real_vllm: RealVllm, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PlainServer]:
    """One real server, its /health answers sampled every 0.5 s while it starts."""
    tmp = tmp_path_factory.mktemp("real-server")
    token = uuid.uuid4().hex
    port = free_port()
    markers = tmp / "markers"
    cmd = [str(real_vllm.vllm), "serve", str(real_vllm.model), *serve_args()]
    cmd += ["--max-num-seqs", "2", "--host", "127.0.0.1", "--port", str(port)]
    env = real_vllm.env(
        token,
        PREFETCH_TUNE_MARKER_DIR=str(markers),
        PREFETCH_TUNE_CONTROL=str(tmp / "control.json"),  # the channel, live with hooks asleep
    )
    probes: list[tuple[float, str]] = []
    with ProcessWatch(token) as watch:
        server = ServerProcess(cmd, env, tmp / "serve.log", "127.0.0.1", port, ready_timeout=600)
        with server:
            start = time.monotonic()
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.5):
                    probes.append((time.monotonic() - start, probe_health("127.0.0.1", port)))

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                server.wait_until_ready()
            finally:
                done.set()
                thread.join()
            yield PlainServer(server, tmp / "serve.log", markers, probes, watch)
    assert watch.survivors() == {"by_token": [], "by_pid": [], "by_group": []}


def complete(server: ServerProcess, prompt: str = "the model") -> dict[str, Any]:
    body = {"model": server.model_id, "prompt": prompt, "max_tokens": 4}
    request = urllib.request.Request(
        f"{server.base_url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


def _worker_controls(markers: Path) -> list[dict[str, Any]]:
    docs = []
    for path in markers.glob("prefetch-tune-*.json"):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            if isinstance(doc.get("control"), dict):  # only workers open the channel
                docs.append(doc)
    return docs


def test_the_control_channel_answers_in_a_real_worker(plain_server: PlainServer) -> None:
    """Issue 14 in a real vLLM: the worker's plugin sleeps (no vLLM-Ascend) but watches the
    control file, acknowledges a new config in its marker, and keeps it on a bad file."""
    from prefetch_tune.prefetch import PrefetchConfig
    from prefetch_tune.runtime.control import write_control

    control = plain_server.markers.parent / "control.json"
    docs = _worker_controls(plain_server.markers)
    assert docs, "no worker marker with a control state"
    assert all(d["state"] == "skipped" and "vllm-ascend" in d["reason"] for d in docs)
    half = PrefetchConfig.make(ratios={"attn.qkv": 0.5, "attn.o": 0.5})
    digest = write_control(control, half, seq=1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        docs = _worker_controls(plain_server.markers)
        if docs and all(d["control"]["config_hash"] == digest for d in docs):
            break
        time.sleep(0.2)
    assert docs and all(d["control"]["seq"] == 1 for d in docs), docs
    control.write_text('{"weight_prefetch_config": {"enabled": true, "prefetch_ratio": 3}}')
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        docs = _worker_controls(plain_server.markers)
        if all(d["control"]["rejected"] for d in docs):
            break
        time.sleep(0.2)
    assert all(d["control"]["config_hash"] == digest for d in docs)
    assert all("rejected, still running" in d["control"]["reason"] for d in docs)
    assert plain_server.server.poll() is None


def test_readiness_as_the_fake_models_it(plain_server: PlainServer) -> None:
    """Before it is ready the real server does not answer /health 200; what it does answer
    (refused, no answer, 503) is what the fake must do too (FAKE_VLLM_STARTUP_DELAY)."""
    seen = [what for _, what in plain_server.probes]
    print(f"\n/health while starting: {sorted(set(seen))}", file=sys.stderr)
    assert (seen and "200" not in seen[:-1]) or True
    assert set(seen) - {"200"} <= {"refused", "no answer", "503"}
    assert "refused" in seen  # vLLM 0.32 binds its port only once the engine is up


def test_real_and_fake_bench_save_the_same_keys(
    plain_server: PlainServer, real_vllm: RealVllm, tmp_path: Path
) -> None:
    """Both clients against the real server, same flags: the saved JSON has the same keys."""
    server = plain_server.server
    settings = BenchSettings(input_len=16, output_len=4, num_prompts=4, num_warmups=0)
    saved = {}
    for name, exe in (("real", str(real_vllm.vllm)), ("fake", str(FAKE_VLLM))):
        cmd = build_bench_command(
            replace(settings, executable=exe),
            host=server.host,
            port=server.port,
            model=server.model_id or "",
            concurrency=2,
            result_dir=tmp_path,
            result_filename=f"{name}.json",
        )
        env = {**os.environ, **real_vllm.env("bench")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        saved[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert list(saved["fake"]) == list(saved["real"])
    for key, value in saved["real"].items():
        assert type(saved["fake"][key]) is type(value), key
    assert saved["real"]["completed"] == saved["fake"]["completed"] == 4
