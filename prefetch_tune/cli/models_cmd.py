"""`prefetch-tune models`: the built-in catalog and the facts that decide weight bytes."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from prefetch_tune.cli.common import JsonOpt, err_console, fail_on_errors
from prefetch_tune.models import catalog_names, load_model


@fail_on_errors
def models(as_json: JsonOpt = False) -> None:
    """List the model catalog (layers, hidden, intermediate, heads, KV heads, experts)."""
    specs = [load_model(name) for name in catalog_names()]
    if as_json:
        typer.echo(json.dumps([s.summary() for s in specs], indent=2))
        return
    table = Table(title="model catalog (configs/models)")
    cols = (
        "name",
        "layers",
        "hidden",
        "intermediate",
        "heads",
        "kv heads",
        "head dim",
        "experts",
        "top-k",
        "expert interm.",
    )
    for col in cols:
        table.add_column(col, justify="left" if col == "name" else "right")
    for s in specs:
        table.add_row(
            s.name,
            str(s.layers),
            str(s.hidden),
            str(s.intermediate),
            str(s.heads),
            str(s.kv_heads),
            str(s.head_dim),
            str(s.experts or "-"),
            str(s.experts_per_token or "-"),
            str(s.moe_intermediate or "-"),
        )
    err_console.print(table)
