"""How fast, and in how much memory, `prefetch-tune profile` reads a big trace_view.json.

Generates a ~100 MB trace_view.json in a temp directory by repeating simulated decode steps
(qwen3-32b W8A8 TP4, max-num-seqs 72, documented default ratios) on two devices, plus host-side
events of a "Python" process that the reader must skip, laid out like the Ascend profiler's
trace_view.json. Then analyses it in a fresh child process (so the peak RSS is the analysis
alone, not the generator) and reports wall time and peak RSS (`resource.getrusage`).

Goal: < 30 s and memory bounded well below the file size.

Usage: python benchmarks/profile_speed.py [--mb 100] [--keep DIR] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prefetch_tune.analysis.trace import step_trace  # noqa: E402
from prefetch_tune.backends.base import OperatingPoint, Workload  # noqa: E402
from prefetch_tune.backends.sim import simulate_step, step_mix  # noqa: E402
from prefetch_tune.hardware import load_hardware  # noqa: E402
from prefetch_tune.models import Layout, load_model  # noqa: E402
from prefetch_tune.prefetch import PrefetchConfig  # noqa: E402

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
from prefetch_tune.analysis.exports import load_profile
from prefetch_tune.analysis.pairing import choose_plan
from prefetch_tune.analysis.profile import analyse
if {tracemalloc}:
    import tracemalloc
    tracemalloc.start()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
data = load_profile(Path(sys.argv[1]))
plan = choose_plan(data.other_data, tp=4)
report = analyse(data, plan)
t2 = time.perf_counter()
out = {{
    "import_s": t1 - t0,
    "read_s": data.read_seconds,
    "analyse_s": report.analyse_seconds,
    "total_s": t2 - t1,
    "rss_after_import_kb": rss0,
    "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "events_read": data.events_read,
    "tasks_kept": data.tasks_kept,
    "prefetch_tasks": data.prefetch_tasks,
    "matched": len(report.instances),
    "knobs": {{k.knob: [k.count, k.verdict] for k in report.knobs}},
}}
if {tracemalloc}:
    out["tracemalloc_peak_kb"] = tracemalloc.get_traced_memory()[1] // 1024
print(json.dumps(out))
"""


def one_step_events() -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    point = OperatingPoint(
        model=load_model("qwen3-32b"),
        layout=Layout(tp=4),
        max_num_seqs=72,
        workload=Workload(),
    )
    mix = step_mix(point)
    step = simulate_step(
        PrefetchConfig.default(), point, load_hardware("atlas-a2"), mix.batch, mix.context, 0, True
    )
    doc = step_trace(step)
    events = doc["traceEvents"]
    span = step.layer.time_s * 1e6 * point.model.layers
    return events, doc["otherData"], span


def generate(path: Path, target_mb: float) -> dict[str, Any]:
    """Write the big trace; returns what it holds."""
    events, other, span = one_step_events()
    meta = [e for e in events if e.get("ph") == "M"]
    tasks = [e for e in events if e.get("ph") == "X"]

    def absolute(rel_us: float) -> str:
        """Absolute µs as text with 3 decimals, as the profiler writes them (no float loss)."""
        whole, frac = f"{rel_us:.3f}".split(".")
        return f"{1_732_873_412_000_000 + int(whole)}.{frac}"

    n_steps = 0
    written = 0
    target = int(target_mb * 1e6)
    with path.open("w") as fh:
        fh.write('{"traceEvents": [\n')
        first = True

        def put(ev: dict[str, Any]) -> None:
            nonlocal first, written
            text = ("" if first else ",\n") + json.dumps(ev, separators=(",", ":"))
            first = False
            written += len(text)
            fh.write(text)

        for device in (0, 1):
            for m in meta:
                m2 = dict(m, pid=100 + device)
                if m2["name"] == "process_labels":
                    m2["args"] = {"labels": f"NPU {device}"}
                put(m2)
        put({"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "Python3 (12345)"}})
        while written < target:
            offset = n_steps * (span + 2000.0)
            for device in (0, 1):
                for ev in tasks:
                    e2 = dict(ev, pid=100 + device)
                    e2["ts"] = absolute(offset + ev["ts"])
                    e2["dur"] = round(ev["dur"], 3)
                    put(e2)
            for i, ev in enumerate(tasks[::2]):  # host-side events the reader must skip
                put(
                    {
                        "ph": "X",
                        "pid": 9,
                        "tid": 9,
                        "name": "aten::npu_prefetch" if i % 5 == 0 else "aten::linear",
                        "ts": absolute(offset + ev["ts"] - 3.0),
                        "dur": 1.5,
                        "args": {"Sequence number": i, "Fwd thread id": 0},
                    }
                )
            n_steps += 1
        fh.write("\n],\n")
        fh.write(f'"otherData": {json.dumps(other)}\n}}\n')
    return {"steps": n_steps, "bytes": path.stat().st_size, "devices": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=100.0, help="size of the generated trace")
    ap.add_argument("--keep", type=Path, help="write the trace here instead of a temp dir")
    ap.add_argument("--tracemalloc", action="store_true", help="also report tracemalloc peak")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.keep or Path(tmp)) / "trace_view.json"
        t0 = time.perf_counter()
        info = generate(path, args.mb)
        gen_s = time.perf_counter() - t0
        child = CHILD.format(tracemalloc=bool(args.tracemalloc))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", child, str(path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        wall = time.perf_counter() - t0
        result = json.loads(proc.stdout)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        children_rss = usage.ru_maxrss
        cpu = usage.ru_utime + usage.ru_stime
    mb = info["bytes"] / 1e6
    print(
        f"trace: {mb:.1f} MB, {info['steps']} steps x {info['devices']} devices (gen {gen_s:.1f} s)"
    )
    print(
        f"analysis: {result['total_s']:.2f} s (read {result['read_s']:.2f} s, analyse "
        f"{result['analyse_s']:.2f} s); child wall incl. interpreter + imports {wall:.2f} s, "
        f"CPU {cpu:.2f} s (the machine may be shared: CPU time is the steadier figure)"
    )
    print(
        f"events read {result['events_read']:,}, device tasks kept {result['tasks_kept']:,}, "
        f"prefetch tasks {result['prefetch_tasks']:,}, matched {result['matched']:,}"
    )
    print(
        f"peak RSS {result['rss_peak_kb'] / 1024:.1f} MiB (after imports "
        f"{result['rss_after_import_kb'] / 1024:.1f} MiB; getrusage children "
        f"{children_rss / 1024:.1f} MiB)"
    )
    if "tracemalloc_peak_kb" in result:
        print(f"tracemalloc peak {result['tracemalloc_peak_kb'] / 1024:.1f} MiB")
    print(f"knobs: {result['knobs']}")
    ok = result["total_s"] < 30.0
    print("PASS" if ok else "FAIL", "(goal: < 30 s)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
