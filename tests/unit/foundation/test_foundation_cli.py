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


OPERATOR = "natsmesh_operator.main, natsmesh_operator.handlers.runtime"
"""What ``natsmesh operator`` imports before it runs."""


def loaded(imports: str, expression: str) -> str:
    """``expression`` printed by a fresh interpreter after ``import sys, <imports>``."""
    code = f"import sys, {imports}; print({expression})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_cli_import_is_lazy() -> None:
    """Importing the CLI must not pull kopf in: `natsmesh sidecar` stays light."""
    assert loaded("natsmesh_operator.cli", "'kopf' in sys.modules") == "False"


def test_operator_does_not_load_the_user_commands() -> None:
    """`natsmesh operator` imports what it runs; the user commands stay out of it."""
    usercli = "sorted(m for m in sys.modules if m.startswith('natsmesh_operator.usercli'))"
    assert loaded(OPERATOR, usercli) == "[]"
    # ...while the command module itself does load them (the check can fail).
    probes = "'natsmesh_operator.usercli.probes' in sys.modules"
    assert loaded("natsmesh_operator.usercli.check", probes) == "True"


def test_operator_does_not_load_cryptography() -> None:
    """The webhook's certificates come from files (the chart's): making them is
    the test bed's (``webhook.certgen``), and cryptography's x509 and key
    modules were ~8 MB of the operator's RSS (docs/performance.md)."""
    crypto = "sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography')"
    assert loaded(OPERATOR, crypto) == "[]"
    # ...while making a certificate does load it (the check can fail).
    x509 = "'cryptography.x509' in sys.modules"
    assert loaded("natsmesh_operator.webhook.certgen", x509) == "True"
