"""`prefetch-tune apply`: a prefetch config as the `--additional-config` value vLLM takes."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from prefetch_tune.cli.common import (
    SetOpt,
    choice,
    err_console,
    fail_on_errors,
    resolve_semantics,
)
from prefetch_tune.errors import ConfigError, PrefetchTuneError
from prefetch_tune.models import QUANTS, Quant, catalog_names, load_model
from prefetch_tune.prefetch import (
    PrefetchConfig,
    Semantics,
    emit,
    parse_set_options,
    parse_weight_prefetch_config,
)
from prefetch_tune.results import PointQuery, describe_point, load_result, matching_results
from prefetch_tune.summaries import RATIO_DECIMALS

BACKENDS = ("sim", "vllm")


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
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="w8a8 or bf16 (default: w8a8 for the catalog, detected for a directory).",
        ),
    ] = None,
    tp: Annotated[int, typer.Option("--tp")] = 1,
    dp: Annotated[int, typer.Option("--dp")] = 1,
    ep: Annotated[bool, typer.Option("--ep")] = False,
    max_num_seqs: Annotated[int | None, typer.Option("--max-num-seqs")] = None,
    hardware: Annotated[
        str | None,
        typer.Option("--hardware", help="With --model: the result's hardware (default: any)."),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="With --model: sim or vllm (default: measured first)."),
    ] = None,
    sequence_parallel: Annotated[
        bool | None,
        typer.Option(
            "--sequence-parallel/--no-sequence-parallel",
            help="With --model: a result with sequence parallel on or off (default: any).",
        ),
    ] = None,
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
            "--semantics",
            help="plugin or native-0.23: what to emit for, and with --model the result's "
            "semantics (default: the result's, else plugin).",
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
        query = _query(model, quant, tp, dp, ep, hardware, sem, backend, sequence_parallel)
        path, doc = lookup(results_dir, query, max_num_seqs)
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


def _query(
    model: str,
    quant: str | None,
    tp: int,
    dp: int,
    ep: bool,
    hardware: str | None,
    semantics: str | None,
    backend: str | None,
    sequence_parallel: bool | None,
) -> PointQuery:
    """The asked operating point; a model directory is matched by its path (then its name),
    another name not in the catalog (a directory's basename) in any quantization."""
    if quant is not None:
        choice(quant, QUANTS, "--quant")
    if backend is not None:
        choice(backend, BACKENDS, "--backend")
    source: str | None = None
    if Path(model).expanduser().is_dir():
        spec = load_model(model, cast(Quant | None, quant))
        model, quant, source = spec.name, spec.quant, spec.source
    elif quant is None and model.lower() in catalog_names():
        quant = "w8a8"  # as search assumes for a catalog model
    return PointQuery(
        model=model,
        quant=quant,
        tp=tp,
        dp=dp,
        ep=ep,
        source=source,
        hardware=hardware,
        semantics=semantics,
        backend=backend,
        sequence_parallel=sequence_parallel,
    )


def lookup(results_dir: Path, query: PointQuery, max_num_seqs: int) -> tuple[Path, dict[str, Any]]:
    """The one stored result at the point: measured ones win over simulated ones; two left at
    the same rank is an error listing them; no extrapolation to untuned concurrency."""
    found = matching_results(results_dir, query)
    exact = [(p, d) for p, d in found if d["max_num_seqs"] == max_num_seqs]
    if not exact:
        tuned = sorted({d["max_num_seqs"] for _, d in found})
        listing = ", ".join(map(str, tuned)) if tuned else "none"
        raise NotTuned(
            f"max-num-seqs {max_num_seqs} was not tuned for {_asked(query)} in {results_dir} "
            f"(tuned: {listing}); prefetch-tune does not extrapolate, run search for it"
        )
    measured = [(p, d) for p, d in exact if not d["simulated"]]
    best = measured or exact
    if len(best) > 1:
        listing = "; ".join(f"{p} ({describe_point(d)})" for p, d in best)
        raise ConfigError(
            f"--model {query.model} --max-num-seqs {max_num_seqs}: {len(best)} stored results "
            f"match: {listing}; narrow it with --hardware, --semantics, --backend or "
            "--[no-]sequence-parallel, or give --result FILE"
        )
    return best[0]


def _asked(q: PointQuery) -> str:
    parts = [q.model, q.quant or "", f"tp{q.tp}", f"dp{q.dp}" + (" ep" if q.ep else "")]
    parts += [x for x in (q.hardware, q.semantics, q.backend) if x]
    if q.sequence_parallel is not None:
        parts.append("sp" if q.sequence_parallel else "no sp")
    return " ".join(p for p in parts if p)
