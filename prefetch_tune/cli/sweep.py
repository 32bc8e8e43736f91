"""`prefetch-tune sweep PLAN.toml`: re-measure stored winners and fail on a regression."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import optuna
import typer
from rich.table import Table

from prefetch_tune.cli.common import err_console, fail_on_errors
from prefetch_tune.regress.outcomes import SweepReport
from prefetch_tune.regress.outputs import check_output_path, rows, write_outputs
from prefetch_tune.regress.sweep import SweepOptions, ensure_backend, run_sweep
from prefetch_tune.regress.sweep_plan import load_plan
from prefetch_tune.search.settings import Progress


class _Messages(Progress):
    def message(self, text: str) -> None:
        err_console.print(text, markup=False, highlight=False)


_STYLE = {"pass": "green", "fail": "red", "missing": "yellow", "error": "red"}


@fail_on_errors
def sweep(
    plan: Annotated[
        Path,
        typer.Argument(
            help="Sweep plan TOML: a point table per operating point, or every_stored_result = true."
        ),
    ],
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend", help="Re-measure with this backend (default: each stored result's own)."
        ),
    ] = None,
    results_dir: Annotated[
        Path, typer.Option("--results-dir", help="Where search wrote its results.")
    ] = Path("results"),
    junit: Annotated[
        Path | None, typer.Option("--junit", help="Write JUnit XML here (one testcase per point).")
    ] = None,
    markdown: Annotated[
        Path | None,
        typer.Option(
            "--markdown", help="Write a Markdown summary here (e.g. for $GITHUB_STEP_SUMMARY)."
        ),
    ] = None,
    csv: Annotated[
        Path | None, typer.Option("--csv", help="Write one CSV row per point here.")
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help="Allowed drop of the winner's objective in percent (the noise band when wider; default: the plan's, else 2).",
        ),
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            "--repeats",
            help="Re-measurements per config (default: the plan's, else the stored result's).",
        ),
    ] = None,
    allow_missing: Annotated[
        bool,
        typer.Option("--allow-missing", help="A point without a stored result is not a failure."),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object per point (the CSV's columns) on stdout."
        ),
    ] = False,
) -> None:
    """Re-measure stored winners, off and default; exit 1 on a regression or a missing point."""
    sweep_plan = load_plan(plan)
    for path, flag in ((junit, "--junit"), (markdown, "--markdown"), (csv, "--csv")):
        if path is not None:
            check_output_path(path, flag)
    opts = SweepOptions(
        results_dir=results_dir,
        backend=backend,
        tolerance=tolerance,
        repeats=repeats,
        allow_missing=allow_missing,
    )
    if backend is not None:
        ensure_backend(backend)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report = run_sweep(sweep_plan, opts, _Messages())
    write_outputs(report, junit, markdown, csv)
    _print(report)
    if as_json:
        data = sorted(rows(report), key=lambda r: (r["max_num_seqs"] or 0, r["point"]))
        typer.echo(json.dumps(data, indent=2))
    if not report.ok:
        raise typer.Exit(1)


def _print(report: SweepReport) -> None:
    label = " (SIMULATED)" if report.simulated else ""
    table = Table(title=f"prefetch-tune sweep{label}: tolerance {report.tolerance:g}%")
    for col in ("status", "point", "label", "metric", "stored", "measured", "change", "detail"):
        table.add_column(col)
    for o in report.outcomes:
        main = next((c for c in o.checks if c.name == "winner vs stored"), None)
        table.add_row(
            f"[{_STYLE[o.status]}]{o.status}[/]",
            o.name,
            o.label,
            o.metric or "-",
            "-" if main is None or main.stored is None else f"{main.stored:,.2f}",
            "-" if main is None or main.measured is None else f"{main.measured:,.2f}",
            "-" if main is None or main.pct is None else f"{main.pct:+.2f}%",
            o.summary(),
        )
    err_console.print(table)
    counts = report.counts()
    err_console.print(
        f"{counts['pass']} pass, {counts['fail']} regressed, {counts['missing']} "
        f"missing, {counts['error']} errors"
    )
