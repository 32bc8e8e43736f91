"""`prefetch-tune profile`: read a torch_npu profile, judge each prefetch knob, optionally
calibrate a hardware profile from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, cast

import typer
from rich.table import Table

from prefetch_tune.analysis.calibration import Calibration, calibrate, write_profile
from prefetch_tune.analysis.exports import load_profile
from prefetch_tune.analysis.pairing import choose_plan
from prefetch_tune.analysis.profile import ProfileReport, analyse
from prefetch_tune.analysis.verdicts import Rules
from prefetch_tune.cli.common import (
    CapOpt,
    ConfigJsonOpt,
    EpOpt,
    JsonOpt,
    QuantOpt,
    SeqParOpt,
    SetOpt,
    choice,
    err_console,
    fail_on_errors,
    positive,
    resolve_config,
    resolve_options,
    resolve_semantics,
)
from prefetch_tune.cli.simulate import HardwareOpt
from prefetch_tune.errors import ConfigError
from prefetch_tune.models import QUANTS, MiB, Quant
from prefetch_tune.numbers import non_negative
from prefetch_tune.runtime.plan import DEFAULT_CAP_MIB

VERDICT_STYLE = {"raise": "green", "keep": "cyan", "lower": "yellow", "off": "red"}


@fail_on_errors
def profile(
    path: Annotated[
        Path,
        typer.Argument(
            help="torch_npu profiler output directory (holding ASCEND_PROFILER_OUTPUT/, "
            "possibly one per rank), a trace_view.json or a kernel_details.csv.",
            show_default=False,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Catalog name or local HF model directory (default: the trace's otherData).",
        ),
    ] = None,
    quant: QuantOpt = None,
    tp: Annotated[int | None, typer.Option("--tp", help="Tensor-parallel size.")] = None,
    dp: Annotated[int | None, typer.Option("--dp", help="Data-parallel size.")] = None,
    ep: EpOpt = False,
    max_num_seqs: Annotated[
        int | None,
        typer.Option("--max-num-seqs", help="Decode batch = tokens per forward of the profile."),
    ] = None,
    tokens: Annotated[
        int | None,
        typer.Option("--tokens", help="Tokens per forward (default: --max-num-seqs)."),
    ] = None,
    sets: SetOpt = None,
    config_json: ConfigJsonOpt = None,
    semantics: Annotated[
        str | None,
        typer.Option(
            "--semantics",
            help="plugin or native-0.23 (default: the trace's otherData, else plugin).",
        ),
    ] = None,
    sequence_parallel: SeqParOpt = False,
    cap_mib: CapOpt = DEFAULT_CAP_MIB,
    hardware: HardwareOpt = "atlas-a2",
    calibrate_out: Annotated[
        Path | None,
        typer.Option(
            "--calibrate",
            help="Fit --hardware's measurable fields to this profile and write a new "
            "profile TOML here (load it with --hardware FILE).",
        ),
    ] = None,
    late_tol_us: Annotated[
        float,
        typer.Option("--late-tol-us", help="A CMO ending this long after its op is not late."),
    ] = 0.5,
    as_json: JsonOpt = False,
) -> None:
    """Read a torch_npu profile: per knob, how the prefetch (CMO) overlaps the vector op it
    hides behind, how late it ends, the stall at its join, its bandwidth, and a verdict.

    \f
    Over 80 lines only because of its typer option declarations; the work is in `analysis/`.
    """
    if quant is not None:
        choice(quant, QUANTS, "--quant")
    for value, flag in ((tp, "--tp"), (dp, "--dp"), (max_num_seqs, "--max-num-seqs")):
        if value is not None:
            positive(value, flag)
    if tokens is not None:
        positive(tokens, "--tokens")
    non_negative(late_tol_us, "--late-tol-us")
    if calibrate_out is not None and not calibrate_out.parent.is_dir():
        raise ConfigError(
            f"--calibrate {calibrate_out}: directory {calibrate_out.parent} is missing"
        )
    data = load_profile(path)
    choice_ = choose_plan(
        data.other_data,
        model=model,
        quant=cast(Quant | None, quant),
        tp=tp,
        dp=dp,
        ep=True if ep else None,
        tokens=tokens if tokens is not None else max_num_seqs,
        config=resolve_config(sets, config_json) if sets or config_json else None,
        semantics=resolve_semantics(semantics) if semantics is not None else None,
        options=resolve_options(sequence_parallel, cap_mib)
        if sequence_parallel or cap_mib != DEFAULT_CAP_MIB
        else None,
    )
    if choice_ is None and data.prefetch_tasks:
        raise ConfigError(
            f"{path}: {data.prefetch_tasks} prefetch tasks found; give --model (and --tp/--dp/"
            "--ep, --max-num-seqs or --tokens, the config) so the runtime plan can say which op "
            "starts each knob"
        )
    report = analyse(data, choice_, Rules(late_tol_us=late_tol_us))
    cal: Calibration | None = None
    if calibrate_out is not None:
        cal = calibrate(report, hardware)
        write_profile(cal, calibrate_out, data.path)
    if as_json:
        doc = report.to_dict()
        if cal is not None:
            doc["calibration"] = {**cal.to_dict(), "written": str(calibrate_out)}
        typer.echo(json.dumps(doc, indent=2))
        return
    render(report)
    if cal is not None and calibrate_out is not None:
        render_calibration(cal, calibrate_out)


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "" if value is None else format(value, fmt)


def render(r: ProfileReport) -> None:
    d = r.data
    sim = " [bold]SIMULATED trace[/]" if d.simulated else ""
    err_console.print(
        f"{d.fmt} from {len(d.sources)} file(s), {len(d.devices)} device(s){sim}: "
        f"{d.events_read:,} events read, {d.tasks_kept:,} device tasks kept, "
        f"{d.prefetch_tasks:,} prefetch tasks ({d.read_seconds + r.analyse_seconds:.1f} s)"
    )
    if r.plan is not None:
        p = r.plan.plan
        err_console.print(
            f"plan: {p.model.name} {p.model.quant} {p.layout.label()}, {p.tokens} tokens/forward, "
            f"{p.semantics}, config {p.config.label()}"
        )
    if not r.found_prefetch:
        err_console.print(
            "[bold]no prefetch (CMO) tasks in this profile[/]: prefetch is off or not firing. "
            "Likely causes:"
        )
        for cause in r.no_prefetch_causes:
            err_console.print(f"  - {cause}")
        return
    table = Table(title="prefetch per knob (overlap with the vector op it starts at)")
    for col, right in (
        ("knob", False),
        ("n", True),
        ("MiB", True),
        ("CMO µs", True),
        ("vector op (µs)", False),
        ("overlap med/p90", True),
        ("late % / med µs", True),
        ("stall µs", True),
        ("GB/s", True),
        ("verdict", False),
    ):
        table.add_column(col, justify="right" if right else "left")
    for k in r.knobs:
        style = VERDICT_STYLE[k.verdict]
        hint = f" (try {k.ratio_hint:g})" if k.ratio_hint and k.verdict != "off" else ""
        table.add_row(
            f"{k.knob} ({k.weight})",
            str(k.count),
            _f(k.bytes_median / MiB if k.bytes_median else None, ".2f"),
            _f(k.cmo_median_us),
            f"{k.vector_op.split(',')[0]} ({k.vector_median_us:.1f})",
            f"{k.overlap_median:.2f} / {k.overlap_p90:.2f}",
            f"{100 * k.late_share:.0f}% / {k.late_when_late_median_us:.1f}",
            _f(k.stall_median_us),
            _f(k.bandwidth_median / 1e9 if k.bandwidth_median else None, ".0f"),
            f"[{style}]{k.verdict}[/]{hint}",
        )
    err_console.print(table)
    for k in r.knobs:
        err_console.print(
            f"{k.knob} ({k.weight}): [{VERDICT_STYLE[k.verdict]}]{k.verdict}[/]: {k.reason}"
        )
    for note in r.notes:
        err_console.print(f"note: {note}")


def render_calibration(cal: Calibration, out: Path) -> None:
    table = Table(title=f"calibration of {cal.base.name} (written to {out})")
    for col in ("field", "base", "fitted", "samples", "how"):
        table.add_column(col, justify="right" if col in ("base", "fitted", "samples") else "left")
    for f in cal.fits:
        table.add_row(f.field, f"{f.base:.4g}", f"{f.value:.4g}", str(f.samples), f.how)
    for name, why in cal.kept.items():
        table.add_row(name, "", "[dim]kept[/]", "", why)
    err_console.print(table)
    if cal.ops:
        ops = Table(title="op durations at the observed shapes (µs, median)")
        for col in ("op", "n", "observed", "model base", "model fitted", "note"):
            ops.add_column(col, justify="left" if col in ("op", "note") else "right")
        for o in cal.ops:
            note = "prefetched (L2 hits)" if o["prefetched"] else ""
            ops.add_row(
                o["op"],
                str(o["samples"]),
                f"{o['observed_us']:.2f}",
                f"{o['model_base_us']:.2f}",
                f"{o['model_fitted_us']:.2f}",
                note,
            )
        err_console.print(ops)
