"""Event metrics name the subscription: a service may take the same topic from two publishers."""

from __future__ import annotations

import pytest

from natsmesh_sidecar.app import Sidecar
from natsmesh_sidecar.config import SidecarSettings
from natsmesh_sidecar.events.consumer import EventConsumer
from natsmesh_sidecar.wire import Delivery

pytestmark = pytest.mark.unit


def delivery(source: str) -> Delivery:
    name = source.split(".")[0]
    return Delivery(
        stream=f"EVENTS_{name}",
        consumer=f"billing_{name}",
        topic="order.created",
        source=source,
        path="/events",
        dead_letter_subject=f"deadletter.shop.billing.{name}",
    )


async def test_two_publishers_of_one_topic_are_two_series() -> None:
    # NatsService.spec.events.subscriptions are unique by (service, topic):
    # billing may take order.created from orders and from returns. Keyed by
    # topic alone, one consumer's pending count overwrote the other's, so
    # NatsmeshConsumerLag could miss (or flap on) the one that lags.
    settings = SidecarSettings.model_validate(
        {"service": "billing", "namespace": "shop", "nats_url": "nats://127.0.0.1:1"}
    )
    app = Sidecar(settings)
    lagging = EventConsumer(app.event_context, delivery("orders.shop"))
    idle = EventConsumer(app.event_context, delivery("returns.shop"))
    assert lagging.pending is not idle.pending
    lagging.pending.set(5000)
    idle.pending.set(0)
    text = app.metrics.registry.render().decode()
    for family, value in (("events_pending", "5000.0"), ("events_dead_lettered_total", "0.0")):
        assert (
            f'natsmesh_sidecar_{family}{{source="orders.shop",topic="order.created"}} {value}'
        ) in text
        assert (
            f'natsmesh_sidecar_{family}{{source="returns.shop",topic="order.created"}} 0.0'
        ) in text
