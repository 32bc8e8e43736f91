"""`vllm serve` stand-in: an OpenAI-compatible HTTP server that streams tokens on a modelled clock.

See the package docstring for the FAKE_VLLM_* variables that choose timing and failure modes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fakevllm import DEFAULT_VERSION

REPO_ROOT = Path(__file__).resolve().parents[3]

ENGINE_CODE = r"""
import os, signal, sys, time
if os.environ.get("FAKE_VLLM_IGNORE_SIGTERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
parent = int(sys.argv[1])
linger = float(os.environ.get("FAKE_VLLM_ORPHAN_LINGER", "60"))
orphaned_at = None
while True:
    time.sleep(0.1)
    if os.getppid() != parent:
        if orphaned_at is None:
            orphaned_at = time.monotonic()
        elif time.monotonic() - orphaned_at > linger:
            sys.exit(0)
"""
"""The "engine core": sleeps in the server's process group and, like a stuck vLLM engine,
does not die with its parent (only after FAKE_VLLM_ORPHAN_LINGER seconds)."""


def log(message: str, level: str = "INFO", where: str = "api_server.py:1") -> None:
    """One vLLM-style log line on stdout (the caller's log file), flushed at once."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    print(f"(APIServer pid={os.getpid()}) {level} {stamp} [{where}] {message}", flush=True)


def _env_float(name: str, default: float | None = None) -> float | None:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


def _json_object(value: str) -> dict[str, Any]:
    """argparse type: vLLM parses these flags as JSON and refuses anything else."""
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"Value {value} cannot be parsed as JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError(f"Value {value} is not a JSON object")
    return parsed


def _compilation_config(value: str) -> str:
    """argparse type: an optimisation level (int) or a JSON object, as in vLLM."""
    if not value.lstrip("-").isdigit():
        _json_object(value)
    return value


def _human_int(value: str) -> int:
    """argparse type: 4096, 4k or 1M, as vLLM's --max-model-len accepts."""
    units = {"k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm serve", description="Fake vLLM OpenAI server.")
    parser.add_argument("model_tag", nargs="?", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-model-len", type=_human_int, default=32768)
    parser.add_argument("--max-num-batched-tokens", type=_human_int, default=None)
    parser.add_argument("--additional-config", type=_json_object, default=None)
    parser.add_argument("--compilation-config", "-O", type=_compilation_config, default=None)
    parser.add_argument("--quantization", "-q", default=None)
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction)
    parser.add_argument(
        "--distributed-executor-backend", choices=["ray", "mp", "uni", "external_launcher"]
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction)
    parser.add_argument("--disable-log-stats", action="store_true")
    parser.add_argument("--uvicorn-log-level", default="info")
    return parser


class Timing:
    """(TTFT, TPOT) in seconds: FAKE_VLLM_*_MS if set, else the simulator; times the scale."""

    def __init__(self, args: argparse.Namespace, raw_additional_config: str | None) -> None:
        self.args = args
        self.raw_additional_config = raw_additional_config
        self.scale = _env_float("FAKE_VLLM_TIME_SCALE", 1.0) or 0.0
        self.ttft_ms = _env_float("FAKE_VLLM_TTFT_MS")
        self.tpot_ms = _env_float("FAKE_VLLM_TPOT_MS")
        self._cache: dict[tuple[int, int], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def get(self, input_len: int, output_len: int) -> tuple[float, float]:
        with self._lock:
            key = (input_len, output_len)
            if key not in self._cache:
                self._cache[key] = self._compute(input_len, output_len)
            return self._cache[key]

    def _compute(self, input_len: int, output_len: int) -> tuple[float, float]:
        if self.ttft_ms is not None and self.tpot_ms is not None:
            ttft, tpot = self.ttft_ms / 1000.0, self.tpot_ms / 1000.0
        else:
            ttft, tpot = self._simulate(input_len, output_len)
            if self.ttft_ms is not None:
                ttft = self.ttft_ms / 1000.0
            if self.tpot_ms is not None:
                tpot = self.tpot_ms / 1000.0
        return ttft * self.scale, tpot * self.scale

    def _simulate(self, input_len: int, output_len: int) -> tuple[float, float]:
        """Imported lazily: the simulator is only needed when no override is set."""
        try:
            from fakevllm.timing import serving_timing
        except ImportError:
            sys.path.append(str(REPO_ROOT))
            from fakevllm.timing import serving_timing
        args = self.args
        ttft, tpot = serving_timing(
            args.model,
            args.tensor_parallel_size,
            args.data_parallel_size,
            bool(args.enable_expert_parallel),
            args.max_num_seqs,
            self.raw_additional_config,
            input_len,
            output_len,
        )
        return float(ttft), float(tpot)


class FakeServer(ThreadingHTTPServer):
    """HTTP server plus the state the handlers share (readiness, counters, slots)."""

    daemon_threads = True
    request_queue_size = 1024  # a burst of max-concurrency connections must not hit SYN retries

    def __init__(self, address: tuple[str, int], args: argparse.Namespace, timing: Timing) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.args = args
        self.timing = timing
        self.names: list[str] = args.served_model_name or [args.model]
        self.ready_at = float("inf")
        self.slots = threading.BoundedSemaphore(args.max_num_seqs)
        self.lock = threading.Lock()
        self.finished = 0
        self.running = 0
        self.crash_after = (
            int(os.environ["FAKE_VLLM_CRASH_AFTER_REQUESTS"])
            if os.environ.get("FAKE_VLLM_CRASH_AFTER_REQUESTS", "") != ""
            else None
        )
        eos_after = os.environ.get("FAKE_VLLM_EOS_AFTER", "")
        self.eos_after = int(eos_after) if eos_after else None
        self.ready_file = os.environ.get("FAKE_VLLM_READY_FILE") or None
        self.events: dict[str, float] = {}

    def is_ready(self) -> bool:
        return time.monotonic() >= self.ready_at

    def record(self, event: str) -> None:
        """Note the first time `event` happens (written to FAKE_VLLM_READY_FILE at once)."""
        now = time.monotonic()
        with self.lock:
            if event in self.events:
                return
            self.events[event] = now
            if self.ready_file:
                tmp = Path(f"{self.ready_file}.tmp")
                tmp.write_text(json.dumps(self.events))
                tmp.replace(self.ready_file)

    def request_finished(self) -> None:
        with self.lock:
            self.finished += 1
            finished = self.finished
        if self.crash_after is not None and finished >= self.crash_after:
            die_mid_run()


def die_mid_run() -> None:
    """Exit the way a dead engine takes vLLM down: error lines, then gone without clean-up."""
    log("EngineCore encountered a fatal error.", "ERROR", "core.py:710")
    print(
        "Traceback (most recent call last):\n"
        '  File "vllm/v1/engine/core.py", line 701, in run_engine_core\n'
        "    engine_core.run_busy_loop()\n"
        "RuntimeError: ACL stream synchronize failed, error code:507035\n",
        flush=True,
    )
    log("AsyncLLM output_handler failed.", "ERROR", "async_llm.py:480")
    print(
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
        "See stack trace (above) for the root cause.",
        flush=True,
    )
    os._exit(1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        host, port = self.client_address[:2]
        print(f'INFO:     {host}:{port} - "{self.requestline}" {code}', flush=True)

    def log_message(self, format: str, *args: Any) -> None:
        print(f"WARNING:  {format % args}", flush=True)

    # -- helpers -------------------------------------------------------------------------

    def _send_json(self, code: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, message: str, kind: str = "BadRequestError") -> None:
        self._send_json(
            code, {"error": {"message": message, "type": kind, "param": None, "code": code}}
        )

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    def _not_ready(self) -> bool:
        if self.server.is_ready():
            return False
        self._send_json(503, {"detail": "Service Unavailable"})
        return True

    # -- routes --------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            if self._not_ready():
                return
            self.server.record("health_ok")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.record(f"first:GET {path}")
        if path == "/version":
            self._send_json(200, {"version": os.environ.get("FAKE_VLLM_VERSION", DEFAULT_VERSION)})
        elif path == "/v1/models":
            if self._not_ready():
                return
            created = int(time.time())
            data = [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": self.server.args.model,
                    "parent": None,
                    "max_model_len": self.server.args.max_model_len,
                }
                for name in self.server.names
            ]
            self._send_json(200, {"object": "list", "data": data})
        elif path == "/metrics":
            body = (
                f'vllm:num_requests_running{{model_name="{self.server.names[0]}"}} '
                f"{float(self.server.running)}\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.record(f"first:POST {path}")
        try:
            body = self._read_json()
        except ValueError as exc:
            self._error(400, f"invalid JSON body: {exc}")
            return
        if path == "/v1/completions":
            self._completions(body)
        elif path == "/tokenize":
            tokens = _tokens(body.get("prompt", ""))
            self._send_json(
                200,
                {
                    "count": len(tokens),
                    "max_model_len": self.server.args.max_model_len,
                    "tokens": tokens,
                },
            )
        elif path in ("/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache"):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send_json(404, {"detail": "Not Found"})

    def _completions(self, body: Any) -> None:
        server = self.server
        if self._not_ready():
            return
        if not isinstance(body, dict):
            self._error(400, "request body must be a JSON object")
            return
        model = body.get("model") or server.names[0]
        if model not in server.names:
            self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
            return
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        n_in = len(_tokens(prompt))
        max_tokens = int(body.get("max_tokens") or 16)
        if n_in + max_tokens > server.args.max_model_len:
            self._error(
                400,
                f"This model's maximum context length is {server.args.max_model_len} tokens. "
                f"However, you requested {n_in + max_tokens} tokens ({n_in} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages "
                "or completion.",
            )
            return
        if body.get("ignore_eos"):
            n_out = max_tokens
        else:
            eos = server.eos_after
            if eos is None:
                eos = 1 + zlib.crc32(json.dumps(prompt).encode()) % max_tokens
            n_out = max(1, min(max_tokens, eos))
        if server.crash_after == 0:
            die_mid_run()
        try:
            ttft, tpot = server.timing.get(n_in, max_tokens)
        except Exception as exc:  # the simulator refused this request: a 500, as a server bug
            log(f"timing model failed:\n{traceback.format_exc()}", "ERROR", "serving.py:1")
            self._error(500, f"{type(exc).__name__}: {exc}", "InternalServerError")
            return
        stream = bool(body.get("stream"))
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        with server.slots:  # beyond --max-num-seqs, requests wait (and their TTFT grows)
            with server.lock:
                server.running += 1
            try:
                if stream:
                    self._stream(model, n_in, n_out, max_tokens, ttft, tpot, usage_wanted)
                else:
                    self._whole(model, n_in, n_out, max_tokens, ttft, tpot)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            finally:
                with server.lock:
                    server.running -= 1
        server.request_finished()

    def _chunk(self, payload: str) -> None:
        data = payload.encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(
        self,
        model: str,
        n_in: int,
        n_out: int,
        max_tokens: int,
        ttft: float,
        tpot: float,
        usage_wanted: bool,
    ) -> None:
        start = time.monotonic()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        for i in range(n_out):
            _sleep_until(start + ttft + i * tpot)
            last = i == n_out - 1
            finish = ("length" if n_out == max_tokens else "stop") if last else None
            chunk = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": f" t{i}",
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                ],
                "usage": None,
            }
            self._chunk(f"data: {json.dumps(chunk)}\n\n")
        if usage_wanted:
            usage = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": n_in,
                    "total_tokens": n_in + n_out,
                    "completion_tokens": n_out,
                },
            }
            self._chunk(f"data: {json.dumps(usage)}\n\n")
        self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _whole(
        self, model: str, n_in: int, n_out: int, max_tokens: int, ttft: float, tpot: float
    ) -> None:
        _sleep_until(time.monotonic() + ttft + (n_out - 1) * tpot)
        self._send_json(
            200,
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": "".join(f" t{i}" for i in range(n_out)),
                        "logprobs": None,
                        "stop_reason": None,
                        "finish_reason": "length" if n_out == max_tokens else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": n_in,
                    "total_tokens": n_in + n_out,
                    "completion_tokens": n_out,
                },
            },
        )


def _tokens(prompt: Any) -> list[int]:
    """One token per whitespace-separated word (or the ids themselves for a token list)."""
    if isinstance(prompt, list):
        return [int(t) for t in prompt if isinstance(t, int)]
    return [zlib.crc32(word.encode()) % 151_000 for word in str(prompt).split()]


def _sleep_until(target: float) -> None:
    delay = target - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _spawn_engine() -> subprocess.Popen[bytes]:
    """The engine-core child: same process group (no new session), same log."""
    return subprocess.Popen(
        [sys.executable, "-c", ENGINE_CODE, str(os.getpid())], stdin=subprocess.DEVNULL
    )


def _crash_at_start(model: str) -> int:
    log(f"Initializing a V1 LLM engine with config: model='{model}'", where="core.py:93")
    print(
        "Traceback (most recent call last):\n"
        '  File "vllm/entrypoints/openai/api_server.py", line 1912, in run_server\n'
        "    async with build_async_engine_client(args) as engine_client:\n"
        '  File "vllm/v1/engine/core.py", line 83, in __init__\n'
        "    self.model_executor = executor_class(vllm_config)\n"
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {'EngineCore_DP0': 1}",
        flush=True,
    )
    return 1


def _oom_at_start(model: str) -> int:
    log(f"Loading model weights took 31.7 GB for {model}", where="model_runner.py:2200")
    print(
        "(EngineCore_DP0 pid=4242) ERROR [core.py:708] EngineCore failed to start.\n"
        "Traceback (most recent call last):\n"
        '  File "vllm_ascend/worker/model_runner_v1.py", line 2710, in _dummy_run\n'
        "    hidden_states = self.model(input_ids=input_ids, positions=positions)\n"
        "RuntimeError: NPU out of memory. Tried to allocate 2.00 GiB (NPU 0; 60.96 GiB total "
        "capacity; 57.31 GiB already allocated; 57.31 GiB current active; 1.12 GiB free; "
        "58.90 GiB reserved in total by PyTorch) If reserved memory is >> allocated memory "
        "try setting max_split_size_mb to avoid fragmentation.\n"
        "[ERROR] 2026-11-29-16:14:18 (PID:4242) ERR00100 PTA call acl api failed\n"
        "EL0004: [PID: 4242] The memory allocation failed: ACL_ERROR_RT_MEMORY_ALLOCATION "
        "(207001)",
        flush=True,
    )
    return 1


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.model = args.model_tag or args.model
    if not args.model:
        parser.error("the following arguments are required: model_tag")
    raw_additional = None
    if args.additional_config is not None:
        raw_additional = json.dumps(args.additional_config)
    version = os.environ.get("FAKE_VLLM_VERSION", DEFAULT_VERSION)
    log(f"vLLM API server version {version}")
    log(f"non-default args: { {k: v for k, v in vars(args).items() if v is not None} }")
    started = time.monotonic()
    delay = _env_float("FAKE_VLLM_STARTUP_DELAY", 0.0) or 0.0
    if os.environ.get("FAKE_VLLM_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())

    timing = Timing(args, raw_additional)
    if timing.ttft_ms is None or timing.tpot_ms is None:
        try:  # like loading the model: a config the simulator refuses fails the start-up
            timing.get(1024, 128)
        except Exception:
            log(f"Engine core initialization failed:\n{traceback.format_exc()}", "ERROR")
            return 1
    host = args.host if args.host is not None else "0.0.0.0"
    try:
        httpd = FakeServer((host, args.port), args, timing)
    except OSError as exc:
        log(f"OSError: [Errno {exc.errno}] {exc.strerror}: ({host!r}, {args.port})", "ERROR")
        return 1
    engine = _spawn_engine()
    threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    log(f"Starting vLLM API server 0 on http://{host}:{args.port}", where="launcher.py:37")

    if _wait(stop, started + delay):
        return _shutdown(httpd, engine)
    if os.environ.get("FAKE_VLLM_CRASH_AT_START") == "1":
        return _crash_at_start(args.model)  # the engine child is left behind, as in real life
    if os.environ.get("FAKE_VLLM_OOM") == "1":
        return _oom_at_start(args.model)
    if os.environ.get("FAKE_VLLM_HANG") != "1":
        httpd.ready_at = time.monotonic()
        httpd.record("ready")
        log(f"Application startup complete ({httpd.ready_at - started:.2f} s).")
    _wait(stop, float("inf"))
    return _shutdown(httpd, engine)


def _wait(stop: threading.Event, until: float) -> bool:
    """Wait for a stop signal until `until` (monotonic); short waits keep signals prompt."""
    while not stop.is_set():
        remaining = until - time.monotonic()
        if remaining <= 0:
            return False
        stop.wait(min(remaining, 0.1))
    return True


def _shutdown(httpd: FakeServer, engine: subprocess.Popen[bytes]) -> int:
    log("Shutting down FastAPI HTTP server.")
    httpd.shutdown()
    httpd.server_close()
    with contextlib.suppress(ProcessLookupError):
        engine.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        engine.wait(timeout=5)
    return 0
