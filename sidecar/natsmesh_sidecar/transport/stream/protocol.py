"""The stream wire format: header names, per-call subjects, credit arithmetic.

A streamed call starts like any other: its *head* is one NATS request on the
callee's service subject (permissions, routes, version splits and the queue
group pick the instance exactly as for a unary call). The rest of the body
travels as numbered chunks on two per-call subjects:

* caller -> callee: ``mesh._<ns>.<service>.<call>.<caller-ns>.<caller>``.
  The caller may publish it with the one request permission it already has
  (``mesh.*.*.*.<ns>.<caller>``, its identity last, enforced by the server);
  only the callee's user may subscribe to it (``mesh._<ns>.<service>.*...``,
  granted beside its serve subjects, for the same callers). The leading
  ``_`` keeps it apart from every service subject (a namespace never starts
  with one), the unguessable call id apart from other calls. Across
  namespaces the callee's account exports these subjects, per admitted
  caller, to the caller's account (a service export answered by ``Stream``).
* callee -> caller: an inbox of the caller (``_INBOX.mesh.<caller>.…``), the
  reply subject of the head or of the caller's first credit: where a callee
  may already answer. Across namespaces both are ``_R_`` subjects of service
  imports: the head's takes one answer, the first credit's many; so the
  caller gives its inbox to that one credit only (an upload's or a tunnel's
  caller sends an empty credit for it as soon as the callee took the call),
  and nothing else either way carries a reply subject (each would open a
  reply mapping in the other account). See
  natsmesh_sidecar.transport.stream.callee.Answers.

Flow control is by credit: the receiving end tells the sending end up to
which chunk number it may send (``Nm-Credit``, cumulative), a window of
chunks ahead of what it has handed on. A slow reader stops granting, so the
sender stops reading its source: memory does not depend on body size.
Chunks are numbered (``Nm-Seq``); a gap (a message NATS dropped) cuts the
stream, the last chunk says so (``Nm-Eof``), so a cut stream is never taken
for a complete one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

from natsmesh_sidecar import codec, subjects
from natsmesh_sidecar.wire import StreamLimits

logger = logging.getLogger(__name__)

#: On a request head: the body follows as chunks of this call. On a reply:
#: the response streams (then ``Nm-Stream-Status``, not ``Nm-Status``: a
#: caller that knows nothing of streams answers 502, never a partial body).
H_STREAM = "Nm-Stream"
H_STREAM_STATUS = "Nm-Stream-Status"
H_SEQ = "Nm-Seq"
H_EOF = "Nm-Eof"
H_CREDIT = "Nm-Credit"
H_ABORT = "Nm-Abort"
H_BEAT = "Nm-Beat"
#: The body's length when the sender knows it (a Content-Length).
H_LENGTH = "Nm-Length"

H_WINDOW = codec.H_STREAM_WINDOW
H_IDLE = codec.H_STREAM_IDLE
#: What a head may ask for: NatsRoute's bounds of a rule's ``stream``
#: (natsmesh_operator.api.route.StreamSettings); anything outside is clamped.
MAX_WINDOW = 64
IDLE_MS_BOUNDS = (1_000, 3_600_000)

#: What a message on a stream is (:func:`kind`). END: an empty message, which
#: closes a reply mapping across namespaces (:func:`answers_once`).
CHUNK, CREDIT, HEAD, FINAL, ABORT, BEAT, END, NO_RESPONDERS, INVALID = (
    "chunk",
    "credit",
    "head",
    "final",
    "abort",
    "beat",
    "end",
    "no_responders",
    "invalid",
)

#: The longest an end of a call across namespaces stays quiet: each of the
#: callee's messages keeps its reply mapping alive, which nats-server drops
#: after its response threshold without one (2 minutes by default, and a
#: threshold in an account JWT is not applied when the account is updated
#: in place, only when it is first loaded).
CROSS_BEAT_S = 30.0

CALL_ID_BYTES = 12
STREAM_MARK = subjects.STREAM_MARK


class StreamError(Exception):
    """The peer broke the protocol (a gap, a bad number, a body of the wrong length)."""


def new_call_id() -> str:
    """Unguessable: knowing a call's subject is no way to another call's."""
    return os.urandom(CALL_ID_BYTES).hex()


def valid_call_id(call: str) -> bool:
    if len(call) != 2 * CALL_ID_BYTES:
        return False
    try:
        int(call, 16)
    except ValueError:
        return False
    return call == call.lower()


def call_subject(request_subject: str, call: str) -> str | None:
    """The caller -> callee subject of ``call``, from the head's request subject.

    ``mesh.<ns>.<svc>.<version>.<cns>.<caller>`` -> ``mesh._<ns>.<svc>.<call>.<cns>.<caller>``;
    None for anything else.
    """
    tokens = request_subject.split(".")
    if (
        len(tokens) != 6
        or tokens[0] != subjects.REQUEST_PREFIX
        or tokens[1].startswith(STREAM_MARK)
    ):
        return None
    if not valid_call_id(call):
        return None
    tokens[1] = STREAM_MARK + tokens[1]
    tokens[3] = call
    return ".".join(tokens)


def crosses(request_subject: str) -> bool:
    """Whether a request subject's callee is in another namespace than its caller
    (then the call's messages cross service imports: see the module docstring)."""
    tokens = request_subject.split(".")
    return len(tokens) == 6 and tokens[1] != tokens[4]


def answers_once(reply: str) -> bool:
    """Whether ``reply`` is a service import's reply subject (``_R_.``): a
    callee reached across namespaces, whose own messages cross back."""
    return reply.startswith(subjects.SERVICE_REPLY_PREFIX)


def beat_period(limits: StreamLimits, crossing: bool) -> float:
    """How often an end beats: a quarter of the idle timeout, and at most
    :data:`CROSS_BEAT_S` apart in a call across namespaces."""
    beat = limits.idle_timeout_s / 4
    return min(beat, CROSS_BEAT_S) if crossing else beat


def kind(headers: Mapping[str, str], data: bytes) -> str:
    """What one message on a stream is."""
    if H_ABORT in headers:
        return ABORT
    if H_SEQ in headers:
        return CHUNK
    if H_STREAM_STATUS in headers:
        return HEAD
    if "Nm-Status" in headers:
        return FINAL
    if H_CREDIT in headers:
        return CREDIT
    if H_BEAT in headers:
        return BEAT
    if not data and headers.get("Status") == "503":
        return NO_RESPONDERS
    if not data and not headers:
        return END
    return INVALID


def _number(headers: Mapping[str, str], name: str) -> int:
    raw = headers.get(name, "")
    if not raw.isdigit() or len(raw) > 18:
        raise StreamError(f"{name} {raw!r} is not a number")
    return int(raw)


def check_chunk(expected: int, headers: Mapping[str, str]) -> bool:
    """A chunk's number must be the next one; True when it is the last."""
    seq = _number(headers, H_SEQ)
    if seq != expected:
        raise StreamError(f"chunk {seq} where {expected} was due: the stream has a gap")
    return H_EOF in headers


def credit_of(headers: Mapping[str, str]) -> int:
    return _number(headers, H_CREDIT)


def length_of(headers: Mapping[str, str]) -> int | None:
    """``Nm-Length``: the body's announced length, or None when unknown."""
    if H_LENGTH not in headers:
        return None
    return _number(headers, H_LENGTH)


def limits_of(headers: Mapping[str, str], base: StreamLimits) -> StreamLimits:
    """The limits of the call whose head has ``headers``: what its route rule
    asked for (``Nm-Window``, ``Nm-Idle-Ms``), clamped to the API's bounds,
    else ``base`` (this sidecar's settings).

    The idle timeout must be the caller's: each end beats every quarter of
    its own and gives up after a whole one, so a callee on a longer clock
    would beat too rarely for a caller on a shorter one.
    """
    window, idle = headers.get(H_WINDOW), headers.get(H_IDLE)
    if window is None and idle is None:
        return base
    low, high = IDLE_MS_BOUNDS
    idle_ms = _clamped(idle, low, high)
    return dataclasses.replace(
        base,
        window=_clamped(window, 1, MAX_WINDOW) or base.window,
        idle_timeout_s=idle_ms / 1000 if idle_ms else base.idle_timeout_s,
    )


def _clamped(raw: str | None, low: int, high: int) -> int:
    """``raw`` as a number within ``[low, high]``; 0 when absent or not a number."""
    if raw is None or not raw.isdigit() or len(raw) > 18:
        return 0
    return min(max(int(raw), low), high)


def grant(consumed: int, granted: int, window: int) -> int | None:
    """The next credit, once half a window was handed on since the last one.

    Granting per chunk would double the messages; granting only when the
    window is used up would stall the sender for a round trip each window.
    """
    credit = consumed + window
    if credit - granted >= max(1, window // 2):
        return credit
    return None


def sendable(next_seq: int, credit: int) -> int:
    """How many chunks the sender may send now."""
    return max(0, credit - next_seq)


def block(*pairs: tuple[str, str | int]) -> bytes:
    """A NATS header block of our own headers (no CR/LF in any value)."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in pairs)
    return f"NATS/1.0\r\n{lines}\r\n".encode()


def chunk_block(seq: int, eof: bool) -> bytes:
    if eof:
        return b"NATS/1.0\r\nNm-Seq: %d\r\nNm-Eof: 1\r\n\r\n" % seq
    return b"NATS/1.0\r\nNm-Seq: %d\r\n\r\n" % seq


def credit_block(credit: int) -> bytes:
    return b"NATS/1.0\r\nNm-Credit: %d\r\n\r\n" % credit


def abort_block(reason: str) -> bytes:
    return block((H_ABORT, "".join(c if c.isprintable() else " " for c in reason)[:200]))


BEAT_BLOCK = b"NATS/1.0\r\nNm-Beat: 1\r\n\r\n"


def http_chunk(data: bytes) -> bytes:
    """One chunk of an HTTP/1.1 chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


HTTP_LAST_CHUNK = b"0\r\n\r\n"
