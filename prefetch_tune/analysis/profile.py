"""Read a torch_npu profile and judge each prefetch knob the way the feature guide says to.

Input: a torch_npu profiler output directory (the one holding `ASCEND_PROFILER_OUTPUT/`, possibly
one per rank as `*_ascend_pt/ASCEND_PROFILER_OUTPUT/`), a `trace_view.json` or a
`kernel_details.csv` (layouts: reference/hardware-models-profiles.md section 3). Both are read by
header / field name, never by position, and streamed: a `trace_view.json` goes through a small
incremental parser over its `traceEvents` array (`json.JSONDecoder.raw_decode` on chunks) that
keeps only device tasks of "Ascend Hardware" processes, in compact columns.

Analysis, per device:

* The compute stream is the stream with the most compute kernels (matmuls, vector ops,
  attention). Prefetch tasks are tasks whose name or task type matches `cmo|prefetch`
  (case-insensitive) on any other stream.
* The compute stream is labelled with the runtime plan's op names (`runtime.plan` constants):
  attention kernels anchor each decoder layer; the matmul before attention is `qkv_proj`, the
  quantize / norm before it `qkv_quant` / `input_layernorm`, the first matmul after it `o_proj`,
  the next norm `post_attention_layernorm`, then either gating top-k and grouped matmuls (MoE)
  or gate_up, SwiGlu, down (dense). Fused ops (`AddRmsNormQuant`) carry both roles.
* Each prefetch is tied to the compute op it starts at (the op in progress when it starts),
  and that op's role picks the plan op whose `start_before` it is: that gives the knob, the
  vector op it hides behind, the consumer matmul and the join op. A `knob` argument in the
  trace (simulated traces carry one) is recorded but never used for the matching.
* Per prefetch: overlap = |CMO ∩ vector op| / CMO duration; late = CMO end - vector op end;
  stall = the compute stream's wait at the join (EVENT_WAIT tasks there, else the gap before
  the next kernel, bounded by how long the CMO ran past the join op); bandwidth = bytes
  (`size(B)`, else the plan's) / CMO duration.
* Per knob: counts, medians and p90s, and a verdict (raise / keep / lower / off) following the
  guide: the CMO should overlap the vector op it hides behind and end no later than it.

Calibration (`calibrate`) fits the base hardware profile's estimated fields that a profile
measures (prefetch_bw, cmo_issue_us, kernel_overhead_us, vector_bw_fraction, hbm_bw) and writes
a new profile TOML that the sim backend loads with `--hardware OUT.toml`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
import time
import tomllib
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal

from prefetch_tune.errors import ConfigError
from prefetch_tune.hardware import HardwareProfile, load_hardware, parse_profile
from prefetch_tune.models import Layout, MiB, ModelSpec, Quant, load_model
from prefetch_tune.prefetch import PrefetchConfig, Semantics, parse_weight_prefetch_config
from prefetch_tune.runtime import plan as P

CHUNK_CHARS = 1 << 20  # characters read per chunk of a trace_view.json
MAX_VALUE_CHARS = 64 << 20  # a single JSON value larger than this is treated as malformed

Verdict = Literal["raise", "keep", "lower", "off"]
Format = Literal["trace_view", "kernel_details"]

# ---------------------------------------------------------------- task categories

PREFETCH, WAIT, SYNC, COMM, MATMUL, ATTN, GATING, SWIGLU, NORM, NORM_QUANT, QUANT, OTHER = range(12)
CATEGORY_NAMES = (
    "prefetch",
    "wait",
    "sync",
    "comm",
    "matmul",
    "attention",
    "gating",
    "swiglu",
    "norm",
    "norm+quant",
    "quant",
    "other",
)
COMPUTE_CATS = frozenset({MATMUL, ATTN, GATING, SWIGLU, NORM, NORM_QUANT, QUANT})
VECTOR_CATS = frozenset({GATING, SWIGLU, NORM, NORM_QUANT, QUANT})

_PREFETCH_RE = re.compile(r"cmo|prefetch", re.IGNORECASE)
_MATMUL_RE = re.compile(r"mat_?mul|gemm")
_GATING_RE = re.compile(r"gating|topk")
_SWIGLU_RE = re.compile(r"swi_?glu")
_NORM_RE = re.compile(r"rms_?norm|layer_?norm")
_ATTN_RE = re.compile(r"attention|flash|attn")
_COMM_RE = re.compile(r"^hcom|hccl|all_?reduce|all_?to_?all|all_?gather|reduce_?scatter")


def classify(name: str, op_type: str = "", task_type: str = "") -> int:
    """The category of one device task from its name, op type and task type (case-insensitive).

    The op type (kernel_details `Type`) decides when given; a trace_view name such as
    `AddRmsNorm_post_attention_layernorm` is read with norm before attention for that reason.
    """
    if any(_PREFETCH_RE.search(s) for s in (name, op_type, task_type) if s):
        return PREFETCH
    tt = task_type.lower()
    key = (op_type or name).lower()
    if "event_wait" in tt or "event_wait" in key:
        return WAIT
    if "event_record" in tt or "event_record" in key:
        return SYNC
    if tt in ("communication", "hccl") or _COMM_RE.search(key):
        return COMM
    if _MATMUL_RE.search(key):
        return MATMUL
    if _GATING_RE.search(key):
        return GATING
    if _SWIGLU_RE.search(key):
        return SWIGLU
    if _NORM_RE.search(key):
        return NORM_QUANT if "quant" in key else NORM
    if _ATTN_RE.search(key):
        return ATTN
    if "quant" in key:
        return QUANT
    return OTHER


# ---------------------------------------------------------------- numbers and timestamps


def _parse_float(text: str) -> float | str:
    """JSON float hook: long numbers (absolute µs timestamps) stay text so no digit is lost."""
    return text if len(text) > 15 else float(text)


class _Clock:
    """Turns absolute µs timestamps (numbers or text, e.g. "1732873412345678.123\\t") into
    floats relative to the first one seen, keeping sub-µs precision."""

    def __init__(self) -> None:
        self.base: int | None = None

    def rel(self, value: Any) -> float:
        if type(value) is float:
            if self.base is None:
                self.base = int(value)
            return value - self.base
        if type(value) is str:
            head, dot, tail = value.partition(".")
            try:
                whole = int(head)
                frac = float(dot + tail) if tail.strip() else 0.0
            except ValueError:
                f = float(value)  # exponent notation and the like (raises on junk)
                if self.base is None:
                    self.base = int(f)
                return f - self.base
            if head.lstrip().startswith("-"):
                frac = -frac
        elif isinstance(value, int) and not isinstance(value, bool):
            whole, frac = value, 0.0
        else:
            raise ValueError(f"{value!r} is not a time")
        if self.base is None:
            self.base = whole
        return (whole - self.base) + frac


def _num(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, int | float):
        return float(value)
    return float(str(value).strip())


# ---------------------------------------------------------------- loaded data


@dataclass(slots=True)
class CmoTask:
    """One prefetch task as read from the profile (times in µs, relative to the file)."""

    start: float
    dur: float
    stream: int
    name: str
    size: int | None  # `size(B)` when the profile carries it
    knob_arg: str | None  # `knob` argument (simulated traces); recorded, never used to match
    step: str | None

    @property
    def end(self) -> float:
        return self.start + self.dur


@dataclass
class DeviceTimeline:
    """One device's tasks: the compute stream in compact columns, waits and prefetch tasks."""

    name: str
    compute_stream: int
    start: array[float]
    end: array[float]
    cat: array[int]
    name_id: array[int]
    names: list[str]
    wait_start: array[float]
    wait_end: array[float]
    cmos: list[CmoTask]
    inline_cmos: int  # prefetch-like tasks on the compute stream itself (not analysed)
    streams: dict[int, int]  # stream -> task count
    source: str

    def op_name(self, i: int) -> str:
        return self.names[self.name_id[i]]


@dataclass
class ProfileData:
    """What `load_profile` read: devices, the trace's otherData, and where it came from."""

    path: Path
    sources: list[Path]
    fmt: Format
    devices: list[DeviceTimeline]
    other_data: dict[str, Any]
    events_read: int
    tasks_kept: int
    read_seconds: float

    @property
    def simulated(self) -> bool:
        return "SIMULATED" in str(self.other_data.get("generator", ""))

    @property
    def prefetch_tasks(self) -> int:
        return sum(len(d.cmos) for d in self.devices)


class _Collector:
    """Accumulates device tasks of one file in columns, then splits them per device."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.clock = _Clock()
        self.dev: array[int] = array("i")
        self.stream: array[int] = array("i")
        self.start: array[float] = array("d")
        self.dur: array[float] = array("d")
        self.cat: array[int] = array("b")
        self.name_id: array[int] = array("i")
        self.names: list[str] = []
        self._name_ids: dict[str, int] = {}
        self._cats: dict[tuple[str, str, str], int] = {}
        self.dev_keys: list[Any] = []
        self._dev_ids: dict[Any, int] = {}
        self.stream_keys: list[Any] = []
        self._stream_ids: dict[Any, int] = {}
        self.extras: dict[int, tuple[int | None, str | None, str | None]] = {}

    def add(
        self,
        dev: Any,
        stream: Any,
        name: str,
        op_type: str,
        task_type: str,
        ts: Any,
        dur: Any,
        where: str,
        size: Any = None,
        knob: Any = None,
        step: str | None = None,
    ) -> None:
        ckey = (name, op_type, task_type)
        cat = self._cats.get(ckey)
        if cat is None:
            cat = self._cats[ckey] = classify(name, op_type, task_type)
        try:
            start = self.clock.rel(ts)
            length = _num(dur)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.source}: bad time in {where} ({exc})") from None
        d = self._dev_ids.get(dev)
        if d is None:
            d = self._dev_ids[dev] = len(self.dev_keys)
            self.dev_keys.append(dev)
        s = self._stream_ids.get(stream)
        if s is None:
            s = self._stream_ids[stream] = len(self.stream_keys)
            self.stream_keys.append(stream)
        label = op_type if op_type and op_type not in name else name
        n = self._name_ids.get(label)
        if n is None:
            n = self._name_ids[label] = len(self.names)
            self.names.append(label)
        idx = len(self.start)
        self.dev.append(d)
        self.stream.append(s)
        self.start.append(start)
        self.dur.append(max(0.0, length))
        self.cat.append(cat)
        self.name_id.append(n)
        if cat == PREFETCH:
            nbytes: int | None = None
            if size is not None:
                try:
                    nbytes = int(_num(size))
                except ValueError:
                    nbytes = None
            arg = sys.intern(str(knob)) if knob is not None else None
            self.extras[idx] = (nbytes, arg, sys.intern(step) if step is not None else None)

    def timelines(self, device_name: Mapping[Any, str], keep: Any = None) -> list[DeviceTimeline]:
        """One timeline per device key (in `keep` when given)."""
        by_dev: dict[int, list[int]] = {}
        for i, d in enumerate(self.dev):
            by_dev.setdefault(d, []).append(i)
        out: list[DeviceTimeline] = []
        for d, idxs in by_dev.items():
            key = self.dev_keys[d]
            if keep is not None and key not in keep:
                continue
            out.append(self._timeline(device_name.get(key, str(key)), idxs))
        out.sort(key=lambda t: t.name)
        return out

    def _timeline(self, name: str, idxs: list[int]) -> DeviceTimeline:
        streams: dict[int, int] = {}
        compute_count: dict[int, int] = {}
        for i in idxs:
            s = self.stream[i]
            streams[s] = streams.get(s, 0) + 1
            if self.cat[i] in COMPUTE_CATS:
                compute_count[s] = compute_count.get(s, 0) + 1
        compute = max(compute_count, key=lambda s: compute_count[s]) if compute_count else -1
        idxs.sort(key=lambda i: self.start[i])
        start: array[float] = array("d")
        end: array[float] = array("d")
        cat: array[int] = array("b")
        name_id: array[int] = array("i")
        wait_start: array[float] = array("d")
        wait_end: array[float] = array("d")
        cmos: list[CmoTask] = []
        inline = 0
        for i in idxs:
            c = self.cat[i]
            s = self.stream[i]
            if c == PREFETCH:
                if s == compute:
                    inline += 1
                    continue
                size, knob, step = self.extras[i]
                cmos.append(
                    CmoTask(
                        self.start[i],
                        self.dur[i],
                        s,
                        self.names[self.name_id[i]],
                        size,
                        knob,
                        step,
                    )
                )
            elif s != compute:
                continue
            elif c == WAIT:
                wait_start.append(self.start[i])
                wait_end.append(self.start[i] + self.dur[i])
            elif c != SYNC:
                start.append(self.start[i])
                end.append(self.start[i] + self.dur[i])
                cat.append(c)
                name_id.append(self.name_id[i])
        stream_names = {self._stream_ids[k]: k for k in self.stream_keys}
        return DeviceTimeline(
            name=name,
            compute_stream=_stream_label(stream_names.get(compute, compute)),
            start=start,
            end=end,
            cat=cat,
            name_id=name_id,
            names=self.names,
            wait_start=wait_start,
            wait_end=wait_end,
            cmos=cmos,
            inline_cmos=inline,
            streams={_stream_label(stream_names[s]): n for s, n in streams.items()},
            source=str(self.source),
        )


def _stream_label(key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        return -1


# ---------------------------------------------------------------- streaming JSON


class _JsonStream:
    """A tiny incremental reader: whitespace, punctuation, and one JSON value at a time."""

    _WS = re.compile(r"[ \t\n\r]*")

    _BIG_NUMBER_TS = re.compile(r'"ts"\s*:\s*-?\d{13,}')

    def __init__(self, fh: IO[str], where: Path) -> None:
        self.fh = fh
        self.where = where
        self.buf = ""
        self.pos = 0
        self.eof = False
        self._fill(max(CHUNK_CHARS, 1 << 16))
        # Absolute µs timestamps written as JSON numbers lose sub-µs digits as floats: keep
        # long numbers as text then (slower); profiles that write them as strings, and
        # relative (simulated) ones, take the fast path.
        big = self._BIG_NUMBER_TS.search(self.buf) is not None
        self.decoder = json.JSONDecoder(parse_float=_parse_float) if big else json.JSONDecoder()

    def _fill(self, want: int | None = None) -> bool:
        if self.eof:
            return False
        data = self.fh.read(want or CHUNK_CHARS)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            m = self._WS.match(self.buf, self.pos)
            self.pos = m.end() if m else self.pos
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def take(self, expected: str) -> None:
        got = self.peek()
        if got != expected:
            raise self.error(f"expected {expected!r}, found {got or 'end of file'!r}")
        self.pos += 1

    def value(self) -> Any:
        self.peek()
        want = CHUNK_CHARS
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                truncated = exc.msg.startswith("Unterminated") or exc.pos >= len(self.buf) - 16
                if truncated and len(self.buf) - self.pos < MAX_VALUE_CHARS and self._fill(want):
                    want *= 2
                    continue
                raise self.error(exc.msg) from None
            if end >= len(self.buf) and self._fill():
                continue  # a number at the end of the buffer may go on in the next chunk
            self.pos = end
            return obj

    def error(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.where}: not a readable trace_view.json ({msg})")


def iter_trace_events(path: Path) -> tuple[Iterator[Any], dict[str, Any]]:
    """Stream the events of a Chrome trace: a bare array or an object with `traceEvents`.

    Returns the event iterator and a dict that receives the document's other top-level keys
    (notably `otherData`) as they are met; read it after the iterator is exhausted.
    """
    top: dict[str, Any] = {}

    def events() -> Iterator[Any]:
        try:
            fh = path.open(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        with fh:
            js = _JsonStream(fh, path)
            first = js.peek()
            if first == "[":
                yield from _array(js)
            elif first == "{":
                js.take("{")
                if js.peek() == "}":
                    return
                while True:
                    key = js.value()
                    if not isinstance(key, str):
                        raise js.error("object key is not a string")
                    js.take(":")
                    if key == "traceEvents" and js.peek() == "[":
                        yield from _array(js)
                    else:
                        top[key] = js.value()
                    c = js.peek()
                    if c == "}":
                        break
                    if c != ",":
                        raise js.error(f"expected ',' or '}}', found {c or 'end of file'!r}")
                    js.pos += 1
            else:
                raise js.error("expected a JSON array or object")

    return events(), top


def _array(js: _JsonStream) -> Iterator[Any]:
    js.take("[")
    if js.peek() == "]":
        js.pos += 1
        return
    while True:
        yield js.value()
        c = js.peek()
        if c == ",":
            js.pos += 1
        elif c == "]":
            js.pos += 1
            return
        else:
            raise js.error(f"expected ',' or ']' in traceEvents, found {c or 'end of file'!r}")


_HARDWARE_RE = re.compile(r"ascend hardware|hardware", re.IGNORECASE)


def _load_trace_view(path: Path) -> tuple[list[DeviceTimeline], dict[str, Any], int, int]:
    col = _Collector(path)
    proc_name: dict[Any, str] = {}
    proc_label: dict[Any, str] = {}
    hardware: set[Any] = set()
    other: set[Any] = set()
    read = 0
    it, top = iter_trace_events(path)
    for ev in it:
        read += 1
        if not isinstance(ev, dict):
            continue
        ph = ev.get("ph")
        pid = ev.get("pid")
        if isinstance(pid, list | dict):
            pid = json.dumps(pid)
        if ph == "X":
            if pid in other:
                continue
            args = ev.get("args")
            if not isinstance(args, dict):
                args = {}
            stream = args.get("Physic Stream Id", ev.get("tid"))
            if isinstance(stream, list | dict):
                stream = json.dumps(stream)
            col.add(
                pid,
                stream,
                str(ev.get("name", "")),
                "",
                str(args.get("Task Type", "")),
                ev.get("ts", 0),
                ev.get("dur", 0),
                f"event {read}",
                args.get("size(B)"),
                args.get("knob"),
            )
        elif ph == "M":
            args = ev.get("args")
            if not isinstance(args, dict):
                continue
            what = ev.get("name")
            if what == "process_name":
                pname = str(args.get("name", ""))
                proc_name[pid] = pname
                (hardware if _HARDWARE_RE.search(pname) else other).add(pid)
            elif what == "process_labels":
                proc_label[pid] = str(args.get("labels", ""))
    keep = hardware if proc_name else None
    names: dict[Any, str] = {}
    for pid in col.dev_keys:
        label = proc_label.get(pid, "").strip()
        names[pid] = label if re.fullmatch(r"NPU \S+", label) else f"pid {pid}"
    timelines = col.timelines(names, keep)
    other_data = top.get("otherData")
    return (
        timelines,
        other_data if isinstance(other_data, dict) else {},
        read,
        sum(len(t.start) + len(t.cmos) for t in timelines),
    )


# ---------------------------------------------------------------- kernel_details.csv

_CSV_ALIASES: dict[str, tuple[str, ...]] = {
    "name": ("name", "opname"),
    "type": ("type", "optype"),
    "core": ("acceleratorcore", "tasktype"),
    "start": ("starttimeus", "taskstarttimeus", "starttime"),
    "dur": ("durationus", "taskdurationus", "duration"),
    "device": ("deviceid",),
    "stream": ("streamid",),
    "step": ("stepid", "step"),
}


def _norm_header(h: str) -> str:
    return re.sub(r"[^a-z0-9]", "", h.lower())


def _load_kernel_details(path: Path) -> tuple[list[DeviceTimeline], int, int]:
    col = _Collector(path)
    read = 0
    try:
        fh = path.open(newline="", encoding="utf-8-sig", errors="replace")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ConfigError(f"{path}: empty kernel_details.csv (no header)") from None
        except csv.Error as exc:
            raise ConfigError(f"{path}: not a readable kernel_details.csv ({exc})") from None
        normed = [_norm_header(h) for h in header]
        cols: dict[str, int] = {}
        for key, aliases in _CSV_ALIASES.items():
            for alias in aliases:
                if alias in normed:
                    cols[key] = normed.index(alias)
                    break
        missing = [k for k in ("start", "dur") if k not in cols]
        if "name" not in cols and "type" not in cols:
            missing.append("name")
        if missing:
            wanted = {"start": "Start Time(us)", "dur": "Duration(us)", "name": "Name or Type"}
            raise ConfigError(
                f"{path}: not a kernel_details.csv (no {', '.join(wanted[m] for m in missing)} "
                "column)"
            )

        def cell(row: list[str], key: str) -> str:
            i = cols.get(key)
            return row[i].strip() if i is not None and i < len(row) else ""

        has_stream = "stream" in cols
        try:
            for row in reader:
                read += 1
                if not row or not any(c.strip() for c in row):
                    continue
                name, op_type = cell(row, "name"), cell(row, "type")
                core = cell(row, "core")
                device = cell(row, "device") or "0"
                step = cell(row, "step") or None
                if has_stream:
                    stream: Any = cell(row, "stream") or "N/A"
                else:  # no stream column: a prefetch task is by definition on its own stream
                    stream = "prefetch" if classify(name, op_type, core) == PREFETCH else "compute"
                col.add(
                    device,
                    stream,
                    name or op_type,
                    op_type,
                    core,
                    cell(row, "start"),
                    cell(row, "dur") or "0",
                    f"row {read + 1}",
                    step=step,
                )
        except csv.Error as exc:
            raise ConfigError(f"{path}: not a readable kernel_details.csv ({exc})") from None
    names = {k: f"NPU {k}" for k in col.dev_keys}
    timelines = col.timelines(names)
    return timelines, read, sum(len(t.start) + len(t.cmos) for t in timelines)


# ---------------------------------------------------------------- finding the files


def find_profile_files(path: Path) -> tuple[Format, list[Path]]:
    """The files to read for PATH: one trace_view.json per rank (else kernel_details.csv)."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "kernel_details", [path]
        return "trace_view", [path]
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or directory")
    dirs = sorted(
        {p for p in path.rglob("ASCEND_PROFILER_OUTPUT") if p.is_dir()}
        | ({path} if (path / "trace_view.json").is_file() else set())
        | ({path} if (path / "kernel_details.csv").is_file() else set())
    )
    views = [d / "trace_view.json" for d in dirs if (d / "trace_view.json").is_file()]
    if views:
        return "trace_view", views
    kernels = [d / "kernel_details.csv" for d in dirs if (d / "kernel_details.csv").is_file()]
    if kernels:
        return "kernel_details", kernels
    raise ConfigError(
        f"{path}: no trace_view.json or kernel_details.csv in it or in an "
        "ASCEND_PROFILER_OUTPUT/ below it"
    )


def load_profile(path: Path) -> ProfileData:
    """Read PATH (directory, trace_view.json or kernel_details.csv) into per-device timelines."""
    t0 = time.perf_counter()
    fmt, files = find_profile_files(path)
    devices: list[DeviceTimeline] = []
    other: dict[str, Any] = {}
    read = kept = 0
    for f in files:
        try:
            if fmt == "trace_view":
                tls, od, r, k = _load_trace_view(f)
                other = other or od
            else:
                tls, r, k = _load_kernel_details(f)
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"{f}: cannot read ({exc})") from None
        if len(files) > 1:
            rank = (
                f.parent.parent.name if f.parent.name == "ASCEND_PROFILER_OUTPUT" else f.parent.name
            )
            for t in tls:
                t.name = f"{rank}/{t.name}"
        devices.extend(tls)
        read += r
        kept += k
    return ProfileData(
        path=path,
        sources=files,
        fmt=fmt,
        devices=devices,
        other_data=other,
        events_read=read,
        tasks_kept=kept,
        read_seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------- the plan the profile ran


@dataclass(frozen=True)
class PlanChoice:
    """The runtime plan used to read the profile, and where each of its inputs came from."""

    plan: P.LayerPlan
    provenance: dict[str, str]


def choose_plan(
    other_data: Mapping[str, Any],
    *,
    model: str | None = None,
    quant: Quant | None = None,
    tp: int | None = None,
    dp: int | None = None,
    ep: bool | None = None,
    tokens: int | None = None,
    config: PrefetchConfig | None = None,
    semantics: Semantics | None = None,
    options: P.PlanOptions | None = None,
) -> PlanChoice | None:
    """The plan for the profile: explicit options first, then the trace's `otherData` (simulated
    traces carry model, semantics, tokens and config), then defaults. None without a model."""
    prov: dict[str, str] = {}

    def pick(name: str, given: Any, key: str, default: Any) -> Any:
        if given is not None:
            prov[name] = "options"
            return given
        if key in other_data and other_data[key] is not None:
            prov[name] = "trace otherData"
            return other_data[key]
        prov[name] = "default"
        return default

    model_ref = pick("model", model, "model", None)
    if model_ref is None:
        return None
    spec: ModelSpec = load_model(str(model_ref), quant)
    raw_layout = other_data.get("layout")
    lay: dict[str, Any] = raw_layout if isinstance(raw_layout, dict) else {}

    def from_layout(name: str, given: Any, default: Any) -> Any:
        if given is not None:
            prov[name] = "options"
            return given
        if name in lay:
            prov[name] = "trace otherData"
            return lay[name]
        prov[name] = "default"
        return default

    try:
        layout = Layout(
            tp=int(from_layout("tp", tp, 1)),
            dp=int(from_layout("dp", dp, 1)),
            ep=bool(from_layout("ep", ep, False)),
        )
        n_tokens = int(pick("tokens", tokens, "tokens_per_forward", 256))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"trace otherData: bad layout or tokens_per_forward ({exc})") from None
    spec.check_layout(layout)
    if n_tokens <= 0:
        raise ConfigError(f"--tokens {n_tokens}: must be > 0")
    if config is None and isinstance(other_data.get("config"), dict):
        config = parse_weight_prefetch_config(other_data["config"], "trace otherData.config")
        prov["config"] = "trace otherData"
    elif config is None:
        config = PrefetchConfig.default()
        prov["config"] = "default (vLLM-Ascend's documented ratios)"
    else:
        prov["config"] = "options"
    sem = pick("semantics", semantics, "semantics", "plugin")
    if sem not in ("plugin", "native-0.23"):
        raise ConfigError(f"trace otherData.semantics {sem!r}: expected plugin or native-0.23")
    if options is None:
        sp = other_data.get("sequence_parallel")
        options = P.PlanOptions(sequence_parallel=bool(sp)) if sp is not None else P.PlanOptions()
    plan = P.plan_layer(spec, layout, config, n_tokens, sem, options)
    return PlanChoice(plan, prov)


# ---------------------------------------------------------------- labelling the compute stream

ROLE_BITS: dict[str, int] = {
    name: 1 << i
    for i, name in enumerate(
        (
            P.INPUT_NORM,
            P.QKV_QUANT,
            P.QKV_PROJ,
            P.QK_NORM_ROPE,
            P.ATTENTION,
            P.O_QUANT,
            P.O_PROJ,
            P.POST_NORM,
            P.GATE_UP_QUANT,
            P.GATE_UP_PROJ,
            P.SWIGLU,
            P.DOWN_QUANT,
            P.DOWN_PROJ,
            P.ROUTER,
            P.GATING,
            P.MOE_QUANT,
            P.W13_GMM,
            P.MOE_SWIGLU,
            P.W2_GMM,
        )
    )
}
DENSE_MATMULS = (P.QKV_PROJ, P.O_PROJ, P.GATE_UP_PROJ, P.DOWN_PROJ)


def roles_of(mask: int) -> list[str]:
    return [name for name, bit in ROLE_BITS.items() if mask & bit]


def label_layers(cat: Sequence[int]) -> tuple[array[int], array[int]]:
    """Plan op roles (bit masks over ROLE_BITS) and decoder-layer numbers for a compute stream.

    Attention kernels anchor each layer (a run of attention kernels with no matmul between them
    is one block); the ops around each anchor are named by position and category.
    """
    n = len(cat)
    roles: array[int] = array("i", bytes(4 * n))
    layer: array[int] = array("i", [-1]) * n
    blocks: list[tuple[int, int]] = []
    i = 0
    while i < n:
        if cat[i] != ATTN:
            i += 1
            continue
        last = k = i
        while k + 1 < n and cat[k + 1] != MATMUL:
            k += 1
            if cat[k] == ATTN:
                last = k
        blocks.append((i, last))
        i = last + 1

    def mark(idx: int | None, role: str, lay: int) -> None:
        if idx is not None:
            roles[idx] |= ROLE_BITS[role]
            layer[idx] = lay

    def first(lo: int, hi: int, cats: frozenset[int]) -> int | None:
        for j in range(lo, hi):
            if cat[j] in cats:
                return j
        return None

    def last_in(lo: int, hi: int, cats: frozenset[int]) -> int | None:
        for j in range(hi - 1, lo - 1, -1):
            if cat[j] in cats:
                return j
        return None

    mm = frozenset({MATMUL})
    quant = frozenset({QUANT})
    norms = frozenset({NORM, NORM_QUANT})
    for b, (a0, a1) in enumerate(blocks):
        lo = blocks[b - 1][1] + 1 if b else 0
        hi = blocks[b + 1][0] if b + 1 < len(blocks) else n
        for j in range(a0, a1 + 1):
            if cat[j] == ATTN:
                mark(j, P.ATTENTION, b)
        # Before attention: [input norm] [qkv quant] qkv_proj [qk norm / rope] attention.
        q = last_in(lo, a0, mm)
        if q is not None:
            mark(q, P.QKV_PROJ, b)
            mark(first(q + 1, a0, norms), P.QK_NORM_ROPE, b)
            got_quant = False
            for j in range(q - 1, lo - 1, -1):
                c = cat[j]
                if c in (MATMUL, COMM, ATTN, SWIGLU, GATING):
                    break
                if c == QUANT and not got_quant:
                    mark(j, P.QKV_QUANT, b)
                    got_quant = True
                elif c in norms:
                    mark(j, P.INPUT_NORM, b)
                    if c == NORM_QUANT and not got_quant:
                        mark(j, P.QKV_QUANT, b)
                    break
        # After attention: [o quant] o_proj [all-reduce] post norm, then MLP or MoE.
        o = first(a1 + 1, hi, mm)
        if o is None:
            continue
        mark(o, P.O_PROJ, b)
        mark(last_in(a1 + 1, o, quant), P.O_QUANT, b)
        p = first(o + 1, hi, norms)
        if p is None or first(o + 1, p, mm) is not None:
            continue
        mark(p, P.POST_NORM, b)
        gate = first(p + 1, hi, frozenset({GATING}))
        glu = first(p + 1, hi, frozenset({SWIGLU}))
        if gate is not None and (glu is None or gate < glu):
            mark(last_in(p + 1, gate, mm), P.ROUTER, b)
            mark(gate, P.GATING, b)
            w13 = first(gate + 1, hi, mm)
            if w13 is None:
                continue
            mark(w13, P.W13_GMM, b)
            mark(last_in(gate + 1, w13, quant), P.MOE_QUANT, b)
            sw = first(w13 + 1, hi, frozenset({SWIGLU}))
            if sw is not None:
                mark(sw, P.MOE_SWIGLU, b)
                mark(first(sw + 1, hi, mm), P.W2_GMM, b)
            continue
        gu = first(p + 1, hi, mm)
        if gu is None:
            continue
        mark(gu, P.GATE_UP_PROJ, b)
        gq = last_in(p + 1, gu, quant)
        if gq is None and cat[p] == NORM_QUANT:
            gq = p
        mark(gq, P.GATE_UP_QUANT, b)
        sw = first(gu + 1, hi, frozenset({SWIGLU}))
        if sw is None:
            continue
        mark(sw, P.SWIGLU, b)
        dn = first(sw + 1, hi, mm)
        if dn is not None:
            mark(dn, P.DOWN_PROJ, b)
            mark(last_in(sw + 1, dn, quant), P.DOWN_QUANT, b)
    return roles, layer


# ---------------------------------------------------------------- the analysis


@dataclass(frozen=True)
class Rules:
    """Thresholds of the verdict (the guide's rule made numeric)."""

    late_tol_us: float = 0.5  # a CMO ending up to this long after its vector op is not late
    min_useful_bytes: float = 1024 * 1024  # a prefetch smaller than this cannot pay its sync
    slack_frac: float = 0.2  # ending this share of the vector op early or more is slack
    late_share: float = 0.5  # late in more than this share of instances -> lower / off
    borderline_share: float = 0.1  # late in more than this share -> no raise
    hidden_frac: float = 0.9  # overlap fraction needed to call a CMO hidden
    lead_us: float = 1.0  # a CMO may start this long before the op it belongs to


@dataclass(slots=True)
class Instance:
    """One prefetch matched to the compute stream (times in µs)."""

    device: str
    layer: int
    step: str | None
    knob: str
    weight: str
    cmo_start: float
    cmo_dur: float
    busy_dur: float  # from max(start, previous CMO's end on that stream) to its end
    nbytes: int | None
    bytes_source: str
    vector_op: str
    vector_role: str
    vector_start: float
    vector_dur: float
    overlap_us: float
    overlap_frac: float
    late_us: float
    consumer: str | None
    consumer_margin_us: float | None  # consumer start - CMO end (< 0: the matmul raced the fill)
    stall_us: float | None
    stall_source: str
    knob_arg: str | None

    @property
    def cmo_end(self) -> float:
        return self.cmo_start + self.cmo_dur

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second over the whole CMO duration."""
        if self.nbytes is None or self.cmo_dur <= 0:
            return None
        return self.nbytes / (self.cmo_dur * 1e-6)


@dataclass
class KnobReport:
    """Statistics and the verdict of one knob (one plan site) across devices and steps."""

    knob: str
    weight: str
    count: int
    overlap_median: float
    overlap_p90: float
    hidden_median_us: float
    late_count: int
    late_share: float
    late_median_us: float  # over all instances (negative: ends before the vector op)
    late_p90_us: float
    late_when_late_median_us: float  # over the late ones only (0 when none)
    stall_median_us: float | None
    stall_p90_us: float | None
    stall_source: str
    cmo_median_us: float
    vector_op: str
    vector_median_us: float
    consumer: str | None
    consumer_margin_median_us: float | None
    bytes_median: float | None
    bytes_source: str
    bandwidth_median: float | None  # B/s
    verdict: Verdict
    reason: str
    ratio_hint: float | None
    plan_ratio: float | None
    plan_bytes: int | None
    plan_fires: bool | None
    plan_reason: str
    devices: int

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = round(v, 4) if isinstance(v, float) else v
        out["bandwidth_gbps"] = (
            round(self.bandwidth_median / 1e9, 3) if self.bandwidth_median else None
        )
        return out


@dataclass
class ProfileReport:
    """The whole analysis: per-knob reports, the matched prefetches and what went unmatched."""

    data: ProfileData
    plan: PlanChoice | None
    rules: Rules
    instances: list[Instance]
    knobs: list[KnobReport]
    unassigned: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    notes: list[str]
    no_prefetch_causes: list[str]
    analyse_seconds: float
    roles: dict[str, array[int]]  # per device: plan-op role masks of its compute ops

    @property
    def found_prefetch(self) -> bool:
        return self.data.prefetch_tasks > 0

    def to_dict(self) -> dict[str, Any]:
        pl = self.plan
        return {
            "path": str(self.data.path),
            "sources": [str(s) for s in self.data.sources],
            "format": self.data.fmt,
            "simulated": self.data.simulated,
            "plan": None
            if pl is None
            else {
                "model": pl.plan.model.name,
                "quant": pl.plan.model.quant,
                "layout": {
                    "tp": pl.plan.layout.tp,
                    "dp": pl.plan.layout.dp,
                    "ep": pl.plan.layout.ep,
                },
                "semantics": pl.plan.semantics,
                "tokens": pl.plan.tokens,
                "sequence_parallel": pl.plan.options.sequence_parallel,
                "config": pl.plan.config.to_json_obj(),
                "provenance": pl.provenance,
            },
            "rules": self.rules.__dict__,
            "devices": self.devices,
            "events_read": self.data.events_read,
            "tasks_kept": self.data.tasks_kept,
            "prefetch_tasks": self.data.prefetch_tasks,
            "matched": len(self.instances),
            "unassigned": self.unassigned[:20],
            "unassigned_count": len(self.unassigned),
            "knobs": [k.to_dict() for k in self.knobs],
            "prefetch_found": self.found_prefetch,
            "no_prefetch_causes": self.no_prefetch_causes,
            "notes": self.notes,
            "seconds": {
                "read": round(self.data.read_seconds, 3),
                "analyse": round(self.analyse_seconds, 3),
            },
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1]."""
    s = sorted(values)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    f = math.floor(k)
    c = min(f + 1, len(s) - 1)
    return s[f] + (s[c] - s[f]) * (k - f)


def _find_forward(roles: array[int], start: int, bit: int, limit: int = 48) -> int | None:
    for j in range(start, min(len(roles), start + limit)):
        if roles[j] & bit:
            return j
    return None


def _site_for(
    dev: DeviceTimeline,
    roles: array[int],
    cmo: CmoTask,
    sites: dict[int, P.PrefetchOp],
    rules: Rules,
) -> tuple[int, P.PrefetchOp] | tuple[int, None]:
    """The compute op this CMO starts at and the plan op it belongs to."""
    n = len(dev.start)
    if n == 0:
        return -1, None
    i = bisect_right(dev.start, cmo.start + 1e-6) - 1
    s = i if i >= 0 and dev.end[i] > cmo.start else i + 1
    candidates: list[int] = []
    if 0 <= s < n:
        candidates.append(s)
    nxt = s + 1 if 0 <= s < n and dev.start[s] <= cmo.start else s
    if nxt not in candidates and 0 <= nxt < n and dev.start[nxt] - cmo.start <= rules.lead_us:
        candidates.append(nxt)
    matmuls = 0
    for j in range(min(s, n) - 1, max(-1, s - 12), -1):  # a CMO that started late
        if dev.cat[j] == MATMUL:
            matmuls += 1
            if matmuls > 1:
                break
        candidates.append(j)
    for j in candidates:
        for bit, op in sites.items():
            if roles[j] & bit:
                return j, op
    return (s if 0 <= s < n else -1), None


def analyse(
    data: ProfileData, plan: PlanChoice | None, rules: Rules | None = None
) -> ProfileReport:
    """Match every prefetch to the plan and the compute stream; statistics and verdicts."""
    t0 = time.perf_counter()
    rules = rules or Rules()
    instances: list[Instance] = []
    unassigned: list[dict[str, Any]] = []
    devices: list[dict[str, Any]] = []
    notes: list[str] = []
    sites: dict[int, P.PrefetchOp] = {}
    roles_by_device: dict[str, array[int]] = {}
    if plan is not None:
        for op in sorted(plan.plan.ops, key=lambda o: not o.fires):
            sites.setdefault(ROLE_BITS[op.start_before], op)
    for dev in data.devices:
        roles, layers = label_layers(dev.cat)
        roles_by_device[dev.name] = roles
        n_layers = max(layers) + 1 if len(layers) else 0
        devices.append(
            {
                "device": dev.name,
                "compute_stream": dev.compute_stream,
                "streams": dev.streams,
                "kernels": len(dev.start),
                "prefetch_tasks": len(dev.cmos),
                "prefetch_on_compute_stream": dev.inline_cmos,
                "layers_seen": n_layers,
            }
        )
        if dev.inline_cmos:
            notes.append(
                f"{dev.name}: {dev.inline_cmos} prefetch task(s) on the compute stream itself "
                "(not overlapped with anything; not analysed)"
            )
        if plan is None:
            continue
        instances.extend(_match_device(dev, roles, layers, sites, rules, unassigned))
    knobs = _knob_reports(instances, plan, rules)
    if plan is not None:
        seen = {(k.knob, k.weight) for k in knobs}
        for k in knobs:
            measured = [
                i.nbytes
                for i in instances
                if (i.knob, i.weight) == (k.knob, k.weight)
                and i.bytes_source == "size(B)"
                and i.nbytes is not None
            ]
            if k.plan_fires and k.plan_bytes and measured:
                med = statistics.median(measured)
                if abs(med - k.plan_bytes) > 0.01 * k.plan_bytes:
                    notes.append(
                        f"{k.knob} ({k.weight}): the profile's CMO size is {med / MiB:.2f} MiB, "
                        f"the plan's {k.plan_bytes / MiB:.2f} MiB: check --tp/--dp/--ep, --quant, "
                        "--cap-mib and the config"
                    )
        for op in plan.plan.ops:
            if not op.fires and (op.knob, op.weight) in seen:
                notes.append(
                    f"the plan says {op.knob} ({op.weight}) does not fire ({op.reason}), yet the "
                    "profile shows it: check --tokens/--max-num-seqs, --semantics, "
                    "--sequence-parallel and the config"
                )
    if unassigned:
        notes.append(
            f"{len(unassigned)} prefetch task(s) could not be tied to a plan op (started at an op "
            "no knob starts at, or outside a recognisable decoder layer)"
        )
    causes = [] if data.prefetch_tasks else no_prefetch_causes(data, plan)
    return ProfileReport(
        data=data,
        plan=plan,
        rules=rules,
        instances=instances,
        knobs=knobs,
        unassigned=unassigned,
        devices=devices,
        notes=notes,
        no_prefetch_causes=causes,
        analyse_seconds=time.perf_counter() - t0,
        roles=roles_by_device,
    )


def _match_device(
    dev: DeviceTimeline,
    roles: array[int],
    layers: array[int],
    sites: dict[int, P.PrefetchOp],
    rules: Rules,
    unassigned: list[dict[str, Any]],
) -> list[Instance]:
    out: list[Instance] = []
    busy_until: dict[int, float] = {}
    # prefetches joined after the same op: the compute stream waits for them in end order
    joins: dict[int, list[tuple[float, int]]] = {}
    pending: list[tuple[Instance, int]] = []
    for cmo in dev.cmos:
        busy_start = max(cmo.start, busy_until.get(cmo.stream, -math.inf))
        busy_until[cmo.stream] = max(busy_until.get(cmo.stream, -math.inf), cmo.end)
        s, op = _site_for(dev, roles, cmo, sites, rules)
        if op is None:
            unassigned.append(
                {
                    "device": dev.name,
                    "start_us": round(cmo.start, 3),
                    "dur_us": round(cmo.dur, 3),
                    "name": cmo.name,
                    "started_at": dev.op_name(s) if s >= 0 else None,
                }
            )
            continue
        vs, ve = dev.start[s], dev.end[s]
        overlap = max(0.0, min(cmo.end, ve) - max(cmo.start, vs))
        consumer = _find_forward(roles, s, ROLE_BITS[op.consumer])
        if consumer is None:
            consumer = next((j for j in range(s + 1, len(dev.cat)) if dev.cat[j] == MATMUL), None)
        join = _find_forward(roles, s, ROLE_BITS[op.join_after])
        if join is None and consumer is not None and consumer > s:
            join = consumer - 1
        if cmo.size is not None:
            nbytes: int | None = cmo.size
            src = "size(B)"
        elif op.fires:
            nbytes, src = op.bytes, "plan"
        else:
            nbytes, src = None, ""
        inst = Instance(
            device=dev.name,
            layer=layers[s],
            step=cmo.step,
            knob=op.knob,
            weight=op.weight,
            cmo_start=cmo.start,
            cmo_dur=cmo.dur,
            busy_dur=max(0.0, cmo.end - busy_start),
            nbytes=nbytes,
            bytes_source=src,
            vector_op=dev.op_name(s),
            vector_role=op.start_before,
            vector_start=vs,
            vector_dur=ve - vs,
            overlap_us=overlap,
            overlap_frac=overlap / cmo.dur if cmo.dur > 0 else 1.0,
            late_us=cmo.end - ve,
            consumer=dev.op_name(consumer) if consumer is not None else None,
            consumer_margin_us=dev.start[consumer] - cmo.end if consumer is not None else None,
            stall_us=None,
            stall_source="",
            knob_arg=cmo.knob_arg,
        )
        out.append(inst)
        if join is not None:
            joins.setdefault(join, []).append((cmo.end, len(pending)))
            pending.append((inst, join))
    for j, group in joins.items():
        j_end = dev.end[j]
        nxt = bisect_right(dev.start, j_end - 1e-9)
        gap_end = dev.start[nxt] if nxt < len(dev.start) else math.inf
        w0 = bisect_right(dev.wait_start, j_end - 1e-6)
        w1 = bisect_right(dev.wait_start, gap_end)
        waits = sum(dev.wait_end[k] - dev.wait_start[k] for k in range(w0, w1))
        budget, source = (waits, "EVENT_WAIT") if w1 > w0 else (gap_end - j_end, "gap")
        done = j_end
        for end, k in sorted(group):
            stall = min(max(0.0, end - done), max(0.0, budget))
            budget -= stall
            done = max(done, end)
            inst = pending[k][0]
            inst.stall_us = stall
            inst.stall_source = source
    return out


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _knob_reports(
    instances: list[Instance], plan: PlanChoice | None, rules: Rules
) -> list[KnobReport]:
    groups: dict[tuple[str, str], list[Instance]] = {}
    for inst in instances:
        groups.setdefault((inst.knob, inst.weight), []).append(inst)
    order = [(o.knob, o.weight) for o in plan.plan.ops] if plan else []
    out: list[KnobReport] = []
    for key in sorted(groups, key=lambda k: order.index(k) if k in order else len(order)):
        g = groups[key]
        op = next((o for o in plan.plan.ops if (o.knob, o.weight) == key), None) if plan else None
        overlaps = [i.overlap_frac for i in g]
        late = [i.late_us for i in g]
        late_ones = [x for x in late if x > rules.late_tol_us]
        stalls = [i.stall_us for i in g if i.stall_us is not None]
        margins = [i.consumer_margin_us for i in g if i.consumer_margin_us is not None]
        nbytes = [float(i.nbytes) for i in g if i.nbytes is not None]
        bws = [b for i in g if (b := i.bandwidth) is not None]
        sources = sorted({i.stall_source for i in g if i.stall_source})
        vec_names = sorted({i.vector_op for i in g})
        consumers = sorted({i.consumer for i in g if i.consumer})
        rep = KnobReport(
            knob=key[0],
            weight=key[1],
            count=len(g),
            overlap_median=_median(overlaps),
            overlap_p90=percentile(overlaps, 0.9),
            hidden_median_us=_median([i.overlap_us for i in g]),
            late_count=len(late_ones),
            late_share=len(late_ones) / len(g),
            late_median_us=_median(late),
            late_p90_us=percentile(late, 0.9),
            late_when_late_median_us=_median(late_ones) if late_ones else 0.0,
            stall_median_us=_median(stalls) if stalls else None,
            stall_p90_us=percentile(stalls, 0.9) if stalls else None,
            stall_source="+".join(sources),
            cmo_median_us=_median([i.cmo_dur for i in g]),
            vector_op=", ".join(vec_names[:3]) + (" ..." if len(vec_names) > 3 else ""),
            vector_median_us=_median([i.vector_dur for i in g]),
            consumer=", ".join(consumers[:3]) if consumers else None,
            consumer_margin_median_us=_median(margins) if margins else None,
            bytes_median=_median(nbytes) if nbytes else None,
            bytes_source="+".join(sorted({i.bytes_source for i in g if i.bytes_source})),
            bandwidth_median=_median(bws) if bws else None,
            verdict="keep",
            reason="",
            ratio_hint=None,
            plan_ratio=op.ratio if op else None,
            plan_bytes=op.bytes if op else None,
            plan_fires=op.fires if op else None,
            plan_reason=op.reason if op else "",
            devices=len({i.device for i in g}),
        )
        rep.verdict, rep.reason, rep.ratio_hint = verdict(rep, op, rules)
        out.append(rep)
    return out


def verdict(
    k: KnobReport, op: P.PrefetchOp | None, rules: Rules
) -> tuple[Verdict, str, float | None]:
    """raise / keep / lower / off for one knob, the reason in one line, and a ratio to try.

    The guide: the CMO should overlap the vector op it hides behind and end no later than it.
    Fully hidden with slack -> raise; hidden and ending near the op's end -> keep; late ->
    lower; late by more than the part it hides, or a join stall larger than that -> off.
    """
    vec = k.vector_op.split(",")[0]
    hidden = k.hidden_median_us
    stall = k.stall_median_us or 0.0
    pct = f"{100 * k.late_share:.0f}% of {k.count}"
    current = None
    if op is not None and op.weight_bytes > 0 and k.bytes_median:
        current = min(1.0, k.bytes_median / op.weight_bytes)
    fit = k.vector_median_us / k.cmo_median_us if k.cmo_median_us > 0 else 0.0
    hint = round(min(1.0, current * fit), 3) if current is not None else None
    if (
        op is not None
        and op.join_after != op.start_before
        and k.late_share > rules.late_share
        and stall <= rules.late_tol_us
    ):
        return (
            "keep",
            f"runs {k.late_median_us:.1f} µs past {vec} but is joined only after "
            f"{op.join_after}: no stall",
            None,
        )
    if k.late_share > rules.late_share and hidden <= rules.late_tol_us:
        return (
            "off",
            f"hides nothing behind {vec} (overlap {k.overlap_median:.0%}); the compute stream "
            f"waits {stall:.1f} µs for it",
            0.0,
        )
    if k.late_share > rules.late_share:
        fits_bytes = hint * op.weight_bytes if hint is not None and op is not None else None
        if fits_bytes is not None and fits_bytes < rules.min_useful_bytes:
            return (
                "off",
                f"ends {k.late_median_us:.1f} µs after {vec} in {pct}; only "
                f"{fits_bytes / MiB:.2f} MiB fits behind it, too little to pay for its "
                "issue and sync",
                0.0,
            )
        return (
            "lower",
            f"ends {k.late_median_us:.1f} µs after {vec} ({k.vector_median_us:.1f} µs) in {pct}"
            + (
                f"; the {stall:.1f} µs join stall exceeds the {hidden:.1f} µs it hides"
                if stall > hidden
                else ""
            ),
            hint,
        )
    if stall > max(hidden, rules.late_tol_us):
        return (
            "off",
            f"{stall:.1f} µs join stall outweighs the {hidden:.1f} µs it hides",
            0.0,
        )
    if k.late_share > rules.borderline_share:
        return (
            "keep",
            f"borderline: late in {pct} (median ends {-k.late_median_us:.1f} µs before {vec})",
            None,
        )
    slack = -k.late_median_us
    if k.overlap_median >= rules.hidden_frac and slack >= rules.slack_frac * k.vector_median_us:
        why = f"hidden behind {vec} with {slack:.1f} µs slack ({100 * slack / k.vector_median_us:.0f}%)"
        if op is not None and op.capped:
            return "keep", f"{why}, but already at the {op.bytes / MiB:.0f} MiB cap", None
        if current is not None and current >= 0.999:
            return "keep", f"{why}, but already the whole weight", None
        return "raise", why, hint
    if k.overlap_median < rules.hidden_frac:
        return (
            "keep",
            f"ends in time but only {100 * k.overlap_median:.0f}% overlaps {vec} "
            "(starts before it)",
            None,
        )
    return "keep", f"hidden behind {vec}, ends {slack:.1f} µs before it", None


def no_prefetch_causes(data: ProfileData, plan: PlanChoice | None) -> list[str]:
    """Why a profile may show no prefetch task: the plan's reasons first, then the usual ones."""
    causes: list[str] = []
    if plan is not None:
        p = plan.plan
        for op in p.ops:
            if not op.fires:
                causes.append(f"{op.knob} ({op.weight}): {op.reason}")
        firing = p.firing
        if firing:
            causes.append(
                f"the plan says {len(firing)} prefetch(es) per layer should fire for "
                f"{p.model.name} at {p.tokens} tokens ({', '.join(o.knob for o in firing)}): "
                "check the config reached the server (--additional-config) and the tokens "
                "per forward of the profiled steps"
            )
    else:
        causes.append(
            "no model given: pass --model (and --tp/--dp/--ep, --max-num-seqs or --tokens, the "
            "config) to see which knobs the runtime plan fires"
        )
    causes.append(
        "weight_prefetch_config not enabled, or vLLM-Ascend >= v0.24.0rc1 (native prefetch "
        "removed; the key is silently ignored) without the prefetch-tune plugin"
    )
    causes.append(
        "token thresholds: MLP prefetch only below 500 tokens per forward, MoE only from 96; "
        "attn prefetch only in static W8A8 linears"
    )
    if data.fmt == "kernel_details":
        causes.append(
            "kernel_details.csv lists compute kernels; CMO tasks may only appear in "
            "trace_view.json: profile again and point at the directory or trace_view.json"
        )
    return causes


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Fit:
    """One fitted hardware field."""

    field: str
    value: float
    base: float
    samples: int
    how: str


@dataclass
class Calibration:
    """What a profile measured of the hardware, against the base profile."""

    base: HardwareProfile
    base_path: Path
    fits: list[Fit]
    kept: dict[str, str]  # field -> why it was not fitted
    ops: list[dict[str, Any]]  # per op role: observed vs modelled durations
    profile: HardwareProfile | None = None  # the result, once written and re-read

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.name,
            "base_path": str(self.base_path),
            "fitted": {
                f.field: {"value": f.value, "base": f.base, "samples": f.samples, "how": f.how}
                for f in self.fits
            },
            "kept": self.kept,
            "ops": self.ops,
        }


def _linear_fit(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Least squares y = a + b x over (x, y); None when x does not vary enough."""
    xs = [p[0] for p in points]
    if len(points) < 2 or max(xs) < 1.2 * min(xs):
        return None
    mx = statistics.fmean(xs)
    my = statistics.fmean(p[1] for p in points)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def _overlaps_any(start: float, end: float, spans: Sequence[tuple[float, float]]) -> bool:
    i = bisect_right(spans, (end, math.inf))
    return any(s < end and e > start for s, e in spans[max(0, i - 8) : i])


def calibrate(report: ProfileReport, hardware: str) -> Calibration:
    """Fit the base profile's fields a profile measures. Needs a plan (model, layout, tokens).

    * prefetch_bw, cmo_issue_us: CMO busy time vs bytes. With several sizes, the least-squares
      line through the per-size medians (intercept = issue, slope = 1 / bandwidth); with one
      size, bandwidth = median bytes / (duration - cmo_issue_us), issue kept.
    * kernel_overhead_us, vector bandwidth: per vector-op role, the median duration of the
      instances no prefetch overlaps (no contention) against the modelled bytes of that op at
      the plan's tokens; a line through them when sizes differ, else bandwidth alone.
    * hbm_bw: dense projections that no prefetch fills nor overlaps, memory-bound at the
      fitted overhead: the bandwidth at which the sim's matmul time equals the median.
    * vector_bw_fraction = vector bandwidth / hbm_bw.
    """
    from prefetch_tune.backends.sim import _memory_time, compute_ops

    if report.plan is None:
        raise ConfigError("--calibrate needs --model (and layout, tokens) for the runtime plan")
    base = load_hardware(hardware)
    plan = report.plan.plan
    fits: list[Fit] = []
    kept: dict[str, str] = {}

    # --- prefetch: bytes vs busy time
    by_size: dict[int, list[float]] = {}
    for inst in report.instances:
        if inst.nbytes and inst.busy_dur > 0:
            by_size.setdefault(inst.nbytes, []).append(inst.busy_dur)
    n_cmo = sum(len(v) for v in by_size.values())
    issue = base.cmo_issue_us
    bw = base.prefetch_bw
    if by_size:
        line = _linear_fit([(float(b), statistics.median(d)) for b, d in by_size.items()])
        if line is not None and line[1] > 0 and line[0] >= 0:
            issue, bw = line[0], 1e6 / line[1]
            how = f"CMO busy time vs bytes, line through {len(by_size)} per-size medians"
            fits.append(Fit("cmo_issue_us", issue, base.cmo_issue_us, n_cmo, how))
            fits.append(Fit("prefetch_bw", bw, base.prefetch_bw, n_cmo, how))
        else:
            rates = [b / ((d - issue) * 1e-6) for b, ds in by_size.items() for d in ds if d > issue]
            if rates:
                bw = statistics.median(rates)
                fits.append(
                    Fit(
                        "prefetch_bw",
                        bw,
                        base.prefetch_bw,
                        len(rates),
                        f"median bytes / (CMO duration - cmo_issue_us {issue:g} us)",
                    )
                )
            kept["cmo_issue_us"] = (
                "one prefetch size only (or no consistent line): the intercept is not measurable"
            )
    else:
        kept["prefetch_bw"] = kept["cmo_issue_us"] = "no prefetch task with known bytes"

    # --- compute ops at the observed shapes
    if not plan.tokens:
        raise ConfigError("--calibrate needs the tokens per forward (--tokens / --max-num-seqs)")
    ops = {o.name: o for o in compute_ops(plan.model, plan.layout, base, plan.tokens, 0, 0)}
    observed: dict[str, list[float]] = {}
    excluded: dict[str, int] = {}
    consumers = dict.fromkeys(DENSE_MATMULS, False)
    seen_knobs = {(i.knob, i.weight) for i in report.instances}
    for o in plan.ops:
        if (o.knob, o.weight) in seen_knobs:
            consumers[o.consumer] = True
    single = {bit: name for name, bit in ROLE_BITS.items() if name in ops}
    for dev in report.data.devices:
        roles = report.roles.get(dev.name)
        if roles is None:
            roles, _ = label_layers(dev.cat)
        spans = sorted((c.start, c.end) for c in dev.cmos)
        for j in range(len(dev.start)):
            role = single.get(roles[j])  # exactly one role (fused ops are left out)
            if role is None or dev.cat[j] == NORM_QUANT:
                continue
            if _overlaps_any(dev.start[j], dev.end[j], spans):
                excluded[role] = excluded.get(role, 0) + 1
                continue
            observed.setdefault(role, []).append(dev.end[j] - dev.start[j])

    overhead = base.kernel_overhead_us
    vector_bw = base.vector_bw
    vec_points = [
        (ops[r].hbm_bytes, statistics.median(d), len(d))
        for r, d in observed.items()
        if ops[r].kind == "vector" and ops[r].hbm_bytes > 0
    ]
    n_vec = sum(p[2] for p in vec_points)
    line = _linear_fit([(b, d) for b, d, _ in vec_points])
    if line is not None and line[1] > 0 and line[0] >= 0:
        overhead, vector_bw = line[0], 1e6 / line[1]
        how = f"vector-op duration vs modelled bytes, line through {len(vec_points)} op medians"
        fits.append(Fit("kernel_overhead_us", overhead, base.kernel_overhead_us, n_vec, how))
    elif vec_points:
        rates = [b / ((d - overhead) * 1e-6) for b, d, _ in vec_points if d > overhead]
        if rates:
            vector_bw = statistics.median(rates)
        kept["kernel_overhead_us"] = "vector ops of one size only: the intercept is not measurable"
    else:
        kept["kernel_overhead_us"] = "no vector op free of prefetch contention"

    hbm_values: list[float] = []
    n_mm = 0
    for r in DENSE_MATMULS:
        if r not in observed or consumers.get(r):
            continue
        op = ops[r]
        memory_s = (statistics.median(observed[r]) - overhead) * 1e-6
        if op.hbm_bytes <= 0 or memory_s <= op.cube_s * 1.02:
            continue  # compute-bound (or overhead only): says nothing of HBM

        def excess(x: float, op: Any = op, memory_s: float = memory_s) -> float:
            return float(_memory_time(op, replace(base, hbm_bw=x), 0.0)) - memory_s

        lo, hi = 1e9, 1e15
        if excess(lo) < 0 or excess(hi) > 0:
            continue
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            if excess(mid) > 0:
                lo = mid
            else:
                hi = mid
        hbm_values.append(math.sqrt(lo * hi))
        n_mm += len(observed[r])
    hbm = base.hbm_bw
    if hbm_values:
        hbm = statistics.median(hbm_values)
        fits.append(
            Fit(
                "hbm_bw",
                hbm,
                base.hbm_bw,
                n_mm,
                f"memory-bound matmuls no prefetch fills or overlaps ({len(hbm_values)} ops), "
                "inverted through the sim's matmul time",
            )
        )
    else:
        kept["hbm_bw"] = "no memory-bound dense matmul free of prefetch hits and contention"
    if vec_points:
        frac = vector_bw / hbm
        if 0 < frac <= 1:
            fits.append(
                Fit(
                    "vector_bw_fraction",
                    frac,
                    base.vector_bw_fraction,
                    n_vec,
                    f"vector bandwidth {vector_bw / 1e9:.1f} GB/s (from vector-op durations vs "
                    f"modelled bytes) / hbm_bw {hbm / 1e9:.1f} GB/s",
                )
            )
        else:
            kept["vector_bw_fraction"] = (
                f"vector ops imply {vector_bw / 1e9:.1f} GB/s, above hbm_bw: not physical, kept"
            )
    fitted = replace(
        base,
        prefetch_bw=bw,
        cmo_issue_us=issue,
        kernel_overhead_us=overhead,
        hbm_bw=hbm,
        vector_bw_fraction=next(
            (f.value for f in fits if f.field == "vector_bw_fraction"), base.vector_bw_fraction
        ),
    )
    table: list[dict[str, Any]] = []
    for role, durs in observed.items():
        op = ops[role]
        if op.kind not in ("vector", "matmul"):
            continue
        table.append(
            {
                "op": role,
                "kind": op.kind,
                "samples": len(durs),
                "excluded_overlapping_prefetch": excluded.get(role, 0),
                "observed_us": round(statistics.median(durs), 3),
                "model_base_us": round(_op_us(op, base, _memory_time), 3),
                "model_fitted_us": round(_op_us(op, fitted, _memory_time), 3),
                "prefetched": bool(consumers.get(role)),
            }
        )
    return Calibration(base, Path(base.source), fits, kept, table)


def _op_us(op: Any, hw: HardwareProfile, memory_time: Any) -> float:
    return hw.kernel_overhead_us + float(memory_time(op, hw, 0.0)) * 1e6


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} cannot be written to a hardware profile")
        return repr(value)
    return json.dumps(str(value))


def _widen_to_measurement(entry: dict[str, Any]) -> None:
    """A measured value outside the base's mechanism range wins over the estimate: the range
    grows to include it and says so (the mechanism behind the old range needs revisiting)."""
    bounds = entry.get("range")
    if not (isinstance(bounds, list) and len(bounds) == 2):
        return
    low, high = float(bounds[0]), float(bounds[1])
    value = float(entry["value"])
    if low <= value <= high:
        return
    entry["range"] = [min(low, value), max(high, value)]
    entry["range_why"] = (
        f"widened from [{low:g}, {high:g}] to the measured {value:g}: a measurement beats the "
        f"estimate the old range came from ({entry.get('range_why', '')})"
    )


def render_profile_toml(cal: Calibration, trace: Path, name: str | None = None) -> str:
    """The base profile's TOML with the fitted fields replaced and a new [calibration] table."""
    try:
        doc = tomllib.loads(cal.base_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{cal.base_path}: cannot re-read the base profile ({exc})") from None
    fits = {f.field: f for f in cal.fits}
    lines = [
        "# Hardware profile calibrated by `prefetch-tune profile --calibrate`.",
        f'# Base: {cal.base_path}. Fitted fields have kind = "fitted"; the rest are the base\'s.',
        f"name = {_toml_value(name or cal.base.name + '-calibrated')}",
    ]
    if "description" in doc:
        desc = f"{doc['description']} (calibrated from {trace.name})"
        lines.append(f"description = {_toml_value(desc)}")
    for key, entry in doc.items():
        if not isinstance(entry, dict) or key == "calibration":
            continue
        lines.append("")
        lines.append(f"[{key}]")
        entry = dict(entry)
        if key in fits:
            f = fits[key]
            entry["value"] = float(f"{f.value:.6g}")
            entry["kind"] = "fitted"
            entry["source"] = (
                f"prefetch-tune profile --calibrate from {trace}: {f.how}; {f.samples} samples "
                f"(base {cal.base.name}: {f.base:g})"
            )
            _widen_to_measurement(entry)
        for k2, v2 in entry.items():
            if isinstance(v2, dict):
                continue
            if isinstance(v2, list):
                lines.append(f"{k2} = [{', '.join(_toml_value(x) for x in v2)}]")
                continue
            lines.append(f"{k2} = {_toml_value(v2)}")
    lines += [
        "",
        "[calibration]",
        f"source_trace = {_toml_value(str(trace))}",
        f"base_profile = {_toml_value(str(cal.base_path))}",
        f"fitted = {_toml_value(', '.join(f.field for f in cal.fits))}",
        "method = "
        + _toml_value(
            "prefetch-tune profile --calibrate: robust per-size / per-op medians, least squares "
            "through them (see prefetch_tune/analysis/profile.py calibrate)"
        ),
        f"created = {_toml_value(time.strftime('%Y-%m-%dT%H:%M:%S%z'))}",
    ]
    for f in cal.fits:
        lines.append(f"samples_{f.field} = {f.samples}")
    base_cal = doc.get("calibration")
    if isinstance(base_cal, dict):  # what the base itself was fitted to, for provenance
        for k4, v4 in base_cal.items():
            if isinstance(v4, str | int | float):
                lines.append(f"base_{k4} = {_toml_value(v4)}")
    for k3, why in cal.kept.items():
        lines.append(f"kept_{k3} = {_toml_value(why)}")
    return "\n".join(lines) + "\n"


def write_profile(cal: Calibration, out: Path, trace: Path) -> HardwareProfile:
    """Write the calibrated profile and read it back the way the sim backend will."""
    text = render_profile_toml(cal, trace)
    try:
        parsed = parse_profile(tomllib.loads(text), str(out))
    except (ConfigError, tomllib.TOMLDecodeError) as exc:  # a bug here, not the user's input
        raise ConfigError(
            f"--calibrate {out}: the fitted profile does not validate ({exc})"
        ) from None
    try:
        out.write_text(text)
    except OSError as exc:
        raise ConfigError(f"--calibrate {out}: cannot write ({exc.strerror})") from None
    cal.profile = parsed
    return parsed


__all__ = [
    "CATEGORY_NAMES",
    "Calibration",
    "CmoTask",
    "DeviceTimeline",
    "Fit",
    "Instance",
    "KnobReport",
    "PlanChoice",
    "ProfileData",
    "ProfileReport",
    "Rules",
    "analyse",
    "calibrate",
    "choose_plan",
    "classify",
    "find_profile_files",
    "iter_trace_events",
    "label_layers",
    "load_profile",
    "no_prefetch_causes",
    "percentile",
    "render_profile_toml",
    "verdict",
    "write_profile",
]
