"""`prefetch-tune runtime-check`: which weight-prefetch runtime a vLLM environment will use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prefetch_tune.cli.common import (
    EpOpt,
    JsonOpt,
    QuantOpt,
    TpOpt,
    err_console,
    fail_on_errors,
    resolve_model,
)
from prefetch_tune.errors import ConfigError, PrefetchTuneError
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
    wheel: Annotated[
        Path | None,
        typer.Option("--wheel", help="Check a vllm-ascend wheel or sdist statically (no import)."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Download vllm-ascend VERSION (cached) and check it."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="With --wheel/--version: readiness per knob."),
    ] = None,
    quant: QuantOpt = None,
    tp: TpOpt = 1,
    ep: EpOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Check vLLM / vLLM-Ascend versions, native or plugin prefetch, entry point, hook points.

    With --wheel or --version: resolve the hook points of that release's line statically."""
    if wheel is not None or version is not None:
        static_check(wheel, version, model, quant, tp, ep, as_json)
        return
    report = check_runtime(python, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    if not report.ready:
        raise PrefetchTuneError(f"{report.python}: not ready: {'; '.join(report.problems)}")


def static_check(
    wheel: Path | None,
    version: str | None,
    model: str | None,
    quant: str | None,
    tp: int,
    ep: bool,
    as_json: bool,
) -> None:
    from prefetch_tune.runtime.readiness import knob_readiness
    from prefetch_tune.runtime.static_check import check_archive, download

    if wheel is not None and version is not None:
        raise ConfigError("--wheel and --version: give one of them")
    path = wheel if wheel is not None else download(str(version))
    result = check_archive(path)
    knobs = None
    if model is not None:
        spec, layout = resolve_model(model, quant, tp, 1, ep)
        knobs = knob_readiness(spec, layout, result)
    if as_json:
        out = {
            "archive": result.path,
            "version": result.version,
            "line": result.line.name,
            "ready": result.ok,
            "hooks": [vars(c) for c in result.checks],
            "knobs": [vars(k) for k in knobs] if knobs is not None else None,
        }
        typer.echo(json.dumps(out, indent=2))
    else:
        table = Table(title=f"vllm-ascend {result.version} (line {result.line.name}), static")
        for col in ("hook", "target", "resolved"):
            table.add_column(col)
        for c in result.checks:
            table.add_row(
                c.hook, c.target, f"[green]ok[/] {c.detail}" if c.ok else f"[red]{c.detail}[/]"
            )
        err_console.print(table)
        for k in knobs or ():
            state = "ready" if k.ready else ("dead" if k.dead else "not ready")
            typer.echo(f"{k.knob}: {state}{': ' + k.reason if k.reason else ''}")
        if knobs is not None:
            live = [k.knob for k in knobs if k.ready]
            typer.echo(f"{len(live)} live knobs: {', '.join(live) or 'none'}")
    if not result.ok:
        raise PrefetchTuneError("not ready: " + "; ".join(result.failures()))
    err_console.print("[green]ready[/]")


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
