"""`prefetch-tune show`: the stored results, one row per result file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prefetch_tune.cli.common import err_console, fail_on_errors
from prefetch_tune.errors import ConfigError
from prefetch_tune.results import iter_results


@fail_on_errors
def show(
    results_dir: Annotated[
        Path, typer.Option("--results-dir", help="Where search wrote its results.")
    ] = Path("results"),
) -> None:
    """Show a table of the stored results (simulated ones are labelled)."""
    if not results_dir.is_dir():
        raise ConfigError(f"--results-dir {results_dir}: no such directory")
    table = Table(title=f"stored results in {results_dir}")
    for col in (
        "model",
        "layout",
        "hardware",
        "backend",
        "semantics",
        "max-num-seqs",
        "winner MiB/layer",
        "objective",
        "vs off",
        "file",
    ):
        table.add_column(col)
    rows = 0
    for path, doc in iter_results(results_dir, include_aside=True):
        rows += 1
        if isinstance(doc, ConfigError):
            table.add_row("[red]unreadable[/]", "", "", "", "", "", "", str(doc), "", path.name)
            continue
        w = doc["winner"]
        lay = doc["layout"]
        vs_off = doc.get("improvement", {}).get("vs_off", {})
        pct = vs_off.get("pct")
        backend = doc["backend"] + (" (SIMULATED)" if doc["simulated"] else "")
        table.add_row(
            f"{doc['model']['name']} {doc['model']['quant']}",
            f"tp{lay['tp']} dp{lay['dp']}" + (" ep" if lay["ep"] else ""),
            str(doc["hardware"]),
            backend,
            doc["semantics"],
            str(doc["max_num_seqs"]),
            "off" if w.get("is_off") else f"{w.get('total_effective_mib', 0):.1f}",
            f"{doc['objective']['metric']} {w.get('objective_median') or 0:,.2f}",
            "-" if pct is None else f"{pct:+.2f}%",
            path.name,
        )
    err_console.print(table)
    if rows == 0:
        err_console.print(f"no result files in {results_dir}")
