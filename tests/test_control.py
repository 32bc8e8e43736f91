"""The runtime's control channel: a running worker takes a new prefetch config from a file, says
so in its marker, keeps the old one on a bad file, and refuses the channel under graph capture."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.runtime import hooks, plugin
from prefetch_tune.runtime.control import (
    ENV_CONTROL,
    ENV_CONTROL_EVERY,
    ControlChannel,
    ControlState,
    config_hash,
    read_acknowledgements,
    watch,
    write_control,
)

HALF = PrefetchConfig.make(
    ratios={"attn.qkv": 0.5, "attn.o": 0.5, "mlp.gate_up": 0.5, "mlp.down": 0.5}
)


class Worker:
    """What the channel drives: a config that changes, and the acknowledgements it writes."""

    def __init__(self, config: PrefetchConfig) -> None:
        self.config = config
        self.acks: list[dict[str, Any]] = []

    def apply(self, config: PrefetchConfig) -> None:
        self.config = config

    def acknowledge(self, state: ControlState) -> None:
        self.acks.append(state.to_json_obj())


def channel(tmp_path: Path, every: int = 1, refused: str | None = None) -> tuple[Worker, Any]:
    worker = Worker(PrefetchConfig.default())
    ch = ControlChannel(
        tmp_path / "control.json",
        worker.config,
        worker.apply,
        worker.acknowledge,
        every=every,
        refused=refused,
    )
    return worker, ch


def test_a_changed_file_is_applied_at_a_forward_and_acknowledged(tmp_path: Path) -> None:
    worker, ch = channel(tmp_path, every=4)
    assert worker.acks[-1]["state"] == "waiting"
    assert worker.acks[-1]["config_hash"] == config_hash(PrefetchConfig.default())
    digest = write_control(tmp_path / "control.json", HALF, seq=1)
    for _ in range(3):
        ch.tick()
    assert worker.config == PrefetchConfig.default()  # not looked at before the 4th forward
    ch.tick()
    assert worker.config == HALF
    ack = worker.acks[-1]
    assert (ack["state"], ack["config_hash"], ack["seq"]) == ("applied", digest, 1)
    assert ack["applied_at_forward"] == 4
    acks = len(worker.acks)
    for _ in range(8):
        ch.tick()  # unchanged file: no new acknowledgement, no re-parse
    assert len(worker.acks) == acks


def test_the_same_config_rewritten_with_a_new_seq_is_acknowledged_again(tmp_path: Path) -> None:
    worker, ch = channel(tmp_path)
    write_control(tmp_path / "control.json", HALF, seq=1)
    ch.tick()
    write_control(tmp_path / "control.json", HALF, seq=2)
    ch.tick()
    assert [a["seq"] for a in worker.acks if a["state"] == "applied"] == [1, 2]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "not JSON"),
        (
            '{"weight_prefetch_config": {"enabled": true, "prefetch_ratio": {"mlp": {"up": 1}}}}',
            "up",
        ),
        (
            '{"weight_prefetch_config": {"enabled": true, "prefetch_ratio": {"attn": {"o": 2}}}}',
            "o",
        ),
        ('{"weight_prefetch_config": {"enabled": NaN}}', "NaN"),
        ('{"seq": "x", "weight_prefetch_config": {"enabled": false}}', "seq"),
    ],
)
def test_a_bad_file_leaves_the_old_config_running(tmp_path: Path, text: str, reason: str) -> None:
    worker, ch = channel(tmp_path)
    write_control(tmp_path / "control.json", HALF, seq=1)
    ch.tick()
    (tmp_path / "control.json").write_text(text)
    ch.tick()
    assert worker.config == HALF
    ack = worker.acks[-1]
    assert ack["config_hash"] == config_hash(HALF)
    assert ack["reason"].startswith(f"rejected, still running {config_hash(HALF)}")
    assert reason in ack["reason"]


def test_graph_mode_refuses_the_channel(tmp_path: Path) -> None:
    worker, ch = channel(tmp_path, refused="graph mode: frozen")
    write_control(tmp_path / "control.json", HALF, seq=1)
    for _ in range(16):
        ch.tick()
    assert worker.config == PrefetchConfig.default()
    assert worker.acks[-1]["state"] == "refused"
    assert "graph mode" in worker.acks[-1]["reason"]


def test_a_watch_thread_keeps_the_channel_live_without_forwards(tmp_path: Path) -> None:
    worker, ch = channel(tmp_path)
    stop = watch(ch, interval_s=0.01)
    try:
        write_control(tmp_path / "control.json", HALF, seq=1)
        deadline = time.monotonic() + 5
        while worker.config != HALF and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
    assert worker.config == HALF
    assert worker.acks[-1]["state"] == "applied" and worker.acks[-1]["forwards"] == 0


def test_acknowledgements_are_read_from_worker_markers_only(tmp_path: Path) -> None:
    def marker(pid: int, **doc: Any) -> None:
        (tmp_path / f"prefetch-tune-{pid}.json").write_text(json.dumps(doc))

    marker(1, worker=True, control={"state": "applied", "config_hash": "abc", "seq": 3})
    marker(2, worker=False, control={"state": "waiting", "config_hash": "x", "seq": None})
    marker(3, worker=True)  # a worker without the channel
    (tmp_path / "prefetch-tune-4.json").write_text("{torn")
    acks = read_acknowledgements(tmp_path)
    assert [(a.marker, a.state, a.config_hash, a.seq) for a in acks] == [
        ("prefetch-tune-1.json", "applied", "abc", 3)
    ]


# ------------------------------------------------------------- through the plugin's runtime

import test_plugin  # noqa: E402
from test_plugin import DENSE_HF, load, run, vllm_config  # noqa: E402

# The fake vLLM-Ascend's fixtures (and its autouse fresh-plugin fixture), shared with test_plugin.
ascend = test_plugin.ascend
torch_mod = test_plugin.torch_mod
clean_plugin = test_plugin.clean_plugin


def eager(config: SimpleNamespace, value: bool = True) -> SimpleNamespace:
    config.model_config.enforce_eager = value
    return config


def marker_doc(directory: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((directory / f"prefetch-tune-{os.getpid()}.json").read_text())
    return doc


def channel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment --screen gives a worker: markers, the control file, a look per forward."""
    monkeypatch.setenv(plugin.ENV_MARKER_DIR, str(tmp_path / "markers"))
    monkeypatch.setenv(ENV_CONTROL, str(tmp_path / "control.json"))
    monkeypatch.setenv(ENV_CONTROL_EVERY, "1")
    return tmp_path / "control.json"


@pytest.mark.torch
def test_a_running_worker_switches_config_between_forwards(
    ascend: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = channel_env(tmp_path, monkeypatch)
    model = load(ascend, eager(vllm_config(DENSE_HF)))
    assert marker_doc(tmp_path / "markers")["control"]["state"] == "waiting"
    run(model, 8)
    every_knob = {e.knob for e in ascend.recorder.starts()}
    assert every_knob == {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"}
    only_o = PrefetchConfig.make(ratios={"attn.o": 0.5, "mlp.gate_up": 0.0, "mlp.down": 0.0})
    digest = write_control(control, only_o, seq=1)
    run(model, 8)  # the forward that picks the file up still starts with the old config...
    ascend.recorder.clear()
    run(model, 8)  # ...and every forward after the acknowledgement runs the new one
    assert {e.knob for e in ascend.recorder.starts()} == {"attn.o"}
    doc = marker_doc(tmp_path / "markers")
    assert doc["control"]["config_hash"] == digest and doc["control"]["state"] == "applied"
    assert doc["config"] == only_o.to_json_obj()
    runtime = hooks.active()
    assert runtime is not None and runtime.pending == []
    write_control(control, PrefetchConfig.off(), seq=2)
    run(model, 8)
    ascend.recorder.clear()
    run(model, 8)
    assert ascend.recorder.events == []  # off: hooks stay, nothing is issued


@pytest.mark.torch
def test_the_plugin_refuses_the_channel_without_enforce_eager(
    ascend: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = channel_env(tmp_path, monkeypatch)
    model = load(ascend, eager(vllm_config(DENSE_HF), False))
    write_control(control, PrefetchConfig.off(), seq=1)
    run(model, 8)
    ascend.recorder.clear()
    run(model, 8)
    assert ascend.recorder.starts()  # still the start-up config
    doc = marker_doc(tmp_path / "markers")
    assert doc["control"]["state"] == "refused"
    assert "--enforce-eager" in doc["control"]["reason"]


def test_a_worker_whose_hooks_sleep_keeps_the_channel_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No vLLM-Ascend (a CPU build): no hooks, but the channel still answers from a thread."""
    control = tmp_path / "control.json"
    monkeypatch.setenv(plugin.ENV_MARKER_DIR, str(tmp_path / "markers"))
    monkeypatch.setenv(ENV_CONTROL, str(control))
    config = SimpleNamespace(model_config=SimpleNamespace(enforce_eager=True), additional_config={})
    assert plugin._asleep_channel(config)
    assert marker_doc(tmp_path / "markers")["control"]["state"] == "waiting"
    digest = write_control(control, HALF, seq=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        doc = marker_doc(tmp_path / "markers")
        if doc["control"]["config_hash"] == digest:
            break
        time.sleep(0.05)
    assert doc["control"]["state"] == "applied" and doc["control"]["seq"] == 1
    assert doc["config"] == HALF.to_json_obj()
    monkeypatch.delenv(ENV_CONTROL)
    assert not plugin._asleep_channel(config)
