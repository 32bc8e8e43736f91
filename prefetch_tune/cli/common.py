"""Options shared by several commands, and the one place that turns them into library objects."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console

from prefetch_tune import numbers
from prefetch_tune.errors import ConfigError, PrefetchTuneError
from prefetch_tune.models import QUANTS, Layout, MiB, ModelSpec, Quant, load_model
from prefetch_tune.prefetch import (
    SEMANTICS,
    PrefetchConfig,
    Semantics,
    parse_config_json,
    parse_set_options,
)
from prefetch_tune.runtime.plan import NATIVE_CAP_BYTES, PlanOptions

err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out_console = Console()
STATE = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def fail_on_errors(fn: F) -> F:
    """Print a PrefetchTuneError as one line and exit with its code (traceback only on --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PrefetchTuneError as exc:
            if STATE["debug"]:
                traceback.print_exc()
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(code=exc.exit_code) from None

    return cast(F, wrapper)


def choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{flag} {value}: expected one of {', '.join(allowed)}")
    return value


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Catalog name or local HF model directory.")
]
QuantOpt = Annotated[
    str | None,
    typer.Option(
        "--quant", help="w8a8 or bf16 (default: w8a8 for the catalog, detected for a directory)."
    ),
]
TpOpt = Annotated[int, typer.Option("--tp", help="Tensor-parallel size.")]
DpOpt = Annotated[int, typer.Option("--dp", help="Data-parallel size.")]
EpOpt = Annotated[bool, typer.Option("--ep", help="Expert parallel on.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="KNOB=RATIO, e.g. mlp.down=0.5 (repeatable).")
]
ConfigJsonOpt = Annotated[
    str | None,
    typer.Option(
        "--config-json", help="A weight_prefetch_config object or a whole --additional-config JSON."
    ),
]
SemanticsOpt = Annotated[
    str,
    typer.Option(
        "--semantics",
        help="plugin (prefetch-tune's runtime) or native-0.23 (vLLM-Ascend v0.15-v0.23).",
    ),
]
SeqParOpt = Annotated[
    bool, typer.Option("--sequence-parallel", help="Sequence parallel / FlashComm1 is on.")
]
CapOpt = Annotated[
    float,
    typer.Option(
        "--cap-mib",
        help=f"The plugin's per-prefetch cap in MiB (native: fixed {NATIVE_CAP_BYTES / MiB:g} "
        "on MLP paths).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")]


def resolve_model(
    model: str, quant: str | None, tp: int, dp: int, ep: bool
) -> tuple[ModelSpec, Layout]:
    if quant is not None:
        choice(quant, QUANTS, "--quant")
    spec = load_model(model, cast(Quant | None, quant))
    layout = Layout(tp=tp, dp=dp, ep=ep)
    spec.check_layout(layout)
    return spec, layout


def resolve_semantics(value: str) -> Semantics:
    return cast(Semantics, choice(value, SEMANTICS, "--semantics"))


def resolve_config(sets: list[str] | None, config_json: str | None) -> PrefetchConfig:
    """--config-json as the base (else vLLM-Ascend's defaults), then --set on top."""
    base = parse_config_json(config_json) if config_json else PrefetchConfig.default()
    updates = parse_set_options(sets or [])
    return base.with_ratios(updates) if updates else base


def resolve_options(
    sequence_parallel: bool, cap_mib: float, name: str = "--cap-mib"
) -> PlanOptions:
    numbers.positive(cap_mib, name)
    return PlanOptions(
        sequence_parallel=sequence_parallel,
        cap_bytes=int(cap_mib * MiB),
    )


def positive(value: int, flag: str) -> int:
    numbers.positive(value, flag, integer=True)
    return value
