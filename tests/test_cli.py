"""The command-line skeleton: help, version, the one error path."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bodyage import __version__
from cli.app import app

runner = CliRunner()

COMMANDS = [
    "simulate",
    "cohort",
    "qc",
    "segment",
    "train",
    "attribute",
    "stats",
    "compare",
    "report",
    "demo",
    "bench",
]


def test_help_lists_every_command() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"bodyage {__version__}"


def test_usage_error_exits_2() -> None:
    res = runner.invoke(app, ["simulate"])  # missing argument
    assert res.exit_code == 2


def test_library_error_is_one_line_and_exit_1(tmp_path) -> None:
    # an unknown scenario -> ScenarioError from the library
    res = subprocess.run(
        [sys.executable, "-m", "cli.app", "simulate", str(tmp_path / "s"), "--scenario", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines == ["error: scenario 'nope' is neither a built-in scenario (default, dev, quick) nor a file"]
    assert "Traceback" not in res.stderr


def test_debug_shows_traceback(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "cli.app", "--debug", "simulate", str(tmp_path / "s"), "--scenario", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1
    assert "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_its_own_help(cmd) -> None:
    # every command is built; `--help` must describe it, not a placeholder
    res = runner.invoke(app, [cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output
    assert "not built yet" not in res.output
