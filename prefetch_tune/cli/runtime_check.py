"""`prefetch-tune runtime-check`: which weight-prefetch runtime a vLLM environment will use."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from prefetch_tune.cli.common import JsonOpt, err_console, fail_on_errors
from prefetch_tune.errors import PrefetchTuneError
from prefetch_tune.runtime.check import RuntimeCheck, check_runtime


@fail_on_errors
def runtime_check(
    python: Annotated[
        str | None,
        typer.Option(
            "--python",
            help="Python executable of the vLLM environment to check (default: this one).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the probe (imports vLLM).")
    ] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Check vLLM / vLLM-Ascend versions, native or plugin prefetch, entry point, hook points."""
    report = check_runtime(python, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    if not report.ready:
        raise PrefetchTuneError(f"{report.python}: not ready: {'; '.join(report.problems)}")


def render(report: RuntimeCheck) -> None:
    table = Table(title=f"prefetch runtime for {report.python}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("python", report.python_version or "?")
    for dist in ("vllm", "vllm-ascend", "torch", "torch-npu", "prefetch-tune"):
        table.add_row(dist, report.versions.get(dist) or "[red]not installed[/]")
    colour = {"native": "green", "plugin": "green"}.get(report.verdict, "red")
    table.add_row("runtime", f"[{colour}]{report.verdict}[/]: {report.reason}")
    table.add_row("entry point", report.entry_point or "not visible")
    for hook in report.hooks if report.verdict == "plugin" else ():
        mark = "[green]ok[/]" if hook.ok else f"[red]missing[/] {hook.detail}"
        table.add_row(f"hook {hook.name}", f"{hook.target}: {mark}")
    for key, value in report.env.items():
        table.add_row(f"env {key}", value)
    err_console.print(table)
    for note in report.notes:
        err_console.print(f"note: {note}")
    if report.ready:
        err_console.print("[green]ready[/]")
