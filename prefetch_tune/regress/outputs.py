"""Sweep outputs: JUnit XML, Markdown and CSV, each labelling simulated results SIMULATED."""

from __future__ import annotations

import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from prefetch_tune.paths import check_output_file
from prefetch_tune.regress.outcomes import Check, PointOutcome, SweepReport
from prefetch_tune.results import atomic_write


def check_output_path(path: Path, flag: str) -> None:
    """Fail early (exit 2) when an output file cannot be written (see `paths`)."""
    check_output_file(path, flag)


def _fmt(value: float | None, spec: str = ",.2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def junit_xml(report: SweepReport) -> str:
    """JUnit XML: one testcase per point; a regression is a <failure> naming metric and values."""
    counts = report.counts()
    failures = counts["fail"] + (0 if report.allow_missing else counts["missing"])
    suite_name = "prefetch-tune sweep" + (" (SIMULATED)" if report.simulated else "")
    suites = ET.Element(
        "testsuites",
        name=suite_name,
        tests=str(len(report.outcomes)),
        failures=str(failures),
        errors=str(counts["error"]),
        time=f"{report.seconds:.3f}",
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=suite_name,
        tests=str(len(report.outcomes)),
        failures=str(failures),
        errors=str(counts["error"]),
        skipped=str(counts["missing"] if report.allow_missing else 0),
        time=f"{report.seconds:.3f}",
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="tolerance_pct", value=f"{report.tolerance:g}")
    ET.SubElement(props, "property", name="results_dir", value=str(report.results_dir))
    for o in report.outcomes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"prefetch-tune.sweep.{o.backend}",
            name=f"{o.name} [{o.label}]",
            time=f"{o.seconds:.3f}",
        )
        cprops = ET.SubElement(case, "properties")
        ET.SubElement(cprops, "property", name="label", value=o.label)
        ET.SubElement(cprops, "property", name="plan", value=o.where)
        if o.path is not None:
            ET.SubElement(cprops, "property", name="result_file", value=str(o.path))
        details = "\n".join(
            [f"[{o.label}] {o.where}"]
            + [f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.message}" for c in o.checks]
            + [f"note: {n}" for n in o.notes]
        )
        if o.status == "fail":
            el = ET.SubElement(
                case,
                "failure",
                type="regression",
                message=f"[{o.label}] " + "; ".join(c.message for c in o.failures),
            )
            el.text = details
        elif o.status == "missing":
            tag = "skipped" if report.allow_missing else "failure"
            el = ET.SubElement(case, tag, message=f"[{o.label}] {o.summary()}")
            if tag == "failure":
                el.set("type", "missing")
        elif o.status == "error":
            el = ET.SubElement(case, "error", type="error", message=f"[{o.label}] {o.summary()}")
            el.text = details
        else:
            out = ET.SubElement(case, "system-out")
            out.text = details
    ET.indent(suites)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
    )


_ICON = {"pass": "✅ pass", "fail": "❌ REGRESSION", "missing": "⚠️ missing", "error": "❌ error"}


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: SweepReport) -> str:
    """A summary for a CI job page ($GITHUB_STEP_SUMMARY)."""
    counts = report.counts()
    verdict = (
        "all points hold"
        if report.ok
        else "REGRESSION"
        if counts["fail"] or counts["error"]
        else "points missing"
    )
    lines = [f"## prefetch-tune sweep: {'✅' if report.ok else '❌'} {verdict}", ""]
    if report.simulated:
        lines += [
            "> **SIMULATED**: some or all results come from the built-in performance model "
            "(sim backend), not from measurements.",
            "",
        ]
    lines += [
        f"{counts['pass']} pass, {counts['fail']} regressed, {counts['missing']} missing"
        f"{' (allowed)' if report.allow_missing and counts['missing'] else ''}, "
        f"{counts['error']} errors; tolerance {report.tolerance:g}% (or the noise band "
        f"when wider); results in `{report.results_dir}`; {report.seconds:.1f} s.",
        "",
    ]
    lines += [
        "| status | point | max-num-seqs | backend | metric | stored | measured | change "
        "| allowed | vs off | vs default |",
        "|---|---|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    for o in report.outcomes:
        checks = {c.name: c for c in o.checks}
        main = checks.get("winner vs stored")
        status = _ICON[o.status]
        if o.status == "missing" and report.allow_missing:
            status = "⚠️ missing (allowed)"

        def beat(base: str, checks: dict[str, Check] = checks) -> str:
            c = checks.get(f"winner beats {base}")
            if c is None:
                return "not claimed"
            return f"{'✅' if c.ok else '❌'} {_fmt(c.pct, '+.2f')}% (±{_fmt(c.band_pct, '.2f')})"

        lines.append(
            f"| {status} | `{o.name}` | {o.max_num_seqs or '-'} | {o.backend} **{o.label}** "
            f"| {o.metric or '-'} | {_fmt(o.stored.get('winner'))} | "
            f"{_fmt(o.measured.get('winner'))} | "
            f"{_fmt(main.pct if main else None, '+.2f')}{'%' if main else ''} | "
            f"{'-' if main is None or main.limit_pct is None else f'{main.limit_pct:.2f}% worse'} | "
            f"{beat('off') if o.status in ('pass', 'fail') else '-'} | "
            f"{beat('default') if o.status in ('pass', 'fail') else '-'} |"
        )
    problems = [o for o in report.outcomes if o.status != "pass"]
    if problems:
        lines += ["", "### Details", ""]
        for o in problems:
            lines.append(f"- **{o.status}** `{o.name}` [{o.label}]: {_md(o.summary())}")
    notes = [(o, n) for o in report.outcomes for n in o.notes if o.status == "pass"]
    if notes:
        lines += ["", "### Notes", ""]
        lines += [f"- `{o.name}`: {_md(n)}" for o, n in notes]
    return "\n".join(lines) + "\n"


def rows(report: SweepReport) -> list[dict[str, Any]]:
    out = []
    for o in report.outcomes:
        checks = {c.name: c for c in o.checks}
        main = checks.get("winner vs stored")
        row: dict[str, Any] = {
            "point": o.name,
            "label": o.label,
            "simulated": o.simulated,
            "status": o.status,
            "backend": o.backend,
            "max_num_seqs": o.max_num_seqs or None,
            "metric": o.metric,
            "direction": ("minimize" if o.minimize else "maximize") if o.metric else None,
        }
        for role in ("winner", "off", "default"):
            row[f"stored_{role}"] = o.stored.get(role)
            row[f"measured_{role}"] = o.measured.get(role)
            row[f"measured_{role}_mad"] = o.mad.get(role)
        row["change_pct"] = main.pct if main else None
        row["band_pct"] = main.band_pct if main else None
        row["allowed_pct"] = main.limit_pct if main else None
        for base in ("off", "default"):
            c = checks.get(f"winner beats {base}")
            row[f"vs_{base}_pct"] = c.pct if c else None
            row[f"vs_{base}_band_pct"] = c.band_pct if c else None
            row[f"vs_{base}_stored_pct"] = c.stored if c else None
            row[f"vs_{base}_holds"] = c.ok if c else None
        row["message"] = o.summary()
        row["result_file"] = str(o.path) if o.path else None
        out.append(row)
    return out


def csv_text(report: SweepReport) -> str:
    import pandas as pd

    columns = list(rows(_empty_like(report))[0]) if not report.outcomes else None
    frame = pd.DataFrame(rows(report), columns=columns)
    return str(frame.to_csv(index=False))


def _empty_like(report: SweepReport) -> SweepReport:
    o = PointOutcome(name="", where="", status="pass", simulated=False, backend="", max_num_seqs=0)
    return SweepReport([o], report.tolerance, report.allow_missing, report.results_dir)


def write_outputs(
    report: SweepReport, junit: Path | None, md: Path | None, csv: Path | None
) -> None:
    for path, render in ((junit, junit_xml), (md, markdown), (csv, csv_text)):
        if path is not None:
            atomic_write(path, render(report))
            path.chmod(0o644)  # CI artifacts: readable like any other output file
