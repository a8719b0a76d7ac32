"""``tracing.*`` values: the operator gets them, injects them into sidecars,
and the sidecar accepts what was injected; off by default, bad URLs refused."""

from __future__ import annotations

import pytest

from natsmesh_operator.settings import OperatorSettings
from natsmesh_operator.webhook import inject
from natsmesh_operator.webhook.inject import InjectionSettings, Target
from natsmesh_sidecar.wire import Settings

from .render import env, operator_container, render, render_error

pytestmark = pytest.mark.unit

ENDPOINT = "http://jaeger-collector.tracing:4318"
TARGET = Target("orders", "shop", "v1", 8080, "natsmesh-orders-creds")


def sidecar_env(injection: InjectionSettings) -> dict[str, str]:
    pod = {"metadata": {}, "spec": {"containers": [{"name": "app", "image": "a:1"}]}}
    patch = inject.injection(pod, TARGET, injection)
    return {e["name"]: e["value"] for e in patch["spec"]["initContainers"][0]["env"]}


def test_tracing_is_off_by_default_all_the_way_to_the_sidecar() -> None:
    values = env(operator_container(render()))
    assert not any("OTLP" in k or "TRACE" in k for k in values)
    injection = OperatorSettings.from_env(values).injection
    assert injection.otlp_endpoint == ""
    injected = sidecar_env(injection)
    assert not any("OTLP" in k or "TRACE" in k for k in injected)
    assert Settings.from_env(injected).otlp_endpoint is None


def test_the_endpoint_and_ratio_flow_from_values_to_the_sidecar() -> None:
    values = env(
        operator_container(render({"tracing": {"otlpEndpoint": ENDPOINT, "sampleRatio": 0.25}}))
    )
    assert values["NATSMESH_SIDECAR_OTLP_ENDPOINT"] == ENDPOINT
    assert values["NATSMESH_SIDECAR_TRACE_SAMPLE_RATIO"] == "0.25"
    injection = OperatorSettings.from_env(values).injection
    injected = sidecar_env(injection)
    assert injected["NATSMESH_OTLP_ENDPOINT"] == ENDPOINT
    sidecar = Settings.from_env(injected)
    assert (sidecar.otlp_endpoint, sidecar.trace_sample_ratio) == (ENDPOINT, 0.25)


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"tracing": {"otlpEndpoint": "jaeger:4318"}}, "/tracing/otlpEndpoint"),
        ({"tracing": {"otlpEndpoint": "http://u:p@jaeger:4318"}}, "/tracing/otlpEndpoint"),
        ({"tracing": {"otlpEndpoint": "http://jaeger:4318/?token=x"}}, "/tracing/otlpEndpoint"),
        ({"tracing": {"sampleRatio": 1.5}}, "/tracing/sampleRatio"),
        ({"tracing": {"endpoint": ENDPOINT}}, "'endpoint'"),
    ],
    ids=["no-scheme", "credentials", "query", "ratio", "typo"],
)
def test_bad_tracing_values_are_refused(values: dict[str, object], path: str) -> None:
    assert path in render_error(values)
