"""The control channel: change the prefetch config of a running server between benchmark runs.

Screening (`search --screen`) runs many candidates on one eager `vllm serve`. The tuner writes
the next candidate to the file named by `PREFETCH_TUNE_CONTROL`; every worker's runtime looks at
that file's (mtime, size) at most once every `PREFETCH_TUNE_CONTROL_EVERY` forwards (a stat, never
a read, on the hot path), parses a changed file with the same strict parser as
`--additional-config`, swaps its config at the forward boundary and acknowledges in its marker:
the config's hash and the forward count from which it runs. The tuner benchmarks a candidate only
once every worker has acknowledged it. A bad file is rejected with the reason in the marker and
the old config keeps running.

Only where the decision is taken at run time: with `--enforce-eager`. Under graph capture the
prefetch sizes are frozen into the captured graphs, so a new config would be silently ignored;
the channel is refused and the marker says why.

The file holds a `weight_prefetch_config` object (or an `--additional-config`-style object with
that key) and an optional `"seq"` number that makes a rewrite of the same config visible.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefetch_tune.errors import ConfigError
from prefetch_tune.numbers import json_loads
from prefetch_tune.prefetch import ROOT_KEY, PrefetchConfig, parse_weight_prefetch_config

ENV_CONTROL = "PREFETCH_TUNE_CONTROL"
ENV_CONTROL_EVERY = "PREFETCH_TUNE_CONTROL_EVERY"
DEFAULT_EVERY = 8  # forwards between two stat() calls: ~1 ms of a decode step, never per op


def config_hash(config: PrefetchConfig) -> str:
    """Short identity of a config, the same in the tuner and in every worker."""
    return hashlib.sha256(config.canonical_json().encode()).hexdigest()[:16]


def parse_control_text(text: str, path: str) -> tuple[PrefetchConfig, int | None]:
    """The config (and seq) a control file asks for; ConfigError names the file and key."""
    try:
        doc = json_loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{path}: expected a JSON object")
    seq = doc.get("seq")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
        raise ConfigError(f"{path}: seq: expected an integer, got {seq!r}")
    body = doc.get(ROOT_KEY, doc)
    if isinstance(body, Mapping):
        body = {k: v for k, v in body.items() if k != "seq"}
    return parse_weight_prefetch_config(body, f"{path}:{ROOT_KEY}"), seq


def write_control(path: Path, config: PrefetchConfig, seq: int) -> str:
    """Atomically write the control file the workers read; returns the config hash to await."""
    tmp = path.with_name(f".{path.name}.tmp")
    doc = {ROOT_KEY: config.to_json_obj(), "seq": seq}
    tmp.write_text(json.dumps(doc, sort_keys=True) + "\n")
    tmp.replace(path)
    return config_hash(config)


def refusal(enforce_eager: bool | None) -> str | None:
    """Why the channel cannot run in this server (None when it can)."""
    if enforce_eager:
        return None
    return (
        "graph mode: ACL graph capture freezes the prefetch sizes into the captured graphs, so a "
        "config changed at run time would not take effect; start vllm serve with --enforce-eager"
    )


@dataclass
class ControlState:
    """What the channel did, for the marker file (`control` key)."""

    path: str
    state: str = "waiting"  # waiting|applied|rejected|refused
    config_hash: str | None = None
    seq: int | None = None
    applied_at_forward: int | None = None
    forwards: int = 0
    reason: str = ""
    rejected: list[str] = field(default_factory=list)

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "state": self.state,
            "config_hash": self.config_hash,
            "seq": self.seq,
            "applied_at_forward": self.applied_at_forward,
            "forwards": self.forwards,
            "reason": self.reason,
            "rejected": self.rejected[-5:],
        }


class ControlChannel:
    """One worker's end of the channel: `tick()` once per forward, at the forward boundary."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        current: PrefetchConfig,
        apply: Callable[[PrefetchConfig], None],
        acknowledge: Callable[[ControlState], None],
        every: int = DEFAULT_EVERY,
        refused: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.every = max(1, every)
        self._apply = apply
        self._acknowledge = acknowledge
        self._seen: tuple[int, int] | None = None
        self.state = ControlState(str(self.path), config_hash=config_hash(current))
        if refused:
            self.state.state, self.state.reason = "refused", refused
        acknowledge(self.state)

    @property
    def live(self) -> bool:
        return self.state.state != "refused"

    def tick(self) -> None:
        """Count a forward; every `every` forwards, pick up a changed control file."""
        self.state.forwards += 1
        if not self.live or self.state.forwards % self.every:
            return
        self.poll()

    def poll(self) -> bool:
        """Apply the control file if it changed since the last look; True when a config changed."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            return self._reject(f"cannot stat {self.path}: {exc}")
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            config, seq = parse_control_text(self.path.read_text(), str(self.path))
        except (OSError, ConfigError) as exc:
            return self._reject(str(exc))
        digest = config_hash(config)
        if digest == self.state.config_hash and seq == self.state.seq:
            return False
        self._apply(config)
        self.state.state, self.state.reason = "applied", ""
        self.state.config_hash, self.state.seq = digest, seq
        self.state.applied_at_forward = self.state.forwards
        self._acknowledge(self.state)
        return True

    def _reject(self, reason: str) -> bool:
        self.state.rejected.append(reason)
        self.state.reason = f"rejected, still running {self.state.config_hash}: {reason}"
        self._acknowledge(self.state)
        return False


def watch(channel: ControlChannel, interval_s: float = 0.2) -> threading.Event:
    """Poll `channel` from a daemon thread every `interval_s`: for a worker whose hooks sleep
    (no forwards to tick on), so the channel and its acknowledgements stay live. Set the
    returned event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            channel.poll()

    threading.Thread(target=loop, name="prefetch-tune-control", daemon=True).start()
    return stop


def every_from_env(environ: Mapping[str, str] | None = None) -> int:
    raw = (environ if environ is not None else os.environ).get(ENV_CONTROL_EVERY, "").strip()
    if not raw:
        return DEFAULT_EVERY
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{ENV_CONTROL_EVERY}={raw}: not an integer") from None
    if value < 1:
        raise ConfigError(f"{ENV_CONTROL_EVERY}={raw}: must be >= 1")
    return value


@dataclass(frozen=True)
class Acknowledgement:
    """One worker's marker as the tuner reads it."""

    marker: str
    state: str
    config_hash: str | None
    seq: int | None
    reason: str


def read_acknowledgements(marker_dir: Path) -> list[Acknowledgement]:
    """The control state of every worker marker in `marker_dir` (markers without one skipped)."""
    out: list[Acknowledgement] = []
    for path in sorted(marker_dir.glob("prefetch-tune-*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: read again on the next poll
        control = doc.get("control") if isinstance(doc, Mapping) else None
        if not isinstance(control, Mapping) or not doc.get("worker", True):
            continue
        seq = control.get("seq")
        out.append(
            Acknowledgement(
                marker=path.name,
                state=str(control.get("state")),
                config_hash=control.get("config_hash"),
                seq=seq if isinstance(seq, int) else None,
                reason=str(control.get("reason") or ""),
            )
        )
    return out


__all__ = [
    "DEFAULT_EVERY",
    "ENV_CONTROL",
    "ENV_CONTROL_EVERY",
    "Acknowledgement",
    "ControlChannel",
    "ControlState",
    "config_hash",
    "every_from_env",
    "parse_control_text",
    "read_acknowledgements",
    "refusal",
    "watch",
    "write_control",
]
