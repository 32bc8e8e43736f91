"""Assertions several test files share (imported as `from helpers import ...`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def assert_bad_input(result: Any, *needles: str, empty_stdout: bool = False) -> str:
    """Exit 2 with exactly one `error:` line on stderr naming the problem, and no traceback."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines: list[str] = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    if empty_stdout:
        assert result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def live_group(pgid: int) -> list[int]:
    """Non-zombie members of a process group, read from /proc independently of the code under
    test."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def processes_with_env(var: str, value: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds var=value: finds every server and
    benchmark a test started, whatever process group they ended up in."""
    needle = f"{var}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X"):
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry.name))
    return found


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal, for the tune files tests write."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)
