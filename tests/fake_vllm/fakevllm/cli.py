"""Entry point of the fake `vllm` executable: `--version`, `serve`, `bench serve`."""

from __future__ import annotations

import os
import sys

from fakevllm import DEFAULT_VERSION

USAGE = "usage: vllm [-h] [-v] {serve,bench} ..."


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-v", "--version"):
        print(os.environ.get("FAKE_VLLM_VERSION", DEFAULT_VERSION))
        return 0
    if argv and argv[0] == "serve":
        from fakevllm import serve

        return serve.main(argv[1:])
    if argv[:2] == ["bench", "serve"]:
        from fakevllm import bench

        return bench.main(argv[2:])
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    print(USAGE, file=sys.stderr)
    print(f"vllm: error: unsupported command {' '.join(argv[:2])!r} (fake vllm)", file=sys.stderr)
    return 2
