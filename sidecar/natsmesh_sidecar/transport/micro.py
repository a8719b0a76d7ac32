"""NATS micro service discovery ($SRV.PING/INFO/STATS) for the sidecar.

Implemented directly rather than with ``nats.micro``: the inbound path is our
own queue subscription (so it keeps its fast callback), and this only needs to
answer the three discovery verbs with the sidecar's own counters. The JSON
shapes are the ``io.nats.micro.v1`` schema that ``nats micro ls/info/stats``
reads.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

API_PREFIX = "$SRV"
SERVING_KEY = "natsmesh.io/serving"
"""PING/INFO/STATS metadata: "false" while the sidecar is out of its queue group."""
VERSION = "0.1.0"


class MicroService:
    def __init__(
        self,
        *,
        name: str,
        instance_id: str,
        subject: str,
        queue_group: str,
        metadata: dict[str, str],
        stats: Callable[[], dict[str, Any]],
        description: str = "natsmesh sidecar",
        serving: Callable[[], bool] = lambda: True,
    ) -> None:
        self.name = name
        self.id = instance_id
        self.subject = subject
        self.queue_group = queue_group
        self.metadata = metadata
        self.stats = stats
        self.description = description
        #: Whether requests reach this instance now (in the queue group): the
        #: operator counts endpoints from PING answers, and an instance whose
        #: app is not ready must not count (metadata ``natsmesh.io/serving``).
        self.serving = serving
        self.started = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        self.subs: list[Any] = []
        #: With creds, answers may go only under this prefix (our JWT has no
        #: response permission); None answers any reply (a dev server).
        self.reply_prefix: str | None = None

    def subjects(self) -> list[str]:
        out = []
        for verb in ("PING", "INFO", "STATS"):
            out += [
                f"{API_PREFIX}.{verb}",
                f"{API_PREFIX}.{verb}.{self.name}",
                f"{API_PREFIX}.{verb}.{self.name}.{self.id}",
            ]
        return out

    async def subscribe(self, nc: Any) -> list[Any]:
        """The service's subscriptions on ``nc``; the caller makes them
        :attr:`subs` once the connection is set up (a connection being moved
        to takes them over only then)."""
        subs = []
        for subject in self.subjects():
            verb = subject.split(".")[1]
            subs.append(await nc.subscribe(subject, cb=self._handler(verb, nc)))
        return subs

    async def stop(self) -> None:
        for sub in self.subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:
                logger.debug("micro unsubscribe: %s", exc)
        self.subs.clear()

    def _identity(self, kind: str) -> dict[str, Any]:
        return {
            "type": f"io.nats.micro.v1.{kind}_response",
            "name": self.name,
            "id": self.id,
            "version": VERSION,
            "metadata": {**self.metadata, SERVING_KEY: "true" if self.serving() else "false"},
        }

    def _endpoint(self) -> dict[str, Any]:
        return {
            "name": "http",
            "subject": self.subject,
            "queue_group": self.queue_group,
            "metadata": {},
        }

    def response(self, verb: str) -> dict[str, Any]:
        if verb == "PING":
            return self._identity("ping")
        if verb == "INFO":
            return {
                **self._identity("info"),
                "description": self.description,
                "endpoints": [self._endpoint()],
            }
        s = self.stats()
        served = int(s.get("num_requests", 0))
        total_ns = int(s.get("processing_time", 0))
        ep = {
            **self._endpoint(),
            "num_requests": served,
            "num_errors": int(s.get("num_errors", 0)),
            "last_error": str(s.get("last_error", "")),
            "processing_time": total_ns,
            "average_processing_time": total_ns // served if served else 0,
            "data": s.get("data"),
        }
        return {**self._identity("stats"), "started": self.started, "endpoints": [ep]}

    def _handler(self, verb: str, nc: Any) -> Callable[[Any], Any]:
        async def handle(msg: Any) -> None:
            prefix = self.reply_prefix
            if msg.reply and (prefix is None or msg.reply.startswith(prefix)):
                await nc.publish(msg.reply, json.dumps(self.response(verb)).encode())

        return handle
