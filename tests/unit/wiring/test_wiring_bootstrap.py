"""``natsmesh bootstrap``: files, idempotency, the Secret manifest, the root kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from natsmesh_operator.cli import main as cli_main
from natsmesh_operator.wiring import bootstrap, jwt
from natsmesh_operator.wiring.keys import Key, Role

pytestmark = pytest.mark.unit


def test_bootstrap_writes_a_consistent_trust_chain(tmp_path: Path) -> None:
    assert cli_main(["bootstrap", "--out", str(tmp_path), "--resolver-dir", "/x/jwt"]) == 0
    boot = bootstrap.Bootstrap.load(tmp_path)
    assert boot.root is not None
    assert not boot.legacy
    op = jwt.decode(boot.operator_jwt)
    assert op.issuer == op.subject == boot.operator_public == boot.root.public
    # The root trusts exactly one signing key, which is not the root itself.
    assert op.nats["signing_keys"] == [boot.signing_key.public]
    assert boot.signing_key.public != boot.root.public
    assert op.nats["system_account"] == boot.system_account.public
    sys_acc = jwt.decode(boot.system_account_jwt)
    assert sys_acc.issuer == boot.operator_public
    assert sys_acc.subject == boot.system_account.public
    user_jwt, _ = jwt.parse_creds(boot.system_user_creds)
    assert jwt.decode(user_jwt).issuer == boot.system_account.public
    conf = (tmp_path / "resolver.conf").read_text()
    assert "type: full" in conf
    assert "allow_delete: true" in conf
    assert '"/x/jwt"' in conf
    assert f"system_account: {boot.system_account.public}" in conf
    for seed in ("operator.nk", "signing.nk", "sys.nk", "sys.creds"):
        assert (tmp_path / seed).stat().st_mode & 0o077 == 0


def test_the_operator_files_never_hold_the_root(tmp_path: Path) -> None:
    boot = bootstrap.create()
    assert boot.root is not None
    files = boot.files()
    assert "operator.nk" not in files
    assert not any(boot.root.seed in body for body in files.values())
    assert files["signing.nk"].strip() == boot.signing_key.seed
    # Read back from exactly those files: a signer, no root.
    back = bootstrap.Bootstrap.from_files(files)
    assert back.root is None
    assert back.signing_key == boot.signing_key
    assert back.operator_public == boot.root.public


def test_root_out_puts_the_root_elsewhere(tmp_path: Path) -> None:
    out, root = tmp_path / "boot", tmp_path / "offline" / "root.nk"
    assert bootstrap.main(["--out", str(out), "--root-out", str(root)]) == 0
    assert not (out / "operator.nk").exists()
    loaded = Key.from_seed(root.read_text(), Role.OPERATOR)
    assert loaded.public == bootstrap.Bootstrap.load(out).operator_public
    assert root.stat().st_mode & 0o077 == 0


def test_bootstrap_again_keeps_the_keys(tmp_path: Path) -> None:
    bootstrap.main(["--out", str(tmp_path)])
    first = bootstrap.Bootstrap.load(tmp_path)
    bootstrap.main(["--out", str(tmp_path), "--resolver-dir", "/elsewhere"])
    second = bootstrap.Bootstrap.load(tmp_path)
    assert first.root == second.root
    assert first.signing_key == second.signing_key
    assert first.system_account == second.system_account
    assert first.operator_jwt == second.operator_jwt
    assert second.resolver_dir == "/elsewhere"


def test_secret_manifest_needs_a_home_for_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bootstrap.main(["--secret", "nats-auth"])
    assert "--root-out" in capsys.readouterr().err
    root = tmp_path / "root.nk"
    args = ["--secret", "nats-auth", "--namespace", "natsmesh", "--root-out", str(root)]
    assert bootstrap.main(args) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["kind"] == "Secret"
    assert manifest["metadata"]["name"] == "nats-auth"
    assert set(manifest["stringData"]) == set(bootstrap.FILES.values())
    seed = root.read_text().strip()
    assert seed not in json.dumps(manifest)
    op = jwt.decode(manifest["stringData"]["operator.jwt"].strip())
    assert op.subject == Key.from_seed(seed, Role.OPERATOR).public


def test_bootstrap_needs_an_output(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bootstrap.main([])
    assert "--out" in capsys.readouterr().err


def legacy_files() -> tuple[dict[str, str], Key]:
    """A bootstrap Secret as made before signing keys: operator.nk, no signing.nk,
    an operator JWT without ``signing_keys``."""
    boot = bootstrap.create()
    assert boot.root is not None
    files = boot.files()
    files.pop("signing.nk")
    files["operator.nk"] = boot.root.seed + "\n"
    op = jwt.decode(boot.operator_jwt)
    claims = dict(op.claims)
    claims["nats"] = {k: v for k, v in op.nats.items() if k != "signing_keys"}
    files["operator.jwt"] = jwt.encode(claims, boot.root) + "\n"
    return files, boot.root


def test_a_legacy_bootstrap_still_signs_with_its_root() -> None:
    files, root = legacy_files()
    boot = bootstrap.Bootstrap.from_files(files)
    assert boot.legacy
    assert boot.signing_key == root
    # Written back unchanged in shape: the operator keeps working after an upgrade.
    assert set(boot.files()) == set(files)


def test_rotation_trusts_only_the_new_key() -> None:
    boot = bootstrap.create()
    assert boot.root is not None
    rotated = bootstrap.rotate_signing_key(bootstrap.Bootstrap.from_files(boot.files()), boot.root)
    op = jwt.decode(rotated.operator_jwt)
    assert op.issuer == op.subject == boot.root.public
    assert op.nats["signing_keys"] == [rotated.signing_key.public]
    assert rotated.signing_key != boot.signing_key
    assert rotated.system_account == boot.system_account
    assert f"operator: {rotated.operator_jwt}" in rotated.auth_conf()


def test_rotation_refuses_a_wrong_root() -> None:
    boot = bootstrap.create()
    with pytest.raises(bootstrap.BootstrapError, match="wrong --root"):
        bootstrap.rotate_signing_key(boot, Key.create(Role.OPERATOR))


def test_a_signing_key_the_operator_jwt_does_not_list_is_refused() -> None:
    files = bootstrap.create().files()
    files["signing.nk"] = Key.create(Role.OPERATOR).seed
    with pytest.raises(bootstrap.BootstrapError, match=r"not in operator\.jwt"):
        bootstrap.Bootstrap.from_files(files)


def test_missing_files_are_named() -> None:
    files = bootstrap.create().files()
    files.pop("signing.nk")
    files.pop("sys.creds")
    with pytest.raises(bootstrap.BootstrapError, match=r"signing.nk \(or operator.nk\), sys.creds"):
        bootstrap.Bootstrap.from_files(files)


def test_rotate_cli_in_a_directory_migrates_a_legacy_bootstrap(tmp_path: Path) -> None:
    files, root = legacy_files()
    out = tmp_path / "boot"
    out.mkdir()
    for name, body in files.items():
        (out / name).write_text(body)
    moved = tmp_path / "offline.nk"
    rotate = ["bootstrap", "rotate-signing-key", "--out", str(out)]
    with pytest.raises(SystemExit):
        cli_main(rotate)  # the root has to go somewhere
    assert cli_main([*rotate, "--root-out", str(moved)]) == 0
    assert not (out / "operator.nk").exists()
    assert Key.from_seed(moved.read_text()) == root
    boot = bootstrap.Bootstrap.load(out)
    assert not boot.legacy
    assert boot.root is None
    # A second rotation needs the root file.
    with pytest.raises(SystemExit):
        cli_main(rotate)
    assert cli_main([*rotate, "--root", str(moved)]) == 0
    again = bootstrap.Bootstrap.load(out)
    assert again.signing_key != boot.signing_key
    assert jwt.decode(again.operator_jwt).nats["signing_keys"] == [again.signing_key.public]
