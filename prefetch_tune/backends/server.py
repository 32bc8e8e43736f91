"""Start, watch and stop one `vllm serve` process group.

Like vLLM's `bench sweep` ServerProcess, but the benchmark may start within ~0.1 s of the
server being ready (it polls every 0.1 s, not every 1 s), a dead server fails at once with its
exit code and log tail, out-of-memory is told apart from other crashes, and stopping waits until
every process of the group is gone and the port is free, so the next server can bind it.
Nothing is ever killed by name: only the process group this object started.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from enum import StrEnum
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

from prefetch_tune.errors import ServerStartupError

POLL_INTERVAL = 0.1
"""Seconds between readiness probes: the bound on the ready-to-benchmark delay we add."""

PORT_FREE_TIMEOUT = 10.0
"""How long stop() waits for the listening socket to go away after the group is dead."""

LOG_TAIL_LINES = 20

OOM_PATTERNS = re.compile(
    r"out of memory|OutOfMemoryError|ACL_ERROR_RT_MEMORY_ALLOCATION|Free memory on device"
    r"|EL0004|No available memory for the cache blocks",
    re.IGNORECASE,
)
"""Log text that means the device ran out of memory (CUDA, NPU/ACL, vLLM's own checks)."""


class FailureClass(StrEnum):
    """Why a measurement failed; stored with a trial so a search can react (e.g. OOM = infeasible)."""

    STARTUP_TIMEOUT = "startup_timeout"
    SERVER_CRASH = "server_crash"
    OUT_OF_MEMORY = "out_of_memory"
    BENCHMARK_FAILURE = "benchmark_failure"
    INCOMPLETE_BENCHMARK = "incomplete_benchmark"


_LIVE: set[ServerProcess] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_live() -> None:
    """atexit hook: no server outlives the tuner, even on an unhandled exception or sys.exit."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all_live)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so with-blocks and atexit stop our servers (CLI opt-in)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; another process may still race us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def connect_host(host: str) -> str:
    """Where to connect for a server bound to `host` (a wildcard address means this machine)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host.strip("[]")


def base_url(host: str, port: int) -> str:
    """http://host:port for clients, with wildcards mapped and IPv6 literals bracketed."""
    target = connect_host(host)
    return f"http://[{target}]:{port}" if ":" in target else f"http://{target}:{port}"


def port_in_use(host: str, port: int) -> bool:
    """True if something accepts connections on host:port (refused means free)."""
    try:
        with socket.create_connection((connect_host(host), port), timeout=1.0):
            return True
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    """PIDs of live (non-zombie) processes in process group `pgid`.

    Reads /proc because a zombie still counts for killpg(pgid, 0) until someone reaps it, and
    orphaned members are reaped by init, which may take seconds in a container.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members: list[int] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after "(comm)": state ppid pgrp ...; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


PROBE_LINE = re.compile(r'"GET /(health|v1/models) HTTP/[0-9.]+" \d+')
"""Access-log lines of our own readiness probes: noise in an error message's log tail."""


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 262144) -> str:
    """The last `lines` lines of a log (probe access lines left out), from its last max_bytes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    kept = [
        line for line in data.decode("utf-8", "replace").splitlines() if not PROBE_LINE.search(line)
    ]
    return "\n".join(kept[-lines:])


def log_shows_oom(path: Path, max_bytes: int = 4 << 20) -> bool:
    """True if the log's last `max_bytes` mention running out of device memory."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return False
    return OOM_PATTERNS.search(text) is not None


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Probes go straight to the server, never through an http_proxy from the environment."""


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """Status and body of GET url; (0, b"") when nothing answers."""
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError, http.client.HTTPException):
        return 0, b""


def spawn_in_own_group(
    cmd: list[str], env: dict[str, str] | None, log_path: Path
) -> subprocess.Popen[bytes]:
    """Start cmd in a new session (so its whole process group can be signalled), stdin closed,
    stdout and stderr to log_path; env is added on top of the current environment."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = None if env is None else {**os.environ, **env}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )


class ServerProcess:
    """One `vllm serve` process group: start, wait until ready, stop (also on errors and exit).

    `env` holds variables added to (overriding) this process's environment; None inherits it.
    Use as a context manager: entering starts the server, leaving stops it whatever happened;
    call `wait_until_ready()` inside the block.
    """

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str] | None,
        log_path: Path,
        host: str,
        port: int,
        ready_timeout: float = 1800.0,
        stop_grace: float = 30.0,
    ) -> None:
        if not cmd:
            raise ValueError("empty server command")
        self.cmd = list(cmd)
        self.env = dict(env) if env is not None else None
        self.log_path = Path(log_path)
        self.host = host
        self.port = port
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.model_id: str | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._stopped = False

    @property
    def base_url(self) -> str:
        return base_url(self.host, self.port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def pgid(self) -> int | None:
        """The process group id; equal to the pid since the server leads its own session."""
        return self.pid

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs (or before start)."""
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> None:
        """Launch the command in a new session so stop() can signal the whole group."""
        with self._lock:
            if self._proc is not None:
                raise RuntimeError("server already started")
            if port_in_use(self.host, self.port):
                # Probing would otherwise report some other server as ready.
                raise ServerStartupError(
                    f"port {self.port} on {connect_host(self.host)} is already in use; "
                    "stop whatever listens there or pick another port",
                    failure_class=FailureClass.SERVER_CRASH,
                )
            try:
                self._proc = spawn_in_own_group(self.cmd, self.env, self.log_path)
            except OSError as exc:
                raise ServerStartupError(
                    f"cannot run {self.cmd[0]!r}: {exc}",
                    failure_class=FailureClass.SERVER_CRASH,
                ) from exc
            self.started_at = time.monotonic()
            with _LIVE_LOCK:
                _LIVE.add(self)

    def wait_until_ready(self) -> str:
        """Block until /health is 200 and /v1/models names a model; return that model id.

        Raises ServerStartupError (server stopped first, so the log is complete) if the process
        exits, or at the deadline; the failure_class says crash, out of memory or timeout.
        """
        if self._proc is None:
            raise RuntimeError("server not started")
        start = self.started_at if self.started_at is not None else time.monotonic()
        deadline = start + self.ready_timeout
        healthy = False
        while True:
            code = self._proc.poll()
            if code is not None:
                self._fail_exited(code, start)
            now = time.monotonic()
            if now >= deadline:
                self._fail_timeout(start)
            probe_timeout = max(0.2, min(5.0, deadline - now))
            if not healthy:
                status, _ = _get(f"{self.base_url}/health", probe_timeout)
                healthy = status == 200
            if healthy:
                model = self._served_model(probe_timeout)
                if model is not None and self._proc.poll() is None:
                    self.model_id = model
                    self.ready_at = time.monotonic()
                    return model
            time.sleep(max(0.0, min(POLL_INTERVAL, deadline - time.monotonic())))

    def _served_model(self, timeout: float) -> str | None:
        status, body = _get(f"{self.base_url}/v1/models", timeout)
        if status != 200:
            return None
        try:
            payload: Any = json.loads(body)
            model = payload["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        return model if isinstance(model, str) else None

    def _fail_exited(self, code: int, start: float) -> None:
        elapsed = time.monotonic() - start
        self.stop()  # the leader is gone, but engine processes of its group may live on
        oom = log_shows_oom(self.log_path)
        what = "ran out of device memory" if oom else "exited"
        raise ServerStartupError(
            f"server {what} with exit code {code} after {elapsed:.1f} s, before becoming ready; "
            f"log {self.log_path}, last lines:\n{read_log_tail(self.log_path)}",
            failure_class=FailureClass.OUT_OF_MEMORY if oom else FailureClass.SERVER_CRASH,
        )

    def _fail_timeout(self, start: float) -> None:
        elapsed = time.monotonic() - start  # before stop(): its grace is not start-up time
        self.stop()
        oom = log_shows_oom(self.log_path)
        note = " (the log shows out of memory)" if oom else ""
        raise ServerStartupError(
            f"startup timeout after {elapsed:.1f} s{note}: no ready answer from "
            f"{self.base_url}/health and /v1/models; log {self.log_path}, last lines:\n"
            f"{read_log_tail(self.log_path)}",
            failure_class=FailureClass.OUT_OF_MEMORY if oom else FailureClass.STARTUP_TIMEOUT,
        )

    def exit_failure_class(self) -> FailureClass | None:
        """If the server has exited: out_of_memory or server_crash, from its log; else None."""
        if self.poll() is None:
            return None
        if log_shows_oom(self.log_path):
            return FailureClass.OUT_OF_MEMORY
        return FailureClass.SERVER_CRASH

    def stop(self) -> int | None:
        """SIGTERM the group, SIGKILL after stop_grace, reap, wait for the port; idempotent.

        A Ctrl-C while waiting skips the rest of the grace (SIGKILL at once), finishes the
        cleanup, then re-raises. Returns the leader's exit code (None if never started).
        """
        with self._lock:
            proc = self._proc
            if proc is None or self._stopped:
                return proc.returncode if proc is not None else None
            interrupted: KeyboardInterrupt | None = None
            try:
                self._signal_group(signal.SIGTERM)
                self._wait_group(time.monotonic() + self.stop_grace)
            except KeyboardInterrupt as exc:
                interrupted = exc
            if self._group_alive():
                self._signal_group(signal.SIGKILL)
                self._wait_group(time.monotonic() + 10.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5.0)
            self._wait_port_free(time.monotonic() + PORT_FREE_TIMEOUT)
            self._stopped = True
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if interrupted is not None:
                raise interrupted
            return proc.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _group_alive(self) -> bool:
        assert self._proc is not None
        self._proc.poll()  # reap the leader if it exited, so it does not count as a member
        return bool(group_members(self._proc.pid))

    def _wait_group(self, deadline: float) -> None:
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_port_free(self, deadline: float) -> None:
        while port_in_use(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
