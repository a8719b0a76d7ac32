"""The injected sidecar waits for what the app's own readinessProbe checks."""

from __future__ import annotations

from typing import Any

import pytest

from natsmesh_operator.api import NatsService
from natsmesh_operator.webhook import inject
from natsmesh_operator.webhook.admission import target_of
from natsmesh_operator.webhook.inject import InjectionSettings, Target
from natsmesh_operator.webhook.server import WebhookServer
from natsmesh_sidecar.wire import Settings

TARGET = Target("orders", "shop", "v1", 8080, "natsmesh-orders-creds")


def pod(*containers: dict[str, Any], **annotations: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app": "orders"}, "annotations": annotations},
        "spec": {"containers": list(containers)},
    }


def app(probe: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "app",
        "image": "a:1",
        "ports": [
            {"name": "http", "containerPort": 8080},
            {"name": "admin", "containerPort": 9090},
        ],
        **extra,
    }
    if probe is not None:
        c["readinessProbe"] = probe
    return c


def sidecar_env(p: dict[str, Any], chart: InjectionSettings | None = None) -> dict[str, str]:
    sidecar = inject.injection(p, TARGET, chart or InjectionSettings())["spec"]["initContainers"][0]
    return {e["name"]: e["value"] for e in sidecar["env"]}


def settings_of(env: dict[str, str]) -> Settings:
    """What the sidecar makes of the injected env (it refuses bad values)."""
    return Settings.from_env(env)


def test_http_probe_becomes_the_same_get_with_its_port_timeout_and_threshold() -> None:
    probe = {
        "httpGet": {"path": "/ready?deep=1", "port": "admin"},
        "timeoutSeconds": 2,
        "failureThreshold": 4,
        "periodSeconds": 10,
    }
    s = settings_of(sidecar_env(pod(app(probe))))
    assert s.ready_check == "/ready?deep=1"
    assert s.ready_port == 9090
    assert s.ready_timeout_seconds == 2
    assert s.ready_failure_threshold == 4
    # Not the probe's period: the sidecar checks faster than a kubelet.
    assert s.ready_period_seconds == 1.0


def test_probe_on_the_app_port_needs_no_port_and_tcp_probe_is_tcp() -> None:
    env = sidecar_env(pod(app({"httpGet": {"path": "/healthz", "port": 8080}})))
    assert env["NATSMESH_READY_CHECK"] == "/healthz"
    assert "NATSMESH_READY_PORT" not in env
    env = sidecar_env(pod(app({"tcpSocket": {"port": "http"}})))
    assert env["NATSMESH_READY_CHECK"] == "tcp"
    assert "NATSMESH_READY_PORT" not in env


@pytest.mark.parametrize(
    "probe",
    [
        None,
        {"exec": {"command": ["cat", "/tmp/ready"]}},
        {"grpc": {"port": 8080}},
        {"httpGet": {"path": "/healthz", "port": "no-such-port"}},
        {"httpGet": {"path": "/with space", "port": 8080}},
    ],
    ids=["none", "exec", "grpc", "unknown-named-port", "bad-path"],
)
def test_what_the_sidecar_cannot_repeat_leaves_its_tcp_default(
    probe: dict[str, Any] | None,
) -> None:
    env = sidecar_env(pod(app(probe)))
    assert "NATSMESH_READY_CHECK" not in env
    assert "NATSMESH_READY_PORT" not in env
    s = settings_of(env)
    assert (s.ready_check, s.ready_port) == ("tcp", 0)


def test_https_probe_is_a_tcp_connect_to_its_port() -> None:
    env = sidecar_env(pod(app({"httpGet": {"path": "/h", "port": 9090, "scheme": "HTTPS"}})))
    assert env["NATSMESH_READY_CHECK"] == "tcp"
    assert env["NATSMESH_READY_PORT"] == "9090"


def test_the_probe_of_the_container_serving_the_app_port_is_used() -> None:
    other = {"name": "log", "image": "l:1", "readinessProbe": {"tcpSocket": {"port": 5000}}}
    serving = app({"httpGet": {"path": "/ready", "port": 8080}})
    assert sidecar_env(pod(other, serving))["NATSMESH_READY_CHECK"] == "/ready"


def test_annotation_overrides_and_a_bad_one_is_refused_with_the_reason() -> None:
    p = pod(app({"httpGet": {"path": "/ready", "port": 8080}}))
    p["metadata"]["annotations"][inject.ANNOTATION_READY_CHECK] = "none"
    assert sidecar_env(p)["NATSMESH_READY_CHECK"] == "none"
    p["metadata"]["annotations"][inject.ANNOTATION_READY_CHECK] = "exec:/bin/true"
    with pytest.raises(inject.InvalidInjection, match=r"natsmesh.io/ready-check.*tcp, none"):
        sidecar_env(p)


def test_chart_wide_period_and_threshold_reach_the_sidecar_and_the_probe_wins() -> None:
    chart = InjectionSettings(ready_period_seconds=0.5, ready_failure_threshold=5)
    p = pod(app({"httpGet": {"path": "/ready", "port": 8080}}))
    s = settings_of(sidecar_env(p, chart))
    assert (s.ready_period_seconds, s.ready_failure_threshold) == (0.5, 5)
    p = pod(app({"httpGet": {"path": "/ready", "port": 8080}, "failureThreshold": 2}))
    s = settings_of(sidecar_env(p, chart))
    assert (s.ready_period_seconds, s.ready_failure_threshold) == (0.5, 2)


async def test_the_webhook_refuses_a_pod_with_a_bad_check_and_says_why() -> None:
    orders = NatsService.from_body(
        {
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "orders"}}, "port": 8080},
        }
    )

    async def services_of(_: str) -> list[NatsService]:
        return [orders]

    server = WebhookServer(
        services_of=services_of,
        injection=InjectionSettings(),
        operator_namespace="natsmesh-system",
        cert=None,
        addr="127.0.0.1",
        port=0,
    )
    review = {"uid": "u1", "namespace": "shop", "operation": "CREATE"}
    check = inject.ANNOTATION_READY_CHECK
    good = await server.inject({**review, "object": pod(app(), **{check: "/h"})})
    assert good["response"]["allowed"] is True
    assert "patch" in good["response"]
    bad = await server.inject({**review, "object": pod(app(), **{check: "h"})})
    assert bad["response"]["allowed"] is False
    assert check in bad["response"]["status"]["message"]


def test_a_pure_client_is_not_gated_on_its_app() -> None:
    """A NatsService that admits no caller and subscribes to nothing receives
    no mesh traffic: its sidecar joins at once (the app may listen on no port),
    unless the pod's annotation says otherwise."""
    client = Target("loadgen", "shop", "v1", 8080, "natsmesh-loadgen-creds", receives=False)
    probe = {"httpGet": {"path": "/ready", "port": 8080}}
    assert inject.readiness_env(pod(app(probe)), 8080, receives=False) == {
        "NATSMESH_READY_CHECK": "none"
    }
    assert inject.readiness_env(pod(app(probe), **{"natsmesh.io/ready-check": "/up"}), 8080,
                                receives=False) == {"NATSMESH_READY_CHECK": "/up"}  # fmt: skip
    # Whatever receives traffic keeps the app's own check.
    assert inject.readiness_env(pod(app(probe)), 8080)["NATSMESH_READY_CHECK"] == "/ready"
    assert client.receives is False
    assert TARGET.receives is True


@pytest.mark.parametrize(
    ("spec", "receives"),
    [
        ({}, True),  # allowSameNamespace defaults to true
        ({"allowSameNamespace": False}, False),
        ({"allowSameNamespace": False, "allowedCallers": [{"name": "gateway"}]}, True),
        (
            {
                "allowSameNamespace": False,
                "events": {"subscriptions": [{"service": "orders", "topic": "t", "path": "/e"}]},
            },
            True,
        ),
    ],
)
def test_what_receives_mesh_traffic(spec: dict[str, Any], receives: bool) -> None:
    body = {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsService",
        "metadata": {"name": "loadgen", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "loadgen"}}, "port": 8080, **spec},
    }
    assert target_of(NatsService.model_validate(body)).receives is receives
