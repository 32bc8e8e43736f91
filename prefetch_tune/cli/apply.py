"""`prefetch-tune apply`: a prefetch config as the `--additional-config` value vLLM takes."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from prefetch_tune.cli.common import (
    SetOpt,
    choice,
    err_console,
    fail_on_errors,
    resolve_semantics,
)
from prefetch_tune.errors import ConfigError, PrefetchTuneError
from prefetch_tune.models import QUANTS
from prefetch_tune.prefetch import (
    PrefetchConfig,
    Semantics,
    emit,
    parse_set_options,
    parse_weight_prefetch_config,
)
from prefetch_tune.results import load_result, matching_results
from prefetch_tune.summaries import RATIO_DECIMALS


class NotTuned(PrefetchTuneError):
    """The asked max-num-seqs was never tuned (exit 1: we do not extrapolate)."""


@fail_on_errors
def apply(
    sets: SetOpt = None,
    disabled: Annotated[
        bool, typer.Option("--disabled", help="Emit prefetch switched off.")
    ] = False,
    result: Annotated[
        Path | None, typer.Option("--result", help="A result file written by search.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Look the result up by model (with --max-num-seqs)."),
    ] = None,
    quant: Annotated[str, typer.Option("--quant", help="w8a8 or bf16 (with --model).")] = "w8a8",
    tp: Annotated[int, typer.Option("--tp")] = 1,
    dp: Annotated[int, typer.Option("--dp")] = 1,
    ep: Annotated[bool, typer.Option("--ep")] = False,
    max_num_seqs: Annotated[int | None, typer.Option("--max-num-seqs")] = None,
    results_dir: Annotated[Path, typer.Option("--results-dir")] = Path("results"),
    merge_into: Annotated[
        str | None,
        typer.Option(
            "--merge-into", help="Your existing --additional-config JSON; its other keys are kept."
        ),
    ] = None,
    semantics: Annotated[
        str | None,
        typer.Option(
            "--semantics", help="plugin or native-0.23 (default: the result's, else plugin)."
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="shell: --additional-config '<json>' to paste (alias flag); args: for "
            "`vllm serve M $(prefetch-tune apply --format args ...)`; json: for "
            '`--additional-config "$(prefetch-tune apply --format json ...)"`.',
        ),
    ] = "shell",
) -> None:
    """Turn ratios or a stored result into the --additional-config argument, merged into yours."""
    choice(fmt, FORMATS, "--format")
    updates = parse_set_options(sets or [])
    if disabled and updates:
        raise ConfigError("--disabled and --set contradict each other; give one")
    sources = sum(bool(x) for x in (updates or disabled, result is not None, model is not None))
    if sources > 1:
        raise ConfigError("give one of --set/--disabled, --result, or --model with --max-num-seqs")
    sem: Semantics | None = resolve_semantics(semantics) if semantics else None
    if disabled:
        config = PrefetchConfig.off()
    elif updates:
        config = PrefetchConfig.make(enabled=True, ratios=updates)
    elif result is not None:
        config, sem = _from_doc(load_result(result), sem, str(result))
    elif model is not None:
        if max_num_seqs is None:
            raise ConfigError("--model needs --max-num-seqs (the concurrency the result is for)")
        choice(quant, QUANTS, "--quant")
        path, doc = _lookup(results_dir, model, quant, tp, dp, ep, max_num_seqs)
        config, sem = _from_doc(doc, sem, str(path))
    else:
        raise ConfigError(
            "nothing to apply: give --set KNOB=RATIO, --disabled, --result FILE, "
            "or --model M --max-num-seqs N"
        )
    emission = emit(rounded(config), sem or "plugin", merge_into)
    for note in emission.notes:
        print(f"note: {note}", file=sys.stderr)
    typer.echo(formatted(emission.json, fmt))


FORMATS = ("shell", "flag", "args", "json")


def rounded(config: PrefetchConfig) -> PrefetchConfig:
    """Ratios to RATIO_DECIMALS (finer steps change no prefetch a benchmark can resolve)."""
    return PrefetchConfig(
        enabled=config.enabled,
        ratios=tuple((k, round(v, RATIO_DECIMALS)) for k, v in config.ratios),
    )


def formatted(text: str, fmt: str) -> str:
    if fmt == "json":
        return text
    if fmt == "args":  # one word after $(...) splitting: no whitespace may reach the shell
        if any(ch.isspace() for ch in text):
            raise ConfigError(
                "--format args: the merged config contains whitespace, which $(...) would "
                'split; use --additional-config "$(prefetch-tune apply --format json ...)"'
            )
        return f"--additional-config={text}"
    return f"--additional-config {shlex.quote(text)}"


def _from_doc(
    doc: dict[str, Any], sem: Semantics | None, where: str
) -> tuple[PrefetchConfig, Semantics]:
    if doc["simulated"]:
        err_console.print(
            f"[yellow]warning:[/] {where} is a SIMULATED result (sim backend); "
            "measure it on the NPU before relying on it"
        )
    try:
        config = parse_weight_prefetch_config(doc["winner"]["weight_prefetch_config"])
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: damaged result file (no winner config)") from None
    return config, sem or doc["semantics"]


def _lookup(
    results_dir: Path, model: str, quant: str, tp: int, dp: int, ep: bool, max_num_seqs: int
) -> tuple[Path, dict[str, Any]]:
    """Measured results win over simulated ones; no extrapolation to untuned concurrency."""
    found = matching_results(results_dir, model, quant, tp, dp, ep)
    exact = [(p, d) for p, d in found if d["max_num_seqs"] == max_num_seqs]
    if not exact:
        tuned = sorted({d["max_num_seqs"] for _, d in found})
        listing = ", ".join(map(str, tuned)) if tuned else "none"
        raise NotTuned(
            f"max-num-seqs {max_num_seqs} was not tuned for {model} {quant} tp{tp} "
            f"dp{dp}{' ep' if ep else ''} in {results_dir} (tuned: {listing}); "
            "prefetch-tune does not extrapolate, run search for it"
        )
    exact.sort(key=lambda pd: (pd[1]["simulated"], pd[0].name))
    return exact[0]
