"""NetworkPolicies for the chart's own pods, the operator's per-service toggle, and monitoring."""

from __future__ import annotations

from typing import Any

import pytest

from .render import (
    FULLNAME,
    Manifest,
    env,
    operator_container,
    render,
    render_error,
    render_notes,
)
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

SETS = pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))

NATS = f"{FULLNAME}-nats"
OPERATOR = f"{FULLNAME}-operator"
INSTANCE = {"app.kubernetes.io/name": "natsmesh", "app.kubernetes.io/instance": "nm"}
NATS_PODS = {"podSelector": {"matchLabels": {**INSTANCE, "app.kubernetes.io/component": "nats"}}}
OPERATOR_PODS = {
    "podSelector": {"matchLabels": {**INSTANCE, "app.kubernetes.io/component": "operator"}}
}
MESHED = {"namespaceSelector": {"matchLabels": {"natsmesh.io/inject": "enabled"}}}
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def _rules(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Ingress rules by their (single) port name."""
    rules = {}
    for rule in policy["spec"]["ingress"]:
        (port,) = rule["ports"]
        assert port["protocol"] == "TCP"
        rules[port["port"]] = rule
    return rules


def test_defaults_ship_two_ingress_policies() -> None:
    manifest = render()
    policies = {p["metadata"]["name"]: p for p in manifest.all("NetworkPolicy")}
    assert set(policies) == {NATS, OPERATOR}
    for policy in policies.values():
        # Ingress only: the operator's egress to the API server has no portable address.
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_nats_policy() -> None:
    policy = render().get("NetworkPolicy", NATS)
    assert policy["spec"]["podSelector"] == {"matchLabels": NATS_PODS["podSelector"]["matchLabels"]}
    rules = _rules(policy)
    # Monitoring is on the loopback by default: no rule for it at all.
    assert set(rules) == {"client", "cluster"}
    assert rules["client"]["from"] == [MESHED, OPERATOR_PODS]
    assert rules["cluster"]["from"] == [NATS_PODS]


def test_nats_policy_single_server_has_no_route_rule() -> None:
    assert set(_rules(render(VALUE_SETS["nats-single"]).get("NetworkPolicy", NATS))) == {"client"}


def test_operator_policy() -> None:
    rules = _rules(render().get("NetworkPolicy", OPERATOR))
    assert set(rules) == {"webhook", "metrics"}
    # The API server is not a pod: without webhookFrom, any source (documented trade-off).
    assert "from" not in rules["webhook"]
    assert rules["metrics"]["from"] == [PROMETHEUS]


def test_restricting_values() -> None:
    manifest = render(VALUE_SETS["network-policy-restricted"])
    nats = _rules(manifest.get("NetworkPolicy", NATS))
    assert nats["client"]["from"] == [
        MESHED,
        OPERATOR_PODS,
        {"namespaceSelector": {"matchLabels": {"admin": "yes"}}},
    ]
    operator = _rules(manifest.get("NetworkPolicy", OPERATOR))
    assert operator["webhook"]["from"] == [{"ipBlock": {"cidr": "172.18.0.0/16"}}]
    assert operator["metrics"]["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"team": "observability"}},
            "podSelector": {"matchLabels": {"app": "prom"}},
        },
        {"podSelector": {"matchLabels": {"app": "scraper"}}},
    ]


def test_a_prometheus_value_replaces_the_default_peer() -> None:
    """A list, not a map: helm would merge a user's selector into the default one
    (both labels required, matching neither Prometheus)."""
    mine = {"podSelector": {"matchLabels": {"app": "prom"}}}
    rules = _rules(
        render({"networkPolicy": {"prometheusFrom": [mine]}}).get("NetworkPolicy", OPERATOR)
    )
    assert rules["metrics"]["from"] == [mine]


def test_without_any_scraper_the_metrics_port_has_no_rule() -> None:
    """No peers: no rule (an empty ``from`` would admit everyone)."""
    rules = _rules(render({"networkPolicy": {"prometheusFrom": []}}).get("NetworkPolicy", OPERATOR))
    assert set(rules) == {"webhook"}


def test_exposed_monitoring_only_for_the_operator_and_prometheus() -> None:
    manifest = render(VALUE_SETS["nats-monitoring-exposed"])
    rules = _rules(manifest.get("NetworkPolicy", NATS))
    assert rules["monitor"]["from"] == [OPERATOR_PODS, PROMETHEUS]
    extra = {"podSelector": {"matchLabels": {"app": "nats-exporter"}}}
    with_extra = render(
        {
            "nats": {"monitoring": {"expose": True}},
            "networkPolicy": {"nats": {"monitoringFrom": [extra]}},
        }
    )
    assert _rules(with_extra.get("NetworkPolicy", NATS))["monitor"]["from"][-1] == extra


def test_exposed_monitoring_listens_on_the_pod_address() -> None:
    manifest = render(VALUE_SETS["nats-monitoring-exposed"])
    conf = manifest.get("ConfigMap", f"{NATS}-config")["data"]["nats.conf"]
    assert "http: 0.0.0.0:8222" in conf
    assert "127.0.0.1:8222" not in conf
    (container,) = manifest.get("StatefulSet", NATS)["spec"]["template"]["spec"]["containers"]
    assert {"name": "monitor", "containerPort": 8222} in container["ports"]
    for service in (NATS, f"{NATS}-headless"):
        ports = manifest.get("Service", service)["spec"]["ports"]
        assert {"name": "monitor", "port": 8222, "targetPort": "monitor"} in ports
    # The probes stay on the loopback either way (one code path).
    assert container["readinessProbe"]["exec"]["command"][0] == "sh"


def test_network_policy_off() -> None:
    manifest = render(VALUE_SETS["network-policy-off"])
    assert not manifest.has("NetworkPolicy")
    assert env(operator_container(manifest))["NATSMESH_APP_NETWORK_POLICY"] == "false"


@pytest.mark.parametrize("which", ["nats", "operator"])
def test_each_policy_has_its_own_toggle(which: str) -> None:
    manifest = render({"networkPolicy": {which: {"enabled": False}}})
    names = {p["metadata"]["name"] for p in manifest.all("NetworkPolicy")}
    assert names == ({NATS, OPERATOR} - {NATS if which == "nats" else OPERATOR})


def test_no_nats_policy_with_external_nats() -> None:
    names = {
        p["metadata"]["name"] for p in render(VALUE_SETS["nats-external"]).all("NetworkPolicy")
    }
    assert names == {OPERATOR}


@pytest.mark.parametrize(("value", "expected"), [(True, "true"), (False, "false")])
def test_mesh_network_policy_reaches_the_operator(value: bool, expected: str) -> None:
    container = operator_container(render({"mesh": {"networkPolicy": value}}))
    assert env(container)["NATSMESH_APP_NETWORK_POLICY"] == expected


@pytest.mark.parametrize("value", [True, False])
def test_operator_may_manage_app_network_policies(value: bool) -> None:
    # Also when off: switching it off must let the operator delete the ones
    # it made while it was on.
    role = render({"mesh": {"networkPolicy": value}}).get("ClusterRole", OPERATOR)
    verbs = {
        verb
        for rule in role["rules"]
        if "networking.k8s.io" in rule["apiGroups"] and "networkpolicies" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert verbs == {"list", "create", "patch", "delete"}


def _container_ports(manifest: Manifest, kind: str, name: str) -> set[str]:
    pod = manifest.get(kind, name)["spec"]["template"]["spec"]
    return {p["name"] for c in pod["containers"] for p in c.get("ports", [])}


@SETS
def test_every_policy_port_is_a_named_port_of_its_pods(values: dict[str, Any]) -> None:
    """A port name no container declares matches nothing, silently closing (or
    failing to open) that port: the names must follow the pod specs."""
    manifest = render(values)
    pods = {NATS: ("StatefulSet", NATS), OPERATOR: ("Deployment", OPERATOR)}
    for policy in manifest.all("NetworkPolicy"):
        kind, name = pods[policy["metadata"]["name"]]
        declared = _container_ports(manifest, kind, name)
        for rule in policy["spec"]["ingress"]:
            for port in rule["ports"]:
                assert port["port"] in declared, (policy["metadata"]["name"], port)


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"networkPolicy": {"enable": True}}, ["/networkPolicy", "'enable'"]),
        ({"networkPolicy": {"nats": {"clientfrom": []}}}, ["/networkPolicy/nats", "'clientfrom'"]),
        ({"networkPolicy": {"prometheus": {}}}, ["/networkPolicy", "'prometheus'"]),
        ({"mesh": {"networkPolicies": True}}, ["/mesh", "'networkPolicies'"]),
        ({"nats": {"monitoring": {"exposed": True}}}, ["/nats/monitoring", "'exposed'"]),
        ({"nats": {"cluster": {"tls": {"enable": True}}}}, ["/nats/cluster/tls", "'enable'"]),
    ],
)
def test_unknown_keys_are_refused(values: dict[str, Any], names: list[str]) -> None:
    message = render_error(values)
    for name in names:
        assert name in message, message


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
        ({"mesh": {"networkPolicy": "true"}}, "/mesh/networkPolicy"),
        ({"networkPolicy": {"operator": {"webhookFrom": {"ipBlock": {}}}}}, "webhookFrom"),
        ({"networkPolicy": {"nats": {"clientFrom": ["ns"]}}}, "clientFrom"),
        ({"nats": {"monitoring": {"expose": 1}}}, "/nats/monitoring/expose"),
    ],
)
def test_wrong_types_are_refused(values: dict[str, Any], path: str) -> None:
    assert path in render_error(values)


def test_notes_say_what_the_policies_leave_open() -> None:
    notes = render_notes()
    assert "networkPolicy.operator.webhookFrom" in notes
    assert "loopback only" in notes
    assert f"{NATS}-routes" in notes
    restricted = render_notes(VALUE_SETS["network-policy-restricted"])
    assert "webhookFrom" not in restricted
    assert "NetworkPolicies" not in render_notes(VALUE_SETS["network-policy-off"])
