"""Micro discovery answers say whether the instance is in its queue group."""

from __future__ import annotations

from natsmesh_sidecar.transport.micro import SERVING_KEY, MicroService


def micro(serving: list[bool]) -> MicroService:
    return MicroService(
        name="orders",
        instance_id="abc",
        subject="mesh.shop.orders.v1",
        queue_group="orders",
        metadata={"namespace": "shop", "version": "v1", "natsmesh.io/sidecar": "true"},
        stats=lambda: {},
        serving=lambda: serving[0],
    )


def test_ping_says_serving_as_membership_changes() -> None:
    state = [False]
    m = micro(state)
    assert m.response("PING")["metadata"][SERVING_KEY] == "false"
    state[0] = True
    for verb in ("PING", "INFO", "STATS"):
        meta = m.response(verb)["metadata"]
        assert meta[SERVING_KEY] == "true"
        assert meta["version"] == "v1"
    # The static metadata is not changed by answering.
    assert SERVING_KEY not in m.metadata
