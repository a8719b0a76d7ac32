"""``natsmesh bootstrap``: files, idempotency, the Secret manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from natsmesh_operator.cli import main as cli_main
from natsmesh_operator.wiring import bootstrap, jwt

pytestmark = pytest.mark.unit


def test_bootstrap_writes_a_consistent_trust_chain(tmp_path: Path) -> None:
    assert cli_main(["bootstrap", "--out", str(tmp_path), "--resolver-dir", "/x/jwt"]) == 0
    boot = bootstrap.Bootstrap.load(tmp_path)
    op = jwt.decode(boot.operator_jwt)
    assert op.issuer == op.subject == boot.operator.public
    assert op.nats["system_account"] == boot.system_account.public
    sys_acc = jwt.decode(boot.system_account_jwt)
    assert sys_acc.issuer == boot.operator.public
    assert sys_acc.subject == boot.system_account.public
    user_jwt, _ = jwt.parse_creds(boot.system_user_creds)
    assert jwt.decode(user_jwt).issuer == boot.system_account.public
    conf = (tmp_path / "resolver.conf").read_text()
    assert "type: full" in conf
    assert "allow_delete: true" in conf
    assert '"/x/jwt"' in conf
    assert f"system_account: {boot.system_account.public}" in conf
    assert (tmp_path / "operator.nk").stat().st_mode & 0o077 == 0


def test_bootstrap_again_keeps_the_keys(tmp_path: Path) -> None:
    bootstrap.main(["--out", str(tmp_path)])
    first = bootstrap.Bootstrap.load(tmp_path)
    bootstrap.main(["--out", str(tmp_path)])
    second = bootstrap.Bootstrap.load(tmp_path)
    assert first.operator == second.operator
    assert first.system_account == second.system_account


def test_secret_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert bootstrap.main(["--secret", "nats-auth", "--namespace", "natsmesh"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["kind"] == "Secret"
    assert manifest["metadata"]["name"] == "nats-auth"
    assert set(manifest["stringData"]) == set(bootstrap.FILES.values())


def test_bootstrap_needs_an_output(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bootstrap.main([])
    assert "--out" in capsys.readouterr().err
