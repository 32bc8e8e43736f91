"""Mutation probe: do the tests catch small deliberate bugs?

Each mutation replaces one exact snippet of one source file (it must occur exactly once, else
the probe stops with exit 2 before running anything), then runs the test files that concern
that file in a scratch copy of the repository (so the checkout is never touched, even when the
probe is interrupted). A mutation is caught when those tests fail; the first failing test is
named. Exit 0 when every mutation is caught, 1 otherwise.

  python benchmarks/mutation_probe.py             # all mutations
  python benchmarks/mutation_probe.py --only sim  # the ones whose name contains "sim"
  python benchmarks/mutation_probe.py --list
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = "prefetch_tune"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to prefetch_tune/
    original: str
    mutated: str
    tests: tuple[str, ...]  # test files (or node ids) relative to the repository


T_SEL = ("tests/test_selection.py",)
T_PREFETCH = ("tests/test_prefetch.py",)
T_PLAN = ("tests/test_plan.py", "tests/test_sim.py")
T_SPACE = ("tests/test_space.py",)
T_SIM = ("tests/test_sim.py",)
T_RESULTS = ("tests/test_result_files.py", "tests/test_search.py")
T_SWEEP = ("tests/test_sweep.py",)
T_PROFILE = ("tests/test_profile.py",)
T_SERVER = ("tests/test_server.py",)
T_BENCH = ("tests/test_fake_vllm.py", "tests/test_vllm_backend.py")

M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # -- the eight that once survived the whole suite (issue 18)
    M(
        "selection: drop the 'not significant -> off' fallback",
        "search/selection.py",
        "pool = [c for c in ok if interval(c, off, settings.minimize).significant]",
        "pool = list(ok)",
        T_SEL,
    ),
    M(
        "selection: drop the 'unstable' rejection",
        "search/selection.py",
        "if cand.median and cand.mad / abs(cand.median) > settings.max_rel_mad:",
        "if False:",
        T_SEL,
    ),
    M(
        "results: non-atomic result write",
        "results.py",
        'atomic_write(path, json.dumps(doc, indent=2, sort_keys=False) + "\\n")',
        'path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\\n")',
        T_RESULTS,
    ),
    M(
        "server: startup timeout with OOM in the log classed as timeout",
        "backends/server.py",
        "failure_class=FailureClass.OUT_OF_MEMORY if oom else FailureClass.STARTUP_TIMEOUT,",
        "failure_class=FailureClass.STARTUP_TIMEOUT,",
        T_SERVER,
    ),
    M(
        "profile: drop the 'too little fits -> off' verdict",
        "analysis/verdicts.py",
        "if fits_bytes is not None and fits_bytes < rules.min_useful_bytes:",
        "if False:",
        T_PROFILE,
    ),
    M(
        "profile: drop the 'join stall outweighs -> off' verdict",
        "analysis/verdicts.py",
        "if stall > max(hidden, rules.late_tol_us):",
        "if False:",
        T_PROFILE,
    ),
    M(
        "sweep: double the allowed drop",
        "regress/judging.py",
        "limit = max(tolerance, band)",
        "limit = 2 * max(tolerance, band)",
        T_SWEEP,
    ),
    M(
        "cli search: default --cap-mib 16",
        "cli/search.py",
        "    ] = DEFAULT_CAP_MIB,\n    trials:",
        "    ] = 16.0,\n    trials:",
        ("tests/test_search_options.py",),
    ),
    # -- prefetch.py
    M(
        "prefetch: ratios up to 1.5 accepted",
        "prefetch.py",
        "not 0.0 <= value <= 1.0:",
        "not 0.0 <= value <= 1.5:",
        T_PREFETCH,
    ),
    M(
        "prefetch: unnamed modules get 0 instead of the defaults",
        "prefetch.py",
        "            else DEFAULT_RATIOS[knob]\n",
        "            else 0.0\n",
        T_PREFETCH,
    ),
    M(
        "prefetch: native translation emits 0 (= whole weight) for an off knob",
        "prefetch.py",
        "knobs[name] = NATIVE_OFF_RATIO",
        "knobs[name] = 0.0",
        T_PREFETCH,
    ),
    M(
        "prefetch: shallow merge of --additional-config",
        "prefetch.py",
        "merged[key] = deep_merge(merged[key], value)",
        "merged[key] = value",
        T_PREFETCH,
    ),
    # -- runtime/plan.py
    M(
        "plan: MLP prefetch also at exactly 500 tokens",
        "runtime/plan.py",
        'if module == "mlp" and tokens >= MLP_TOKEN_LIMIT:',
        'if module == "mlp" and tokens > MLP_TOKEN_LIMIT:',
        T_PLAN,
    ),
    M(
        "plan: MoE prefetch not at exactly 96 tokens",
        "runtime/plan.py",
        'if module == "moe" and tokens < MOE_TOKEN_MIN:',
        'if module == "moe" and tokens <= MOE_TOKEN_MIN:',
        T_PLAN,
    ),
    M(
        "plan: native caps every path, not only MLP",
        "runtime/plan.py",
        'size = min(requested, cap) if module_of(knob) == "mlp" else requested',
        "size = min(requested, cap)",
        T_PLAN,
    ),
    M(
        "plan: native reads 0 as nothing instead of the whole weight",
        "runtime/plan.py",
        "    if size <= 0:\n        size = weight_bytes\n",
        "    if size < 0:\n        size = weight_bytes\n",
        T_PLAN,
    ),
    M(
        "plan: native mlp.gate_up dead with sequence parallel instead of without",
        "runtime/plan.py",
        'if semantics == "native-0.23" and not options.sequence_parallel:',
        'if semantics == "native-0.23" and options.sequence_parallel:',
        T_PLAN,
    ),
    # -- search/space.py
    M(
        "space: ratios clipped at 1 instead of the flat bound",
        "search/space.py",
        "return min(max(0.0, float(param)), self.bound(knob))",
        "return min(max(0.0, float(param)), 1.0)",
        T_SPACE,
    ),
    M(
        "space: all knobs off is not the off config",
        "search/space.py",
        "        if not any(ratios.values()):\n            return PrefetchConfig.off()\n",
        "",
        T_SPACE,
    ),
    M(
        "space: no flat-region cut of the upper bound",
        "search/space.py",
        "1.0 if (f := flat[k]) is None else round(f, 6)",
        "1.0",
        T_SPACE,
    ),
    # -- backends/sim.py
    M(
        "sim: no prefetch contention",
        "backends/sim.py",
        "slow = min(0.95, hw.prefetch_contention * hw.prefetch_bw / hw.hbm_bw)",
        "slow = 0.0",
        T_SIM,
    ),
    M(
        "sim: no join stall",
        "backends/sim.py",
        "waited = max(0.0, fill.end - t)",
        "waited = 0.0",
        T_SIM,
    ),
    M(
        "sim: KV cache read ignores the context length",
        "backends/sim.py",
        "kv_read = decode_tokens * context * 2 * kv_width * KV_BYTES",
        "kv_read = decode_tokens * 2 * kv_width * KV_BYTES",
        T_SIM,
    ),
    M(
        "sim: noise moves latencies the wrong way",
        "backends/sim.py",
        "noisy[name] = value / factor if name in LOWER_IS_BETTER else value * factor",
        "noisy[name] = value * factor",
        T_SIM,
    ),
    # -- results.py
    M(
        "results: any schema_version accepted",
        "results.py",
        "    if version != SCHEMA_VERSION:\n",
        "    if False:\n",
        T_RESULTS,
    ),
    M(
        "results: damaged result files skipped silently when listing",
        "results.py",
        "        except ConfigError as exc:\n            yield path, exc\n",
        "        except ConfigError:\n            continue\n",
        T_RESULTS + T_SWEEP,
    ),
    # -- regress/
    M(
        "sweep: 'winner beats baseline' always holds",
        "regress/judging.py",
        'ok = bool(cmp["significant"])',
        "ok = True",
        T_SWEEP,
    ),
    M(
        "sweep: missing points never fail the sweep",
        "regress/outcomes.py",
        'bad: set[Status] = {"fail", "error"} if self.allow_missing else '
        '{"fail", "error", "missing"}',
        'bad: set[Status] = {"fail", "error"}',
        T_SWEEP,
    ),
    # -- analysis/
    M(
        "profile: lateness measured from the vector op's start",
        "analysis/pairing.py",
        "late_us=cmo.end - ve,",
        "late_us=cmo.end - vs,",
        T_PROFILE,
    ),
    M(
        "profile: prefetch names matched case-sensitively",
        "analysis/kernels.py",
        '_PREFETCH_RE = re.compile(r"cmo|prefetch", re.IGNORECASE)',
        '_PREFETCH_RE = re.compile(r"cmo|prefetch")',
        T_PROFILE,
    ),
    M(
        "profile: calibrated prefetch bandwidth from the slope, not its inverse",
        "analysis/calibration.py",
        "issue, bw = line[0], 1e6 / line[1]",
        "issue, bw = line[0], 1e6 * line[1]",
        T_PROFILE,
    ),
    # -- backends/server.py
    M(
        "server: OOM exit classed as a crash",
        "backends/server.py",
        "failure_class=FailureClass.OUT_OF_MEMORY if oom else FailureClass.SERVER_CRASH,",
        "failure_class=FailureClass.SERVER_CRASH,",
        T_SERVER,
    ),
    M(
        "server: SIGTERM again instead of SIGKILL after the grace",
        "backends/server.py",
        "                self._signal_group(signal.SIGKILL)\n",
        "                self._signal_group(signal.SIGTERM)\n",
        T_SERVER,
    ),
    # -- backends/bench.py
    M(
        "bench: missing requests not an incomplete benchmark",
        "backends/bench.py",
        "if failed > 0 or completed < expected:",
        "if failed > 0:",
        T_BENCH,
    ),
    M(
        "bench: no --ignore-eos",
        "backends/bench.py",
        '        "--ignore-eos",\n',
        "",
        T_BENCH,
    ),
)


def check_snippets(mutations: tuple[Mutation, ...]) -> None:
    """Every snippet must occur exactly once; otherwise stop (a stale probe measures nothing)."""
    problems = []
    for m in mutations:
        path = REPO / PKG / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {PKG}/{m.file} does not exist")
            continue
        count = path.read_text().count(m.original)
        if count != 1:
            problems.append(f"{m.name}: snippet found {count} times in {PKG}/{m.file}")
        for t in m.tests:
            if not (REPO / t.split("::")[0]).is_file():
                problems.append(f"{m.name}: test file {t} does not exist")
    if problems:
        print("error: mutation probe is out of date:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        raise SystemExit(2)


def scratch_copy(dest: Path) -> Path:
    """The repository's files (tracked and untracked, not ignored) under `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_one(m: Mutation, copy: Path, timeout: float) -> tuple[str, str, float]:
    """(caught / SURVIVED / error / timeout, the catching test or a note, seconds)."""
    path = copy / PKG / m.file
    clean = path.read_text()
    path.write_text(clean.replace(m.original, m.mutated, 1))
    env = {**os.environ, "PYTHONPATH": str(copy)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *m.tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"no verdict within {timeout:.0f} s", time.monotonic() - t0
    finally:
        path.write_text(clean)
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return "SURVIVED", "", seconds
    failed = re.search(r"^FAILED (\S+)", proc.stdout, re.MULTILINE)
    if proc.returncode == 1 and failed:
        return "caught", failed.group(1), seconds
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return "error", f"pytest exit {proc.returncode}: {tail[0][:100]}", seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", help="run the mutations whose name contains this text")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    args = ap.parse_args()
    check_snippets(MUTATIONS)
    chosen = [m for m in MUTATIONS if not args.only or args.only in m.name]
    if args.list or not chosen:
        for i, m in enumerate(MUTATIONS, 1):
            print(f"{i:2d}  {m.name}  [{PKG}/{m.file}]")
        return 0 if chosen else 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-probe-") as tmp:
        copy = scratch_copy(Path(tmp))
        for i, m in enumerate(chosen, 1):
            status, detail, seconds = run_one(m, copy, args.timeout)
            rows.append((m, status, detail))
            print(f"[{i}/{len(chosen)}] {status:8s} {seconds:6.1f}s  {m.name}", file=sys.stderr)
    print("| # | mutation | file | result | catching test |")
    print("|---|---|---|---|---|")
    for i, (m, status, detail) in enumerate(rows, 1):
        print(f"| {i} | {m.name} | {PKG}/{m.file} | {status} | {detail} |")
    caught = sum(status == "caught" for _, status, _ in rows)
    print(f"\ncaught {caught} of {len(rows)} mutations")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
