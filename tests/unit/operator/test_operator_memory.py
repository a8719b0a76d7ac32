"""What a mesh pass keeps of each listed object: no managedFields."""

from __future__ import annotations

import json
from typing import Any

from natsmesh_operator.api import NatsService
from natsmesh_operator.handlers.kube import NatsServiceRes, body_of


def _stored(name: str) -> dict[str, Any]:
    """A NatsService as the API server returns it, managedFields and all."""
    return {
        "apiVersion": "natsmesh.io/v1alpha1",
        "kind": "NatsService",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": "6f1c2a",
            "annotations": {"natsmesh.io/last-handled-configuration": "{}"},
            "managedFields": [
                {
                    "manager": manager,
                    "operation": "Update",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {"f:port": {}, "f:selector": {"f:matchLabels": {}}}},
                }
                for manager in ("kubectl", "kopf", "natsmesh-operator")
            ],
        },
        "spec": {"selector": {"matchLabels": {"app": name}}, "port": 8080},
        "status": {"user": "UABC"},
    }


def test_a_listed_body_drops_managed_fields_and_keeps_the_rest() -> None:
    stored = _stored("orders")
    body = body_of(NatsServiceRes.from_dict(json.loads(json.dumps(stored))))
    assert "managedFields" not in body["metadata"]
    expected = json.loads(json.dumps(stored))
    del expected["metadata"]["managedFields"]
    assert body == expected  # uid, annotations, spec, status: all still there
    svc = NatsService.from_body(body)
    assert svc.metadata.name == "orders"
    assert "managedFields" not in (svc.metadata.model_extra or {})


def test_a_plain_mapping_is_copied_not_changed() -> None:
    stored = _stored("payments")
    body = body_of(stored)
    assert "managedFields" not in body["metadata"]
    assert body["metadata"]["uid"] == "6f1c2a"
    assert len(stored["metadata"]["managedFields"]) == 3
