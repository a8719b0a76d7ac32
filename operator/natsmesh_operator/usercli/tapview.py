"""What ``natsmesh tap`` prints: one line per request, and the sidecars' drop counts.

Pure: records in (the JSON a sidecar sends, :mod:`natsmesh_sidecar.observe.tap`),
text out. A record is checked with pydantic at this boundary: a sidecar of
the tapped service could send anything on its records subject.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

#: C0 and C1 controls, DEL, line separators and bidi overrides: a caller
#: picks the path and method a record shows, and escape sequences in them
#: would drive the reader's terminal (or reorder what it shows).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
#: Times a record may carry (Unix seconds before the year 5000): a forged
#: one past that would end the CLI in ``datetime.fromtimestamp``.
_MAX_TS = 95_617_584_000.0


class TapRecord(BaseModel):
    """One request a sidecar saw."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    kind: Literal["request"]
    ts: float = Field(ge=0, le=_MAX_TS, allow_inf_nan=False)
    instance: str = Field(max_length=64)
    direction: Literal["inbound", "outbound"]
    method: str = Field(max_length=32)
    path: str = Field(max_length=4096)
    status: int
    latency_ms: float = Field(alias="latencyMs", allow_inf_nan=False)
    source: str = Field(max_length=256)
    destination: str = Field(max_length=256)
    request_id: str = Field(alias="requestId", max_length=256)
    route: str = Field(default="", max_length=256)
    error: str = Field(default="", max_length=256)

    def to_json(self) -> dict[str, object]:
        return self.model_dump(by_alias=True)


class TapStatus(BaseModel):
    """A sidecar's answer to a start or renewal: it is tapping, and what it dropped."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["status"]
    #: A sidecar's instance id; the CLI prints it in its warnings, unescaped.
    instance: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    sent: int = 0
    dropped: int = 0
    rate: float = 0.0


def parse(data: bytes) -> TapRecord | TapStatus | None:
    try:
        raw = json.loads(data)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    try:
        if raw.get("kind") == "status":
            return TapStatus.model_validate(raw)
        return TapRecord.model_validate(raw)
    except ValidationError:
        log.debug("not a tap record: %r", data[:200])
        return None


def _latency(ms: float) -> str:
    if ms < 1.0:
        return f"{ms * 1000:.0f}us"
    if ms < 1000.0:
        return f"{ms:.1f}ms"
    return f"{ms / 1000:.2f}s"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def line(r: TapRecord) -> str:
    """``HH:MM:SS.mmm  in  POST /charge  200  3.2ms  orders.shop -> payments.shop  rid=..``"""
    when = datetime.datetime.fromtimestamp(r.ts, tz=datetime.UTC).strftime("%H:%M:%S.%f")[:-3]
    arrow = "in " if r.direction == "inbound" else "out"
    error = f"  error={r.error}" if r.error else ""
    text = (
        f"{when}  {arrow}  {r.method} {r.path}  {r.status}  {_latency(r.latency_ms)}  "
        f"{r.source} -> {r.destination}  rid={r.request_id}  "
        f"sidecar={r.instance[:8]}{error}"
    )
    return _CONTROL.sub(_escape, text)


@dataclass
class Sidecars:
    """What the tapped sidecars said about themselves: who answered, what they dropped.

    A sidecar's ``dropped`` counts from its first tap on; what this session
    lost is the growth since its first status here.
    """

    first: dict[str, int] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)

    def status(self, s: TapStatus) -> int:
        """Record a status; the records this sidecar dropped since its last one."""
        self.first.setdefault(s.instance, s.dropped)
        before = self.last.get(s.instance, s.dropped)
        self.last[s.instance] = max(before, s.dropped)
        return max(0, s.dropped - before)

    @property
    def count(self) -> int:
        return len(self.first)

    @property
    def total_dropped(self) -> int:
        return sum(self.last[i] - self.first[i] for i in self.first)


def summary(shown: int, sidecars: Sidecars, service: str) -> str:
    text = f"{shown} request(s) shown from {sidecars.count} sidecar(s) of {service}"
    if sidecars.total_dropped:
        text += f"; {sidecars.total_dropped} dropped by the sidecars' rate limit"
    return text
