"""What the operator's RBAC must grant: one table for both install modes."""

from __future__ import annotations

from typing import Any

READ = {"get", "list", "watch"}

#: In every namespace the operator manages: the ClusterRole in cluster-wide
#: mode, a Role per listed namespace in namespaced mode.
OPERATOR_RULES: dict[tuple[str, str], set[str]] = {
    ("natsmesh.io", "natsservices"): READ | {"patch"},
    ("natsmesh.io", "natsroutes"): READ | {"patch"},
    ("natsmesh.io", "natsservices/status"): {"get", "patch"},
    ("natsmesh.io", "natsroutes/status"): {"get", "patch"},
    ("natsmesh.io", "natsservices/finalizers"): {"update"},
    ("natsmesh.io", "natsroutes/finalizers"): {"update"},
    ("", "secrets"): {"list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create"},
    ("networking.k8s.io", "networkpolicies"): {"list", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("apps", "deployments"): {"list", "patch"},
    ("apps", "statefulsets"): {"list", "patch"},
}

#: Cluster-scoped, cluster-wide mode only besides OPERATOR_RULES.
CLUSTER_WIDE_ONLY: dict[tuple[str, str], set[str]] = {
    ("kopf.dev", "clusterkopfpeerings"): READ | {"patch"},
    ("", "namespaces"): {"get"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): set(READ),
}

#: The whole ClusterRole of a namespaced install: nothing namespaced.
NAMESPACED_CLUSTER_ROLE: dict[tuple[str, str], set[str]] = {
    ("", "namespaces"): set(READ),
    ("apiextensions.k8s.io", "customresourcedefinitions"): set(READ),
}


def grants(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of a Role or ClusterRole (names ignored)."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out
