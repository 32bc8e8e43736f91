"""The command line: one small module per command; each parses, calls the library, exits."""

from __future__ import annotations

import importlib
import logging
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from prefetch_tune import __version__
from prefetch_tune.cli.common import STATE

# name -> (module, function, one-line help). A command's module is imported only when that
# command runs (or shows its own --help): importing them all (optuna, pandas, rich tables) made
# `prefetch-tune --help` take 0.38 s. tests/test_cli_basic.py checks the help texts match.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "plan": ("plan", "plan", "What the runtime prefetches per decoder layer."),
    "apply": ("apply", "apply", "Turn ratios or a stored result into the --additional-config."),
    "models": ("models_cmd", "models", "The model catalog."),
    "simulate": ("simulate", "simulate", "The performance model's metrics for one config."),
    "search": ("search", "search", "Search the prefetch ratios per max-num-seqs."),
    "show": ("show", "show", "Show the stored results, sorted by max-num-seqs."),
    "profile": ("profile_cmd", "profile", "Read an Ascend profiler export and judge overlap."),
    "sweep": ("sweep", "sweep", "Re-measure stored winners; exit 1 on a regression."),
    "report": ("report", "report", "Write an HTML report and PNGs of the studies."),
    "runtime-check": ("runtime_check", "runtime_check", "Versions and hooks of a serving env."),
}


class LazyGroup(TyperGroup):
    """A click group that imports a command's module only when the command is looked up."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        module, func, _ = COMMANDS[cmd_name]
        fn = getattr(importlib.import_module(f"prefetch_tune.cli.{module}"), func)
        single = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
        single.command(cmd_name)(fn)
        return typer.main.get_command(single)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        # typer's rich help looks every command up (imports them all); click's plain one does not
        super(TyperGroup, self).format_help(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in COMMANDS.items()])


app = typer.Typer(
    name="prefetch-tune",
    help="Find, apply and re-check vLLM-Ascend weight-prefetch ratios.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    cls=LazyGroup,
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


def main() -> None:
    app(prog_name="prefetch-tune")
