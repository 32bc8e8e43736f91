"""`prefetch-tune report`: a self-contained HTML report (and PNGs) of the stored results.

Per study: the optimisation history, parameter importances, a slice plot per knob with the
ratio above which the knob goes flat (the search-space bound), and the winner against `off` and
`default` with error bars over the repeats. Across concurrencies: the winning effective MiB per
knob against max-num-seqs. The plotly.js bundle is embedded inline, so the page opens without a
network. PNGs of the key plots come from matplotlib (Agg) for places that cannot show HTML.

plotly and matplotlib are an optional extra (`pip install 'prefetch-tune[report]'`); they are
imported lazily and a missing one is a ConfigError saying so.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from prefetch_tune import __version__
from prefetch_tune.errors import ConfigError
from prefetch_tune.results import atomic_write, iter_results
from prefetch_tune.search.space import FLAT_ZONE

INSTALL_HINT = "pip install 'prefetch-tune[report]'"
SIM_LABEL = "SIMULATED"


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise ConfigError(f"prefetch-tune report needs {top}: {INSTALL_HINT}") from None


def check_extras() -> None:
    """Raise the install hint up front when plotly or matplotlib is missing."""
    _need("plotly")
    _need("matplotlib")


@dataclass
class StudyEntry:
    """One stored result and its study (None when the study cannot be opened)."""

    path: Path
    doc: dict[str, Any]
    study: optuna.Study | None
    study_note: str = ""

    @property
    def simulated(self) -> bool:
        return bool(self.doc.get("simulated"))

    @property
    def label(self) -> str:
        return SIM_LABEL if self.simulated else "measured"

    @property
    def group(self) -> str:
        """The point without max-num-seqs (the file stem before `-mns`)."""
        return self.path.stem.rsplit("-mns", 1)[0]

    @property
    def title(self) -> str:
        return f"{self.path.stem} [{self.label}]"


@dataclass
class ReportOutput:
    html: Path
    pngs: list[Path] = field(default_factory=list)
    entries: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- loading


def _journal(path: Path) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def open_study(results_dir: Path, doc: dict[str, Any]) -> tuple[optuna.Study | None, str]:
    """The result's study: its recorded storage, else the journal under results_dir/studies/."""
    info = doc.get("study") or {}
    name = str(info.get("name", ""))
    if not name:
        return None, "the result names no study"
    storage = str(info.get("storage", ""))
    local = results_dir / "studies" / f"{name}.journal"
    tries: list[tuple[str, Any]] = []
    if local.is_file():
        tries.append((str(local), lambda: _journal(local)))
    if storage and "://" in storage:
        tries.append((storage, lambda: storage))
    elif storage and Path(storage).is_file() and Path(storage) != local:
        tries.append((storage, lambda: _journal(Path(storage))))
    problems: list[str] = []
    for where, make in tries:
        try:
            return optuna.load_study(study_name=name, storage=make()), ""
        except Exception as exc:
            problems.append(f"{where}: {type(exc).__name__}: {exc}".splitlines()[0])
    if not tries:
        return None, f"study {name} not found (no {local}, storage {storage or '-'})"
    return None, "; ".join(problems)


def load_entries(results_dir: Path) -> tuple[list[StudyEntry], list[str]]:
    if not results_dir.is_dir():
        raise ConfigError(f"--results-dir {results_dir}: no such directory")
    entries: list[StudyEntry] = []
    notes: list[str] = []
    for path, doc in iter_results(results_dir):
        if isinstance(doc, ConfigError):
            notes.append(f"skipped {path.name}: {doc}")
            continue
        study, note = open_study(results_dir, doc)
        entries.append(StudyEntry(path, doc, study, note))
    if not entries:
        raise ConfigError(f"--results-dir {results_dir}: no result files to report")
    entries.sort(key=lambda e: (e.group, int(e.doc["max_num_seqs"])))
    return entries, notes


# ---------------------------------------------------------------- plot data


def flat_above(study: optuna.Study) -> dict[str, float | None]:
    """Each knob's flat-above ratio (the plan's, as `search` records it on the study; None: the
    knob never goes flat). Older studies: the bound behind the sampling range's flat zone."""
    recorded = study.user_attrs.get("flat_above")
    if isinstance(recorded, dict):
        return {str(k): None if v is None else float(v) for k, v in recorded.items()}
    flat: dict[str, float | None] = {}
    for t in study.get_trials(deepcopy=False):
        for k, dist in t.distributions.items():
            high = getattr(dist, "high", None)
            if high is not None:
                bound = float(high) / (1.0 + FLAT_ZONE)
                flat[k] = None if bound >= 1.0 - 1e-9 else bound
    return flat


def ratio_in_effect(trial: optuna.trial.FrozenTrial, knob: str, flat: float | None) -> float:
    """The ratio a trial ran with: its `ratio.<knob>` attr, else its param cut to [0, flat]."""
    recorded = trial.user_attrs.get(f"ratio.{knob}")
    if isinstance(recorded, int | float):
        return float(recorded)
    return min(max(0.0, float(trial.params[knob])), 1.0 if flat is None else flat)


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None
    ]


def finalist_bars(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Winner, off, default (and other finalists): median, min and max over the repeats."""
    winner_label = doc["winner"].get("label")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    summaries = list(doc.get("finalists") or [])
    summaries += [doc["baselines"]["off"], doc["baselines"]["default"], doc["winner"]]
    for s in summaries:
        label = str(s.get("label"))
        values = [float(v) for v in s.get("objective_values") or []]
        if label in seen or not values:
            continue
        seen.add(label)
        med = statistics.median(values)
        role = (
            "winner"
            if label == winner_label
            else label
            if label in ("off", "default")
            else "finalist"
        )
        name = f"{label} (winner)" if role == "winner" and label != "winner" else label
        rows.append(
            {
                "name": name,
                "role": role,
                "median": med,
                "lo": med - min(values),
                "hi": max(values) - med,
                "values": values,
                "mib": float(s.get("total_effective_mib") or 0.0),
                "rejected": s.get("rejected"),
            }
        )
    order = {"off": 0, "default": 1, "winner": 2, "finalist": 3}
    rows.sort(key=lambda r: order[str(r["role"])])
    return rows


def trend(entries: list[StudyEntry]) -> dict[str, dict[str, Any]]:
    """Per point group: max-num-seqs and the winner's effective MiB per knob."""
    groups: dict[str, dict[str, Any]] = {}
    for e in entries:
        g = groups.setdefault(e.group, {"label": e.label, "seqs": [], "knobs": {}, "total": []})
        n = int(e.doc["max_num_seqs"])
        w = e.doc["winner"]
        mib = dict(w.get("effective_mib") or {})
        if w.get("is_off"):
            mib = dict.fromkeys(mib, 0.0)
        idx = len(g["seqs"])
        g["seqs"].append(n)
        for k in set(g["knobs"]) | set(mib):
            series = g["knobs"].setdefault(k, [None] * idx)
            series.append(float(mib.get(k, 0.0)))
        g["total"].append(sum(float(v) for v in mib.values()))
    return groups


# ---------------------------------------------------------------- plotly figures


def _title(fig: Any, text: str) -> Any:
    fig.update_layout(title={"text": text}, height=420, margin={"t": 60, "l": 60, "r": 20, "b": 50})
    return fig


def study_figures(e: StudyEntry) -> list[tuple[str, Any]]:
    """(caption, plotly figure) for one study; an empty list without a study."""
    from optuna.visualization import plot_optimization_history, plot_param_importances

    figs: list[tuple[str, Any]] = []
    metric = e.doc.get("objective", {}).get("metric", "objective")
    if e.study is not None:
        fig = plot_optimization_history(e.study, target_name=metric)
        figs.append(("Optimisation history", _title(fig, f"optimisation history [{e.label}]")))
        done = complete_trials(e.study)
        params = sorted({k for t in done for k in t.params})
        if len(done) >= 2 and len(params) >= 2:
            try:
                fig = plot_param_importances(e.study, target_name=metric)
                figs.append(
                    ("Parameter importances", _title(fig, f"parameter importances [{e.label}]"))
                )
            except Exception as exc:
                e.study_note += f" parameter importances unavailable ({type(exc).__name__})"
        flat = flat_above(e.study)
        for knob in params:
            fig = slice_figure(done, knob, flat.get(knob), metric)
            figs.append((f"Slice: {knob}", _title(fig, f"{knob} ratio in effect [{e.label}]")))
    figs.append(("Winner vs off vs default", baseline_figure(e)))
    return figs


def slice_figure(
    trials: list[optuna.trial.FrozenTrial], knob: str, flat: float | None, metric: str
) -> Any:
    """Objective against the ratio in effect, one marker per trial (knob off = 0, so trials
    sampled in the off zone are drawn), and the plan's flat-above ratio as a dashed line."""
    go = _need("plotly.graph_objects")
    drawn = [t for t in trials if knob in t.params]
    xs = [ratio_in_effect(t, knob, flat) for t in drawn]
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=[t.value for t in drawn],
            mode="markers",
            marker={
                "color": [t.number for t in drawn],
                "colorscale": "Blues",
                "showscale": True,
                "colorbar": {"title": {"text": "trial"}},
                "line": {"width": 1, "color": "#333"},
                "size": 9,
            },
            customdata=[t.number for t in drawn],
            hovertemplate="trial %{customdata}: ratio %{x:.4g}, %{y:.6g}<extra></extra>",
            name="trial",
        )
    )
    top = max([*xs, flat or 0.0, 1.0 if flat is None else flat])
    pad = 0.04 * top
    fig.update_xaxes(title_text=f"{knob} ratio in effect (0 = off)", range=[-pad, top + pad])
    fig.update_yaxes(title_text=metric)
    if flat is not None:
        fig.add_vline(
            x=flat,
            line_dash="dash",
            line_color="firebrick",
            annotation_text=f"flat above {flat:.3g}",
            annotation_position="top left",
        )
    return fig


def baseline_figure(e: StudyEntry) -> Any:
    go = _need("plotly.graph_objects")
    bars = finalist_bars(e.doc)
    colours = {"off": "#7f7f7f", "default": "#ff7f0e", "winner": "#2ca02c", "finalist": "#9ecae1"}
    # Points with error bars, not bars: the axis does not start at zero.
    fig = go.Figure(
        go.Scatter(
            x=[b["name"] for b in bars],
            y=[b["median"] for b in bars],
            mode="markers+text",
            textposition="middle right",
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [b["hi"] for b in bars],
                "arrayminus": [b["lo"] for b in bars],
            },
            marker={"color": [colours[b["role"]] for b in bars], "size": 14},
            text=[f"  {b['median']:,.2f}<br>  {b['mib']:.1f} MiB" for b in bars],
            customdata=[", ".join(f"{v:.6g}" for v in b["values"]) for b in bars],
            hovertemplate="%{x}: median %{y:.6g}<br>repeats: %{customdata}<extra></extra>",
        )
    )
    fig.update_xaxes(range=[-0.5, len(bars) - 0.1])  # room for the labels right of the points
    meds = [b["median"] for b in bars]
    if meds:
        lo, hi = min(meds), max(meds)
        pad = max((hi - lo) * 0.5, abs(hi) * 0.01, 1e-9)
        fig.update_yaxes(range=[lo - pad, hi + pad])
    metric = e.doc.get("objective", {}).get("metric", "objective")
    fig.update_yaxes(title_text=f"{metric} (median; error bars: min-max over repeats)")
    return _title(fig, f"winner vs off vs default [{e.label}]")


def trend_figure(group: str, g: dict[str, Any]) -> Any:
    go = _need("plotly.graph_objects")
    fig = go.Figure()
    for knob in sorted(g["knobs"]):
        fig.add_trace(go.Scatter(x=g["seqs"], y=g["knobs"][knob], mode="lines+markers", name=knob))
    fig.add_trace(
        go.Scatter(
            x=g["seqs"],
            y=g["total"],
            mode="lines+markers",
            name="total",
            line={"dash": "dot", "color": "black"},
        )
    )
    fig.update_xaxes(title_text="max-num-seqs", type="log" if len(g["seqs"]) > 2 else "linear")
    fig.update_yaxes(title_text="winning effective MiB per layer")
    return _title(fig, f"{group} [{g['label']}]: winning prefetch vs max-num-seqs")


# ---------------------------------------------------------------- PNGs (matplotlib)


def _pyplot() -> Any:
    mpl = _need("matplotlib")
    mpl.use("Agg")
    return _need("matplotlib.pyplot")


def png_history(e: StudyEntry, path: Path) -> Path | None:
    if e.study is None:
        return None
    plt = _pyplot()
    done = complete_trials(e.study)
    if not done:
        return None
    minimize = e.study.direction.name == "MINIMIZE"
    xs = [t.number for t in done]
    ys = [float(t.value or 0.0) for t in done]
    best: list[float] = []
    for y in ys:
        best.append(y if not best else (min if minimize else max)(best[-1], y))
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.scatter(xs, ys, s=14, label="trial")
    ax.step(xs, best, where="post", color="firebrick", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(str(e.doc.get("objective", {}).get("metric", "objective")))
    ax.set_title(f"{e.title}\noptimisation history", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def png_baselines(e: StudyEntry, path: Path) -> Path | None:
    bars = finalist_bars(e.doc)
    if not bars:
        return None
    plt = _pyplot()
    colours = {"off": "#7f7f7f", "default": "#ff7f0e", "winner": "#2ca02c", "finalist": "#9ecae1"}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    names = [b["name"] for b in bars]
    meds = [b["median"] for b in bars]
    xs = list(range(len(bars)))
    ax.errorbar(
        xs,
        meds,
        yerr=[[b["lo"] for b in bars], [b["hi"] for b in bars]],
        fmt="none",
        ecolor="black",
        capsize=6,
    )
    ax.scatter(xs, meds, s=80, c=[colours[b["role"]] for b in bars], zorder=3)
    for x, b in zip(xs, bars, strict=True):
        ax.annotate(
            f"{b['median']:,.2f}\n{b['mib']:.1f} MiB",
            (x, b["median"]),
            textcoords="offset points",
            xytext=(10, -8),
            fontsize=8,
        )
    ax.set_xticks(xs, names)
    ax.set_xlim(-0.5, len(bars) - 0.3)
    ax.grid(axis="y", alpha=0.3)
    lo, hi = min(meds), max(meds)
    pad = max((hi - lo) * 0.5, abs(hi) * 0.01, 1e-9)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(str(e.doc.get("objective", {}).get("metric", "objective")))
    ax.set_title(f"{e.title}\nwinner vs off vs default (median, min-max over repeats)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def png_trend(group: str, g: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for knob in sorted(g["knobs"]):
        ax.plot(g["seqs"], g["knobs"][knob], marker="o", label=knob)
    ax.plot(g["seqs"], g["total"], marker="s", linestyle=":", color="black", label="total")
    if len(g["seqs"]) > 2:
        ax.set_xscale("log")
    ax.set_xlabel("max-num-seqs")
    ax.set_ylabel("winning effective MiB per layer")
    ax.set_title(f"{group} [{g['label']}]\nwinning prefetch vs max-num-seqs", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- HTML


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-top: 1px solid #ccc;
padding-top: 1rem; } h3 { font-size: 1rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: left; }
.sim { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5rem; font-weight: bold; }
.note { color: #8a4b00; } .grid { display: grid; grid-template-columns: repeat(2, 1fr);
gap: 0.5rem; } code { font-size: 0.85rem; }
"""


def _fig_div(fig: Any) -> str:
    return str(
        fig.to_html(
            full_html=False,
            include_plotlyjs=False,
            config={"displaylogo": False, "responsive": True},
            default_height="420px",
        )
    )


def _pct(cmp: dict[str, Any] | None) -> str:
    if not cmp or cmp.get("pct") is None:
        return "-"
    sig = "significant" if cmp.get("significant") else "within noise"
    return f"{cmp['pct']:+.2f}% (±{cmp.get('band_pct') or 0:.2f}, {sig})"


def _summary_table(e: StudyEntry) -> str:
    d = e.doc
    w = d["winner"]
    imp = d.get("improvement", {})
    st = d.get("study", {})
    rows = [
        ("label", e.label),
        ("model", f"{d['model']['name']} {d['model']['quant']}"),
        ("layout", json.dumps(d["layout"])),
        ("hardware / backend / semantics", f"{d['hardware']} / {d['backend']} / {d['semantics']}"),
        ("max-num-seqs", str(d["max_num_seqs"])),
        ("objective", f"{d['objective']['metric']} ({d['objective']['direction']})"),
        (
            "winner",
            "off"
            if w.get("is_off")
            else ", ".join(
                f"{k} {v:.1f} MiB" for k, v in (w.get("effective_mib") or {}).items() if v
            ),
        ),
        (
            "winner median",
            "-" if w.get("objective_median") is None else f"{w['objective_median']:,.3f}",
        ),
        ("vs off", _pct(imp.get("vs_off"))),
        ("vs default", _pct(imp.get("vs_default"))),
        (
            "study",
            f"{st.get('name', '-')}: {st.get('trials', '-')} trials, "
            f"{st.get('failures', '-')} failed ({st.get('storage', '-')})",
        ),
        ("--additional-config", f"<code>{html.escape(str(d.get('additional_config', '')))}</code>"),
    ]
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v if k == '--additional-config' else html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return f"<table>{body}</table>"


def build_report(results_dir: Path, out_dir: Path) -> ReportOutput:
    """Write out_dir/report.html and out_dir/png/*.png; returns what was written."""
    check_extras()
    plotly_offline = _need("plotly.offline")
    entries, notes = load_entries(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png_dir = out_dir / "png"
    png_dir.mkdir(exist_ok=True)
    output = ReportOutput(html=out_dir / "report.html", entries=len(entries), notes=notes)
    any_sim = any(e.simulated for e in entries)
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>prefetch-tune report{' (SIMULATED)' if any_sim else ''}</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{plotly_offline.get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>prefetch-tune report{' (SIMULATED)' if any_sim else ''}</h1>",
        f"<p>{len(entries)} result file(s) in <code>{html.escape(str(results_dir))}</code>; "
        f"prefetch-tune {__version__}; generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.</p>",
    ]
    if any_sim:
        parts.append(
            '<p class="sim">SIMULATED: results from the sim backend come from the '
            "built-in performance model, not from measurements. They are labelled "
            "SIMULATED on every plot.</p>"
        )
    for note in notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    groups = trend(entries)
    parts.append("<h2>Winning prefetch across concurrencies</h2>")
    for group, g in groups.items():
        parts.append(_fig_div(trend_figure(group, g)))
        output.pngs.append(png_trend(group, g, png_dir / f"{group}-trend.png"))
    data: dict[str, Any] = {}
    for e in entries:
        anchor = html.escape(e.path.stem)
        parts.append(f'<h2 id="{anchor}">{html.escape(e.title)}</h2>')
        if e.simulated:
            parts.append(f'<p class="sim">{html.escape(str(e.doc.get("label") or SIM_LABEL))}</p>')
        parts.append(_summary_table(e))
        figs = study_figures(e)
        if e.study_note:
            parts.append(f'<p class="note">{html.escape(e.study_note.strip())}</p>')
        parts.append('<div class="grid">')
        for caption, fig in figs:
            parts.append(f"<div><h3>{html.escape(caption)}</h3>{_fig_div(fig)}</div>")
        parts.append("</div>")
        for made in (
            png_history(e, png_dir / f"{e.path.stem}-history.png"),
            png_baselines(e, png_dir / f"{e.path.stem}-baselines.png"),
        ):
            if made is not None:
                output.pngs.append(made)
        data[e.path.stem] = {
            "label": e.label,
            "trial_values": [] if e.study is None else [t.value for t in complete_trials(e.study)],
            "finalists": finalist_bars(e.doc),
        }
    payload = json.dumps(data, default=_json_default).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="prefetch-tune-data">{payload}</script>')
    parts.append("</body></html>")
    atomic_write(output.html, "\n".join(parts) + "\n")
    return output


def _json_default(obj: object) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)
