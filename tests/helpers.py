"""Assertions several test files share (imported as `from helpers import ...`)."""

from __future__ import annotations

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
