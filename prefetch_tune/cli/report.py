"""`prefetch-tune report`: a self-contained HTML report and PNGs of the stored results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import optuna
import typer

from prefetch_tune.cli.common import err_console, fail_on_errors
from prefetch_tune.errors import ConfigError
from prefetch_tune.paths import ensure_output_dir
from prefetch_tune.regress.report import build_report, check_extras


@fail_on_errors
def report(
    results_dir: Annotated[
        Path, typer.Option("--results-dir", help="Where search wrote its results and studies.")
    ] = Path("results"),
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory for report.html and png/ (created if missing)."),
    ] = Path("report"),
) -> None:
    """Write an HTML report (opens offline) and PNGs: histories, importances, slices, trends."""
    check_extras()
    if not results_dir.is_dir():  # before --out is created
        raise ConfigError(f"--results-dir {results_dir}: no such directory")
    ensure_output_dir(out, "--out")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    written = build_report(results_dir, out)
    for note in written.notes:
        err_console.print(f"note: {note}", markup=False)
    err_console.print(f"{written.entries} result(s), {len(written.pngs)} PNG(s) in {out / 'png'}")
    typer.echo(str(written.html))
