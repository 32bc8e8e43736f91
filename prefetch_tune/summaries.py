"""One summary row per stored result: what `show` prints as a table and `show --json` /
`search --json` print as data, built in one place so the two never disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefetch_tune.errors import ConfigError
from prefetch_tune.results import iter_results

# The runtime prefetches int(weight bytes x ratio); 1e-4 of the largest per-rank weight in the
# catalog (a bf16 TP1 gate_up, ~0.5 GB) is ~52 KiB, under the 256 KiB a benchmark can resolve
# (search.space.KEY_GRANULARITY), so 4 decimals tell apart every config the runtime can.
RATIO_DECIMALS = 4


def winner_ratios(winner: dict[str, Any]) -> dict[str, float]:
    """The winner's ratios of the knobs that prefetch something."""
    ratio = winner["weight_prefetch_config"].get("prefetch_ratio", {})
    return {
        f"{m}.{k}": round(float(v), RATIO_DECIMALS)
        for m, ks in ratio.items()
        for k, v in ks.items()
        if winner.get("effective_mib", {}).get(f"{m}.{k}")
    }


def result_row(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    w = doc["winner"]
    lay = doc["layout"]
    vs_off = doc.get("improvement", {}).get("vs_off", {})
    study = doc.get("study") or {}
    return {
        "file": str(path),
        "model": doc["model"]["name"],
        "quant": doc["model"]["quant"],
        "layout": dict(lay),
        "hardware": doc["hardware"],
        "backend": doc["backend"],
        "simulated": bool(doc["simulated"]),
        "semantics": doc["semantics"],
        "max_num_seqs": int(doc["max_num_seqs"]),
        "winner_is_off": bool(w.get("is_off")),
        "winner_ratios": {} if w.get("is_off") else winner_ratios(w),
        "winner_total_mib": float(w.get("total_effective_mib") or 0.0),
        "objective": doc["objective"]["metric"],
        "objective_median": w.get("objective_median"),
        "vs_off_pct": vs_off.get("pct"),
        "vs_off_significant": bool(vs_off.get("significant")),
        "additional_config": doc["additional_config"],
        "study_name": study.get("name"),
        "study_storage": study.get("storage"),
    }


def result_rows(results_dir: Path) -> list[dict[str, Any]]:
    """Rows sorted by point, then numerically by max-num-seqs; unreadable files as error rows."""
    rows: list[dict[str, Any]] = []
    for path, doc in iter_results(results_dir, include_aside=True):
        if isinstance(doc, ConfigError):
            rows.append({"file": str(path), "error": str(doc)})
        else:
            rows.append(result_row(path, doc))
    return sorted(rows, key=_order)


def _order(row: dict[str, Any]) -> tuple[Any, ...]:
    if "error" in row:
        return (1, "", 0, row["file"])
    stem = Path(row["file"]).stem.rsplit("-mns", 1)[0]
    return (0, stem, row["max_num_seqs"], row["file"])


def dashboard_hint(rows: list[dict[str, Any]]) -> list[str]:
    """How to open the rows' studies in optuna-dashboard (one command per distinct storage)."""
    storages = sorted({str(r["study_storage"]) for r in rows if r.get("study_storage")})
    lines = [f"optuna-dashboard {s}" for s in storages]
    if len(storages) > 1:
        lines.append(
            "(one dashboard for all points: search with one --storage for all of them, "
            "e.g. --storage sqlite:///results/studies.db, then optuna-dashboard on that URL)"
        )
    return lines
