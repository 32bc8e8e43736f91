"""`search` options whose defaults or optional dependencies the rest of the suite takes for granted:
the default cap, and the GP sampler (torch + scipy) running a real search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from typer.testing import CliRunner

from prefetch_tune.cli import app

MODEL = ("--model", "qwen3-32b", "--tp", "4", "--max-num-seqs", "72")


def _search(results: Path, *extra: str) -> dict[str, Any]:
    r = CliRunner().invoke(app, ["search", *MODEL, "--results-dir", str(results), *extra])
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    (path,) = results.glob("*.json")
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_default_cap_is_vllm_ascends_18_mib(tmp_path: Path) -> None:
    # vLLM-Ascend's MAX_PREFETCH_WEIGHT_SIZE is 18 MiB; `search` without --cap-mib plans with it.
    doc = _search(tmp_path / "default", "--trials", "3")
    assert doc["cap_mib"] == 18.0
    doc = _search(tmp_path / "eight", "--trials", "3", "--cap-mib", "8")
    assert doc["cap_mib"] == 8.0


@pytest.mark.torch
@pytest.mark.slow
def test_gp_sampler_runs_a_real_search(tmp_path: Path) -> None:
    # Needs torch (CPU build) and scipy; .ci/run installs both, so this runs in CI.
    pytest.importorskip("torch")
    pytest.importorskip("scipy")
    trials = 14  # GPSampler draws its first 10 at random, then fits a Gaussian process
    doc = _search(tmp_path, "--sampler", "gp", "--trials", str(trials))
    assert doc["study"]["sampler"] == "gp"
    (journal,) = (tmp_path / "studies").glob("*.journal")
    storage = JournalStorage(JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) >= trials
    # The GP-proposed trials (after the random start) are new points, not a stuck repeat.
    later = {tuple(sorted(t.params.items())) for t in done[10:trials]}
    assert len(later) >= 2
    assert doc["winner"]["weight_prefetch_config"] is not None
