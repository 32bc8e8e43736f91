"""The fake `vllm` CLI and prefetch_tune.backends.bench, end to end over real HTTP.

The fake must behave like vLLM where the tuner depends on it: argparse errors (exit 2), the
saved result's key names, failed requests counted when the server dies mid-run.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import live_group

from prefetch_tune.backends.bench import (
    BenchSettings,
    build_bench_command,
    check_complete,
    parse_result,
    run_bench,
)
from prefetch_tune.backends.server import FailureClass, ServerProcess, free_port
from prefetch_tune.errors import BenchmarkError, ConfigError

REPO = Path(__file__).resolve().parents[1]
FAKE_DIR = REPO / "tests" / "fake_vllm"
MODEL = "vllm-ascend/Qwen3-32B-W8A8"
TTFT_MS, TPOT_MS, SCALE = 20.0, 10.0, 0.5

# A trimmed copy of a real `vllm bench serve` 0.33.0 result (per-request arrays shortened).
REFERENCE_RESULT = {
    "date": "20261129-161418",
    "endpoint_type": "openai",
    "backend": "openai",
    "label": None,
    "model_id": MODEL,
    "tokenizer_id": MODEL,
    "num_prompts": 16,
    "request_rate": "inf",
    "burstiness": 1.0,
    "max_concurrency": 8,
    "duration": 0.19229294000001573,
    "completed": 16,
    "failed": 0,
    "total_input_tokens": 512,
    "total_output_tokens": 256,
    "request_throughput": 83.20638292804037,
    "request_goodput": None,
    "output_throughput": 1331.302126848646,
    "total_token_throughput": 3993.9063805459377,
    "latencies": [0.09150945200008209, 0.09740916800001287],
    "queue_times": [0.0001821299999846815, 0.0002915139999686289],
    "max_output_tokens_per_s": 272.0,
    "max_concurrent_requests": 16,
    "rtfx": 0.0,
    "mean_ttft_ms": 12.860144250012695,
    "median_ttft_ms": 11.160979000067073,
    "std_ttft_ms": 3.666733478055039,
    "p99_ttft_ms": 20.577371100034725,
    "mean_tpot_ms": 5.366864687500575,
    "median_tpot_ms": 5.365226166672225,
    "std_tpot_ms": 0.0491316027317522,
    "p99_tpot_ms": 5.431676016664824,
    "mean_itl_ms": 5.03143564453179,
    "median_itl_ms": 5.370830000003934,
    "std_itl_ms": 1.3189598495321593,
    "p99_itl_ms": 6.021373350006343,
}

SERVE_FLAGS = [
    "--tensor-parallel-size", "2",
    "--data-parallel-size", "1",
    "--enable-expert-parallel",
    "--max-num-seqs", "8",
    "--max-model-len", "4096",
    "--max-num-batched-tokens", "8192",
    "--additional-config", '{"weight_prefetch_config": {"enabled": true}}',
    "--compilation-config", '{"cudagraph_mode": "FULL_DECODE_ONLY"}',
    "--quantization", "ascend",
    "--served-model-name", "served-a", "served-b",
    "--gpu-memory-utilization", "0.9",
    "--block-size", "128",
    "--trust-remote-code",
    "--enforce-eager",
    "--no-enable-prefix-caching",
    "--async-scheduling",
    "--distributed-executor-backend", "mp",
    "--seed", "0",
]  # fmt: skip

MakeServer = Callable[..., ServerProcess]


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains `marker`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                state = (cmdline.parent / "stat").read_text()
                if state[state.rfind(")") + 2] not in "ZX":
                    found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def vllm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["vllm", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(autouse=True)
def fake_vllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FAKE_VLLM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_VLLM_TTFT_MS", str(TTFT_MS))
    monkeypatch.setenv("FAKE_VLLM_TPOT_MS", str(TPOT_MS))
    monkeypatch.setenv("FAKE_VLLM_TIME_SCALE", str(SCALE))
    monkeypatch.setenv("FAKE_VLLM_ORPHAN_LINGER", "30")


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    made: list[ServerProcess] = []

    def make(*extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        port = free_port()
        cmd = ["vllm", "serve", MODEL, "--host", "127.0.0.1", "--port", str(port), *extra]
        server = ServerProcess(
            cmd, env, tmp_path / f"server-{len(made)}.log", "127.0.0.1", port, ready_timeout=30
        )
        made.append(server)
        return server

    yield make
    survivors = {s.pgid: live_group(s.pgid) for s in made if s.pgid and live_group(s.pgid)}
    for server in made:
        server.stop()
    assert not survivors, f"processes survived the test: {survivors}"


def bench(
    target: ServerProcess,
    tmp_path: Path,
    settings: BenchSettings,
    concurrency: int,
    **kwargs: object,
) -> dict[str, float]:
    """Run the benchmark against `target` (pass server=... to have its death classified)."""
    return run_bench(
        settings,
        host=target.host,
        port=target.port,
        model=target.model_id or MODEL,
        concurrency=concurrency,
        result_dir=tmp_path / "results",
        result_filename="run.json",
        log_path=tmp_path / "bench.log",
        **kwargs,  # type: ignore[arg-type]
    )


# -- the fake's command line -------------------------------------------------------------


def test_version_honours_env() -> None:
    assert vllm("--version").stdout.strip() == "0.23.0"
    assert vllm("--version", env={"FAKE_VLLM_VERSION": "0.11.0rc3"}).stdout.strip() == "0.11.0rc3"


def test_unknown_serve_flag_exits_2_like_argparse() -> None:
    result = vllm("serve", MODEL, "--max-num-seq", "8", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_additional_config_must_be_json() -> None:
    result = vllm("serve", MODEL, "--additional-config", "{weight_prefetch_config: 1}")
    assert result.returncode == 2
    assert "--additional-config" in result.stderr


def test_bench_with_every_request_failed_exits_0_and_saves_the_counts(tmp_path: Path) -> None:
    """As vLLM 0.32's client does (seen in tests/test_real_vllm.py): a warning, exit 0, and a
    saved result with completed 0 and failed N; the tuner must read the counts, not the code."""
    port = free_port()  # nothing listens there
    result = vllm(
        "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", MODEL,
        "--random-input-len", "8", "--random-output-len", "4", "--num-prompts", "4",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "dead.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "All requests failed" in result.stderr
    saved = json.loads((tmp_path / "dead.json").read_text())
    assert saved["completed"] == 0 and saved["failed"] == 4 and saved["num_prompts"] == 4
    assert saved["mean_ttft_ms"] == 0.0 and saved["output_throughput"] == 0.0


def test_max_model_len_above_the_model_is_refused_at_start(tmp_path: Path) -> None:
    """As vLLM 0.32 does (tests/test_real_vllm.py, max-model-len case): exit 1, ValidationError."""
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    result = vllm("serve", str(model), "--max-model-len", "4096", "--port", str(free_port()))
    assert result.returncode == 1
    assert "User-specified max_model_len (4096) is greater than the derived" in result.stdout


def test_unknown_bench_flag_exits_2() -> None:
    result = vllm("bench", "serve", "--num-prompts", "4", "--no-such-bench-flag")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


def test_serve_accepts_the_real_flags(make_server: MakeServer) -> None:
    server = make_server(*SERVE_FLAGS)
    with server:
        assert server.wait_until_ready() == "served-a"
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/v1/models")
        names = [m["id"] for m in json.loads(conn.getresponse().read())["data"]]
        assert names == ["served-a", "served-b"]
        conn.close()


def test_eos_is_respected_unless_ignored(make_server: MakeServer) -> None:
    server = make_server(env={"FAKE_VLLM_EOS_AFTER": "3"})

    def complete(ignore_eos: bool) -> dict[str, object]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        body = {"model": MODEL, "prompt": "a b c d", "max_tokens": 10, "ignore_eos": ignore_eos}
        conn.request("POST", "/v1/completions", json.dumps(body))
        payload: dict[str, object] = json.loads(conn.getresponse().read())
        conn.close()
        return payload

    with server:
        server.wait_until_ready()
        stopped, full = complete(False), complete(True)
    assert stopped["usage"] == {"prompt_tokens": 4, "total_tokens": 7, "completion_tokens": 3}
    assert full["usage"] == {"prompt_tokens": 4, "total_tokens": 14, "completion_tokens": 10}


# -- bench.py: command and parsing -------------------------------------------------------


def test_bench_command_is_exact(tmp_path: Path) -> None:
    settings = BenchSettings(
        input_len=512, output_len=64, num_warmups=2, extra_args=("--seed", "7")
    )
    cmd = build_bench_command(
        settings,
        host="127.0.0.1",
        port=8123,
        model=MODEL,
        concurrency=8,
        result_dir=tmp_path,
        result_filename="r.json",
    )
    assert cmd == [
        "vllm", "bench", "serve", "--backend", "openai", "--base-url", "http://127.0.0.1:8123",
        "--model", MODEL, "--dataset-name", "random", "--random-input-len", "512",
        "--random-output-len", "64", "--num-prompts", "32", "--max-concurrency", "8",
        "--ignore-eos", "--temperature", "0", "--num-warmups", "2",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json",
        "--seed", "7",
    ]  # fmt: skip
    default = build_bench_command(
        BenchSettings(executable="/opt/vllm"),
        host="0.0.0.0",
        port=1,
        model="m",
        concurrency=3,
        result_dir=tmp_path,
        result_filename="r.json",
    )
    assert default[0] == "/opt/vllm"
    assert default[default.index("--num-prompts") + 1] == "12"
    assert default[default.index("--num-warmups") + 1] == "3"
    assert default[default.index("--base-url") + 1] == "http://127.0.0.1:1"


@pytest.mark.parametrize("extra", [("--result-dir", "x"), ("--max-concurrency=4",)])
def test_settings_refuse_flags_we_set(extra: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        BenchSettings(extra_args=extra)


def test_parse_result_by_key(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**REFERENCE_RESULT, "some_future_metric": 1.5}))
    metrics = parse_result(path)
    assert metrics["output_throughput"] == pytest.approx(1331.302126848646)
    assert metrics["p99_tpot_ms"] == pytest.approx(5.431676016664824)
    assert metrics["completed"] == 16.0 and metrics["num_prompts"] == 16.0
    assert metrics["some_future_metric"] == 1.5
    for skipped in ("date", "label", "request_rate", "request_goodput", "latencies", "model_id"):
        assert skipped not in metrics
    assert all(isinstance(v, float) for v in metrics.values())
    check_complete(metrics)


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"duration": 1.0}'])
def test_unreadable_result_is_benchmark_failure(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BenchmarkError) as info:
        parse_result(path)
    assert info.value.failure_class == FailureClass.BENCHMARK_FAILURE


@pytest.mark.parametrize("counts", [(15, 1), (15, 0)])
def test_incomplete_results_are_refused(counts: tuple[int, int]) -> None:
    completed, failed = counts
    metrics = {"completed": float(completed), "failed": float(failed), "num_prompts": 16.0}
    with pytest.raises(BenchmarkError) as info:
        check_complete(metrics)
    assert info.value.failure_class == FailureClass.INCOMPLETE_BENCHMARK


# -- bench.py against the fake server ----------------------------------------------------


def test_full_bench_run_parses_by_key(make_server: MakeServer, tmp_path: Path) -> None:
    ready_file = tmp_path / "ready.json"
    server = make_server(env={"FAKE_VLLM_READY_FILE": str(ready_file)})
    settings = BenchSettings(input_len=32, output_len=16)
    with server:
        server.wait_until_ready()
        metrics = bench(server, tmp_path, settings, concurrency=4)
    assert metrics["completed"] == metrics["num_prompts"] == 16
    assert metrics["failed"] == 0
    assert metrics["total_output_tokens"] == 16 * 16
    assert metrics["total_input_tokens"] == 16 * 32
    expected_tpot = TPOT_MS * SCALE
    assert metrics["mean_tpot_ms"] == pytest.approx(expected_tpot, rel=0.3)
    assert metrics["median_itl_ms"] == pytest.approx(expected_tpot, rel=0.3)
    assert metrics["mean_ttft_ms"] >= TTFT_MS * SCALE * 0.9
    for key in (
        "p50_ttft_ms",
        "p90_tpot_ms",
        "p99_itl_ms",
        "p99_e2el_ms",
        "std_e2el_ms",
        "output_throughput",
        "total_token_throughput",
        "request_throughput",
        "duration",
        "max_output_tokens_per_s",
        "max_concurrent_requests",
    ):
        assert key in metrics, key
    assert metrics["max_concurrent_requests"] <= 4
    raw = json.loads((tmp_path / "results" / "run.json").read_text())
    assert set(REFERENCE_RESULT) <= set(raw), set(REFERENCE_RESULT) - set(raw)
    assert raw["request_rate"] == "inf" and raw["max_concurrency"] == 4
    assert raw["model_id"] == MODEL
    events = json.loads(ready_file.read_text())
    # Warm-ups (one wave) reach the server first; well under a second after it was ready.
    assert events["first:POST /v1/completions"] - events["ready"] < 1.0


def test_requests_beyond_max_num_seqs_queue(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server("--max-num-seqs", "2")
    with server:
        server.wait_until_ready()
        metrics = bench(
            server, tmp_path, BenchSettings(input_len=8, output_len=8, num_warmups=0), concurrency=4
        )
    # Half the requests wait a full request time (TTFT + 7 TPOT) for a slot.
    assert metrics["p90_ttft_ms"] > (TTFT_MS + 5 * TPOT_MS) * SCALE


@pytest.mark.parametrize(
    ("crash_after", "pass_server", "expected"),
    [
        (3, False, FailureClass.INCOMPLETE_BENCHMARK),
        (0, False, FailureClass.INCOMPLETE_BENCHMARK),  # all failed: vLLM 0.32 exits 0
        (3, True, FailureClass.SERVER_CRASH),
    ],
)
def test_crash_mid_benchmark_is_classified(
    make_server: MakeServer,
    tmp_path: Path,
    crash_after: int,
    pass_server: bool,
    expected: FailureClass,
) -> None:
    server = make_server(env={"FAKE_VLLM_CRASH_AFTER_REQUESTS": str(crash_after)})
    settings = BenchSettings(input_len=8, output_len=32, num_prompts=12, num_warmups=0)
    with server:
        server.wait_until_ready()
        with pytest.raises(BenchmarkError) as info:
            bench(
                server,
                tmp_path,
                settings,
                concurrency=2,
                **({"server": server} if pass_server else {}),
            )
        assert server.poll() == 1
    assert info.value.failure_class == expected
    if expected == FailureClass.INCOMPLETE_BENCHMARK:
        # The server dies after its 3rd completion; the other request in flight (concurrency 2)
        # may finish in the same instant, so 3 or 4 complete, never all.
        match = re.search(r"(\d+) of 12 requests completed", str(info.value))
        allowed = (0,) if crash_after == 0 else (3, 4)
        assert match is not None and int(match.group(1)) in allowed, str(info.value)
    assert live_group(server.pgid or 0) == []


def test_bench_timeout_kills_the_client(make_server: MakeServer, tmp_path: Path) -> None:
    server = make_server(env={"FAKE_VLLM_TPOT_MS": "1000"})
    marker = str(tmp_path / "results")
    settings = BenchSettings(input_len=8, output_len=50, num_warmups=0, timeout=1.0)
    with server:
        server.wait_until_ready()
        start = time.monotonic()
        with pytest.raises(BenchmarkError, match="timed out") as info:
            bench(server, tmp_path, settings, concurrency=1)
        assert time.monotonic() - start < 5.0
    assert info.value.failure_class == FailureClass.BENCHMARK_FAILURE
    assert processes_mentioning(marker) == []


def test_stale_result_file_is_not_reused(make_server: MakeServer, tmp_path: Path) -> None:
    stale = tmp_path / "results" / "run.json"
    stale.parent.mkdir()
    stale.write_text(json.dumps(REFERENCE_RESULT))
    server = make_server(env={"FAKE_VLLM_CRASH_AFTER_REQUESTS": "0"})
    with server:
        server.wait_until_ready()
        with pytest.raises(BenchmarkError):
            bench(
                server,
                tmp_path,
                BenchSettings(input_len=8, output_len=8, num_prompts=2, num_warmups=0),
                concurrency=1,
            )
    assert not stale.exists() or json.loads(stale.read_text())["completed"] == 0
