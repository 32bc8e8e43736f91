"""Screening on a real server: one `vllm serve --enforce-eager`, configs changed while it serves.

The server starts once with vLLM-Ascend's default config (so the runtime installs its hooks) and
`PREFETCH_TUNE_CONTROL` pointing at a control file. Per candidate: write the file (config + a new
seq), send short warm-up requests so the workers run forwards (they look at the file between
forwards) until every worker's marker acknowledges that seq and config hash, then run the
benchmark. A config is therefore never benchmarked before every worker runs it. A worker that
refuses the channel (graph mode) or rejects the file stops the screening with its reason.
"""

from __future__ import annotations

import json
import shlex
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from prefetch_tune.backends.base import Metrics, OperatingPoint
from prefetch_tune.backends.bench import run_bench
from prefetch_tune.backends.server import FailureClass, ServerProcess, free_port
from prefetch_tune.backends.vllm import served_model
from prefetch_tune.errors import BackendError, ConfigError
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.runtime.control import (
    ENV_CONTROL,
    Acknowledgement,
    read_acknowledgements,
    write_control,
)

if TYPE_CHECKING:
    from prefetch_tune.backends.vllm import VllmBackend


EAGER_FLAG = "--enforce-eager"
WARMUP_PROMPT = "prefetch-tune control warm-up"
ACK_TIMEOUT_S = 300.0  # first forwards after a start can be slow; a stuck worker fails the run


class VllmScreening:
    """The screening session of one operating point (see the module docstring)."""

    name = "vllm"
    measured = True

    def __init__(self, backend: VllmBackend, point: OperatingPoint) -> None:
        self.backend = backend
        self.point = point
        self.starts = 0
        self.seq = 0
        self.dir = backend.logs_dir(point) / "screen"
        self.control = self.dir / "control.json"
        self.markers = self.dir / "markers"
        self.server: ServerProcess | None = None
        self.workers = point.layout.tp * point.layout.dp  # one runtime per rank
        self.last_artifacts: dict[str, str] = {}
        self.runs = 0

    # -- server ------------------------------------------------------------------------------

    def _start(self) -> ServerProcess:
        backend, point = self.backend, self.point
        info = backend.check_semantics(point)
        if info.semantics != "plugin":
            raise ConfigError(
                f"--screen: needs prefetch-tune's runtime (plugin semantics); {info.reason}, and "
                "a native runtime cannot change its config while serving"
            )
        backend.close()  # a graph-mode server kept for repeats would hold the device
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.markers.glob("prefetch-tune-*.json"):
            old.unlink()
        start_config = PrefetchConfig.default()  # enabled, so every hook is installed
        write_control(self.control, start_config, self.seq)
        port = backend.settings.port or free_port(backend.settings.host)
        cmd = backend.serve_command(start_config, point, port, "plugin")
        if EAGER_FLAG not in cmd:
            cmd.append(EAGER_FLAG)
        env = backend.server_env(point, "plugin", self.markers)
        env[ENV_CONTROL] = str(self.control)
        server = ServerProcess(
            cmd,
            env,
            self.dir / f"serve-{self.starts:02d}.log",
            backend.settings.host,
            port,
            ready_timeout=backend.settings.ready_timeout,
            stop_grace=backend.settings.stop_grace,
        )
        self.starts += 1
        server.start()
        try:
            server.wait_until_ready()
        except BaseException:
            server.stop()
            raise
        self.server = server
        return server

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()

    # -- one candidate -----------------------------------------------------------------------

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        server = self.server
        if server is None or server.poll() is not None:
            self.close()
            server = self._start()
        self.seq += 1
        digest = write_control(self.control, config, self.seq)
        self._await_workers(server, digest)
        self.runs += 1
        name = f"screen-{self.runs:03d}-{digest[:8]}"
        cmd = self.backend.bench_command(point, server.port, self.dir, f"{name}-bench.json")
        self.last_artifacts = {
            "log": str(server.log_path),
            "bench_log": str(self.dir / f"{name}-bench.log"),
            "bench_json": str(self.dir / f"{name}-bench.json"),
            "serve_command": shlex.join(server.cmd),
            "bench_command": shlex.join(cmd),
            "control_seq": str(self.seq),
        }
        try:
            return run_bench(
                self.backend.bench_settings(point),
                host=self.backend.settings.host,
                port=server.port,
                model=served_model(point, self.backend.settings),
                concurrency=point.concurrency,
                result_dir=self.dir,
                result_filename=f"{name}-bench.json",
                log_path=self.dir / f"{name}-bench.log",
                env=self.backend.env,
                server=server,
            )
        except BaseException:
            self.close()  # the next candidate starts a fresh screening server
            raise

    def _await_workers(self, server: ServerProcess, digest: str) -> list[Acknowledgement]:
        """Warm up until every worker acknowledged this seq and hash (or fail with why)."""
        deadline = time.monotonic() + ACK_TIMEOUT_S
        while True:
            acks = read_acknowledgements(self.markers)
            for ack in acks:
                if ack.state == "refused":
                    self.close()
                    raise ConfigError(f"--screen: worker {ack.marker} refuses: {ack.reason}")
                if ack.reason.startswith("rejected") and ack.config_hash != digest:
                    latest = ack.reason.rsplit(": ", 1)[-1]
                    if str(self.control) in latest:
                        raise BackendError(
                            f"--screen: worker {ack.marker} rejected the control file: {latest}",
                            failure_class=FailureClass.BENCHMARK_FAILURE,
                        )
            done = [a for a in acks if a.config_hash == digest and a.seq == self.seq]
            if len(done) >= self.workers and len(acks) >= self.workers:
                return acks
            if server.poll() is not None:
                self.close()
                raise BackendError(
                    f"--screen: the screening server exited while switching configs; log "
                    f"{server.log_path}",
                    failure_class=FailureClass.SERVER_CRASH,
                )
            if time.monotonic() >= deadline:
                raise BackendError(
                    f"--screen: {len(done)} of {self.workers} workers acknowledged config "
                    f"{digest} within {ACK_TIMEOUT_S:.0f} s (markers {self.markers}); is "
                    "prefetch-tune installed in the serving environment?",
                    failure_class=FailureClass.BENCHMARK_FAILURE,
                )
            self._warm_up(server)

    def _warm_up(self, server: ServerProcess) -> None:
        """One short completion: a few forwards in every worker."""
        body = json.dumps(
            {
                "model": served_model(self.point, self.backend.settings),
                "prompt": WARMUP_PROMPT,
                "max_tokens": 4,
                "ignore_eos": True,
            }
        ).encode()
        req = urllib.request.Request(
            f"{server.base_url}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, TimeoutError):
            time.sleep(0.2)  # the server may be busy; the exit check above catches a crash


__all__ = ["EAGER_FLAG", "WARMUP_PROMPT", "VllmScreening"]
