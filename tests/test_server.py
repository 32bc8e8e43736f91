"""ServerProcess against the fake `vllm serve`: real processes, real HTTP, no mocks.

Every test checks that no process of the server's group survives (read from /proc, so a
zombie waiting for init to reap it does not count as alive).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import live_group

from prefetch_tune.backends.server import (
    FailureClass,
    ServerProcess,
    free_port,
    group_members,
    port_in_use,
)
from prefetch_tune.errors import BackendError, ServerStartupError

REPO = Path(__file__).resolve().parents[1]
FAKE_DIR = REPO / "tests" / "fake_vllm"
MODEL = "vllm-ascend/Qwen3-32B-W8A8"

MakeServer = Callable[..., ServerProcess]


def assert_group_gone(pgid: int | None) -> None:
    assert pgid is not None
    assert live_group(pgid) == [], f"processes of group {pgid} survive"
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return
    # Only zombies left, waiting for init to reap them: dead, if not yet buried.
    assert not live_group(pgid)


@pytest.fixture(autouse=True)
def fake_vllm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake first on PATH, fast fixed timings, no failure mode left over from the caller."""
    for key in list(os.environ):
        if key.startswith("FAKE_VLLM_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_VLLM_TTFT_MS", "20")
    monkeypatch.setenv("FAKE_VLLM_TPOT_MS", "10")
    monkeypatch.setenv("FAKE_VLLM_ORPHAN_LINGER", "30")


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Build ServerProcess objects; afterwards assert that none left a process behind."""
    made: list[ServerProcess] = []

    def make(
        *extra: str,
        env: dict[str, str] | None = None,
        ready_timeout: float = 30.0,
        stop_grace: float = 5.0,
    ) -> ServerProcess:
        port = free_port()
        cmd = ["vllm", "serve", MODEL, "--host", "127.0.0.1", "--port", str(port), *extra]
        server = ServerProcess(
            cmd,
            env,
            tmp_path / f"server-{len(made)}.log",
            "127.0.0.1",
            port,
            ready_timeout=ready_timeout,
            stop_grace=stop_grace,
        )
        made.append(server)
        return server

    yield make
    survivors = {s.pgid: live_group(s.pgid) for s in made if s.pgid and live_group(s.pgid)}
    for server in made:
        server.stop()
    assert not survivors, f"processes survived the test: {survivors}"


def test_ready_shortly_after_startup_delay(make_server: MakeServer, tmp_path: Path) -> None:
    ready_file = tmp_path / "ready.json"
    server = make_server(
        env={"FAKE_VLLM_STARTUP_DELAY": "1.0", "FAKE_VLLM_READY_FILE": str(ready_file)}
    )
    with server:
        start = time.monotonic()
        model = server.wait_until_ready()
        elapsed = time.monotonic() - start
        assert model == MODEL
        assert server.model_id == MODEL
        assert 1.0 <= elapsed < 2.0
        events = json.loads(ready_file.read_text())
        assert server.ready_at is not None
        # Polling every 0.1 s: noticed well under a second after the server became ready.
        assert events["ready"] <= events["health_ok"] <= server.ready_at
        assert server.ready_at - events["ready"] < 0.5
        assert len(live_group(server.pgid or 0)) >= 2, "the fake should have an engine child"
        before_stop = time.monotonic()
    assert time.monotonic() - before_stop < 2.0
    assert server.poll() == 0  # the fake shuts down cleanly on SIGTERM
    assert_group_gone(server.pgid)
    assert not port_in_use("127.0.0.1", server.port)


def test_crash_at_start_fails_fast_with_log_tail(make_server: MakeServer) -> None:
    server = make_server(env={"FAKE_VLLM_CRASH_AT_START": "1"}, ready_timeout=60.0)
    start = time.monotonic()
    with pytest.raises(ServerStartupError) as info, server:
        server.wait_until_ready()
    assert time.monotonic() - start < 5.0
    assert info.value.failure_class == FailureClass.SERVER_CRASH
    message = str(info.value)
    assert "exit code 1" in message
    assert "Engine core initialization failed" in message
    # The orphaned engine child must have been killed with the group.
    assert_group_gone(server.pgid)


def test_out_of_memory_is_recognised(make_server: MakeServer) -> None:
    server = make_server(env={"FAKE_VLLM_OOM": "1"})
    with pytest.raises(ServerStartupError) as info, server:
        server.wait_until_ready()
    assert info.value.failure_class == FailureClass.OUT_OF_MEMORY
    assert "out of device memory" in str(info.value)
    assert "NPU out of memory" in str(info.value)
    assert isinstance(info.value, BackendError)
    assert_group_gone(server.pgid)


def test_unknown_flag_is_a_crash_with_argparse_message(make_server: MakeServer) -> None:
    server = make_server("--no-such-flag")
    with pytest.raises(ServerStartupError) as info, server:
        server.wait_until_ready()
    assert info.value.failure_class == FailureClass.SERVER_CRASH
    assert "exit code 2" in str(info.value)
    assert "unrecognized arguments: --no-such-flag" in str(info.value)


def test_hang_hits_startup_timeout_and_group_is_gone(make_server: MakeServer) -> None:
    server = make_server(env={"FAKE_VLLM_HANG": "1"}, ready_timeout=1.5)
    with server:
        start = time.monotonic()
        with pytest.raises(ServerStartupError) as info:
            server.wait_until_ready()
        elapsed = time.monotonic() - start
        # Stopped before raising, even while still inside the with-block.
        assert_group_gone(server.pgid)
    assert info.value.failure_class == FailureClass.STARTUP_TIMEOUT
    assert str(info.value).startswith("startup timeout after")
    assert "GET /health" not in str(info.value)  # our own probes are left out of the log tail
    assert 1.3 <= elapsed < 4.0


def test_startup_timeout_after_an_oom_in_the_log_is_out_of_memory(tmp_path: Path) -> None:
    # vLLM's engine core can die of OOM while the API server keeps waiting for it: no exit, no
    # ready answer, but the log says why. That is out of memory (infeasible), not a timeout.
    port = free_port()
    script = (
        "import time; print('torch.OutOfMemoryError: NPU out of memory. Tried to allocate "
        "2.00 GiB', flush=True); time.sleep(60)"
    )
    log = tmp_path / "server.log"
    server = ServerProcess(
        [sys.executable, "-c", script], None, log, "127.0.0.1", port, ready_timeout=1.5
    )
    with pytest.raises(ServerStartupError) as info, server:
        server.wait_until_ready()
    assert info.value.failure_class == FailureClass.OUT_OF_MEMORY
    assert str(info.value).startswith("startup timeout after")
    assert "(the log shows out of memory)" in str(info.value)
    assert_group_gone(server.pgid)


def test_sigterm_ignoring_server_is_killed_after_grace(make_server: MakeServer) -> None:
    server = make_server(env={"FAKE_VLLM_IGNORE_SIGTERM": "1"}, stop_grace=1.0)
    server.start()
    server.wait_until_ready()
    start = time.monotonic()
    code = server.stop()
    elapsed = time.monotonic() - start
    assert code == -9
    assert 1.0 <= elapsed < 2.0
    assert_group_gone(server.pgid)
    assert not port_in_use("127.0.0.1", server.port)


def test_ctrl_c_during_grace_kills_at_once_then_reraises(make_server: MakeServer) -> None:
    server = make_server(env={"FAKE_VLLM_IGNORE_SIGTERM": "1"}, stop_grace=30.0)
    server.start()
    server.wait_until_ready()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            server.stop()  # waits for the 30 s grace unless interrupted
        elapsed = time.monotonic() - start
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert elapsed < 3.0
    assert server.poll() == -9
    assert_group_gone(server.pgid)
    assert server.stop() == -9  # already stopped: no second wait


def test_stop_is_idempotent_and_safe_before_start(make_server: MakeServer) -> None:
    server = make_server()
    assert server.stop() is None
    server.start()
    server.wait_until_ready()
    first = server.stop()
    assert server.stop() == first == 0
    assert_group_gone(server.pgid)


def test_keyboard_interrupt_in_block_stops_server(make_server: MakeServer) -> None:
    server = make_server()
    with pytest.raises(KeyboardInterrupt), server:
        server.wait_until_ready()
        raise KeyboardInterrupt
    assert_group_gone(server.pgid)


def test_exception_in_block_stops_server(make_server: MakeServer) -> None:
    server = make_server()
    with pytest.raises(RuntimeError, match="boom"), server:
        server.wait_until_ready()
        raise RuntimeError("boom")
    assert_group_gone(server.pgid)


@pytest.mark.parametrize("ending", ["sys.exit(3)", "raise RuntimeError('unhandled')"])
def test_atexit_stops_servers_left_running(tmp_path: Path, ending: str) -> None:
    port = free_port()
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from prefetch_tune.backends.server import ServerProcess
        s = ServerProcess(["vllm", "serve", "m", "--port", "{port}"], None,
                          Path({str(tmp_path / "s.log")!r}), "127.0.0.1", {port})
        s.start()
        s.wait_until_ready()
        print(s.pgid, flush=True)
        {ending}
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    pgid = int(result.stdout.split()[0])
    assert_group_gone(pgid)
    assert not port_in_use("127.0.0.1", port)


def test_sigterm_to_the_tuner_stops_its_server(tmp_path: Path) -> None:
    port = free_port()
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from prefetch_tune.backends.server import ServerProcess, exit_on_sigterm
        exit_on_sigterm()
        s = ServerProcess(["vllm", "serve", "m", "--port", "{port}"], None,
                          Path({str(tmp_path / "s.log")!r}), "127.0.0.1", {port})
        with s:
            s.wait_until_ready()
            print(s.pgid, flush=True)
            time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tuner = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert tuner.stdout is not None
        pgid = int(tuner.stdout.readline())
        tuner.send_signal(signal.SIGTERM)
        assert tuner.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        tuner.kill()
        tuner.wait()
    assert_group_gone(pgid)
    assert not port_in_use("127.0.0.1", port)


def test_port_in_use_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = ServerProcess(
            ["vllm", "serve", MODEL], None, tmp_path / "s.log", "127.0.0.1", port
        )
        with pytest.raises(ServerStartupError, match="already in use"):
            server.start()
        assert server.pid is None


def test_missing_executable(tmp_path: Path) -> None:
    server = ServerProcess(
        [str(tmp_path / "no-vllm"), "serve"], None, tmp_path / "s.log", "127.0.0.1", free_port()
    )
    with pytest.raises(ServerStartupError, match="cannot run") as info:
        server.start()
    assert info.value.failure_class == FailureClass.SERVER_CRASH


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_group_members_sees_the_server_group(make_server: MakeServer) -> None:
    server = make_server()
    with server:
        server.wait_until_ready()
        assert server.pgid is not None
        assert sorted(group_members(server.pgid)) == sorted(live_group(server.pgid))
    assert group_members(server.pgid or 0) == []
