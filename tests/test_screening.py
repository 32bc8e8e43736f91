"""`search --screen` against the fake `vllm` (real processes, real HTTP, the real control channel
in every fake worker) and on the sim: one eager server for all trials, every worker runs a
config before it is benchmarked, graph mode refuses, the result says what was screened."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_vllm_backend import (  # noqa: F401  (fixtures)
    assert_nothing_left,
    fake_vllm_on_path,
    point,
    vllm_table,
)
from test_vllm_backend import token as token

from prefetch_tune.backends.base import OperatingPoint, Workload
from prefetch_tune.backends.sim import SimBackend, evaluate_point
from prefetch_tune.backends.vllm import VllmBackend
from prefetch_tune.backends.vllm_screen import WARMUP_PROMPT, VllmScreening
from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.runtime.control import config_hash
from prefetch_tune.search.screening import MODE_SCREENED, rank_correlation
from prefetch_tune.search.settings import SearchSettings
from prefetch_tune.search.tuner import search_point

HALF = PrefetchConfig.make(
    ratios={"attn.qkv": 0.5, "attn.o": 0.5, "mlp.gate_up": 0.5, "mlp.down": 0.5}
)


def screen_table(token: str, tmp_path: Path, lag: int = 0) -> dict[str, Any]:
    """A plugin-semantics fake (vLLM 0.25.1) whose four workers lag behind each other."""
    env = {
        "FAKE_VLLM_VERSION": "0.25.1",
        "FAKE_VLLM_CONTROL_LAG": str(lag),
        "FAKE_VLLM_REQUEST_LOG": str(tmp_path / "requests.jsonl"),
        "PREFETCH_TUNE_CONTROL_EVERY": "2",
    }
    return vllm_table(token, env=env)


def requests(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def bench_requests_stale(tmp_path: Path) -> int:
    """Benchmark requests that arrived while some worker still ran another config than the
    control file asked for."""
    return sum(
        1
        for r in requests(tmp_path)
        if WARMUP_PROMPT not in r["prompt"] and any(h != r["wanted"] for h in r["hashes"])
    )


@pytest.mark.slow
def test_every_worker_runs_a_config_before_it_is_benchmarked(
    tmp_path: Path, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = VllmBackend(
        vllm=screen_table(token, tmp_path, lag=3), python=sys.executable, results_dir=tmp_path
    )
    pt = point("plugin")
    session = backend.screening(pt)
    try:
        for config in (HALF, PrefetchConfig.off(), HALF, PrefetchConfig.default()):
            metrics = session.evaluate(config, pt)
            assert metrics["completed"] == pt.num_prompts
        assert session.starts == 1
        markers = sorted((session.markers).glob("prefetch-tune-*.json"))
        assert len(markers) == 4  # one per tp rank
        for path in markers:
            control = json.loads(path.read_text())["control"]
            assert control["config_hash"] == config_hash(PrefetchConfig.default())
            assert control["seq"] == 4 and control["state"] == "applied"
        assert any(WARMUP_PROMPT in r["prompt"] for r in requests(tmp_path))
        assert bench_requests_stale(tmp_path) == 0
        # The check can fail: without waiting for the acknowledgements, benchmarks run while
        # the lagging workers still run the previous config.
        monkeypatch.setattr(VllmScreening, "_await_workers", lambda self, server, digest: [])
        for config in (HALF, PrefetchConfig.off(), HALF):
            session.evaluate(config, pt)
        assert bench_requests_stale(tmp_path) > 0
    finally:
        session.close()
        backend.close()
    assert_nothing_left(token)


@pytest.mark.slow
def test_graph_mode_refuses_the_channel_and_says_why(
    tmp_path: Path, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("prefetch_tune.backends.vllm_screen.EAGER_FLAG", "--disable-log-stats")
    backend = VllmBackend(
        vllm=screen_table(token, tmp_path), python=sys.executable, results_dir=tmp_path
    )
    pt = point("plugin")
    session = backend.screening(pt)
    try:
        with pytest.raises(ConfigError, match=r"refuses: graph mode.*--enforce-eager"):
            session.evaluate(HALF, pt)
    finally:
        session.close()
        backend.close()
    assert_nothing_left(token)


def test_a_native_runtime_cannot_screen(tmp_path: Path, token: str) -> None:
    backend = VllmBackend(vllm=vllm_table(token), python=sys.executable, results_dir=tmp_path)
    session = backend.screening(point("native-0.23"))
    with pytest.raises(ConfigError, match="--screen: needs prefetch-tune's runtime"):
        session.evaluate(HALF, point("native-0.23"))


@pytest.mark.slow
def test_a_screened_search_starts_one_eager_server_for_all_trials(
    tmp_path: Path, token: str
) -> None:
    backend = VllmBackend(
        vllm=screen_table(token, tmp_path, lag=1), python=sys.executable, results_dir=tmp_path
    )
    settings = SearchSettings(
        results_dir=tmp_path, trials=30, repeats=2, screen=True, screen_every=10
    )
    pt = point("plugin")
    try:
        outcome = search_point(pt, backend, settings)
    finally:
        backend.close()
    assert_nothing_left(token)
    doc = outcome.result
    assert doc is not None
    screening = doc["screening"]
    assert screening["candidates_screened"] == 30
    assert screening["screening_server_starts"] == 1
    assert len(screening["drift_checks"]) == 3
    csv = outcome.trials_csv
    assert csv is not None and MODE_SCREENED in csv.read_text()
    assert bench_requests_stale(tmp_path) == 0


def test_sim_eager_mode_stretches_kernels_and_ranks_differently() -> None:
    pt = OperatingPoint(load_model("qwen3-32b"), Layout(tp=4), 8, workload=Workload())
    off_graph = evaluate_point(PrefetchConfig.off(), pt)[0]["mean_tpot_ms"]
    off_eager = evaluate_point(PrefetchConfig.off(), pt, eager=True)[0]["mean_tpot_ms"]
    assert off_eager > off_graph  # every kernel pays the host launch
    gain = {
        eager: evaluate_point(PrefetchConfig.default(), pt, eager=eager)[0]["output_throughput"]
        / evaluate_point(PrefetchConfig.off(), pt, eager=eager)[0]["output_throughput"]
        for eager in (False, True)
    }
    assert gain[True] != pytest.approx(gain[False], rel=1e-3)  # what eager cannot know


def test_sim_screened_search_records_screened_and_final(tmp_path: Path) -> None:
    pt = OperatingPoint(load_model("qwen3-32b"), Layout(tp=4), 72)
    settings = SearchSettings(results_dir=tmp_path, trials=12, screen=True, screen_every=4)
    outcome = search_point(pt, SimBackend(noise_pct=1.0, seed=3), settings)
    doc = outcome.result
    assert doc is not None and doc["simulated"] is True
    screening = doc["screening"]
    assert screening["candidates_screened"] == 12 and screening["screening_server_starts"] == 0
    assert [d["after_candidates"] for d in screening["drift_checks"]] == [0, 4, 8]
    assert screening["screening_runs"] == 12 + 2 * 3
    finals = {f["candidate"] for f in screening["finalists"]}
    assert {"off", "default"} <= finals
    assert screening["spearman_screened_vs_final"] is not None


def test_rank_correlation() -> None:
    assert rank_correlation([(1, 10), (2, 20), (3, 30)]) == pytest.approx(1.0)
    assert rank_correlation([(1, 30), (2, 20), (3, 10)]) == pytest.approx(-1.0)
    assert rank_correlation([(1, 1), (2, 2)]) is None
