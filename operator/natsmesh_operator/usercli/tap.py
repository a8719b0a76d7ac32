"""``natsmesh tap SERVICE [-n NS]``: live requests to and from a service.

Like ``linkerd viz tap``: the service's sidecars send a record of each request
they handle (both directions: calls to it, and the calls it makes), one line
each, or one JSON object per line with ``-o json``. Nothing is recorded
unless a tap runs: the CLI starts a session on the service's tap control
subject and renews it every :data:`RENEW_SECONDS`; sidecars forget a session
:data:`TTL_SECONDS` after its last renewal (a killed CLI costs at most that).
Ctrl-C, ``--duration`` or ``--max`` end it, with a stop message.

Who may tap: whoever may ``get`` the Secret ``natsmesh-tap`` in the
namespace (the operator's tap user for that namespace: it may start taps
and read records there, nothing else). Exit status: 0 done, 1 failed (NATS
unreachable, no tap Secret yet), 2 no such service, 3 not allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.core_v1 import Secret
from nats import errors as nats_errors
from nats.aio.client import Client as NATS

from natsmesh_operator.handlers import kube
from natsmesh_operator.handlers.tap_creds import NATS_URL_KEY, TAP_USER
from natsmesh_operator.settings import NatsSettings
from natsmesh_operator.usercli import common, natsinfo, tapview
from natsmesh_operator.usercli.kubeaccess import Access
from natsmesh_operator.webhook.inject import CREDS_KEY
from natsmesh_operator.wiring.apply import connect_creds
from natsmesh_sidecar import subjects

log = logging.getLogger(__name__)

PROG = "natsmesh tap"
RENEW_SECONDS = 3.0
TTL_SECONDS = 10.0
QUIET_WARNING = 3.0
"""Seconds without any sidecar answering before saying so."""
EXIT_FAILED, EXIT_NOT_FOUND, EXIT_FORBIDDEN = 1, 2, 3


class TapError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TapAccess:
    creds: str
    nats_url: str


@dataclass(frozen=True)
class Limits:
    duration: float | None = None
    max_records: int | None = None


def _forbidden(exc: ApiError) -> bool:
    return exc.status.code == 403


async def locate(client: AsyncClient, namespace: str, service: str) -> TapAccess:
    """The tap creds of ``namespace``, once ``service`` is known to be one of its services."""
    try:
        found = await kube.namespace_services(client, namespace)
    except ApiError as exc:
        if _forbidden(exc):
            raise TapError(
                f"you may not list NatsServices in namespace {namespace}: {exc.status.message}",
                EXIT_FORBIDDEN,
            ) from exc
        raise
    names = sorted({s.service_name for s in found})
    if service not in names:
        known = f" (services there: {', '.join(names)})" if names else " (it has none)"
        raise TapError(f"no service {service!r} in namespace {namespace}{known}", EXIT_NOT_FOUND)
    try:
        secret = await client.get(Secret, TAP_USER, namespace=namespace)
    except ApiError as exc:
        if _forbidden(exc):
            raise TapError(
                f"you may not read Secret {namespace}/{TAP_USER}, which tapping namespace "
                f"{namespace} needs (check: kubectl auth can-i get secret/{TAP_USER} "
                f"-n {namespace})",
                EXIT_FORBIDDEN,
            ) from exc
        if exc.status.code == 404:
            raise TapError(
                f"no Secret {namespace}/{TAP_USER} yet: the operator writes it for every "
                "namespace with a NatsService (is the operator running and current?)"
            ) from exc
        raise
    data = kube.decode_secret(secret)
    creds = data.get(CREDS_KEY)
    if not creds:
        raise TapError(f"Secret {namespace}/{TAP_USER} holds no {CREDS_KEY}")
    return TapAccess(creds, data.get(NATS_URL_KEY, ""))


def control(session: str, ttl: float) -> bytes:
    return json.dumps({"session": session, "ttl": ttl}).encode()


async def stream(
    nc: NATS,
    namespace: str,
    service: str,
    emit: Callable[[tapview.TapRecord], None],
    *,
    limits: Limits,
    stop: asyncio.Event,
    warn: Callable[[str], None],
) -> tuple[int, tapview.Sidecars]:
    """Start a session, renew it, hand each record to ``emit`` until ``stop``
    or a limit; stop the session. The records shown and what the sidecars said."""
    session = secrets.token_hex(8)
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10_000)

    async def on_msg(msg: object) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(getattr(msg, "data", b""))

    sub = await nc.subscribe(subjects.tap_records(namespace, service, session), cb=on_msg)
    ctl = subjects.tap_control(namespace, service)
    sidecars = tapview.Sidecars()
    shown = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    end = started + limits.duration if limits.duration else float("inf")
    renew_at = started
    warned = False
    try:
        while not stop.is_set():
            now = loop.time()
            if now >= end:
                break
            if now >= renew_at:
                await nc.publish(ctl, control(session, TTL_SECONDS))
                await nc.flush()
                renew_at = now + RENEW_SECONDS
            if not warned and not sidecars.count and now - started > QUIET_WARNING:
                warned = True
                warn(f"no sidecar of {service}.{namespace} answered yet (is a pod of it running?)")
            wait = min(renew_at, end) - loop.time()
            try:
                data = await asyncio.wait_for(queue.get(), timeout=max(0.0, min(wait, 0.5)))
            except TimeoutError:
                continue
            item = tapview.parse(data)
            if isinstance(item, tapview.TapStatus):
                lost = sidecars.status(item)
                if lost:
                    warn(f"sidecar {item.instance[:8]} dropped {lost} record(s) (rate limit)")
            elif item is not None:
                emit(item)
                shown += 1
                if limits.max_records is not None and shown >= limits.max_records:
                    break
    except nats_errors.Error as exc:  # closed, flush timed out, buffer full while away
        raise TapError(
            f"lost the connection to NATS ({type(exc).__name__}) after {shown} request(s)"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await nc.publish(ctl, control(session, 0))
            await nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return shown, sidecars


def _emitter(output: str, stop: asyncio.Event) -> Callable[[tapview.TapRecord], None]:
    def emit(record: tapview.TapRecord) -> None:
        text = json.dumps(record.to_json()) if output == "json" else tapview.line(record)
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader went away (`| head`): stop as on Ctrl-C. stdout now
            # points at /dev/null, or the interpreter's last flush fails again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            stop.set()

    return emit


def _warn(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, access: Access) -> int:
    namespace = args.namespace or access.namespace
    client = access.client()
    try:
        found = await locate(client, namespace, args.service)
    finally:
        await client.close()
    url = args.nats_url or found.nats_url or NatsSettings.url
    try:
        nc = await connect_creds(url, found.creds, allow_reconnect=True)
    except Exception as exc:  # nats-py raises several unrelated types for "no"
        raise TapError(
            f"cannot connect to NATS at {url} ({type(exc).__name__}: {exc}); "
            + natsinfo.port_forward_hint(url, namespace)
        ) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _warn(f"tapping {args.service}.{namespace} (Ctrl-C to stop)")
    t0 = time.monotonic()
    try:
        shown, sidecars = await stream(
            nc,
            namespace,
            args.service,
            _emitter(args.output, stop),
            limits=Limits(args.duration, args.max),
            stop=stop,
            warn=_warn,
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await nc.close()
    _warn(
        tapview.summary(shown, sidecars, f"{args.service}.{namespace}")
        + f" in {time.monotonic() - t0:.1f} s"
    )
    return 0


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: ``kind`` of the text, above 0 (0 would read as "no limit")."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number above 0, not {text!r}")
        return value

    return parse


def main(argv: list[str]) -> int:
    parser = common.parser(PROG, "Show live requests to and from a service's sidecars.")
    parser.add_argument("service", help="the mesh service (a NatsService's spec.service)")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    parser.add_argument("--duration", type=_positive(float), help="stop after this many seconds")
    parser.add_argument("--max", type=_positive(int), help="stop after this many requests")
    parser.add_argument("--nats-url", help="NATS URL (default: the one in the tap Secret)")
    args = parser.parse_args(argv)
    try:
        code = common.execute(args, PROG, run)
    except TapError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    return EXIT_FAILED if code is None else code
