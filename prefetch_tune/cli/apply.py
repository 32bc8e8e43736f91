"""`prefetch-tune apply`: a prefetch config as the `--additional-config` value vLLM takes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from prefetch_tune.cli.common import (
    SemanticsOpt,
    SetOpt,
    choice,
    fail_on_errors,
    resolve_semantics,
)
from prefetch_tune.errors import ConfigError
from prefetch_tune.prefetch import PrefetchConfig, emit, parse_set_options


@fail_on_errors
def apply(
    sets: SetOpt = None,
    disabled: Annotated[
        bool, typer.Option("--disabled", help="Emit prefetch switched off.")
    ] = False,
    merge_into: Annotated[
        str | None,
        typer.Option(
            "--merge-into", help="Your existing --additional-config JSON; its other keys are kept."
        ),
    ] = None,
    semantics: SemanticsOpt = "plugin",
    fmt: Annotated[
        str, typer.Option("--format", help="flag (--additional-config '<json>') or json.")
    ] = "flag",
) -> None:
    """Turn ratios into the --additional-config argument, merged into your existing one."""
    choice(fmt, ("flag", "json"), "--format")
    updates = parse_set_options(sets or [])
    if disabled and updates:
        raise ConfigError("--disabled and --set contradict each other; give one")
    if disabled:
        config = PrefetchConfig.off()
    elif updates:
        config = PrefetchConfig.make(enabled=True, ratios=updates)
    else:
        raise ConfigError("nothing to apply: give --set KNOB=RATIO (repeatable) or --disabled")
    emission = emit(config, resolve_semantics(semantics), merge_into)
    for note in emission.notes:
        print(f"note: {note}", file=sys.stderr)
    typer.echo(emission.flag if fmt == "flag" else emission.json)
