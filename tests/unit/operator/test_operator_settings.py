"""Operator settings come from NATSMESH_* variables, with safe defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from natsmesh_operator.settings import OperatorSettings


def test_defaults_are_cluster_wide_with_peering() -> None:
    s = OperatorSettings.from_env({})
    assert s.peering == "natsmesh"
    assert s.watch_namespaces == ()
    assert s.watches("anything")
    assert s.webhook.failure_policy == "Fail"
    assert s.injection.nats_url == s.nats.url
    assert s.nats.replicas == 1  # a single server unless told (the chart tells)
    # A kubelet may take a minute to rewrite a mounted Secret.
    assert s.creds.revocation_grace_seconds == 90.0


def test_environment_overrides() -> None:
    s = OperatorSettings.from_env(
        {
            "NATSMESH_PEERING": "standalone",
            "NATSMESH_WATCH_NAMESPACES": "shop-*, team-a",
            "NATSMESH_NATS_URL": "nats://nats:4222",
            "NATSMESH_NATS_REPLICAS": "3",
            "NATSMESH_SIDECAR_NATS_URL": "nats://nats.mesh.svc:4222",
            "NATSMESH_WEBHOOK_CERT_DIR": "/tls",
            "NATSMESH_DRIFT_INTERVAL": "5",
            "NATSMESH_SIDECAR_READY_PERIOD_SECONDS": "0.5",
            "NATSMESH_SIDECAR_READY_FAILURE_THRESHOLD": "4",
            "NATSMESH_CREDS_REVOCATION_GRACE_SECONDS": "7.5",
        }
    )
    assert s.peering is None
    assert s.watches("shop-1")
    assert s.watches("team-a")
    assert not s.watches("team-b")
    assert not s.watches("kube-system")
    assert s.nats.url == "nats://nats:4222"
    assert s.nats.replicas == 3
    assert s.injection.nats_url == "nats://nats.mesh.svc:4222"
    assert s.webhook.cert_dir == Path("/tls")
    assert s.reconcile.drift_interval == 5.0
    assert s.injection.ready_period_seconds == 0.5
    assert s.injection.ready_failure_threshold == 4
    assert s.creds.revocation_grace_seconds == 7.5
    at_once = OperatorSettings.from_env({"NATSMESH_CREDS_REVOCATION_GRACE_SECONDS": "-3"})
    assert at_once.creds.revocation_grace_seconds == 0.0


def test_replicas_get_distinct_peering_priorities() -> None:
    """kopf pauses every replica when two share the top priority: each draws its own."""
    drawn = {OperatorSettings.from_env({}).peering_priority for _ in range(50)}
    assert len(drawn) == 50
    assert all(p > 0 for p in drawn)
    assert OperatorSettings.from_env({"NATSMESH_PEERING_PRIORITY": "7"}).peering_priority == 7


def test_app_network_policy_is_on_unless_switched_off() -> None:
    # On by default and for anything but "false": a typo must not open app ports.
    assert OperatorSettings.from_env({}).network.app_policy
    for value in ("true", "True", "yes", ""):
        env = {"NATSMESH_APP_NETWORK_POLICY": value}
        assert OperatorSettings.from_env(env).network.app_policy, value
    for value in ("false", "False", " false "):
        env = {"NATSMESH_APP_NETWORK_POLICY": value}
        assert not OperatorSettings.from_env(env).network.app_policy, value


def test_exact_namespaces_are_listed_one_by_one() -> None:
    # A namespaced install's RBAC allows listing only in the named namespaces.
    exact = OperatorSettings.from_env({"NATSMESH_WATCH_NAMESPACES": "shop, web"}).watched
    assert exact.exact == ("shop", "web")
    assert exact("shop")
    assert not exact("kube-system")
    for globs in ("shop-*", "shop,team-?", "ns[12]"):
        watched = OperatorSettings.from_env({"NATSMESH_WATCH_NAMESPACES": globs}).watched
        assert watched.exact is None, globs
    assert OperatorSettings.from_env({}).watched.exact is None


@pytest.mark.parametrize("endpoint", ["http://:4318", "http://jaeger:99999", "http://jaeger:x"])
def test_an_otlp_endpoint_the_sidecars_would_refuse_stops_the_operator(endpoint: str) -> None:
    # The chart's pattern admits these; injected, every new meshed pod's
    # sidecar would exit 2 at start. Refused once, where it is set.
    with pytest.raises(ValueError, match="NATSMESH_SIDECAR_OTLP_ENDPOINT"):
        OperatorSettings.from_env({"NATSMESH_SIDECAR_OTLP_ENDPOINT": endpoint})
    ok = OperatorSettings.from_env({"NATSMESH_SIDECAR_OTLP_ENDPOINT": " http://jaeger:4318 "})
    assert ok.injection.otlp_endpoint == "http://jaeger:4318"
