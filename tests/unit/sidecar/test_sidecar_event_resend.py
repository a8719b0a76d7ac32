"""Event publishes resent when an ack is late: the retry logic alone.

The stream side (a repeat with the same ``Nats-Msg-Id`` stored once) is the
server's duplicate window, exercised against a real nats-server in
tests/integration/sidecar/test_sidecar_events.py and, under a NATS rolling
restart, in tests/change.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats import errors as nats_errors

from natsmesh_sidecar.events import publisher


class _Js:
    """A JetStream context whose first ``lost`` publishes never get an ack."""

    def __init__(self, lost: int) -> None:
        self.lost = lost
        self.calls: list[tuple[float, dict[str, str]]] = []

    async def publish(self, subject: str, body: bytes, **kw: Any) -> str:
        self.calls.append((kw["timeout"], dict(kw["headers"])))
        if len(self.calls) <= self.lost:
            await asyncio.sleep(kw["timeout"])
            raise nats_errors.TimeoutError
        return "ack"


class _Link:
    def __init__(self, js: _Js) -> None:
        self._js = js
        self.nc = None

    def js(self, prefix: str = "") -> _Js:
        return self._js


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publisher, "ACK_RESEND_SECONDS", 0.05)
    monkeypatch.setattr(publisher, "PUBLISH_TIMEOUT", 0.3)


async def test_a_lost_ack_is_resent_with_the_same_message_id() -> None:
    js = _Js(lost=2)
    ack = await publisher.publish_to_stream(
        _Link(js), "ev.x", b"{}", None, {"Nats-Msg-Id": "k1", "A": "b"}
    )
    assert ack == "ack"
    assert len(js.calls) == 3
    assert {h["Nats-Msg-Id"] for _, h in js.calls} == {"k1"}
    assert all(t <= 0.05 for t, _ in js.calls)


async def test_resends_stop_at_the_publish_timeout() -> None:
    js = _Js(lost=1000)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(nats_errors.TimeoutError):
        await publisher.publish_to_stream(_Link(js), "ev.x", b"{}", None, {"Nats-Msg-Id": "k"})
    took = loop.time() - began
    assert 0.25 <= took < 0.45
    assert 4 <= len(js.calls) <= 7


async def test_without_a_message_id_a_late_ack_is_not_resent() -> None:
    # A resend without an id could store the event twice.
    js = _Js(lost=1)
    with pytest.raises(nats_errors.TimeoutError):
        await publisher.publish_to_stream(_Link(js), "ev.x", b"{}", None, {})
    assert len(js.calls) == 1
    assert js.calls[0][0] == pytest.approx(0.3, abs=0.01)


def test_generated_ids_are_under_the_reserved_prefix() -> None:
    # The subscriber maps reserved ids to nm:<stream>:<seq>, as for no id.
    from natsmesh_sidecar.events.consumer import idempotency_key

    generated = publisher.PUBLISHED_KEY_PREFIX + "ab12"
    assert idempotency_key(generated, "S", 7) == "nm:S:7"
    assert idempotency_key("app-key", "S", 7) == "app-key"
