"""The search space: live knobs only, bounded where the cap makes them flat, and sampling
zones that reach exact off and exact cap."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from prefetch_tune.backends.base import OperatingPoint
from prefetch_tune.models import Layout, load_model
from prefetch_tune.prefetch import PrefetchConfig
from prefetch_tune.search.space import SearchSpace, build_space


@pytest.fixture
def space() -> SearchSpace:
    return build_space(OperatingPoint(load_model("qwen3-32b"), Layout(tp=4), 72))


def test_live_knobs_and_bounds(space: SearchSpace) -> None:
    # dense model: no moe knob; gate_up 62.5 MiB and down 31.25 MiB go flat at the 18 MiB cap
    assert space.knobs == ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
    assert space.bound("mlp.gate_up") == pytest.approx(18 / 62.5)
    assert space.bound("mlp.down") == pytest.approx(18 / 31.25)
    assert space.bound("attn.qkv") == 1.0


def test_zones_map_to_exact_off_and_exact_cap(space: SearchSpace) -> None:
    k = "mlp.gate_up"
    assert space.low(k) < 0 < space.bound(k) < space.high(k)
    assert space.ratio(k, space.low(k)) == 0.0
    assert space.ratio(k, -1e-9) == 0.0
    assert space.ratio(k, space.high(k)) == space.bound(k)
    assert space.ratio(k, 0.1) == 0.1
    everything_off = {kn: space.low(kn) for kn in space.knobs}
    assert space.config(everything_off) == PrefetchConfig.off()
    at_cap = space.config({**everything_off, k: space.high(k)})
    assert space.effective_mib(at_cap)[k] == pytest.approx(18.0)


def test_key_is_effective_bytes(space: SearchSpace) -> None:
    a = space.config({"mlp.gate_up": 0.3, "mlp.down": 0.1})
    b = space.config({"mlp.gate_up": 0.9, "mlp.down": 0.1})  # both at the 18 MiB cap
    c = space.config({"mlp.gate_up": 0.2, "mlp.down": 0.1})
    assert space.key(a) == space.key(b) != space.key(c)
    assert space.key(PrefetchConfig.off()) == "off"


def test_trials_table_holds_ratios_in_effect(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prefetch_tune.cli import app

    r = CliRunner().invoke(
        app,
        [
            "search",
            "-m",
            "qwen3-32b",
            "--tp",
            "4",
            "--max-num-seqs",
            "72",
            "--trials",
            "20",
            "--results-dir",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.stderr
    (csv,) = (tmp_path / "trials").glob("*.csv")
    table = pd.read_csv(csv)
    ratios = table[[c for c in table.columns if c.startswith("ratio.")]]
    assert (ratios.fillna(0) >= 0).all().all()
    assert (ratios["ratio.mlp.gate_up"].dropna() <= 18 / 62.5 + 1e-12).all()
