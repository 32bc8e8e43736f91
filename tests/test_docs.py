"""The README names every command, and every command has help text."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from prefetch_tune.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
COMMANDS = sorted(typer.main.get_command(app).list_commands(None))  # type: ignore[attr-defined]


def test_the_cli_has_the_commands_people_use() -> None:
    assert {
        "search",
        "apply",
        "plan",
        "simulate",
        "show",
        "sweep",
        "report",
        "profile",
        "runtime-check",
        "models",
    } <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_in_readme_and_has_help(name: str) -> None:
    assert f"prefetch-tune {name}" in README
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) > 3


def test_readme_gives_exactly_two_quick_start_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = quick.split("```")[1::2]
    commands = [
        line
        for b in blocks
        for line in b.splitlines()
        if line.strip() and not line.startswith("bash")
    ]
    assert len(commands) == 2
    assert "prefetch-tune search" in commands[0]
    assert "pytest" in commands[1]
