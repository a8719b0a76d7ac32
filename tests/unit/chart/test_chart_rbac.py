"""The operator's RBAC in both install modes, and where the NATS root key goes.

Cluster-wide (default): one ClusterRole with only the verbs the operator calls.
Namespaced (operator.watchNamespaces): Roles in the listed namespaces, a
ClusterRole with nothing namespaced in it, kopf peering per namespace. Both:
Secrets in the release namespace are read by name only, never the root Secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from .rbac import NAMESPACED_CLUSTER_ROLE, OPERATOR_RULES, grants
from .render import FULLNAME, NAMESPACE, env, operator_container, render, render_notes

pytestmark = pytest.mark.unit

NAMESPACED = {"operator": {"watchNamespaces": ["shop", "web"]}}


def roles_in(namespace: str, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for r in render(values).all("Role") if r["metadata"]["namespace"] == namespace]


def test_namespaced_cluster_role_grants_nothing_namespaced() -> None:
    cluster_role = render(NAMESPACED).get("ClusterRole", f"{FULLNAME}-operator")
    assert grants(cluster_role) == NAMESPACED_CLUSTER_ROLE
    assert not any(r.get("resourceNames") for r in cluster_role["rules"])


@pytest.mark.parametrize("namespace", ["shop", "web"])
def test_namespaced_mode_has_a_role_per_listed_namespace(namespace: str) -> None:
    manifest = render(NAMESPACED)
    (role,) = [
        r
        for r in roles_in(namespace, NAMESPACED)
        if r["metadata"]["name"] == f"{FULLNAME}-operator"
    ]
    assert grants(role) == {
        **OPERATOR_RULES,
        ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
    }
    (binding,) = [b for b in manifest.all("RoleBinding") if b["metadata"]["namespace"] == namespace]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]
    peering = [p for p in manifest.all("KopfPeering") if p["metadata"]["namespace"] == namespace]
    assert [p["metadata"]["name"] for p in peering] == ["natsmesh"]


def test_namespaced_mode_touches_no_other_namespace() -> None:
    manifest = render(NAMESPACED)
    namespaces = {
        d["metadata"]["namespace"]
        for d in manifest.docs
        if d["kind"] in {"Role", "RoleBinding", "KopfPeering"}
    }
    assert namespaces == {"shop", "web", NAMESPACE}
    assert not manifest.has("ClusterKopfPeering")
    assert env(operator_container(manifest))["NATSMESH_WATCH_NAMESPACES"] == "shop,web"


def test_cluster_wide_mode_has_no_namespace_list() -> None:
    manifest = render()
    assert "NATSMESH_WATCH_NAMESPACES" not in env(operator_container(manifest))
    assert not manifest.has("KopfPeering")
    assert manifest.get("ClusterKopfPeering")["metadata"]["name"] == "natsmesh"


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_release_namespace_secrets_by_name_only(values: dict[str, Any]) -> None:
    role = render(values).get("Role", f"{FULLNAME}-operator-release")
    named, create = role["rules"]
    assert named == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": [f"{FULLNAME}-nats-bootstrap", "natsmesh-keys"],
        "verbs": ["get", "patch"],
    }
    assert create == {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}
    # The one Secret the operator must never read is not named anywhere.
    assert f"{FULLNAME}-nats-bootstrap-root" not in repr(role)


def test_namespaced_mode_in_the_release_namespace_keeps_both_roles() -> None:
    values = {"operator": {"watchNamespaces": [NAMESPACE, "shop"]}}
    names = sorted(r["metadata"]["name"] for r in roles_in(NAMESPACE, values))
    assert names == [
        f"{FULLNAME}-bootstrap",
        f"{FULLNAME}-operator",
        f"{FULLNAME}-operator-release",
    ]


def test_watch_namespaces_must_be_names() -> None:
    from .render import render_error

    assert "watchNamespaces" in render_error({"operator": {"watchNamespaces": ["shop-*"]}})
    assert "watchNamespaces" in render_error({"operator": {"watchNamespaces": ["a", "a"]}})


def test_bootstrap_hook_writes_the_root_elsewhere() -> None:
    job = render().get("Job", f"{FULLNAME}-bootstrap")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--secret") + 1] == f"{FULLNAME}-nats-bootstrap"
    assert args[args.index("--root-secret") + 1] == f"{FULLNAME}-nats-bootstrap-root"
    custom = render({"bootstrap": {"rootSecret": "offline-me"}}).get("Job", f"{FULLNAME}-bootstrap")
    custom_args = custom["spec"]["template"]["spec"]["containers"][0]["args"]
    assert custom_args[custom_args.index("--root-secret") + 1] == "offline-me"
    # Nothing in the release mounts it.
    for _, pod in render().pod_specs():
        for volume in pod.get("volumes", []):
            assert (volume.get("secret") or {}).get(
                "secretName"
            ) != f"{FULLNAME}-nats-bootstrap-root"


def test_notes_tell_the_admin_to_move_the_root_offline() -> None:
    notes = render_notes()
    assert f"Secret {NAMESPACE}/{FULLNAME}-nats-bootstrap-root" in notes
    assert f"delete secret {FULLNAME}-nats-bootstrap-root" in notes
    assert "rotate-signing-key" in notes
    assert "Namespaced install" not in notes
    assert "manages only shop, web" in render_notes(NAMESPACED)
