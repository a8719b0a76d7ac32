"""Event headers the subscriber's sidecar vouches for cannot be spoofed by the publisher.

A raw JetStream publisher (anyone holding creds that may publish to the
stream) writes the headers the consuming sidecar sets for its app --
``Nm-Event-Source`` raw, escaped (``Nm-Esc-``) and as a repeat
(``Nm-Dup-``), ``Idempotency-Key`` -- and a ``Nats-Msg-Id`` equal to the
default key another message will get. The app must see each of those once,
with the sidecar's values, and the legitimate events beside it keep their
own keys.
"""

from __future__ import annotations

import nats
import pytest

from natsmesh_sidecar import subjects
from natsmesh_sidecar.events.publisher import DEFAULT_KEY_PREFIX
from tests.fixtures.nats_server import NatsServer
from tests.integration.sidecar.sidecar_harness import AppRequest, request
from tests.integration.sidecar.test_sidecar_events import (
    STREAM,
    TOPIC,
    make_stream_and_consumer,
    start_event_mesh,
    stop_event_mesh,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)


def values(req: AppRequest, name: str) -> list[str]:
    return [v for k, v in req.headers if k.lower() == name.lower()]


async def test_forged_event_headers_are_dropped_and_keys_cannot_be_taken(
    nats_server: NatsServer,
) -> None:
    await make_stream_and_consumer(nats_server.url)
    m = await start_event_mesh(nats_server)
    try:
        nc = await nats.connect(nats_server.url)
        try:
            # Sequence 1: the forgery, claiming to come from payments and
            # taking the default key the next keyless event (seq 2) will get.
            ack = await nc.jetstream().publish(
                subjects.event_subject("shop", "orders", TOPIC),
                b"forged",
                headers={
                    "Nm-Event-Source": "payments.shop",
                    "Nm-Esc-Nm-Event-Source": "payments.shop",
                    "Nm-Dup-1-Nm-Esc-Nm-Event-Source": "payments.shop",
                    "Nm-Esc-Nm-Event-Topic": "refunds",
                    "Nm-Esc-Idempotency-Key": "stolen",
                    "Idempotency-Key": "stolen",
                    "Nats-Msg-Id": f"{DEFAULT_KEY_PREFIX}{STREAM}:2",
                    "X-Legit-Looking": "kept",
                },
            )
            assert ack.seq == 1
        finally:
            await nc.close()
        port = m.publisher.outbound_port
        # Sequence 2: a legitimate event without a key; 3: with its own key.
        assert (await request(port, "POST", f"/_events/{TOPIC}", body=b"real")).status == 202
        keyed = await request(
            port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", "order-7")],
            body=b"keyed",
        )
        assert keyed.status == 202
        # The publishing sidecar refuses keys from the reserved space.
        reserved = await request(
            port,
            "POST",
            f"/_events/{TOPIC}",
            headers=[("Idempotency-Key", f"{DEFAULT_KEY_PREFIX}{STREAM}:9")],
            body=b"x",
        )
        assert reserved.status == 400
        assert reserved.json()["error"] == "bad_request"

        await wait_for(lambda: len(m.acked) == 3)
        by_body = {r.body: r for r in m.app.requests}
        assert set(by_body) == {b"forged", b"real", b"keyed"}
        for req in by_body.values():
            assert values(req, "Nm-Event-Source") == ["orders.shop"]
            assert values(req, "Nm-Event-Topic") == [TOPIC]
            assert len(values(req, "Idempotency-Key")) == 1
            assert not any(k.lower().startswith("nats-") for k, _ in req.headers)
        forged, real, own = by_body[b"forged"], by_body[b"real"], by_body[b"keyed"]
        # Each message keeps a key of its own: the forgery could not take seq 2's.
        assert values(forged, "Idempotency-Key") == [f"{DEFAULT_KEY_PREFIX}{STREAM}:1"]
        assert values(real, "Idempotency-Key") == [f"{DEFAULT_KEY_PREFIX}{STREAM}:2"]
        assert values(own, "Idempotency-Key") == ["order-7"]
        assert values(forged, "X-Legit-Looking") == ["kept"]
        assert sorted(m.acked) == sorted(
            [f"{DEFAULT_KEY_PREFIX}{STREAM}:1", f"{DEFAULT_KEY_PREFIX}{STREAM}:2", "order-7"]
        )
    finally:
        await stop_event_mesh(m)
