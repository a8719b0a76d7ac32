"""The generated CRDs are structural, bounded, and carry what kubectl shows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import Field

from natsmesh_operator.api import RESOURCES, ApiModel, NatsRoute, NatsService
from natsmesh_operator.crdgen.crd import crd, openapi_schema, to_yaml
from natsmesh_operator.crdgen.schema import KEY_ORDER, NotStructural, structural
from natsmesh_sidecar.subjects import NAME_PATTERN

CRDS = {r.KIND: crd(r) for r in RESOURCES}


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, e.g. `.spec.rules[].timeout`."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from nodes(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from nodes(node["items"], f"{path}[]")


def all_nodes() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for kind, doc in CRDS.items():
        schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in nodes(schema):
            yield kind, path, node


def test_every_node_is_structural() -> None:
    for kind, path, node in all_nodes():
        where = f"{kind}{path}"
        assert set(node) <= set(KEY_ORDER), where
        assert "type" in node, where
        assert not ("properties" in node and "additionalProperties" in node), where
        if node["type"] == "array":
            assert "items" in node, where


def test_lists_maps_and_spec_strings_are_bounded() -> None:
    # Bounds keep objects small and let the API server estimate CEL costs.
    for kind, path, node in all_nodes():
        where = f"{kind}{path}"
        if node["type"] == "array":
            assert "maxItems" in node, where
        if node["type"] == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, where
        if node["type"] == "string" and path.startswith(".spec"):
            assert "maxLength" in node or "enum" in node, where


def test_spec_fields_are_described() -> None:
    for kind, path, node in all_nodes():
        if path.startswith(".spec") and not path.endswith(("[]", ".*")):
            assert node.get("description"), f"{kind}{path}"


def test_list_map_keys_are_required_or_defaulted() -> None:
    for kind, path, node in all_nodes():
        if node.get("x-kubernetes-list-type") != "map":
            continue
        item = node["items"]
        for key in node["x-kubernetes-list-map-keys"]:
            assert key in item.get("required", []) or "default" in item["properties"][key], (
                f"{kind}{path}: {key}"
            )


def test_cel_rules_have_messages_and_real_field_paths() -> None:
    count = 0
    for kind, path, node in all_nodes():
        for rule in node.get("x-kubernetes-validations", []):
            count += 1
            assert rule["rule"], f"{kind}{path}"
            assert rule["message"], f"{kind}{path}"
            target = node
            for part in rule.get("fieldPath", "").split(".")[1:]:
                target = target["properties"][part]
    assert count >= 20


def test_metadata_name_is_a_subject_token() -> None:
    for doc in CRDS.values():
        meta = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["metadata"]
        assert meta["properties"]["name"]["pattern"] == NAME_PATTERN


@pytest.mark.parametrize(
    ("kind", "columns", "short"),
    [
        ("NatsService", ["Ready", "Subject", "Endpoints", "Age"], "nsvc"),
        ("NatsRoute", ["Service", "Rules", "Ready", "Age"], "nroute"),
    ],
)
def test_names_columns_and_subresources(kind: str, columns: list[str], short: str) -> None:
    doc = CRDS[kind]
    names = doc["spec"]["names"]
    assert names["shortNames"] == [short]
    assert names["categories"] == ["natsmesh"]
    assert doc["spec"]["scope"] == "Namespaced"
    version = doc["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    printed = version["additionalPrinterColumns"]
    assert [c["name"] for c in printed if not c.get("priority")] == columns
    schema = version["schema"]["openAPIV3Schema"]
    for column in printed:
        path = column["jsonPath"].split("[")[0]
        if path.startswith(".metadata"):
            continue
        target = schema
        for part in path.split(".")[1:]:
            target = target["properties"][part]
        assert target["type"] in {"string", "integer", "array"}, column


def test_conditions_follow_the_api_conventions() -> None:
    for resource in (NatsService, NatsRoute):
        status = openapi_schema(resource)["properties"]["status"]["properties"]
        conditions = status["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        item = conditions["items"]
        assert set(item["properties"]) == {
            "type",
            "status",
            "reason",
            "message",
            "lastTransitionTime",
            "observedGeneration",
        }
        assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
        assert "observedGeneration" in status


def test_output_is_deterministic() -> None:
    for resource in RESOURCES:
        assert to_yaml(crd(resource)) == to_yaml(crd(resource))
    assert "&id" not in to_yaml(crd(NatsService))  # no YAML anchors for shared dicts


def test_optional_fields_have_no_null() -> None:
    text = to_yaml(crd(NatsRoute)) + to_yaml(crd(NatsService))
    for forbidden in ("anyOf", "$ref", "$defs", "null", "title:", "uniqueItems"):
        assert forbidden not in text


class _Union(ApiModel):
    value: int | str


class _Set(ApiModel):
    value: set[str]


class _Exclusive(ApiModel):
    value: int = Field(gt=0)


@pytest.mark.parametrize("model", [_Union, _Set, _Exclusive])
def test_non_structural_models_are_refused(model: type[ApiModel]) -> None:
    with pytest.raises(NotStructural):
        structural(model)
