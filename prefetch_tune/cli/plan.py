"""`prefetch-tune plan`: what the runtime prefetches in one decoder layer, and why."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from prefetch_tune.cli.common import (
    CapOpt,
    ConfigJsonOpt,
    DpOpt,
    EpOpt,
    JsonOpt,
    ModelOpt,
    QuantOpt,
    SemanticsOpt,
    SeqParOpt,
    SetOpt,
    TpOpt,
    err_console,
    fail_on_errors,
    positive,
    resolve_config,
    resolve_model,
    resolve_options,
    resolve_semantics,
)
from prefetch_tune.models import MiB
from prefetch_tune.runtime.plan import DEFAULT_CAP_MIB, LayerPlan, plan_layer


@fail_on_errors
def plan(
    model: ModelOpt,
    quant: QuantOpt = None,
    tp: TpOpt = 1,
    dp: DpOpt = 1,
    ep: EpOpt = False,
    max_num_seqs: Annotated[
        int, typer.Option("--max-num-seqs", help="Decode batch = tokens per forward.")
    ] = 256,
    tokens: Annotated[
        int | None,
        typer.Option("--tokens", help="Tokens in the forward (default: --max-num-seqs)."),
    ] = None,
    sets: SetOpt = None,
    config_json: ConfigJsonOpt = None,
    semantics: SemanticsOpt = "plugin",
    sequence_parallel: SeqParOpt = False,
    cap_mib: CapOpt = DEFAULT_CAP_MIB,
    as_json: JsonOpt = False,
) -> None:
    """Show the prefetch operations of one decoder layer: bytes, caps, start/join ops, dead knobs."""
    spec, layout = resolve_model(model, quant, tp, dp, ep)
    positive(max_num_seqs, "--max-num-seqs")
    n_tokens = positive(tokens, "--tokens") if tokens is not None else max_num_seqs
    layer_plan = plan_layer(
        spec,
        layout,
        resolve_config(sets, config_json),
        n_tokens,
        resolve_semantics(semantics),
        resolve_options(sequence_parallel, cap_mib),
    )
    if as_json:
        typer.echo(json.dumps(layer_plan.to_dict(), indent=2))
        return
    render(layer_plan)


def render(p: LayerPlan) -> None:
    title = (
        f"{p.model.name} {p.model.quant} {p.layout.label()}, {p.tokens} tokens/forward, "
        f"{p.semantics} semantics"
    )
    table = Table(title=title)
    for col in (
        "knob",
        "weight",
        "weight MiB",
        "ratio",
        "MiB",
        "capped",
        "start before",
        "join after",
        "fires",
        "why / note",
    ):
        table.add_column(col, justify="right" if "MiB" in col or col == "ratio" else "left")
    for op in p.ops:
        table.add_row(
            op.knob,
            op.weight,
            f"{op.weight_bytes / MiB:.2f}",
            f"{op.ratio:.4g}",
            f"{op.bytes / MiB:.2f}",
            "yes" if op.capped else "",
            op.start_before,
            op.join_after,
            "[green]yes[/]" if op.fires else "[red]no[/]",
            op.reason,
        )
    err_console.print(table)
    flat = Table(title="per knob")
    for col in ("knob", "flat above ratio", "dead because"):
        flat.add_column(col)
    for knob, ratio in p.flat_above.items():
        flat.add_row(knob, "never" if ratio is None else f"{ratio:.3f}", p.dead.get(knob, ""))
    err_console.print(flat)
    err_console.print(
        f"prefetched per layer: {p.bytes_per_layer / MiB:.2f} MiB; per decode step "
        f"({p.model.layers} layers): {p.bytes_per_step / MiB:.1f} MiB"
    )
