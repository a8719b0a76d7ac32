"""What a mesh pass keeps of each listed object (no managedFields), and how many
coroutines its bounded fan-outs have alive at once."""

from __future__ import annotations

import asyncio
import gc
import json
import types
from typing import Any

import pytest

from natsmesh_operator.api import NatsService
from natsmesh_operator.handlers import bounded
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


async def test_a_bounded_fan_out_keeps_only_its_workers_alive() -> None:
    running = peak = 0
    alive: list[int] = []

    async def work(item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if item == 500:  # mid-way: how many of these coroutines exist?
            alive.append(
                sum(
                    1
                    for o in gc.get_objects()
                    if isinstance(o, types.CoroutineType) and o.cr_code is work.__code__
                )
            )
        await asyncio.sleep(0)
        running -= 1
        return item * 2

    out = await bounded.each(range(1000), work, 16)
    assert out == [i * 2 for i in range(1000)]
    assert peak == 16
    assert len(alive) == 1
    assert alive[0] <= 16, f"{alive[0]} coroutines alive for 16 workers"


async def test_a_bounded_fan_out_raises_what_its_work_raises() -> None:
    async def work(item: int) -> int:
        if item == 3:
            raise ValueError("three")
        return item

    with pytest.raises(ValueError, match="three"):
        await bounded.each(range(10), work, 4)
    assert await bounded.each([], work, 4) == []
