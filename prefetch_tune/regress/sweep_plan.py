"""Sweep plans: which operating points a regression sweep checks, and their stored results.

A sweep plan (TOML) names operating points (`[[point]]` tables) or takes every stored result
(`every_stored_result = true`); each point is matched with its stored result file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prefetch_tune.backends.base import OperatingPoint, Workload
from prefetch_tune.errors import ConfigError
from prefetch_tune.models import Layout, MiB, ModelSpec, Quant, load_model
from prefetch_tune.numbers import non_negative, positive
from prefetch_tune.prefetch import SEMANTICS, Semantics
from prefetch_tune.results import iter_results, result_path
from prefetch_tune.runtime.plan import DEFAULT_CAP_MIB, PlanOptions
from prefetch_tune.tuneconfig import check_keys, read_toml

DEFAULT_TOLERANCE_PCT = 2.0

# [[point]] keys and the types they accept.
POINT_KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "quant": (str,),
    "tp": (int,),
    "dp": (int,),
    "ep": (bool,),
    "hardware": (str,),
    "max_num_seqs": (int, list),
    "semantics": (str,),
    "input_len": (int,),
    "output_len": (int,),
    "sequence_parallel": (bool,),
    "cap_mib": (int, float),
    "backend": (str,),
    "vllm": (dict,),
}
PLAN_KEYS: dict[str, tuple[type, ...]] = {
    "point": (list,),
    "every_stored_result": (bool,),
    "tolerance": (int, float),
    "repeats": (int,),
    "vllm": (dict,),
}


@dataclass(frozen=True)
class PlanPoint:
    """One operating point of a plan, before it is matched with a stored result."""

    where: str  # e.g. "plan.toml: [[point]] 2" (for messages)
    model: ModelSpec
    layout: Layout
    max_num_seqs: int
    hardware: str = "atlas-a2"
    semantics: Semantics = "plugin"
    sequence_parallel: bool = False
    cap_mib: float = DEFAULT_CAP_MIB
    input_len: int | None = None
    output_len: int | None = None
    backend: str | None = None
    vllm: dict[str, Any] = field(default_factory=dict)  # over the plan's [vllm] table

    def operating_point(self, workload: Workload | None = None) -> OperatingPoint:
        wl = workload or Workload(
            input_len=self.input_len or Workload.input_len,
            output_len=self.output_len or Workload.output_len,
        )
        return OperatingPoint(
            model=self.model,
            layout=self.layout,
            max_num_seqs=self.max_num_seqs,
            hardware=self.hardware,
            workload=wl,
            semantics=self.semantics,
            options=PlanOptions(self.sequence_parallel, int(self.cap_mib * MiB)),
        )


@dataclass
class Plan:
    path: Path
    points: list[PlanPoint] = field(default_factory=list)
    every_stored_result: bool = False
    tolerance: float | None = None
    repeats: int | None = None
    vllm: dict[str, Any] = field(default_factory=dict)


def load_plan(path: Path) -> Plan:
    """Read a sweep plan; a bad key, type, model or layout is a ConfigError naming it."""
    doc = read_toml(path, "sweep plan")
    check_keys(doc, PLAN_KEYS, str(path))
    plan = Plan(
        path=path,
        every_stored_result=bool(doc.get("every_stored_result", False)),
        vllm=dict(doc.get("vllm", {})),
    )
    if "tolerance" in doc:
        plan.tolerance = non_negative(doc["tolerance"], f"{path}: tolerance")
    if "repeats" in doc:
        plan.repeats = int(positive(doc["repeats"], f"{path}: repeats", integer=True))
    for i, raw in enumerate(doc.get("point", []), start=1):
        where = f"{path}: [[point]] {i}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a table")
        plan.points.extend(_plan_points(raw, where))
    if not plan.points and not plan.every_stored_result:
        raise ConfigError(f"{path}: no [[point]] tables and every_stored_result is not true")
    return plan


def _plan_points(raw: dict[str, Any], where: str) -> list[PlanPoint]:
    check_keys(raw, POINT_KEYS, where)
    for required in ("model", "max_num_seqs"):
        if required not in raw:
            raise ConfigError(f"{where}: missing key {required!r}")
    seqs = raw["max_num_seqs"]
    seqs = [seqs] if isinstance(seqs, int) else seqs
    if not seqs or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in seqs):
        raise ConfigError(f"{where}: max_num_seqs must be a positive integer or a list of them")
    quant = raw.get("quant")
    if quant is not None and quant not in ("w8a8", "bf16"):
        raise ConfigError(f"{where}: quant {quant!r}: expected w8a8 or bf16")
    semantics = raw.get("semantics", "plugin")
    if semantics not in SEMANTICS:
        raise ConfigError(
            f"{where}: semantics {semantics!r}: expected one of {', '.join(SEMANTICS)}"
        )
    for key in ("input_len", "output_len", "tp", "dp"):
        if key in raw:
            positive(raw[key], f"{where}: {key}", integer=True)
    cap = positive(raw.get("cap_mib", DEFAULT_CAP_MIB), f"{where}: cap_mib")
    try:
        spec = load_model(str(raw["model"]), cast(Quant | None, quant))
        layout = Layout(
            tp=int(raw.get("tp", 1)), dp=int(raw.get("dp", 1)), ep=bool(raw.get("ep", False))
        )
        spec.check_layout(layout)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return [
        PlanPoint(
            where=f"{where} (max_num_seqs {n})",
            model=spec,
            layout=layout,
            max_num_seqs=n,
            hardware=str(raw.get("hardware", "atlas-a2")),
            semantics=cast(Semantics, semantics),
            sequence_parallel=bool(raw.get("sequence_parallel", False)),
            cap_mib=cap,
            input_len=raw.get("input_len"),
            output_len=raw.get("output_len"),
            backend=raw.get("backend"),
            vllm=dict(raw.get("vllm", {})),
        )
        for n in seqs
    ]


def point_from_result(path: Path, doc: dict[str, Any]) -> PlanPoint:
    """The plan point a stored result describes (for `every_stored_result`)."""
    model = doc["model"]
    source = str(model.get("source", ""))
    ref = model["name"] if source.startswith("catalog") or not source else source
    try:
        spec = load_model(ref, cast(Quant, model["quant"]))
        lay = doc["layout"]
        layout = Layout(tp=int(lay["tp"]), dp=int(lay["dp"]), ep=bool(lay["ep"]))
        wl = doc.get("workload", {})
        return PlanPoint(
            where=str(path),
            model=spec,
            layout=layout,
            max_num_seqs=int(doc["max_num_seqs"]),
            hardware=str(doc["hardware"]),
            semantics=cast(Semantics, doc["semantics"]),
            sequence_parallel=bool(doc.get("sequence_parallel", False)),
            cap_mib=float(doc.get("cap_mib", DEFAULT_CAP_MIB)),
            input_len=wl.get("input_len"),
            output_len=wl.get("output_len"),
            backend=str(doc["backend"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: damaged result file ({type(exc).__name__}: {exc})") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _stored_backends(results_dir: Path) -> list[str]:
    """Backends with stored results, measured ones first (never prefer the sim silently)."""
    names = {
        str(doc["backend"])
        for _, doc in iter_results(results_dir)
        if not isinstance(doc, ConfigError)
    }
    return sorted(names, key=lambda b: (b == "sim", b))


def find_stored(
    results_dir: Path, point: OperatingPoint, backend: str | None
) -> tuple[Path | None, str | None]:
    """The stored result of a point: for `backend`, else for any backend (measured first)."""
    if backend is not None:
        path = result_path(results_dir, point, backend)
        return (path if path.exists() else None), backend
    for name in _stored_backends(results_dir):
        path = result_path(results_dir, point, name)
        if path.exists():
            return path, name
    return None, None
