"""`prefetch-tune simulate`: the performance model's metrics for one config (simulated)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from prefetch_tune.analysis.trace import write_trace
from prefetch_tune.backends.base import OperatingPoint, Workload
from prefetch_tune.backends.sim import SimBackend, simulate_step, step_mix
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
    resolve_config,
    resolve_model,
    resolve_options,
    resolve_semantics,
)
from prefetch_tune.errors import ConfigError
from prefetch_tune.hardware import load_hardware
from prefetch_tune.runtime.plan import DEFAULT_CAP_MIB

HardwareOpt = Annotated[
    str, typer.Option("--hardware", help="Built-in profile (atlas-a2, atlas-a3) or a .toml file.")
]
InputLenOpt = Annotated[int, typer.Option("--input-len", help="Prompt tokens per request.")]
OutputLenOpt = Annotated[int, typer.Option("--output-len", help="Generated tokens per request.")]
NoiseOpt = Annotated[
    float,
    typer.Option(
        "--noise", help="Seeded multiplicative noise on the metrics, in percent (default off)."
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for --noise.")]


@fail_on_errors
def simulate(
    model: ModelOpt,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", help="vLLM --max-num-seqs.")],
    quant: QuantOpt = None,
    tp: TpOpt = 1,
    dp: DpOpt = 1,
    ep: EpOpt = False,
    sets: SetOpt = None,
    config_json: ConfigJsonOpt = None,
    semantics: SemanticsOpt = "plugin",
    sequence_parallel: SeqParOpt = False,
    cap_mib: CapOpt = DEFAULT_CAP_MIB,
    hardware: HardwareOpt = "atlas-a2",
    input_len: InputLenOpt = 3500,
    output_len: OutputLenOpt = 1500,
    noise: NoiseOpt = 0.0,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Write the modelled decode step as a Chrome trace (trace_view.json layout).",
        ),
    ] = None,
) -> None:
    """Model one config at one operating point (SIMULATED numbers, not a measurement)."""
    spec, layout = resolve_model(model, quant, tp, dp, ep)
    point = OperatingPoint(
        model=spec,
        layout=layout,
        max_num_seqs=max_num_seqs,
        hardware=hardware,
        workload=Workload(input_len=input_len, output_len=output_len),
        semantics=resolve_semantics(semantics),
        options=resolve_options(sequence_parallel, cap_mib),
    )
    config = resolve_config(sets, config_json)
    metrics = SimBackend(noise_pct=noise, seed=seed).evaluate(config, point)
    if trace is not None:
        if trace.parent and not trace.parent.is_dir():
            raise ConfigError(f"--trace {trace}: directory {trace.parent} does not exist")
        mix = step_mix(point)
        step = simulate_step(
            config, point, load_hardware(hardware), mix.batch, mix.context, 0, with_events=True
        )
        try:
            write_trace(step, trace)
        except OSError as exc:
            raise ConfigError(f"--trace {trace}: cannot write ({exc.strerror})") from None
        err_console.print(f"simulated trace of one decode step written to {trace}")
    if as_json:
        doc = {
            "simulated": True,
            "backend": "sim",
            "point": point.describe(),
            "config": config.to_json_obj(),
            "metrics": metrics,
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    table = Table(
        title=f"SIMULATED: {spec.name} {spec.quant} {layout.label()} "
        f"max-num-seqs {max_num_seqs} on {hardware} ({point.semantics})"
    )
    table.add_column("metric (simulated)")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:,.3f}")
    err_console.print(table)
