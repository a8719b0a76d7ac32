"""The natsmesh command dispatches subcommands and refuses unknown ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from natsmesh_operator import cli


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("operator", "bootstrap", "crds", "sidecar"):
        assert name in out


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_cli_import_is_lazy() -> None:
    """Importing the CLI must not pull kopf in: `natsmesh sidecar` stays light."""
    code = "import sys, natsmesh_operator.cli; print('kopf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
