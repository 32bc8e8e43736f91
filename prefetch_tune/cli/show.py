"""`prefetch-tune show`: the stored results, one row per result file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from prefetch_tune.cli.common import JsonOpt, err_console, fail_on_errors
from prefetch_tune.errors import ConfigError
from prefetch_tune.summaries import dashboard_hint, result_rows

COLUMNS = (
    "model",
    "layout",
    "hardware",
    "backend",
    "semantics",
    "max-num-seqs",
    "winner",
    "MiB/layer",
    "objective",
    "vs off",
    "file",
)


def _cells(row: dict[str, Any]) -> list[str]:
    if "error" in row:
        return ["[red]unreadable[/]", "", "", "", "", "", "", "", row["error"], "", row["file"]]
    lay = row["layout"]
    pct = row["vs_off_pct"]
    ratios = ", ".join(f"{k}={v:g}" for k, v in row["winner_ratios"].items())
    return [
        f"{row['model']} {row['quant']}",
        f"tp{lay['tp']} dp{lay['dp']}" + (" ep" if lay["ep"] else ""),
        str(row["hardware"]),
        row["backend"] + (" (SIMULATED)" if row["simulated"] else ""),
        row["semantics"],
        str(row["max_num_seqs"]),
        "off" if row["winner_is_off"] else ratios,
        f"{row['winner_total_mib']:.1f}",
        f"{row['objective']} {row['objective_median'] or 0:,.2f}",
        "-" if pct is None else f"{pct:+.2f}%",
        Path(row["file"]).name,
    ]


@fail_on_errors
def show(
    results_dir: Annotated[
        Path, typer.Option("--results-dir", help="Where search wrote its results.")
    ] = Path("results"),
    as_json: JsonOpt = False,
) -> None:
    """Show the stored results (simulated ones are labelled), sorted by max-num-seqs."""
    from rich.table import Table

    if not results_dir.is_dir():
        raise ConfigError(f"--results-dir {results_dir}: no such directory")
    rows = result_rows(results_dir)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"stored results in {results_dir}")
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*_cells(row))
    err_console.print(table)
    if not rows:
        err_console.print(f"no result files in {results_dir}")
    for line in dashboard_hint([r for r in rows if "error" not in r]):
        err_console.print(line, markup=False, highlight=False)
