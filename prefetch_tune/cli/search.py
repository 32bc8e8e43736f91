"""`prefetch-tune search`: an Optuna search per max-num-seqs, then a noise-aware winner."""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import optuna
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from prefetch_tune import numbers
from prefetch_tune.backends.base import OperatingPoint, Workload, get_backend
from prefetch_tune.backends.sim import NOISE_MAX_PCT
from prefetch_tune.capacity import check_capacity
from prefetch_tune.cli.common import (
    choice,
    err_console,
    fail_on_errors,
    resolve_model,
    resolve_options,
    resolve_semantics,
)
from prefetch_tune.errors import ConfigError
from prefetch_tune.hardware import load_hardware
from prefetch_tune.results import check_writable
from prefetch_tune.runtime.plan import DEFAULT_CAP_MIB
from prefetch_tune.search.settings import SAMPLERS, SEED_MAX, SearchSettings, Slo
from prefetch_tune.search.settings import Progress as SearchProgress
from prefetch_tune.search.space import build_space
from prefetch_tune.search.tuner import SearchOutcome, search_point
from prefetch_tune.summaries import result_row, winner_ratios
from prefetch_tune.tuneconfig import load_tune_file


class PlainProgress(SearchProgress):
    """One line per trial on stderr, for logs and CI where a redrawn bar shows nothing."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}

    def start(self, label: str, total: int, done: int) -> None:
        self.totals[label] = total
        self.message(f"{label}: {done}/{total} trials done")

    def advance(self, label: str, done: int, best: float | None) -> None:
        shown = "-" if best is None else f"{best:,.2f}"
        self.message(f"{label}: trial {done}/{self.totals.get(label, '?')}, best {shown}")

    def message(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class RichProgress(SearchProgress):
    """Per concurrency: trial i/N, best so far, ETA; on stderr so stdout stays data."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def start(self, label: str, total: int, done: int) -> None:
        self.tasks[label] = self.progress.add_task(label, total=total, completed=done, best="-")

    def advance(self, label: str, done: int, best: float | None) -> None:
        self.progress.update(
            self.tasks[label], completed=done, best="-" if best is None else f"{best:,.2f}"
        )

    def message(self, text: str) -> None:
        self.progress.console.print(text)


def _merge(ctx: typer.Context, flags: dict[str, Any], file_opts: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line win; otherwise the tune file; otherwise the default."""
    merged = dict(flags)
    for key in _from_file(ctx, file_opts):
        merged[key] = file_opts[key]
    return merged


def _from_file(ctx: typer.Context, file_opts: dict[str, Any]) -> set[str]:
    """The tune file's keys that no command-line flag overrides."""
    return {
        key
        for key in file_opts
        if (source := ctx.get_parameter_source(key)) is None
        or source.name in ("DEFAULT", "DEFAULT_MAP")
    }


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _name(key: str, from_file: set[str], config: Path | None) -> str:
    """How to name an option in an error: the tune file's key if it came from there."""
    return f"{config}: {key}" if key in from_file else _flag(key)


def _check_numbers(o: dict[str, Any], name: Callable[[str], str]) -> None:
    """Every numeric search option through `numbers` (finite, in range), named as given."""
    numbers.positive(o["cap_mib"], name("cap_mib"))
    numbers.number(o["noise"], name("noise"), low=0, high=NOISE_MAX_PCT)
    numbers.number(o["seed"], name("seed"), low=0, high=SEED_MAX, integer=True)
    if o["max_repeats"] is not None:
        numbers.positive(o["max_repeats"], name("max_repeats"), integer=True)
    numbers.positive(o["heartbeat"], name("heartbeat"), integer=True)
    if o["timeout"] is not None:
        numbers.positive(o["timeout"], name("timeout"))
    for key in ("trials", "repeats", "input_len", "output_len", "tp", "dp"):
        numbers.positive(o[key], name(key), integer=True)


@fail_on_errors
def search(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Catalog name or local HF model directory.")
    ] = None,
    quant: Annotated[str | None, typer.Option("--quant", help="w8a8 or bf16.")] = None,
    tp: Annotated[int, typer.Option("--tp", help="Tensor-parallel size.")] = 1,
    dp: Annotated[int, typer.Option("--dp", help="Data-parallel size.")] = 1,
    ep: Annotated[bool, typer.Option("--ep", help="Expert parallel on.")] = False,
    max_num_seqs: Annotated[
        list[int] | None,
        typer.Option("--max-num-seqs", help="vLLM --max-num-seqs to tune (repeatable)."),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="sim (built-in performance model) or vllm (real runs).")
    ] = "sim",
    hardware: Annotated[
        str,
        typer.Option(
            "--hardware", help="Hardware profile for the sim: atlas-a2, atlas-a3 or a .toml."
        ),
    ] = "atlas-a2",
    semantics: Annotated[
        str, typer.Option("--semantics", help="plugin or native-0.23.")
    ] = "plugin",
    sequence_parallel: Annotated[
        bool, typer.Option("--sequence-parallel", help="Sequence parallel / FlashComm1 on.")
    ] = False,
    cap_mib: Annotated[
        float, typer.Option("--cap-mib", help="The plugin's per-prefetch cap in MiB.")
    ] = DEFAULT_CAP_MIB,
    trials: Annotated[int, typer.Option("--trials", help="Trial budget per max-num-seqs.")] = 30,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", help="Seconds per max-num-seqs; the current trial finishes."),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats",
            help="Selection race: rounds of off, default and finalists before any drops.",
        ),
    ] = 3,
    max_repeats: Annotated[
        int | None,
        typer.Option(
            "--max-repeats",
            help="Selection race: rounds at most, it stops once decided [default: max(12, 4 x --repeats)].",
        ),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="A vllm bench metric: output_throughput (max) or a latency such as p99_tpot_ms (min).",
        ),
    ] = "output_throughput",
    slo: Annotated[
        list[str] | None,
        typer.Option("--slo", help="Constraint such as p99_tpot_ms<=50 (repeatable)."),
    ] = None,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe, gp, random or grid.")] = "tpe",
    seed: Annotated[
        int, typer.Option("--seed", help="Sampler seed (and the sim's noise seed).")
    ] = 0,
    noise: Annotated[
        float, typer.Option("--noise", help="Sim only: seeded measurement noise in percent.")
    ] = 0.0,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage", help="Optuna storage URL (e.g. postgresql://...) shared by several hosts."
        ),
    ] = None,
    heartbeat: Annotated[
        int,
        typer.Option(
            "--heartbeat",
            help="RDB --storage: seconds between trial heartbeats; a worker silent for 3x is dead.",
        ),
    ] = 60,
    results_dir: Annotated[
        Path, typer.Option("--results-dir", help="Where result files, trial tables and studies go.")
    ] = Path("results"),
    config: Annotated[
        Path | None, typer.Option("--config", help="Tune TOML with the same options (flags win).")
    ] = None,
    input_len: Annotated[
        int, typer.Option("--input-len", help="Prompt tokens per request.")
    ] = 3500,
    output_len: Annotated[
        int, typer.Option("--output-len", help="Generated tokens per request.")
    ] = 1500,
    screen: Annotated[
        bool,
        typer.Option(
            "--screen",
            help="Run the trials on one eager server, changing the config at run time; "
            "restart (graph mode) only for the finalists, off and default.",
        ),
    ] = False,
    screen_every: Annotated[
        int,
        typer.Option(
            "--screen-every", help="With --screen: candidates between off/default re-runs."
        ),
    ] = 5,
    screen_waves: Annotated[
        int,
        typer.Option(
            "--screen-waves",
            help="With --screen: a screened run's requests in waves of the concurrency.",
        ),
    ] = 1,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print what would run (serve and bench commands) and exit."),
    ] = False,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Store the new result even when it is less trustworthy than the stored one "
            "(smaller budget, other objective or constraints); else it is written beside it.",
        ),
    ] = False,
    python: Annotated[
        str | None, typer.Option("--python", help="vllm backend: the serving environment's Python.")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the results as JSON on stdout (as `show --json`)."),
    ] = False,
) -> None:
    """Search the prefetch ratios per max-num-seqs and write the best ratio JSON for each.

    \f
    Over 80 lines only because of its typer option declarations; the work is in `search/`.
    """
    flags = dict(ctx.params)
    vllm_table: dict[str, Any] = {}
    from_file: set[str] = set()
    if config is not None:
        file_opts, vllm_table = load_tune_file(config)
        flags = _merge(ctx, flags, file_opts)
        from_file = _from_file(ctx, file_opts)
    o = flags
    _check_numbers(o, lambda key: _name(key, from_file, config))
    if not o["model"]:
        raise ConfigError("--model is required (or `model` in --config)")
    seqs = o["max_num_seqs"] or []
    seqs = [seqs] if isinstance(seqs, int) else list(seqs)
    if not seqs:
        raise ConfigError("--max-num-seqs is required (repeatable, or `max_num_seqs` in --config)")
    for n in seqs:
        numbers.positive(n, _name("max_num_seqs", from_file, config), integer=True)
    choice(o["sampler"], SAMPLERS, "--sampler")
    slos = tuple(
        Slo.parse(s, _name("slo", from_file, config))
        for s in ([o["slo"]] if isinstance(o["slo"], str) else o["slo"] or [])
    )
    spec, layout = resolve_model(o["model"], o["quant"], o["tp"], o["dp"], o["ep"])
    sem = resolve_semantics(o["semantics"])
    options = resolve_options(o["sequence_parallel"], float(o["cap_mib"]))
    load_hardware(o["hardware"])  # a bad profile fails here, before any study file exists
    settings = SearchSettings(
        results_dir=Path(o["results_dir"]),
        trials=o["trials"],
        timeout=o["timeout"],
        repeats=o["repeats"],
        objective=o["objective"],
        slos=slos,
        sampler=o["sampler"],
        seed=o["seed"],
        storage=o["storage"],
        screen=bool(o["screen"]),
        screen_every=int(o["screen_every"]),
        screen_waves=int(o["screen_waves"]),
        replace=bool(o["replace"]),
        heartbeat_s=o["heartbeat"],
        max_repeats=o["max_repeats"],
    )
    settings.check()
    workload = Workload(input_len=o["input_len"], output_len=o["output_len"])
    points = [
        OperatingPoint(
            model=spec,
            layout=layout,
            max_num_seqs=n,
            hardware=o["hardware"],
            workload=workload,
            semantics=sem,
            options=options,
        )
        for n in seqs
    ]
    for point in points:  # a layout that cannot hold its KV cache is bad input, before any trial
        check_capacity(point)
    be = get_backend(
        o["backend"],
        noise_pct=float(o["noise"]),
        seed=o["seed"],
        vllm=vllm_table,
        python=o["python"],
        results_dir=settings.results_dir,
    )
    if config is not None:
        err_console.print(f"using tune file {config}")
    if dry_run:
        _dry_run(be, points)
        return
    check_writable(settings.results_dir)
    check_semantics = getattr(be, "check_semantics", None)
    if check_semantics is not None:  # refuse a version/semantics mismatch before any study exists
        check_semantics(points[0])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    outcomes = _run(points, be, settings)
    _report(outcomes, be.measured, settings, as_json)
    if any(out.interrupted for out in outcomes):
        cmd = " ".join(shlex.quote(a) for a in ["prefetch-tune", *sys.argv[1:]])
        err_console.print(
            f"[yellow]interrupted:[/] finished trials are kept in the study; "
            f"resume with the same command:\n  {cmd}"
        )
        raise typer.Exit(130)


def _dry_run(be: Any, points: list[OperatingPoint]) -> None:
    describe = getattr(be, "describe_commands", None)
    for point in points:
        space = build_space(point)
        typer.echo(
            f"# max-num-seqs {point.max_num_seqs}: live knobs "
            f"{', '.join(f'{k}<={space.bound(k):g}' for k in space.knobs)}"
        )
        if describe is None:
            typer.echo(f"# backend {be.name} starts no process; nothing else to show")
            continue
        for line in describe(point):
            typer.echo(line)


def _run(points: list[OperatingPoint], be: Any, settings: SearchSettings) -> list[SearchOutcome]:
    stop = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err_console.print(
            "[yellow]Ctrl-C: stopping after the current trial (press again to abort now)[/]"
        )

    previous = signal.signal(signal.SIGINT, on_sigint)
    outcomes: list[SearchOutcome] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}"),
        TimeRemainingColumn(),
    )
    try:
        with contextlib.ExitStack() as stack:
            progress: SearchProgress = PlainProgress()
            if err_console.is_terminal:
                bar = stack.enter_context(Progress(*columns, console=err_console, transient=False))
                progress = RichProgress(bar)
            for point in points:
                if stop.is_set():
                    outcomes.append(SearchOutcome(point, None, None, None, True, "", ""))
                    continue
                outcomes.append(search_point(point, be, settings, progress, stop))
    finally:
        signal.signal(signal.SIGINT, previous)
    return outcomes


def _report(
    outcomes: list[SearchOutcome], measured: bool, settings: SearchSettings, as_json: bool
) -> None:
    label = "measured" if measured else "SIMULATED"
    table = Table(title=f"prefetch-tune search ({label}): objective {settings.objective}")
    for col in (
        "max-num-seqs",
        "effective MiB/layer",
        settings.objective,
        "vs off",
        "vs default",
        "significant",
    ):
        table.add_column(col, overflow="fold")
    winners: list[str] = []
    for out in outcomes:
        n = out.point.max_num_seqs
        if out.result is None:
            table.add_row(str(n), "[yellow]interrupted[/]", "", "", "", "")
            continue
        w = out.result["winner"]
        ratios = winner_ratios(w)
        text = "off" if w["is_off"] else ", ".join(f"{k}={v:g}" for k, v in ratios.items())
        winners.append(f"max-num-seqs {n} winner: {text}")  # own line: never cut by the table
        mib = ", ".join(f"{k} {v:.1f}" for k, v in w["effective_mib"].items() if v)
        imp = out.result["improvement"]
        table.add_row(
            str(n),
            mib or "0",
            f"{w['objective_median']:,.2f}",
            _pct(imp["vs_off"]),
            _pct(imp["vs_default"]),
            "yes" if imp["vs_off"]["significant"] else "no",
        )
    err_console.print(table)
    for line in winners:
        err_console.print(line, markup=False, highlight=False, soft_wrap=True)
    rows = [result_row(o.path, o.result) for o in outcomes if o.path and o.result is not None]
    if as_json:
        typer.echo(json.dumps(sorted(rows, key=lambda r: r["max_num_seqs"]), indent=2))
    for out in outcomes:
        if out.path is not None:
            if not as_json:
                typer.echo(str(out.path))
            _say_stored(out)
            if out.moved_damaged is not None:
                err_console.print(
                    f"[yellow]a damaged result file was kept aside as {out.moved_damaged}[/]"
                )
        for note in out.notes:
            err_console.print(f"note (max-num-seqs {out.point.max_num_seqs}): {note}")


def _say_stored(out: SearchOutcome) -> None:
    """Which result `apply` will use for the point, when that is not simply the new one."""
    st = out.stored
    if st is None:
        return
    if st.beside:
        err_console.print(
            f"kept {st.used}: `apply` uses it, as {st.reason}; the new result is beside it "
            f"in {st.written} (`apply --result` it, or rerun with --replace to store it)",
            markup=False,
        )
    elif st.reason == "--replace":
        err_console.print(f"replaced {st.used} (--replace)", markup=False)


def _pct(cmp: dict[str, Any]) -> str:
    if cmp.get("pct") is None:
        return "-"
    if cmp.get("low_pct") is None or cmp.get("high_pct") is None:  # too few runs to bound it
        return f"{cmp['pct']:+.2f}% [unbounded]"
    return f"{cmp['pct']:+.2f}% [{cmp['low_pct']:+.2f}, {cmp['high_pct']:+.2f}]"
