"""`prefetch-tune profile`: reading torch_npu exports, matching prefetches to knobs, verdicts,
and calibrating a hardware profile.

Fixtures with known truth:

* simulated traces (`simulate_step(..., with_events=True)` + `trace.step_trace`): the truth per
  knob is read from the sim's own events (the CMO, the op named by the plan's `start_before`,
  the EVENT_WAIT carrying the knob);
* hand-made exports that follow the documented layouts (docs/profile-formats.md): trace_view.json as a bare array with absolute string timestamps, host processes
  to skip, late metadata, two devices, two steps, fused AddRmsNormQuant, EVENT_RECORD/WAIT
  tasks; kernel_details.csv with reordered / extra / missing optional columns. The builder
  places every task itself, so it knows each prefetch's overlap, lateness and stall.

Stated tolerances: simulated traces 0.001 µs (float round-off only); hand-made exports
0.002 µs and 0.001 in overlap fraction (timestamps written with 3 decimals); calibration within
5% (in practice the fit is exact to float precision on simulated traces).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_bad_input
from typer.testing import CliRunner

import prefetch_tune.analysis.exports as exports
from prefetch_tune.analysis.calibration import calibrate, write_profile
from prefetch_tune.analysis.exports import iter_trace_events, load_profile
from prefetch_tune.analysis.kernels import (
    ATTN,
    COMM,
    MATMUL,
    NORM,
    NORM_QUANT,
    OTHER,
    PREFETCH,
    QUANT,
    SWIGLU,
    WAIT,
    kernel_category,
)
from prefetch_tune.analysis.pairing import (
    ROLE_BITS,
    PlanChoice,
    choose_plan,
    label_layers,
    roles_of,
)
from prefetch_tune.analysis.profile import ProfileReport, analyse
from prefetch_tune.analysis.trace import OP_TYPES, step_trace
from prefetch_tune.analysis.verdicts import KnobReport, Rules, knob_verdict
from prefetch_tune.backends.base import OperatingPoint, Workload
from prefetch_tune.backends.sim import StepResult, simulate_step
from prefetch_tune.cli import app
from prefetch_tune.cli.profile_cmd import profile as profile_command
from prefetch_tune.hardware import HardwareProfile, load_hardware, parse_profile
from prefetch_tune.models import Layout, MiB, load_model
from prefetch_tune.prefetch import PrefetchConfig, Semantics
from prefetch_tune.runtime import plan as P

if not any(c.name == "profile" for c in app.registered_commands):  # until cli/__init__ has it
    app.command("profile")(profile_command)

MIB = 1048576
SIM_TOL_US = 1e-3
HAND_TOL_US = 2e-3
HAND_TOL_FRAC = 1e-3


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


# ---- simulated traces --------------------------------------------------------------------------


TP4 = Layout(tp=4)


def sim_step(
    model: str = "qwen3-32b",
    layout: Layout = TP4,
    tokens: int = 72,
    config: PrefetchConfig | None = None,
    hw: HardwareProfile | None = None,
    semantics: Semantics = "plugin",
    options: P.PlanOptions | None = None,
) -> StepResult:
    point = OperatingPoint(
        model=load_model(model),
        layout=layout,
        max_num_seqs=tokens,
        workload=Workload(),
        semantics=semantics,
        options=options or P.PlanOptions(),
    )
    return simulate_step(
        config or PrefetchConfig.default(),
        point,
        hw or load_hardware("atlas-a2"),
        tokens,
        3500,
        0,
        with_events=True,
    )


def write_sim(tmp_path: Path, step: StepResult, name: str = "trace_view.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(step_trace(step)))
    return path


@dataclass(frozen=True)
class Truth:
    knob: str
    weight: str
    overlap_frac: float
    late_us: float
    stall_us: float
    nbytes: int


def sim_truth(step: StepResult) -> list[Truth]:
    """Per prefetch of one layer, straight from the sim's events."""
    events = step.layer.events
    out = []
    for ev in events:
        if ev.name != "CMO":
            continue
        vec = next(e for e in events if e.name == ev.args["start_before"])
        cs, ce = ev.start * 1e6, (ev.start + ev.dur) * 1e6
        vs, ve = vec.start * 1e6, (vec.start + vec.dur) * 1e6
        overlap = max(0.0, min(ce, ve) - max(cs, vs))
        stall = sum(
            e.dur * 1e6
            for e in events
            if e.name == "EVENT_WAIT"
            and e.args["knob"] == ev.args["knob"]
            and e.start * 1e6 >= vs
            and e.start * 1e6 <= ce + 1e-6
        )
        weight = next(
            o.weight
            for o in step.layer_plan.ops
            if o.knob == ev.args["knob"] and o.start_before == ev.args["start_before"]
        )
        out.append(
            Truth(ev.args["knob"], weight, overlap / (ce - cs), ce - ve, stall, ev.args["size(B)"])
        )
    return out


def check_against_sim(report: ProfileReport, step: StepResult) -> None:
    truth = {(t.knob, t.weight): t for t in sim_truth(step)}
    layers = step.layer_plan.model.layers
    assert len(report.instances) == len(truth) * layers
    assert not report.unassigned
    for inst in report.instances:
        assert inst.knob == inst.knob_arg  # the arg is only checked, never used to match
        t = truth[(inst.knob, inst.weight)]
        assert inst.overlap_frac == pytest.approx(t.overlap_frac, abs=1e-6)
        assert inst.late_us == pytest.approx(t.late_us, abs=SIM_TOL_US)
        assert inst.stall_us == pytest.approx(t.stall_us, abs=SIM_TOL_US)
        assert inst.nbytes == t.nbytes
    for k in report.knobs:
        t = truth[(k.knob, k.weight)]
        assert k.count == layers
        assert k.overlap_median == pytest.approx(t.overlap_frac, abs=1e-6)
        assert k.late_median_us == pytest.approx(t.late_us, abs=SIM_TOL_US)
        assert k.stall_median_us == pytest.approx(t.stall_us, abs=SIM_TOL_US)


def test_sim_dense_default_recovers_each_knob(tmp_path: Path) -> None:
    step = sim_step()
    data = load_profile(write_sim(tmp_path, step))
    assert data.simulated and data.fmt == "trace_view"
    choice = choose_plan(data.other_data, tp=4)
    assert choice is not None
    assert choice.provenance["model"] == "trace otherData"
    assert choice.provenance["tp"] == "options"
    report = analyse(data, choice)
    check_against_sim(report, step)
    assert [k.knob for k in report.knobs] == ["attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"]
    by = {k.knob: k for k in report.knobs}
    # qkv: a CMO longer than its quantize -> late -> lower, with the size that fits
    assert by["attn.qkv"].verdict == "lower"
    assert 0 < (by["attn.qkv"].ratio_hint or 0) < 1
    assert by["mlp.down"].verdict == "lower"
    assert by["mlp.down"].stall_source == "EVENT_WAIT"
    # gate_up runs past its norm but is joined only after SwiGlu, with no stall: keep
    assert by["mlp.gate_up"].verdict == "keep"
    assert "no stall" in by["mlp.gate_up"].reason
    # the gate_up join sits after its consumer: the matmul starts before the fill ends
    assert by["mlp.gate_up"].consumer_margin_median_us is not None
    assert by["mlp.gate_up"].consumer_margin_median_us < 0
    # bandwidth over the whole CMO (issue included): 18 MiB / (issue + 18 MiB at prefetch_bw)
    hw = load_hardware("atlas-a2")
    whole_cmo_s = hw.cmo_issue_us * 1e-6 + 18 * MIB / hw.prefetch_bw
    assert by["mlp.down"].bandwidth_median == pytest.approx(18 * MIB / whole_cmo_s, rel=1e-3)


def test_plan_inputs_from_other_data_layout(tmp_path: Path) -> None:
    """A trace whose otherData also carries the layout needs no flags at all."""
    step = sim_step("qwen3-235b-a22b", Layout(tp=4, dp=4, ep=True), 144)
    doc = step_trace(step)
    doc["otherData"]["layout"] = {"tp": 4, "dp": 4, "ep": True}
    path = tmp_path / "trace_view.json"
    path.write_text(json.dumps(doc))
    result = run("profile", str(path), "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["plan"]["layout"] == {"tp": 4, "dp": 4, "ep": True}
    assert out["plan"]["provenance"]["ep"] == "trace otherData"
    assert not any("CMO size" in n for n in out["notes"])
    # explicit flags win over otherData
    result = run("profile", str(path), "--json", "--tp", "8", "--dp", "2")
    assert json.loads(result.stdout)["plan"]["layout"] == {"tp": 8, "dp": 2, "ep": True}


def test_sim_trace_with_wrong_layout_is_flagged(tmp_path: Path) -> None:
    data = load_profile(write_sim(tmp_path, sim_step()))  # made at tp4, read as tp1 (default)
    other = {k: v for k, v in data.other_data.items() if k != "layout"}  # as a real export
    report = analyse(data, choose_plan(other))
    assert {k.knob for k in report.knobs} == {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"}
    assert any("the profile's CMO size" in n and "--tp" in n for n in report.notes)


def test_sim_knob_arg_is_not_used_for_matching(tmp_path: Path) -> None:
    step = sim_step()
    doc = step_trace(step)
    for ev in doc["traceEvents"]:
        ev.get("args", {}).pop("knob", None)
    path = tmp_path / "noknob.json"
    path.write_text(json.dumps(doc))
    data = load_profile(path)
    report = analyse(data, choose_plan(data.other_data, tp=4))
    assert all(i.knob_arg is None for i in report.instances)
    assert [(k.knob, k.count) for k in report.knobs] == [
        ("attn.qkv", 64),
        ("attn.o", 64),
        ("mlp.gate_up", 64),
        ("mlp.down", 64),
    ]


def test_sim_moe_expert_parallel(tmp_path: Path) -> None:
    layout = Layout(tp=4, dp=4, ep=True)
    step = sim_step("qwen3-235b-a22b", layout, 144, hw=load_hardware("atlas-a3"))
    data = load_profile(write_sim(tmp_path, step))
    report = analyse(data, choose_plan(data.other_data, tp=4, dp=4, ep=True))
    check_against_sim(report, step)
    assert {k.knob for k in report.knobs} == {"attn.qkv", "attn.o", "moe.gate_up"}
    moe = next(k for k in report.knobs if k.knob == "moe.gate_up")
    assert moe.vector_op.startswith("MoeGatingTopKSoftmax")
    assert moe.consumer is not None and moe.consumer.startswith("GroupedMatmul")


def test_sim_native_semantics_sees_attn_o_on_down_proj(tmp_path: Path) -> None:
    options = P.PlanOptions(sequence_parallel=True)
    step = sim_step(tokens=16, semantics="native-0.23", options=options)
    data = load_profile(write_sim(tmp_path, step))
    report = analyse(data, choose_plan(data.other_data, tp=4, options=options))
    check_against_sim(report, step)
    sites = [(k.knob, k.weight) for k in report.knobs]
    assert ("attn.o", "o_proj") in sites and ("attn.o", "down_proj") in sites
    assert ("mlp.gate_up", "gate_up_proj") in sites
    # without --sequence-parallel the plan says mlp.gate_up cannot fire: still matched, flagged
    other = {k: v for k, v in data.other_data.items() if k != "sequence_parallel"}
    report2 = analyse(data, choose_plan(other, tp=4))
    assert next(k for k in report2.knobs if k.knob == "mlp.gate_up").plan_fires is False
    assert any("does not fire" in n for n in report2.notes)


def test_sim_cli_table_and_json(tmp_path: Path) -> None:
    path = write_sim(tmp_path, sim_step())
    result = run("profile", str(path), "--tp", "4")
    assert result.exit_code == 0, result.stderr
    assert "SIMULATED" in result.stderr
    assert "mlp.down (down_proj)" in result.stderr
    assert result.stdout == ""
    result = run("profile", str(path), "--tp", "4", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["simulated"] is True
    assert doc["prefetch_tasks"] == doc["matched"] == 256
    assert doc["plan"]["model"] == "qwen3-32b"
    assert doc["plan"]["layout"]["tp"] == 4
    knobs = {k["knob"]: k for k in doc["knobs"]}
    assert knobs["mlp.down"]["verdict"] == "lower"
    assert 0 < knobs["mlp.down"]["ratio_hint"] < 0.576
    assert knobs["attn.qkv"]["bandwidth_gbps"] > 0


def test_sim_raise_when_fully_hidden(tmp_path: Path) -> None:
    """A small prefetch that ends well inside its vector op: the guide says raise."""
    cfg = PrefetchConfig.make(
        ratios={"mlp.gate_up": 0.0, "mlp.down": 0.02, "attn.qkv": 0.0, "attn.o": 0}
    )  # 0.625 MiB: ~2 us of fill at the profile's prefetch_bw, inside the ~8 us SwiGlu
    step = sim_step(config=cfg)
    data = load_profile(write_sim(tmp_path, step))
    report = analyse(data, choose_plan(data.other_data, tp=4))
    check_against_sim(report, step)
    (down,) = report.knobs
    assert down.late_share == 0 and down.overlap_median == pytest.approx(1.0)
    assert down.verdict == "raise", down.reason
    assert down.ratio_hint is not None and down.ratio_hint > 0.02


# ---- no prefetch / bad input -------------------------------------------------------------------


def test_no_prefetch_says_so_with_plan_causes(tmp_path: Path) -> None:
    path = write_sim(tmp_path, sim_step(config=PrefetchConfig.off()))
    result = run("profile", str(path), "--tp", "4")
    assert result.exit_code == 0, result.stderr
    assert "no prefetch" in result.stderr
    assert "prefetch disabled" in result.stderr
    result = run("profile", str(path), "--tp", "4", "--json")
    doc = json.loads(result.stdout)
    assert doc["prefetch_found"] is False
    assert doc["knobs"] == [] and doc["prefetch_tasks"] == 0
    assert any("prefetch disabled" in c for c in doc["no_prefetch_causes"])


def test_no_prefetch_above_mlp_token_limit(tmp_path: Path) -> None:
    cfg = PrefetchConfig.make(
        ratios={"mlp.gate_up": 1.0, "mlp.down": 1.0, "attn.qkv": 0, "attn.o": 0}
    )
    path = write_sim(tmp_path, sim_step(tokens=600, config=cfg))
    result = run("profile", str(path), "--tp", "4", "--json")
    assert result.exit_code == 0, result.stderr
    causes = json.loads(result.stdout)["no_prefetch_causes"]
    assert any("MLP prefetch only below 500" in c for c in causes)


def test_no_prefetch_without_model_gives_generic_causes(tmp_path: Path) -> None:
    trace = HandTrace(knobs=False).build()
    path = tmp_path / "trace_view.json"
    path.write_text(json.dumps(trace.trace_view()))
    result = run("profile", str(path))
    assert result.exit_code == 0, result.stderr
    assert "no model given" in result.stderr


def test_prefetch_without_model_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "trace_view.json"
    path.write_text(json.dumps(HandTrace().build().trace_view()))
    assert_bad_input(run("profile", str(path)), "--model", "prefetch tasks")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("trace_view.json", '{"traceEvents": [{"ph": "X", "name": "a"', "trace_view.json"),
        ("trace_view.json", "\x00\x01garbage", "trace_view.json"),
        ("trace_view.json", '{"traceEvents": [1, 2 3]}', "trace_view.json"),
        ("trace_view.json", '{"traceEvents": [] "otherData": {}}', "expected ','"),
        ("kernel_details.csv", "Foo,Bar\n1,2\n", "Start Time(us)"),
        ("kernel_details.csv", "", "kernel_details.csv"),
    ],
)
def test_unreadable_file_exits_2_naming_it(
    tmp_path: Path, name: str, content: str, needle: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    line = assert_bad_input(run("profile", str(path), "-m", "qwen3-32b"), str(path))
    assert needle in line


def test_missing_path_and_empty_dir_exit_2(tmp_path: Path) -> None:
    assert_bad_input(run("profile", str(tmp_path / "nope")), "nope")
    (tmp_path / "empty").mkdir()
    assert_bad_input(run("profile", str(tmp_path / "empty")), "ASCEND_PROFILER_OUTPUT")


def test_bad_time_value_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "kernel_details.csv"
    path.write_text("Name,Type,Start Time(us),Duration(us)\nCMO,CMO,soon,1.0\n")
    assert_bad_input(run("profile", str(path), "-m", "qwen3-32b"), str(path), "row 2")


# ---- hand-made exports in the documented layouts ------------------------------------------------

T0 = 1_732_873_412_000_000  # absolute µs, as the profiler writes them

# (name in trace_view, op Type, Accelerator Core, duration µs, role tag)
DENSE_LAYER: list[tuple[str, str, str, float, str]] = [
    ("aclnnAddRmsNormQuant_AddRmsNormQuant", "AddRmsNormQuant", "AI_VECTOR_CORE", 12.0, "qkv"),
    ("aclnnQuantMatmulV4_QuantBatchMatmulV3", "QuantBatchMatmulV3", "AI_CORE", 9.0, "qkv_mm"),
    ("aclnnRmsNorm_RmsNorm", "RmsNorm", "AI_VECTOR_CORE", 3.0, ""),
    ("aclnnRmsNorm_RmsNorm", "RmsNorm", "AI_VECTOR_CORE", 3.0, ""),
    ("aclnnApplyRotaryPosEmb_ApplyRotaryPosEmb", "ApplyRotaryPosEmb", "AI_VECTOR_CORE", 4.0, ""),
    ("aclnnReshapeAndCache_ReshapeAndCache", "ReshapeAndCache", "AI_VECTOR_CORE", 2.0, ""),
    (
        "aclnnFusedInferAttentionScore_FusedInferAttentionScore",
        "FusedInferAttentionScore",
        "MIX_AIC",
        120.0,
        "",
    ),
    ("aclnnAscendQuantV3_AscendQuantV2", "AscendQuantV2", "AI_VECTOR_CORE", 5.0, "o"),
    ("aclnnQuantMatmulV4_QuantBatchMatmulV3", "QuantBatchMatmulV3", "AI_CORE", 8.0, "o_mm"),
    ("hcom_allReduce__532_0_1", "hcom_allReduce_", "COMMUNICATION", 15.0, ""),
    ("aclnnAddRmsNormQuant_AddRmsNormQuant", "AddRmsNormQuant", "AI_VECTOR_CORE", 10.0, "gate_up"),
    ("aclnnQuantMatmulV4_QuantBatchMatmulV3", "QuantBatchMatmulV3", "AI_CORE", 60.0, "gu_mm"),
    ("aclnnSwiGlu_SwiGlu", "SwiGlu", "AI_VECTOR_CORE", 6.0, "down"),
    ("aclnnDynamicQuant_DynamicQuant", "DynamicQuant", "AI_VECTOR_CORE", 4.0, ""),
    ("aclnnQuantMatmulV4_QuantBatchMatmulV3", "QuantBatchMatmulV3", "AI_CORE", 30.0, "down_mm"),
    ("hcom_allReduce__532_0_1", "hcom_allReduce_", "COMMUNICATION", 15.0, ""),
]
# knob -> (weight, tag of the op it starts at, tag of its join op, delay after the op starts,
#          CMO duration). Designed: qkv hidden with slack (raise), o a little late (lower),
#          gate_up starts 0.8 µs early (during the all-reduce) and ends just in time (keep),
#          down very late (off).
HAND_KNOBS: dict[str, tuple[str, str, str, float, float]] = {
    "attn.qkv": ("qkv_proj", "qkv", "qkv", 0.5, 8.0),
    "attn.o": ("o_proj", "o", "o", 0.3, 5.8),
    "mlp.gate_up": ("gate_up_proj", "gate_up", "down", -0.8, 9.9),
    "mlp.down": ("down_proj", "down", "down", 0.5, 15.0),
}
HAND_VERDICTS = {"attn.qkv": "raise", "attn.o": "lower", "mlp.gate_up": "keep", "mlp.down": "lower"}
HAND_ARGS = (
    "--model",
    "qwen3-32b",
    "--tp",
    "4",
    "--tokens",
    "64",
    "--set",
    "attn.qkv=0.5",
    "--set",
    "attn.o=0.5",
    "--set",
    "mlp.gate_up=0.2",
    "--set",
    "mlp.down=0.3",
)
HAND_CONFIG = PrefetchConfig.make(
    ratios={"attn.qkv": 0.5, "attn.o": 0.5, "mlp.gate_up": 0.2, "mlp.down": 0.3}
)


def abs_ts(rel_us: float) -> str:
    """T0 + rel_us in µs with 3 decimals, exactly (a float would keep only 0.25 µs there)."""
    return str(Decimal(T0) + Decimal(f"{rel_us:.3f}"))


GAP = 0.6  # launch gap between kernels on the compute stream


@dataclass
class Task:
    device: int
    stream: int
    name: str
    op_type: str
    core: str
    start: float  # µs after T0, on a 0.001 grid
    dur: float
    step: int
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HandTruth:
    device: int
    knob: str
    start: float
    overlap_frac: float
    late_us: float
    stall_us: float


@dataclass
class HandTrace:
    """Two devices x two steps x three dense layers, every task placed by hand."""

    devices: int = 2
    steps: int = 2
    layers: int = 3
    knobs: bool = True
    tasks: list[Task] = field(default_factory=list)
    truth: list[HandTruth] = field(default_factory=list)

    def build(self) -> HandTrace:
        for dev in range(self.devices):
            t = 5.0 + 3.1 * dev
            compute, side = (3, 17) if dev == 0 else (40, 41)
            for step in range(self.steps):
                t = self._op(dev, compute, step, t, "aclnnEmbedding_Embedding", "Embedding", 6.0)
                for layer in range(self.layers):
                    t = self._layer(dev, compute, side, step, layer, t)
                t = self._op(dev, compute, step, t, "aclnnMatmul_MatMulV2", "MatMulV2", 40.0)
                t = self._op(dev, compute, step, t, "aclnnArgMax_ArgMaxV2", "ArgMaxV2", 5.0)
                t += 800.0  # scheduler gap between steps
        return self

    def _op(
        self, dev: int, stream: int, step: int, t: float, name: str, op: str, d: float
    ) -> float:
        self.tasks.append(Task(dev, stream, name, op, "AI_CORE", round(t, 3), d, step))
        return round(t + d + GAP, 3)

    def _layer(self, dev: int, compute: int, side: int, step: int, layer: int, t: float) -> float:
        jitter = 1.0 + 0.03 * ((layer + step + dev) % 3)
        placed: dict[str, Task] = {}
        pending: list[tuple[str, float, float]] = []  # knob, cmo start, cmo end
        for name, op_type, core, base, tag in DENSE_LAYER:
            dur = round(base * (jitter if core == "AI_VECTOR_CORE" else 1.0), 3)
            starts_here = [k for k, v in HAND_KNOBS.items() if v[1] == tag] if self.knobs else []
            for _ in starts_here:  # event record for the prefetch stream to wait on
                self.tasks.append(
                    Task(dev, compute, "EVENT_RECORD", "", "EVENT_RECORD_SQE", t - 0.3, 0.05, step)
                )
            task = Task(dev, compute, name, op_type, core, round(t, 3), dur, step)
            self.tasks.append(task)
            placed[tag] = task
            for knob in starts_here:
                _, _, _, delay, cdur = HAND_KNOBS[knob]
                cdur = round(cdur * (1.0 + 0.02 * (layer % 4)), 3)
                cs = round(t + delay, 3)
                self.tasks.append(
                    Task(
                        dev, side, "EVENT_WAIT", "", "EVENT_WAIT_SQE", round(cs - 0.2, 3), 0.1, step
                    )
                )
                cmo_name, cmo_tt = ("CMO", "SDMA_SQE") if dev == 0 else ("SDMA_TASK", "CMO")
                self.tasks.append(
                    Task(dev, side, cmo_name, "", cmo_tt, cs, cdur, step, {"knob": knob})
                )
                pending.append((knob, cs, round(cs + cdur, 3)))
            end = round(t + dur, 3)
            t = round(end + GAP, 3)
            joins = [p for p in pending if HAND_KNOBS[p[0]][2] == tag] if tag else []
            waited_until = end
            for knob, cs, ce in sorted(joins, key=lambda p: p[2]):
                stall = round(max(0.0, ce - waited_until), 3)
                if stall > 0:
                    self.tasks.append(
                        Task(
                            dev,
                            compute,
                            "EVENT_WAIT",
                            "",
                            "EVENT_WAIT_SQE",
                            waited_until,
                            stall,
                            step,
                        )
                    )
                    waited_until = round(waited_until + stall, 3)
                vec = placed[HAND_KNOBS[knob][1]]
                ve = round(vec.start + vec.dur, 3)
                overlap = max(0.0, min(ce, ve) - max(cs, vec.start))
                self.truth.append(
                    HandTruth(dev, knob, cs, overlap / (ce - cs), round(ce - ve, 3), stall)
                )
                pending.remove((knob, cs, ce))
            t = round(max(t, waited_until + GAP), 3)
        assert not pending
        return t

    # -- writers

    def trace_view_text(self, string_ts: bool = True) -> str:
        """trace_view.json text; `string_ts=False` writes absolute µs as bare JSON numbers
        (with all their digits, which a float would not keep)."""
        return bare_numbers(json.dumps(self.trace_view(string_ts)))

    def trace_view(self, string_ts: bool = True) -> list[dict[str, Any]]:
        """A bare JSON array like torch_npu's trace_view.json."""
        events: list[dict[str, Any]] = []
        pid = {0: 2_000_000, 1: 2_000_001}
        meta_late: list[dict[str, Any]] = []
        for dev in range(self.devices):
            meta = [
                {
                    "ph": "M",
                    "name": "process_name",
                    "pid": pid[dev],
                    "tid": 0,
                    "args": {"name": "Ascend Hardware"},
                },
                {
                    "ph": "M",
                    "name": "process_labels",
                    "pid": pid[dev],
                    "tid": 0,
                    "args": {"labels": f"NPU {dev}"},
                },
                {
                    "ph": "M",
                    "name": "process_sort_index",
                    "pid": pid[dev],
                    "tid": 0,
                    "args": {"sort_index": 9},
                },
            ]
            for s in sorted({t.stream for t in self.tasks if t.device == dev}):
                meta.append(
                    {
                        "ph": "M",
                        "name": "thread_name",
                        "pid": pid[dev],
                        "tid": s,
                        "args": {"name": f"Stream {s}"},
                    }
                )
            # device 1's metadata comes at the end of the file
            (events if dev == 0 else meta_late).extend(meta)
        events += [
            {
                "ph": "M",
                "name": "process_name",
                "pid": 31337,
                "tid": 0,
                "args": {"name": "Python3 (31337)"},
            },
            {
                "ph": "M",
                "name": "process_name",
                "pid": 1_000_000,
                "tid": 0,
                "args": {"name": "CANN"},
            },
            {
                "ph": "M",
                "name": "process_name",
                "pid": 3_000_000,
                "tid": 0,
                "args": {"name": "Overlap Analysis"},
            },
        ]
        for i, t in enumerate(self.tasks):
            ts = abs_ts(t.start) if string_ts else f"__NUM__{abs_ts(t.start)}"
            if "knob" in t.args:
                # what the host and CANN layers show of it: never device tasks
                events.append(
                    {
                        "ph": "X",
                        "name": "npu::npu_prefetch",
                        "pid": 31337,
                        "tid": 31337,
                        "ts": abs_ts(t.start - 4),
                        "dur": 2.0,
                        "args": {},
                    }
                )
                events.append(
                    {
                        "ph": "X",
                        "name": "AscendCL@aclrtCmoAsync",
                        "pid": 1_000_000,
                        "tid": 9,
                        "ts": abs_ts(t.start - 3),
                        "dur": 1.0,
                        "args": {},
                    }
                )
            args: dict[str, Any] = {
                "Model Id": 4294967295,
                "Task Type": t.core,
                "Physic Stream Id": t.stream,
                "Task Id": i,
                "Batch Id": 0,
                "Subtask Id": 4294967295,
                "connection_id": 1000 + i,
            }
            if "knob" in t.args:
                args["knob"] = t.args["knob"]
            events.append(
                {
                    "ph": "X",
                    "name": t.name,
                    "pid": pid[t.device],
                    "tid": t.stream,
                    "ts": ts,
                    "dur": round(t.dur, 3),
                    "args": args,
                }
            )
            if i % 7 == 0:
                events.append(
                    {
                        "ph": "f",
                        "id": 1000 + i,
                        "pid": pid[t.device],
                        "tid": t.stream,
                        "ts": ts,
                        "cat": "HostToDevice",
                        "name": "HostToDevice",
                        "bp": "e",
                    }
                )
        events.append(
            {
                "ph": "X",
                "name": "Computing",
                "pid": 3_000_000,
                "tid": 0,
                "ts": f"{T0:.3f}",
                "dur": 5000.0,
                "args": {},
            }
        )
        return events + meta_late

    def kernel_details(self, variant: str) -> str:
        """kernel_details.csv: `full` (Step Id, Stream ID, PMU columns, `Block Dim`, tab-suffixed
        times) or `default` (reordered default columns, no Step Id / Stream ID, `Block Num`)."""
        if variant == "full":
            header = [
                "Step Id",
                "Model ID",
                "Task ID",
                "Stream ID",
                "Device_id",
                "Name",
                "Type",
                "Accelerator Core",
                "Start Time(us)",
                "Duration(us)",
                "Wait Time(us)",
                "Block Dim",
                "Mix Block Dim",
                "Input Shapes",
                "Input Data Types",
                "Input Formats",
                "Output Shapes",
                "Output Data Types",
                "Output Formats",
                "aicore_time(us)",
                "aic_total_cycles",
                "aic_mte2_ratio",
            ]
        else:
            header = [
                "Name",
                "Device_id",
                "Type",
                "Start Time(us)",
                "Accelerator Core",
                "Duration(us)",
                "Block Num",
                "Wait Time(us)",
            ]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        for i, t in enumerate(self.tasks):
            if t.name.startswith("EVENT"):
                continue  # kernel_details lists kernels (and, here, the CMO tasks)
            is_cmo = "knob" in t.args
            row = {
                "Step Id": str(t.step + 1),
                "Model ID": "4294967295",
                "Task ID": str(i),
                "Stream ID": str(t.stream),
                "Device_id": str(t.device),
                "Name": t.name,
                "Type": "CMO" if is_cmo else t.op_type,
                "Accelerator Core": "SDMA_SQE" if is_cmo else t.core,
                "Start Time(us)": f"{abs_ts(t.start)}\t",
                "Duration(us)": f"{t.dur:.3f}",
                "Wait Time(us)": "0.0",
                "Block Dim": "24",
                "Block Num": "24",
                "Mix Block Dim": "0",
                "Input Shapes": '"64,5120";"5120,1920"',
                "Input Data Types": "INT8;INT8",
                "Input Formats": "ND;FRACTAL_NZ",
                "Output Shapes": '"64,1920"',
                "Output Data Types": "BF16",
                "Output Formats": "ND",
                "aicore_time(us)": f"{t.dur * 0.9:.3f}",
                "aic_total_cycles": "12345",
                "aic_mte2_ratio": "0.71",
            }
            w.writerow([row[h] for h in header])
        return buf.getvalue()


def bare_numbers(text: str) -> str:
    return re.sub(r'"__NUM__([0-9.]+)"', r"\1", text)


def check_hand(report: ProfileReport, trace: HandTrace, device_prefix: str = "") -> None:
    got = sorted(report.instances, key=lambda i: (i.device, i.cmo_start))
    want = sorted(trace.truth, key=lambda t: (t.device, t.start))
    assert len(got) == len(want) == trace.devices * trace.steps * trace.layers * len(HAND_KNOBS)
    assert not report.unassigned
    for g, w in zip(got, want, strict=True):
        assert g.device == f"{device_prefix}NPU {w.device}"
        assert g.knob == w.knob
        assert g.overlap_frac == pytest.approx(w.overlap_frac, abs=HAND_TOL_FRAC)
        assert g.late_us == pytest.approx(w.late_us, abs=HAND_TOL_US)
        assert g.stall_us == pytest.approx(w.stall_us, abs=HAND_TOL_US)
    verdicts = {k.knob: k.verdict for k in report.knobs}
    assert verdicts == HAND_VERDICTS, [(k.knob, k.reason) for k in report.knobs]
    for k in report.knobs:
        assert k.devices == trace.devices
        assert k.bytes_source == "plan"


def hand_plan() -> PlanChoice:
    choice = choose_plan({}, model="qwen3-32b", tp=4, tokens=64, config=HAND_CONFIG)
    assert choice is not None
    return choice


@pytest.mark.parametrize("string_ts", [True, False])
def test_hand_trace_view(tmp_path: Path, string_ts: bool) -> None:
    trace = HandTrace().build()
    path = tmp_path / "trace_view.json"
    path.write_text(trace.trace_view_text(string_ts=string_ts))
    data = load_profile(path)
    assert [d.name for d in data.devices] == ["NPU 0", "NPU 1"]
    assert [d.compute_stream for d in data.devices] == [3, 40]
    report = analyse(data, hand_plan())
    check_hand(report, trace)
    by = {k.knob: k for k in report.knobs}
    assert by["attn.o"].stall_source == "EVENT_WAIT"
    assert by["mlp.down"].ratio_hint is not None and 0 < by["mlp.down"].ratio_hint < 0.3
    assert by["attn.qkv"].ratio_hint is not None and by["attn.qkv"].ratio_hint > 0.5
    assert by["mlp.gate_up"].overlap_median < 1.0  # it starts 0.8 µs before its op


def test_hand_late_starting_cmo_still_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CMO that only starts once its vector op is over (queued on a busy SDMA engine): it is
    still the qkv prefetch (found by walking back from the matmul it starts in), and off."""
    monkeypatch.setitem(HAND_KNOBS, "attn.qkv", ("qkv_proj", "qkv", "qkv", 14.0, 8.0))
    trace = HandTrace(devices=1).build()
    path = tmp_path / "kernel_details.csv"
    path.write_text(trace.kernel_details("default"))
    report = analyse(load_profile(path), hand_plan())
    assert not report.unassigned
    qkv = [i for i in report.instances if i.knob == "attn.qkv"]
    assert len(qkv) == trace.steps * trace.layers
    assert all(i.overlap_us == 0 and i.vector_op.startswith("aclnnAddRmsNormQuant") for i in qkv)
    assert next(k for k in report.knobs if k.knob == "attn.qkv").verdict == "off"


@pytest.mark.parametrize("variant", ["full", "default"])
def test_hand_kernel_details(tmp_path: Path, variant: str) -> None:
    trace = HandTrace().build()
    path = tmp_path / "kernel_details.csv"
    path.write_text(trace.kernel_details(variant))
    data = load_profile(path)
    assert data.fmt == "kernel_details"
    assert [d.name for d in data.devices] == ["NPU 0", "NPU 1"]
    report = analyse(data, hand_plan())
    check_hand(report, trace)
    assert {k.stall_source for k in report.knobs} == {"gap"}
    steps = {i.step for i in report.instances}
    assert steps == ({"1", "2"} if variant == "full" else {None})


def test_hand_profiler_directory_per_rank(tmp_path: Path) -> None:
    root = tmp_path / "prof"
    traces = []
    for rank in (0, 1):
        out = root / f"host_{rank}_20261129_ascend_pt" / "ASCEND_PROFILER_OUTPUT"
        out.mkdir(parents=True)
        trace = HandTrace(devices=1).build()
        traces.append(trace)
        (out / "trace_view.json").write_text(json.dumps(trace.trace_view()))
        # kernel_details.csv next to it is ignored: trace_view.json has the streams and CMOs
        (out / "kernel_details.csv").write_text("garbage,\n")
    result = run("profile", str(root), *HAND_ARGS, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [d["device"] for d in doc["devices"]] == [
        "host_0_20261129_ascend_pt/NPU 0",
        "host_1_20261129_ascend_pt/NPU 0",
    ]
    assert {k["knob"]: k["verdict"] for k in doc["knobs"]} == HAND_VERDICTS
    assert all(k["devices"] == 2 for k in doc["knobs"])


def test_hand_cli_table(tmp_path: Path) -> None:
    path = tmp_path / "kernel_details.csv"
    path.write_text(HandTrace().build().kernel_details("full"))
    result = run("profile", str(path), *HAND_ARGS)
    assert result.exit_code == 0, result.stderr
    for knob, verdict in HAND_VERDICTS.items():
        assert f"{knob} (" in result.stderr
        assert verdict in result.stderr
    assert "SIMULATED" not in result.stderr


# ---- calibration ----------------------------------------------------------------------------------

TRUE_HW = {
    "prefetch_bw": 0.6e12,
    "cmo_issue_us": 3.0,
    "kernel_overhead_us": 5.0,
    "vector_bw_fraction": 0.5,
    "hbm_bw": 1.2e12,
}


def modified_hw(**changes: float) -> HardwareProfile:
    return dataclasses.replace(load_hardware("atlas-a2"), **changes)


def test_calibrate_recovers_the_hardware_behind_a_sim_trace(tmp_path: Path) -> None:
    # two prefetch sizes (intercept measurable); qkv_proj and down_proj left unprefetched so
    # their durations measure HBM bandwidth
    cfg = PrefetchConfig.make(
        ratios={"attn.qkv": 0.0, "attn.o": 1.0, "mlp.gate_up": 0.25, "mlp.down": 0}
    )
    step = sim_step(config=cfg, hw=modified_hw(**TRUE_HW))
    path = write_sim(tmp_path, step)
    data = load_profile(path)
    report = analyse(data, choose_plan(data.other_data, tp=4))
    check_against_sim(report, step)
    cal = calibrate(report, "atlas-a2")
    fits = {f.field: f for f in cal.fits}
    assert set(fits) == set(TRUE_HW)
    for name, value in TRUE_HW.items():
        assert fits[name].value == pytest.approx(value, rel=0.05), name
        assert fits[name].samples > 0
    out = tmp_path / "fitted.toml"
    hw = write_profile(cal, out, path)
    doc = tomllib.loads(out.read_text())
    base_doc = tomllib.loads(Path(load_hardware("atlas-a2").source).read_text())
    for key, entry in base_doc.items():
        if not isinstance(entry, dict) or key == "calibration":
            continue
        if key in TRUE_HW:
            assert doc[key]["kind"] == "fitted"
            assert str(path) in doc[key]["source"]
            assert doc[key]["unit"] == entry["unit"]
        else:
            assert doc[key] == entry, key
    assert doc["calibration"]["source_trace"] == str(path)
    assert doc["calibration"]["samples_prefetch_bw"] == 128
    assert set(doc["calibration"]["fitted"].split(", ")) == set(TRUE_HW)
    # the sim backend loads it like any profile
    assert parse_profile(doc, str(out)) == hw
    loaded = load_hardware(str(out))
    assert loaded.prefetch_bw == pytest.approx(0.6e12, rel=0.05)
    result = run(
        "simulate",
        "--model",
        "qwen3-32b",
        "--tp",
        "4",
        "--max-num-seqs",
        "72",
        "--hardware",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.stderr


def test_calibrate_cli_default_config_within_5_percent(tmp_path: Path) -> None:
    step = sim_step(hw=modified_hw(prefetch_bw=0.6e12))
    path = write_sim(tmp_path, step)
    out = tmp_path / "a2-fitted.toml"
    result = run("profile", str(path), "--tp", "4", "--calibrate", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    fitted = doc["calibration"]["fitted"]
    assert fitted["prefetch_bw"]["value"] == pytest.approx(0.6e12, rel=0.05)
    assert fitted["cmo_issue_us"]["value"] == pytest.approx(
        load_hardware("atlas-a2").cmo_issue_us, rel=0.05
    )
    # 0.6e12 lies above the base's mechanism range: the measurement widens it, and says so
    written = tomllib.loads(out.read_text())["prefetch_bw"]
    assert written["range"][1] == pytest.approx(fitted["prefetch_bw"]["value"])
    assert "widened" in written["range_why"]
    # every dense matmul is prefetched at the default config: HBM bandwidth is not measurable
    assert "hbm_bw" in doc["calibration"]["kept"]
    assert load_hardware(str(out)).prefetch_bw == pytest.approx(0.6e12, rel=0.05)
    result = run("profile", str(path), "--tp", "4", "--calibrate", str(out))
    assert result.exit_code == 0, result.stderr
    assert "prefetch_bw" in result.stderr and "calibration" in result.stderr


def test_calibrate_single_prefetch_size_keeps_issue(tmp_path: Path) -> None:
    cfg = PrefetchConfig.make(
        ratios={"mlp.gate_up": 0.0, "mlp.down": 0.5, "attn.qkv": 0, "attn.o": 0}
    )
    step = sim_step(config=cfg, hw=modified_hw(prefetch_bw=0.45e12))
    data = load_profile(write_sim(tmp_path, step))
    cal = calibrate(analyse(data, choose_plan(data.other_data, tp=4)), "atlas-a2")
    fits = {f.field: f for f in cal.fits}
    assert fits["prefetch_bw"].value == pytest.approx(0.45e12, rel=0.05)
    assert "cmo_issue_us" not in fits and "cmo_issue_us" in cal.kept


def test_calibrate_from_kernel_details_uses_plan_bytes(tmp_path: Path) -> None:
    trace = HandTrace().build()
    path = tmp_path / "kernel_details.csv"
    path.write_text(trace.kernel_details("full"))
    cal = calibrate(analyse(load_profile(path), hand_plan()), "atlas-a2")
    fits = {f.field: f for f in cal.fits}
    assert fits["prefetch_bw"].value > 0
    assert fits["prefetch_bw"].samples == len(trace.truth)


def test_calibrate_needs_a_writable_target(tmp_path: Path) -> None:
    path = write_sim(tmp_path, sim_step())
    assert_bad_input(
        run("profile", str(path), "--tp", "4", "--calibrate", str(tmp_path / "no/dir/x.toml")),
        "--calibrate",
    )


# ---- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "op_type", "task_type", "cat"),
    [
        ("CMO", "", "SDMA_SQE", PREFETCH),
        ("SDMA_TASK", "", "CMO", PREFETCH),
        ("weight_prefetch", "", "", PREFETCH),
        ("EVENT_WAIT", "", "EVENT_WAIT_SQE", WAIT),
        ("hcom_allReduce__532_0_1", "", "COMMUNICATION", COMM),
        ("aclnnQuantMatmulV4_QuantBatchMatmulV3", "", "AI_CORE", MATMUL),
        ("x", "GroupedMatmul", "AI_CORE", MATMUL),
        ("AddRmsNorm_post_attention_layernorm", "", "AI_VECTOR_CORE", NORM),
        ("aclnnAddRmsNormQuant_AddRmsNormQuant", "", "AI_VECTOR_CORE", NORM_QUANT),
        ("PagedAttention_attention", "", "MIX_AIC", ATTN),
        ("DynamicQuant_moe_quant", "", "AI_VECTOR_CORE", QUANT),
        ("SwiGlu_moe_swiglu", "", "AI_VECTOR_CORE", SWIGLU),
        ("aclnnCast_Cast", "", "AI_VECTOR_CORE", OTHER),
    ],
)
def test_kernel_category(name: str, op_type: str, task_type: str, cat: int) -> None:
    assert kernel_category(name, op_type, task_type) == cat


def test_label_layers_dense_and_moe() -> None:
    for model, layout, tokens in (
        ("qwen3-32b", Layout(tp=4), 72),
        ("qwen3-235b-a22b", Layout(tp=4, dp=4, ep=True), 144),
    ):
        step = sim_step(model, layout, tokens)
        compute = [e for e in step.layer.events if e.stream == "compute" and e.name != "EVENT_WAIT"]
        names = [e.name for e in compute] * 3
        kernel_names = [f"{OP_TYPES[n][0]}_{n}" for n in names]
        cats = [kernel_category(n) for n in kernel_names]
        roles, layers = label_layers(cats)
        for i, name in enumerate(names):
            got = roles_of(roles[i])
            if name in ROLE_BITS:
                assert got == [name], (model, i, name, got)
            else:
                assert got == [], (model, name)
        assert max(layers) == 2


def test_stream_reader_matches_json_load_at_any_chunk_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = {
        "schemaVersion": 1,
        "otherData": {"model": "qwen3-32b", "nested": [1, 2.5, {"a": "µ"}]},
        "traceEvents": [
            {
                "ph": "X",
                "name": f'op{i} "quoted" ✓',
                "ts": f"__NUM__{1_732_873_412_345_678 + i}.125",
                "dur": 1.0 / (i + 1),
                "args": {"list": [i, None, True]},
            }
            for i in range(50)
        ],
        "displayTimeUnit": "ns",
        "tail": 12345678901234,
    }
    path = tmp_path / "t.json"
    path.write_text(bare_numbers(json.dumps(doc, indent=1)))
    for chunk in (1, 7, 64, 1 << 20):
        monkeypatch.setattr(exports, "CHUNK_CHARS", chunk)
        it, top = iter_trace_events(path)
        events = list(it)
        assert [e["name"] for e in events] == [e["name"] for e in doc["traceEvents"]]
        assert top["otherData"] == doc["otherData"]
        assert top["tail"] == doc["tail"]
        # long numbers (absolute µs) stay text, so no sub-µs digit is lost
        assert events[3]["ts"] == "1732873412345681.125"
    path.write_text(bare_numbers(json.dumps(doc["traceEvents"])))  # a bare array, as torch_npu
    monkeypatch.setattr(exports, "CHUNK_CHARS", 5)
    it, top = iter_trace_events(path)
    assert len(list(it)) == 50 and top == {}


def test_reader_keeps_only_hardware_processes(tmp_path: Path) -> None:
    trace = HandTrace(devices=1, steps=1, layers=1).build()
    path = tmp_path / "trace_view.json"
    path.write_text(json.dumps(trace.trace_view()))
    data = load_profile(path)
    (dev,) = data.devices
    assert dev.name == "NPU 0"
    assert len(dev.cmos) == len(HAND_KNOBS)  # not the host's npu::npu_prefetch, not CANN's
    names = {dev.op_name(i) for i in range(len(dev.start))}
    assert "Computing" not in names and "aten::linear" not in names


# ---------------------------------------------------------------- verdict rules, one by one


def _op(weight_mib: float, start: str = "post_attention_layernorm") -> P.PrefetchOp:
    nbytes = int(weight_mib * MiB)
    return P.PrefetchOp(
        knob="mlp",
        weight="gate_up",
        weight_bytes=nbytes,
        ratio=0.1,
        requested_bytes=nbytes // 10,
        bytes=nbytes // 10,
        capped=False,
        start_before=start,
        join_after=start,
        consumer="gate_up_proj",
        fires=True,
    )


def _knob(**over: Any) -> KnobReport:
    """A knob report of one hidden, on-time prefetch; tests override what their rule reads."""
    base: dict[str, Any] = {
        "knob": "mlp",
        "weight": "gate_up",
        "count": 20,
        "overlap_median": 1.0,
        "overlap_p90": 1.0,
        "hidden_median_us": 2.0,
        "late_count": 0,
        "late_share": 0.0,
        "late_median_us": -1.0,
        "late_p90_us": -1.0,
        "late_when_late_median_us": 0.0,
        "stall_median_us": 0.0,
        "stall_p90_us": 0.0,
        "stall_source": "EVENT_WAIT",
        "cmo_median_us": 2.0,
        "vector_op": "AddRmsNorm",
        "vector_median_us": 4.0,
        "consumer": "QuantBatchMatmulV3",
        "consumer_margin_median_us": 1.0,
        "bytes_median": 4.0 * MiB,
        "bytes_source": "size(B)",
        "bandwidth_median": 2e9,
        "verdict": "keep",
        "reason": "",
        "ratio_hint": None,
        "plan_ratio": 0.1,
        "plan_bytes": 4 * MiB,
        "plan_fires": True,
        "plan_reason": "",
        "devices": 1,
    }
    base.update(over)
    return KnobReport(**base)


def test_verdict_late_with_too_little_room_is_off() -> None:
    # Late in 80%; at the pace of the vector op only 0.4 MiB of the 40 MiB weight fits behind
    # it (below min_useful_bytes, 1 MiB): not worth its issue and sync, so off, not lower.
    late = {"late_share": 0.8, "late_count": 16, "late_median_us": 18.0, "cmo_median_us": 20.0}
    verdict_, reason, hint = knob_verdict(_knob(vector_median_us=2.0, **late), _op(40.0), Rules())
    assert verdict_ == "off", reason
    assert "too little to pay" in reason and hint == 0.0
    # The same lateness with room for 2 MiB (above the threshold) is lower, with a ratio hint.
    verdict_, reason, hint = knob_verdict(_knob(vector_median_us=10.0, **late), _op(40.0), Rules())
    assert verdict_ == "lower", reason
    assert hint == pytest.approx(0.05)


def test_verdict_join_stall_larger_than_what_it_hides_is_off() -> None:
    # On time and fully hidden (2 µs), but the compute stream waits 5 µs at the join: off.
    verdict_, reason, hint = knob_verdict(_knob(stall_median_us=5.0), _op(40.0), Rules())
    assert verdict_ == "off", reason
    assert "join stall outweighs" in reason and hint == 0.0
    # A 1 µs stall under the 2 µs it hides leaves the rest of the rules to decide (raise here).
    verdict_, reason, _ = knob_verdict(_knob(stall_median_us=1.0), _op(40.0), Rules())
    assert verdict_ == "raise", reason
