"""Pydantic JSON Schema -> Kubernetes structural OpenAPI v3 schema.

The API server wants a *structural* schema: every node has a type, no `$ref`,
no `anyOf`/`oneOf`/`allOf` at the places pydantic puts them, no `title`, no
`additionalProperties: false` next to `properties`. Pydantic's
`model_json_schema()` has all of those, so this module inlines references,
collapses `X | None` to `X` (a field that is unset is simply absent; the
server prunes explicit nulls), and refuses anything it does not know how to
express rather than letting a non-structural CRD reach the server.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

JsonDict = dict[str, Any]

#: Keys a structural schema node may carry, in the order they are written.
KEY_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "default",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "nullable",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-validations",
)
_ALLOWED = frozenset(KEY_ORDER)
RULE_KEY_ORDER = ("rule", "message", "messageExpression", "fieldPath", "reason")
#: Pydantic output that carries no meaning for the API server.
_DROPPED = frozenset({"title"})


class NotStructural(ValueError):
    """The model produced a schema construct a CRD cannot hold."""


def structural(model: type[BaseModel]) -> JsonDict:
    """The structural schema of ``model`` (camelCase property names)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, JsonDict] = raw.pop("$defs", {})
    return _node(raw, defs, path=model.__name__)


def description(text: str) -> str:
    """Docstring text as one line per paragraph: stable YAML and readable
    `kubectl explain` output regardless of source indentation."""
    paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def _node(node: JsonDict, defs: dict[str, JsonDict], path: str) -> JsonDict:
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = _merge(target, node)
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise NotStructural(f"{path}: only `X | None` unions are supported")
        if node.get("default", ...) is None:
            del node["default"]
        return _node(_merge(branches[0], node), defs, path)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    for key in _DROPPED:
        node.pop(key, None)
    unknown = sorted(set(node) - _ALLOWED)
    if unknown:
        raise NotStructural(f"{path}: schema keys not allowed in a CRD: {unknown}")
    if "type" not in node:
        raise NotStructural(f"{path}: every schema node needs a type")

    if "description" in node:
        node["description"] = description(node["description"])
    if "properties" in node:
        node["properties"] = {
            name: _node(child, defs, f"{path}.{name}") for name, child in node["properties"].items()
        }
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _node(node["additionalProperties"], defs, f"{path}.*")
    if "items" in node:
        node["items"] = _node(node["items"], defs, f"{path}[]")
    if "x-kubernetes-validations" in node:
        node["x-kubernetes-validations"] = [
            {key: rule[key] for key in RULE_KEY_ORDER if key in rule}
            for rule in node["x-kubernetes-validations"]
        ]
    return {key: node[key] for key in KEY_ORDER if key in node}


def _merge(inner: JsonDict, outer: JsonDict) -> JsonDict:
    """``outer`` (the field) over ``inner`` (its type): the field's description
    wins, CEL rules of both apply."""
    merged = {**inner, **outer}
    rules = [*inner.get("x-kubernetes-validations", []), *outer.get("x-kubernetes-validations", [])]
    if rules:
        merged["x-kubernetes-validations"] = rules
    return merged
