"""The command line: one small module per command; each parses, calls the library, exits."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from prefetch_tune import __version__
from prefetch_tune.cli.apply import apply
from prefetch_tune.cli.common import STATE
from prefetch_tune.cli.models_cmd import models
from prefetch_tune.cli.plan import plan
from prefetch_tune.cli.profile_cmd import profile
from prefetch_tune.cli.report import report
from prefetch_tune.cli.runtime_check import runtime_check
from prefetch_tune.cli.search import search
from prefetch_tune.cli.show import show
from prefetch_tune.cli.simulate import simulate
from prefetch_tune.cli.sweep import sweep

app = typer.Typer(
    name="prefetch-tune",
    help="Find, apply and re-check vLLM-Ascend weight-prefetch ratios.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefetch-tune {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True)
    ] = None,
) -> None:
    """prefetch-tune: search, apply and re-check weight_prefetch_config per model and concurrency."""
    STATE["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)


app.command("plan")(plan)
app.command("apply")(apply)
app.command("models")(models)
app.command("simulate")(simulate)
app.command("search")(search)
app.command("show")(show)
app.command("profile")(profile)
app.command("sweep")(sweep)
app.command("report")(report)
app.command("runtime-check")(runtime_check)


def main() -> None:
    app(prog_name="prefetch-tune")
