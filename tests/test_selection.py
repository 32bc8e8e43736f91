"""The selection race's statistics, on a backend whose true values are known exactly.

`Truth` returns a fixed true objective per config with seeded multiplicative normal noise, like
the sim's `--noise` (one draw per run), so each property is checked against the truth.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import threading
from pathlib import Path

import pytest

from prefetch_tune.backends.base import Metrics, OperatingPoint
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.search.selection import (
    Candidate,
    choose_winner,
    gain_interval,
    interval,
    measured_noise,
    race,
)
from prefetch_tune.search.settings import Progress, SearchSettings

POINT = OperatingPoint(
    model=load_model("qwen3-32b", "w8a8"), layout=Layout(tp=4, dp=1, ep=False), max_num_seqs=72
)
CONFIGS = {
    "off": PrefetchConfig.off(),
    "default": PrefetchConfig.default(),
    "cand": PrefetchConfig.make(True, {"mlp.gate_up": 0.2}),
}


class Truth:
    """True objective per candidate label, seeded normal noise of `noise_pct` per run."""

    name = "truth"
    measured = False

    def __init__(self, truth: dict[str, float], noise_pct: float, seed: int) -> None:
        self.truth, self.noise_pct, self.seed = truth, noise_pct, seed
        self.runs = 0

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        label = next(k for k, c in CONFIGS.items() if c == config)
        digest = hashlib.sha256(f"{self.seed}|{label}|{repeat}".encode()).digest()
        draw = random.Random(digest).gauss(0.0, self.noise_pct / 100)
        self.runs += 1
        return {"output_throughput": self.truth[label] * (1 + draw), "completed": point.num_prompts}


def run_race(
    truth: dict[str, float], seed: int, noise_pct: float = 1.0, **kw: int
) -> tuple[Candidate, list[Candidate], Truth]:
    cands = [Candidate(k, CONFIGS[k], k, i) for i, k in enumerate(truth)]
    backend = Truth(truth, noise_pct, seed)
    settings = SearchSettings(results_dir=Path("unused"), **kw)  # type: ignore[arg-type]
    race(cands, POINT, backend, settings, Progress(), threading.Event())
    winner, _ = choose_winner(cands, POINT, settings)
    return winner, cands, backend


def test_interval_shrinks_with_repeats() -> None:
    widths: dict[int, list[float]] = {n: [] for n in (3, 6, 12, 24, 48)}
    for seed in range(20):
        rng = random.Random(seed)
        gains = [2.0 + rng.gauss(0, 1.4) for _ in range(48)]
        for n in widths:
            iv = gain_interval(gains[:n])
            assert iv.low < statistics.fmean(gains[:n]) < iv.high
            widths[n].append(iv.high - iv.low)
    medians = [statistics.median(w) for w in widths.values()]
    assert medians == sorted(medians, reverse=True), medians
    # Student-t: width ~ t(n-1) / sqrt(n); from 12 to 48 runs it halves (t shrinks a bit too).
    assert medians[-1] < 0.55 * medians[2], medians


def test_race_intervals_shrink_with_more_rounds() -> None:
    truth = {"off": 100.0, "default": 100.5, "cand": 100.8}
    widths = {}
    for rounds in (4, 16):
        ws = []
        for seed in range(10):
            _, cands, _ = run_race(truth, seed, repeats=rounds, max_repeats=rounds)
            iv = interval(cands[2], cands[0], False)
            assert iv.n == rounds
            ws.append(iv.high - iv.low)
        widths[rounds] = statistics.median(ws)
    assert widths[16] < 0.6 * widths[4], widths


def test_two_percent_better_candidate_beats_off_at_one_percent_noise() -> None:
    truth = {"off": 100.0, "default": 100.0, "cand": 102.0}
    wins = sum(run_race(truth, seed)[0].label == "cand" for seed in range(40))
    assert wins >= 38, f"chosen in {wins} of 40 runs"


def test_candidate_equal_to_off_is_rarely_significant() -> None:
    truth = {"off": 100.0, "default": 100.0, "cand": 100.0}
    significant = 0
    off_won = 0
    for seed in range(40):
        winner, cands, _ = run_race(truth, seed)
        significant += interval(cands[2], cands[0], False).significant
        off_won += winner.label == "off"
    assert significant <= 4, f"declared significant in {significant} of 40 runs"
    assert off_won >= 32, f"off won {off_won} of 40 runs (two candidates equal to off)"


def test_default_stays_unless_beaten_beyond_the_noise() -> None:
    truth = {"off": 100.0, "default": 102.0, "cand": 102.1}
    winners = [run_race(truth, seed)[0].label for seed in range(20)]
    assert winners.count("default") >= 18, winners


def test_a_separated_race_stops_early_and_costs_less() -> None:
    truth = {"off": 100.0, "default": 90.0, "cand": 110.0}
    winner, cands, backend = run_race(truth, 0, repeats=3, max_repeats=12)
    assert winner.label == "cand"
    assert cands[1].dropped  # default's interval lay below cand's
    assert backend.runs < 3 * 12
    assert len(cands[2].values) < 12


def test_noise_is_measured_from_off_and_default_runs() -> None:
    for noise in (0.5, 2.0):
        _, cands, _ = run_race(
            {"off": 100.0, "default": 100.0, "cand": 100.0}, 1, noise, repeats=30, max_repeats=30
        )
        got = measured_noise(cands[:2])
        assert got["runs"] == 60
        assert got["pct"] == pytest.approx(noise, rel=0.25)
