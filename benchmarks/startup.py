"""Start-up time of the CLI: `prefetch-tune --help` and `apply --set`, against `python -c pass`.

Each command runs as a fresh process (`python -m prefetch_tune ...`, the same interpreter) N
times, interleaved with the baseline so load on a shared machine hits all of them alike. Prints
the median wall time of each and its ratio to the baseline, and the time above the baseline
(what prefetch-tune itself costs) next to the 0.3 s goal for the whole command.

Usage: python benchmarks/startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

GOAL_S = 0.3
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "prefetch-tune --help": [sys.executable, "-m", "prefetch_tune", "--help"],
    "prefetch-tune apply --set mlp.down=0.5": [
        sys.executable,
        "-m",
        "prefetch_tune",
        "apply",
        "--set",
        "mlp.down=0.5",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.runs):
        for name, cmd in CASES.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["python -c pass"])
    print(f"{'command':42} {'median s':>9} {'min s':>7} {'x baseline':>10} {'goal s':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        goal = "-" if name.startswith("python") else f"{GOAL_S:.2f}"
        print(f"{name:42} {med:9.3f} {min(ts):7.3f} {med / base:10.2f} {goal:>7}")


if __name__ == "__main__":
    main()
