"""values.schema.json refuses typos, wrong types and out-of-range values by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from .render import CHART, render, render_error
from .values_sets import EXTERNAL_URL

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"replicas": 2}, ["additional properties", "'replicas'"]),
        ({"operator": {"replcas": 3}}, ["/operator", "'replcas'"]),
        ({"webhook": {"certManager": {"enable": True}}}, ["/webhook/certManager", "'enable'"]),
        ({"nats": {"jetstream": {"persistence": {"sise": "1Gi"}}}}, ["persistence", "'sise'"]),
        ({"metrics": {"serviceMonitor": {"enabld": True}}}, ["serviceMonitor", "'enabld'"]),
    ],
    ids=["top-level", "operator", "cert-manager", "persistence", "service-monitor"],
)
def test_unknown_keys_are_refused(values: dict[str, Any], names: list[str]) -> None:
    message = render_error(values)
    for name in names:
        assert name in message, message


@pytest.mark.parametrize(
    ("values", "path", "says"),
    [
        ({"operator": {"replicas": "two"}}, "/operator/replicas", "want integer"),
        ({"crds": {"keep": "yes"}}, "/crds/keep", "want boolean"),
        ({"webhook": {"timeoutSeconds": 1.5}}, "/webhook/timeoutSeconds", "integer"),
        ({"nats": {"replicas": [3]}}, "/nats/replicas", "want integer"),
        ({"operator": {"podAnnotations": {"a": 1}}}, "/operator/podAnnotations/a", "want string"),
    ],
    ids=["replicas-string", "keep-string", "timeout-float", "nats-replicas-list", "annotation"],
)
def test_wrong_types_are_refused(values: dict[str, Any], path: str, says: str) -> None:
    message = render_error(values)
    assert path in message, message
    assert says in message, message


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"webhook": {"failurePolicy": "Maybe"}}, "/webhook/failurePolicy"),
        ({"image": {"operator": {"pullPolicy": "Sometimes"}}}, "/image/operator/pullPolicy"),
        ({"nats": {"image": {"pullPolicy": "always"}}}, "/nats/image/pullPolicy"),
        ({"webhook": {"timeoutSeconds": 31}}, "/webhook/timeoutSeconds"),
        ({"webhook": {"timeoutSeconds": 0}}, "/webhook/timeoutSeconds"),
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"nats": {"replicas": 0}}, "/nats/replicas"),
        ({"operator": {"peering": "Not_A_Label"}}, "/operator/peering"),
        ({"nats": {"external": {"url": "http://x"}}}, "/nats/external/url"),
        ({"operator": {"resources": {"requests": {"memory": "lots"}}}}, "memory"),
    ],
)
def test_enums_and_ranges_are_enforced(values: dict[str, Any], path: str) -> None:
    assert path in render_error(values)


def test_external_nats_needs_a_url() -> None:
    message = render_error({"nats": {"enabled": False}})
    assert "/nats/external/url" in message


def test_external_nats_with_url_is_accepted() -> None:
    render({"nats": {"enabled": False, "external": {"url": EXTERNAL_URL}}})


def _objects(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            found.append((path, node))
        for key, value in node.items():
            found += _objects(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _objects(value, f"{path}/{i}")
    return found


def test_every_object_in_the_schema_is_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    objects = _objects(schema)
    assert len(objects) > 20
    for path, node in objects:
        assert node.get("additionalProperties") is False, path


def test_defaults_match_the_schema_keys() -> None:
    """values.yaml documents every key the schema allows (no hidden options)."""
    import yaml

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(schema_node: dict[str, Any], value: Any, path: str) -> None:
        props = schema_node.get("properties")
        if not props or schema_node.get("additionalProperties") is not False:
            return
        assert isinstance(value, dict), path
        missing = set(props) - set(value) - {"global"}
        assert not missing, f"{path or '/'}: keys in the schema but not in values.yaml: {missing}"
        for key, sub in value.items():
            walk(props[key], sub, f"{path}/{key}")

    walk(schema, values, "")
