"""Restricted pods everywhere, no seeds on the NATS pods, RBAC without wildcards."""

from __future__ import annotations

from typing import Any

import pytest

from .rbac import CLUSTER_WIDE_ONLY, OPERATOR_RULES, grants
from .render import FULLNAME, Manifest, render
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

SETS = pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))


def _containers(manifest: Manifest) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(owner, pod spec, container) for every container of every workload."""
    out = []
    for owner, spec in manifest.pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            out.append((f"{owner['kind']}/{owner['metadata']['name']}", spec, container))
    return out


@SETS
def test_every_container_is_restricted(values: dict[str, Any]) -> None:
    containers = _containers(render(values))
    assert containers
    for where, pod, container in containers:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, where
        assert sc["runAsUser"] != 0, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"], where
        assert "add" not in sc["capabilities"], where
        assert sc.get("privileged", False) is False, where
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert not pod.get("hostNetwork"), where
        assert not pod.get("hostPID"), where
        assert container.get("resources", {}).get("requests"), where


def test_operator_and_bootstrap_run_as_65532() -> None:
    for where, pod, container in _containers(render()):
        if container["name"] in {"operator", "bootstrap"}:
            assert container["securityContext"]["runAsUser"] == 65532, where
            assert pod["securityContext"]["runAsUser"] == 65532, where


def test_writable_paths_are_volumes() -> None:
    """With a read-only root fs, /tmp and the NATS data and pid dirs are mounts."""
    manifest = render()
    for where, _, container in _containers(manifest):
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        if container["name"] in {"operator", "bootstrap"}:
            assert "/tmp" in mounts, where
        if container["name"] == "nats":
            assert {"/data", "/var/run/nats"} <= mounts, where


@pytest.mark.parametrize(
    "values", [{}, VALUE_SETS["nats-single"], VALUE_SETS["nats-no-persistence"]]
)
def test_nats_never_mounts_the_seeds(values: dict[str, Any]) -> None:
    sts = render(values).get("StatefulSet")
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    bootstrap = next(v for v in volumes if v["name"] == "bootstrap")["secret"]
    assert bootstrap["secretName"] == f"{FULLNAME}-nats-bootstrap"
    assert {i["key"] for i in bootstrap["items"]} == {"resolver.conf", "operator.jwt"}
    text = repr(sts)
    for secret_key in ("operator.seed", "sys.creds", ".nk", "seed"):
        assert secret_key not in text
    assert sts["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def _rules(manifest: Manifest) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", rule)
        for d in manifest.docs
        if d["kind"] in {"ClusterRole", "Role"}
        for rule in d["rules"]
    ]


@SETS
def test_rbac_has_no_wildcards(values: dict[str, Any]) -> None:
    rules = _rules(render(values))
    assert rules
    for where, rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), f"{where}: {field} {rule}"
            assert not any("*" in item for item in rule.get(field, [])), where
        assert "nonResourceURLs" not in rule, where
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), where


def test_operator_cluster_role_is_the_contract() -> None:
    """Cluster-wide mode: only what the operator calls (docs/security.md)."""
    found = grants(render().get("ClusterRole", f"{FULLNAME}-operator"))
    assert found == {**OPERATOR_RULES, **CLUSTER_WIDE_ONLY}
    # Never a cluster-wide get on Secrets, nor update/watch/get anywhere it is unused.
    assert "get" not in found[("", "secrets")]


def test_operator_is_bound_to_its_service_account() -> None:
    manifest = render()
    binding = manifest.get("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == f"{FULLNAME}-operator"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": "mesh"}
    ]
    pod = manifest.get("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == FULLNAME
    assert sorted(r["metadata"]["name"] for r in manifest.all("Role")) == [
        f"{FULLNAME}-bootstrap",
        f"{FULLNAME}-operator-release",
    ]


def test_bootstrap_role_reads_only_its_secret() -> None:
    role = render().get("Role", f"{FULLNAME}-bootstrap")
    get_rule, create_rule = role["rules"]
    assert get_rule == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": [f"{FULLNAME}-nats-bootstrap"],
        "verbs": ["get"],
    }
    # resourceNames cannot restrict create: the hook role lives only for the Job.
    assert create_rule == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
    assert "hook-succeeded" in role["metadata"]["annotations"]["helm.sh/hook-delete-policy"]
