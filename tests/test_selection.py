"""Winner selection: the rules any selection must keep, and the race's statistics.

Off wins unless a candidate's lower bound of gain over off is above zero; unstable, incomplete
or failed re-measurements are rejected (seeded draws and the sim's seeded noise). `Truth`
returns a fixed true objective per config with seeded multiplicative normal noise, like
the sim's `--noise` (one draw per run), so each property is checked against the truth.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import threading
from pathlib import Path

import pytest

from prefetch_tune.backends.base import Backend, Metrics, OperatingPoint, get_backend
from prefetch_tune.errors import BackendError
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.search.selection import (
    Candidate,
    choose_winner,
    gain_interval,
    interval,
    judge,
    measured_noise,
    race,
    remeasure,
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


# ---- the rules any selection keeps (seeded draws and the sim's seeded noise)

POINT8 = OperatingPoint(load_model("qwen3-32b", "w8a8"), Layout(tp=4), max_num_seqs=8)
PROMPTS = float(POINT8.num_prompts)


def _settings(tmp_path: Path, repeats: int = 3) -> SearchSettings:
    """Rules of the re-measurements given (`repeats` of them), as after a race."""
    return SearchSettings(results_dir=tmp_path, repeats=repeats)


def _cand(label: str, values: list[float], total_bytes: int = 0) -> Candidate:
    """A candidate whose runs completed every prompt and measured `values`."""
    cfg = PrefetchConfig.off() if label == "off" else PrefetchConfig.default()
    cand = Candidate(label, cfg, label, total_bytes)
    cand.values = list(values)
    cand.rounds = list(range(1, len(values) + 1))  # run i pairs with off's run i
    cand.runs = [
        {"output_throughput": v, "completed": PROMPTS, "failed": 0.0, "num_prompts": PROMPTS}
        for v in values
    ]
    return cand


def _noisy(rng: random.Random, true: float, rel_sigma: float, n: int) -> list[float]:
    return [true * (1 + rng.gauss(0, rel_sigma)) for _ in range(n)]


def test_a_gain_inside_the_noise_falls_back_to_off(tmp_path: Path) -> None:
    # The finalist's median is 4% above off's, but its paired gains (9%, 1%, 2%) scatter too
    # much for three pairs: the interval reaches below zero and the winner must be off.
    off = _cand("off", [98.0, 100.0, 102.0])
    fin = _cand("finalist", [107.0, 101.0, 104.0], total_bytes=1 << 20)
    settings = _settings(tmp_path)
    iv = interval(fin, off, minimize=False)
    assert iv.estimate > 3 and iv.low < 0 and not iv.significant
    winner, notes = choose_winner([off, fin], POINT8, settings)
    assert winner is off
    assert any("lower bound of gain over off" in n for n in notes), notes


def test_a_gain_beyond_the_noise_wins(tmp_path: Path) -> None:
    off = _cand("off", [99.0, 100.0, 101.0])
    fin = _cand("finalist", [109.0, 110.0, 111.0], total_bytes=1 << 20)
    winner, notes = choose_winner([off, fin], POINT8, _settings(tmp_path))
    assert winner is fin, notes
    assert interval(fin, off, minimize=False).significant


@pytest.mark.parametrize("seed", range(40))
def test_over_seeded_noise_the_winner_is_off_unless_significant(seed: int, tmp_path: Path) -> None:
    # A true 2% gain under 3% run-to-run noise: sometimes significant, mostly not.
    rng = random.Random(seed)
    settings = _settings(tmp_path, repeats=5)
    off = _cand("off", _noisy(rng, 1000.0, 0.03, 5))
    fin = _cand("finalist", _noisy(rng, 1020.0, 0.03, 5), total_bytes=8 << 20)
    winner, _ = choose_winner([off, fin], POINT8, settings)
    for c in (off, fin):
        assert not c.rejected, c.rejected  # 3% noise is stable (MAD well below 10%)
    if winner is fin:
        assert interval(fin, off, minimize=False).significant
    else:
        assert winner is off and not interval(fin, off, minimize=False).significant


def test_seeded_noise_exercises_the_off_fallback() -> None:
    """The seeds above do include finalists that measure better yet are not significant (so
    the parametrized test above checks the fallback, not only easy cases)."""
    fallbacks = 0
    for seed in range(40):
        rng = random.Random(seed)
        off = _cand("off", _noisy(rng, 1000.0, 0.03, 5))
        fin = _cand("finalist", _noisy(rng, 1020.0, 0.03, 5))
        iv = interval(fin, off, False)
        if iv.estimate > 1 and not iv.significant:
            fallbacks += 1
    assert fallbacks >= 5


def test_unstable_runs_are_rejected(tmp_path: Path) -> None:
    shaky = _cand("finalist", [60.0, 100.0, 140.0])  # relative MAD 40% > max_rel_mad 10%
    judge(shaky, POINT8, _settings(tmp_path))
    assert shaky.rejected.startswith("unstable"), shaky.rejected
    steady = _cand("finalist", [98.0, 100.0, 102.0])
    judge(steady, POINT8, _settings(tmp_path))
    assert steady.rejected == ""


def test_an_unstable_finalist_cannot_win(tmp_path: Path) -> None:
    # Its median is far ahead, but the runs scatter by 40%: rejected, so off wins.
    off = _cand("off", [99.0, 100.0, 101.0])
    shaky = _cand("finalist", [150.0, 250.0, 350.0], total_bytes=1 << 20)
    winner, _ = choose_winner([off, shaky], POINT8, _settings(tmp_path))
    assert shaky.rejected.startswith("unstable")
    assert winner is off


def test_incomplete_runs_are_rejected(tmp_path: Path) -> None:
    few = _cand("finalist", [100.0, 101.0])  # 2 of 3 repeats
    judge(few, POINT8, _settings(tmp_path))
    assert few.rejected == "incomplete re-measurement"
    dropped = _cand("finalist", [100.0, 101.0, 102.0])
    dropped.runs[1] = {**dropped.runs[1], "completed": PROMPTS - 1}
    judge(dropped, POINT8, _settings(tmp_path))
    assert dropped.rejected.startswith("incomplete benchmark"), dropped.rejected
    failed = _cand("finalist", [100.0, 101.0, 102.0])
    failed.runs[2] = {**failed.runs[2], "failed": 1.0}
    judge(failed, POINT8, _settings(tmp_path))
    assert failed.rejected.startswith("incomplete benchmark"), failed.rejected


class _FailsSecondRun(Backend):
    """Delegates to the sim but fails the second repeat of every non-off config."""

    name = "sim-failing"
    measured = False

    def __init__(self) -> None:
        self.sim = get_backend("sim", noise_pct=2.0, seed=3)

    def evaluate(self, config: PrefetchConfig, point: OperatingPoint, repeat: int = 0) -> Metrics:
        if repeat == 2 and config != PrefetchConfig.off():
            raise BackendError("vllm bench serve exited 1")
        return self.sim.evaluate(config, point, repeat)


def test_a_failed_repeat_rejects_the_candidate_and_off_wins(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    off = Candidate("off", PrefetchConfig.off(), "off", 0)
    fin = Candidate("default", PrefetchConfig.default(), "default", 1 << 20)
    remeasure([off, fin], POINT8, _FailsSecondRun(), settings, Progress(), threading.Event())
    assert fin.rejected.startswith("run 2 failed"), fin.rejected
    winner, _ = choose_winner([off, fin], POINT8, settings)
    assert winner is off


@pytest.mark.parametrize("seed", range(6))
def test_sim_noise_re_measurements_follow_the_rules(seed: int, tmp_path: Path) -> None:
    # The sim backend with seeded noise: whatever the draw, a winner other than off beats a
    # usable off significantly, and a rejected candidate never wins.
    settings = _settings(tmp_path, repeats=3)
    backend = get_backend("sim", noise_pct=8.0, seed=seed)
    off = Candidate("off", PrefetchConfig.off(), "off", 0)
    fin = Candidate("default", PrefetchConfig.default(), "default", 1 << 20)
    remeasure([off, fin], POINT8, backend, settings, Progress(), threading.Event())
    winner, _ = choose_winner([off, fin], POINT8, settings)
    assert not winner.rejected or winner is off
    if winner is fin and not off.rejected:
        assert interval(fin, off, settings.minimize).significant
    for c in (off, fin):
        rel = c.mad / abs(c.median)
        assert (rel > settings.max_rel_mad) == c.rejected.startswith("unstable"), (rel, c.rejected)
