"""Run `vllm bench serve` and read its saved JSON by key, never its console text.

auto_tune.sh grepped the console and broke whenever a label moved (vllm#23600); the saved
result has stable key names, so we ask for it and parse that. A run in which any request failed
is not a measurement: it raises, tagged incomplete_benchmark, instead of returning numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefetch_tune.backends.server import (
    FailureClass,
    base_url,
    read_log_tail,
    spawn_in_own_group,
)
from prefetch_tune.errors import BenchmarkError, ConfigError

if TYPE_CHECKING:
    from prefetch_tune.backends.server import ServerProcess

PERCENTILE_METRICS = "ttft,tpot,itl,e2el"
METRIC_PERCENTILES = "50,90,99"

RESERVED_FLAGS = frozenset(
    {
        "--backend",
        "--base-url",
        "--host",
        "--port",
        "--model",
        "--max-concurrency",
        "--save-result",
        "--append-result",
        "--result-dir",
        "--result-filename",
    }
)
"""Flags prefetch-tune sets itself: overriding them in extra args would measure something else
or lose the result file, so they are refused."""


@dataclass(frozen=True)
class BenchSettings:
    """How each benchmark run loads the server; the concurrency comes with each run.

    num_prompts None means 4 x concurrency (four full waves); num_warmups None means one wave
    (= concurrency) of unmeasured requests first, so start-up effects stay out of the numbers.
    """

    dataset_name: str = "random"
    input_len: int = 1024
    output_len: int = 128
    num_prompts: int | None = None
    num_warmups: int | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    executable: str = "vllm"
    timeout: float = 3600.0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ConfigError(
                f"benchmark input/output length must be >= 1, got {self.input_len}/"
                f"{self.output_len}"
            )
        if self.num_prompts is not None and self.num_prompts < 1:
            raise ConfigError(f"benchmark num_prompts must be >= 1, got {self.num_prompts}")
        if self.num_warmups is not None and self.num_warmups < 0:
            raise ConfigError(f"benchmark num_warmups must be >= 0, got {self.num_warmups}")
        if self.timeout <= 0:
            raise ConfigError(f"benchmark timeout must be > 0, got {self.timeout}")
        for arg in self.extra_args:
            flag = arg.split("=", 1)[0]
            if flag in RESERVED_FLAGS:
                raise ConfigError(f"extra benchmark argument {flag} is set by prefetch-tune")

    def prompts_for(self, concurrency: int) -> int:
        return self.num_prompts if self.num_prompts is not None else 4 * concurrency

    def warmups_for(self, concurrency: int) -> int:
        return self.num_warmups if self.num_warmups is not None else concurrency


def build_bench_command(
    settings: BenchSettings,
    *,
    host: str,
    port: int,
    model: str,
    concurrency: int,
    result_dir: Path,
    result_filename: str,
) -> list[str]:
    """The exact `vllm bench serve` argv for one run (extra user args last, so they win)."""
    if concurrency < 1:
        raise ConfigError(f"benchmark concurrency must be >= 1, got {concurrency}")
    return [
        settings.executable,
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        base_url(host, port),
        "--model",
        model,
        "--dataset-name",
        settings.dataset_name,
        "--random-input-len",
        str(settings.input_len),
        "--random-output-len",
        str(settings.output_len),
        "--num-prompts",
        str(settings.prompts_for(concurrency)),
        "--max-concurrency",
        str(concurrency),
        "--ignore-eos",
        "--temperature",
        "0",
        "--num-warmups",
        str(settings.warmups_for(concurrency)),
        "--percentile-metrics",
        PERCENTILE_METRICS,
        "--metric-percentiles",
        METRIC_PERCENTILES,
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        result_filename,
        *settings.extra_args,
    ]


def parse_result(path: Path) -> dict[str, float]:
    """Numeric top-level values of a saved result, by vLLM's key names.

    Unknown keys are kept if numeric (new vLLM metrics come for free); strings, lists and nulls
    (request_rate "inf", latencies, request_goodput null) are skipped. Raises BenchmarkError
    (benchmark_failure) if the file is missing or is not a JSON object with `completed`.
    """
    try:
        payload: Any = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchmarkError(
            f"benchmark result {path} is missing or unreadable: {exc}",
            failure_class=FailureClass.BENCHMARK_FAILURE,
        ) from exc
    if not isinstance(payload, dict):
        raise BenchmarkError(
            f"benchmark result {path} is not a JSON object",
            failure_class=FailureClass.BENCHMARK_FAILURE,
        )
    metrics: dict[str, float] = {}
    for key, value in payload.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            metrics[str(key)] = float(value)
    if "completed" not in metrics:
        raise BenchmarkError(
            f"benchmark result {path} has no 'completed' count",
            failure_class=FailureClass.BENCHMARK_FAILURE,
        )
    return metrics


def check_complete(metrics: dict[str, float], expected_prompts: int | None = None) -> None:
    """Raise BenchmarkError (incomplete_benchmark) if any request failed or went missing."""
    completed = int(metrics.get("completed", 0))
    failed = int(metrics.get("failed", 0))
    expected = int(metrics.get("num_prompts", expected_prompts or completed))
    if failed > 0 or completed < expected:
        raise BenchmarkError(
            f"incomplete benchmark: {completed} of {expected} requests completed, {failed} failed",
            failure_class=FailureClass.INCOMPLETE_BENCHMARK,
        )


def run_bench(
    settings: BenchSettings,
    *,
    host: str,
    port: int,
    model: str,
    concurrency: int,
    result_dir: Path,
    result_filename: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    server: ServerProcess | None = None,
) -> dict[str, float]:
    """Run one benchmark to completion and return its metrics (see parse_result).

    Output goes to log_path. A stale result file of the same name is removed first so it can
    never pass for this run. With `server`, a failure while that server has died is tagged
    server_crash or out_of_memory (from the server log) instead of a benchmark failure.
    `env` adds to this process's environment.
    """
    cmd = build_bench_command(
        settings,
        host=host,
        port=port,
        model=model,
        concurrency=concurrency,
        result_dir=result_dir,
        result_filename=result_filename,
    )
    result_path = Path(result_dir) / result_filename
    Path(result_dir).mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    try:
        code = _run_logged(cmd, env, Path(log_path), settings.timeout)
        if code is None:
            raise BenchmarkError(
                f"benchmark timed out after {settings.timeout:.0f} s; log {log_path}",
                failure_class=FailureClass.BENCHMARK_FAILURE,
            )
        if code != 0:
            raise BenchmarkError(
                f"benchmark exited with code {code}; log {log_path}, last lines:\n"
                f"{read_log_tail(Path(log_path))}",
                failure_class=FailureClass.BENCHMARK_FAILURE,
            )
        metrics = parse_result(result_path)
        check_complete(metrics, settings.prompts_for(concurrency))
        return metrics
    except BenchmarkError as exc:
        died = server.exit_failure_class() if server is not None else None
        if server is None or died is None:
            raise
        raise BenchmarkError(
            f"server died during the benchmark (exit code {server.poll()}): "
            f"{str(exc).splitlines()[0]}; log {server.log_path}, last lines:\n"
            f"{read_log_tail(server.log_path)}",
            failure_class=died,
        ) from exc


def _run_logged(
    cmd: list[str], env: dict[str, str] | None, log_path: Path, timeout: float
) -> int | None:
    """Exit code of cmd run with output to log_path, or None on timeout (group killed)."""
    try:
        proc = spawn_in_own_group(cmd, env, log_path)
    except OSError as exc:
        raise BenchmarkError(
            f"cannot run {cmd[0]!r}: {exc}", failure_class=FailureClass.BENCHMARK_FAILURE
        ) from exc
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None
    except BaseException:  # Ctrl-C or any error: never leave the client running
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the client's group, SIGKILL if it lingers, and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
