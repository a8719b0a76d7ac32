"""The natsmesh command dispatches subcommands and refuses unknown ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from natsmesh_operator import cli


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("operator", "bootstrap", "crds", "sidecar", "check", "status", "analyze"):
        assert name in out


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_cli_import_is_lazy() -> None:
    """Importing the CLI must not pull kopf in: `natsmesh sidecar` stays light."""
    code = "import sys, natsmesh_operator.cli; print('kopf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_operator_does_not_load_the_user_commands() -> None:
    """`natsmesh operator` imports what it runs; the user commands stay out of it."""
    code = (
        "import sys, natsmesh_operator.main, natsmesh_operator.handlers.runtime; "
        "print(sorted(m for m in sys.modules if m.startswith('natsmesh_operator.usercli')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # ...while the command module itself does load them (the check can fail).
    code = (
        "import sys, natsmesh_operator.usercli.check; "
        "print('natsmesh_operator.usercli.probes' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
