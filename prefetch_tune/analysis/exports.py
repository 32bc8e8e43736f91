"""Read a torch_npu profiler export into per-device timelines.

Input: a torch_npu profiler output directory (the one holding `ASCEND_PROFILER_OUTPUT/`, possibly
one per rank as `*_ascend_pt/ASCEND_PROFILER_OUTPUT/`), a `trace_view.json` or a
`kernel_details.csv` (layouts: docs/profile-formats.md). Both are read by header / field name,
never by position, and streamed: a `trace_view.json` goes through a small incremental parser over
its `traceEvents` array (`json.JSONDecoder.raw_decode` on chunks) that keeps only device tasks of
"Ascend Hardware" processes, in compact columns.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from prefetch_tune.analysis.kernels import COMPUTE_CATS, PREFETCH, SYNC, WAIT, kernel_category
from prefetch_tune.errors import ConfigError

CHUNK_CHARS = 1 << 20  # characters read per chunk of a trace_view.json
MAX_VALUE_CHARS = 64 << 20  # a single JSON value larger than this is treated as malformed

Format = Literal["trace_view", "kernel_details"]


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
            cat = self._cats[ckey] = kernel_category(name, op_type, task_type)
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
                    stream = (
                        "prefetch"
                        if kernel_category(name, op_type, core) == PREFETCH
                        else "compute"
                    )
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
