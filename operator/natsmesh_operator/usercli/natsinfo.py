"""What the NATS servers say about themselves, asked as the system account's user.

The same user the operator connects as (its creds are in the bootstrap
Secret): it may ask every server for ``VARZ`` (version, trusted operator,
JetStream) and ``JSZ`` (streams and consumers of every account, with their
backlog), and nothing it does here changes anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from nats.aio.client import Client as NATS

from natsmesh_operator.usercli.checks import CheckResult
from natsmesh_operator.usercli.view import ConsumerKey, ConsumerLag
from natsmesh_operator.wiring.apply import connect_creds

log = logging.getLogger(__name__)

VARZ = "$SYS.REQ.SERVER.PING.VARZ"
JSZ = "$SYS.REQ.SERVER.PING.JSZ"
JSZ_OPTIONS = {"accounts": True, "streams": True, "consumer": True, "leader_only": True}
GATHER_SECONDS = 2.0
"""Longest wait for the servers' answers to one ping."""
GATHER_QUIET = 0.25
"""After the first answer: how long no further one means every server answered."""


CONNECT_SECONDS = 3


async def connect(url: str, creds: str) -> NATS:
    return await connect_creds(url, creds, connect_timeout=CONNECT_SECONDS)


async def gather(
    nc: NATS,
    subject: str,
    body: Mapping[str, Any],
    *,
    wait: float = GATHER_SECONDS,
    quiet: float = GATHER_QUIET,
) -> list[dict[str, Any]]:
    """Every server's answer to a ``$SYS.REQ.SERVER.PING.*`` request.

    A ping is answered once per server, and how many there are is not
    known up front: collect until ``quiet`` passes without a new answer.
    """
    answers: list[dict[str, Any]] = []
    arrived = asyncio.Event()
    inbox = nc.new_inbox()

    async def on_msg(msg: Any) -> None:
        try:
            decoded = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(decoded, dict):
            answers.append(decoded)
            arrived.set()

    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
        await nc.flush()
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            arrived.clear()
            try:
                await asyncio.wait_for(
                    arrived.wait(), timeout=min(left, quiet) if answers else left
                )
            except TimeoutError:
                if answers:
                    break
    finally:
        await sub.unsubscribe()
    return answers


def parse_jsz(answers: Iterable[Mapping[str, Any]]) -> dict[ConsumerKey, ConsumerLag]:
    """Consumer backlogs from JSZ answers (account details named by namespace).

    Accounts are named after their namespace in their JWT, and JSZ reports
    that name; with ``leader_only`` each consumer comes from one server.
    """
    out: dict[ConsumerKey, ConsumerLag] = {}
    for answer in answers:
        data = answer.get("data") or {}
        for account in data.get("account_details") or []:
            namespace = str(account.get("name", ""))
            for stream in account.get("stream_detail") or []:
                for consumer in stream.get("consumer_detail") or []:
                    key = (namespace, str(stream.get("name")), str(consumer.get("name")))
                    out[key] = ConsumerLag(
                        pending=int(consumer.get("num_pending", 0)),
                        ack_pending=int(consumer.get("num_ack_pending", 0)),
                        redelivered=int(consumer.get("num_redelivered", 0)),
                    )
    return out


async def consumer_lag(url: str, creds: str) -> dict[ConsumerKey, ConsumerLag]:
    nc = await connect(url, creds)
    try:
        return parse_jsz(await gather(nc, JSZ, JSZ_OPTIONS))
    finally:
        await nc.close()


async def varz(nc: NATS) -> list[dict[str, Any]]:
    """Each server's ``VARZ`` data."""
    return [a["data"] for a in await gather(nc, VARZ, {}) if isinstance(a.get("data"), dict)]


def port_forward_hint(url: str, namespace: str) -> str:
    """How to reach an in-cluster NATS from a workstation."""
    host = url.split("://", 1)[-1].split(":", 1)[0].split(",", 1)[0]
    service = host.split(".", 1)[0] if host.endswith((".svc", ".svc.cluster.local")) else ""
    if service:
        return (
            f"from outside the cluster: kubectl -n {namespace} port-forward svc/{service} "
            "4222:4222, then --nats-url nats://127.0.0.1:4222"
        )
    return f"check that {url} is reachable from here, or pass --nats-url"


def assess(varz_list: Iterable[Mapping[str, Any]], operator: str) -> tuple[list[str], list[str]]:
    """Problems and facts from every server's VARZ: operator mode with ``operator``
    as trusted operator, and JetStream enabled."""
    problems: list[str] = []
    facts: list[str] = []
    servers = list(varz_list)
    if not servers:
        return ["no server answered VARZ"], facts
    versions = sorted({str(v.get("version", "?")) for v in servers})
    facts.append(f"{len(servers)} server(s), nats-server {', '.join(versions)}")
    foreign = [
        str(v.get("server_name", "?"))
        for v in servers
        if operator not in {str(c.get("sub")) for c in v.get("trusted_operators_claim") or []}
    ]
    if foreign:
        problems.append(
            f"not in operator mode with the bootstrap's operator {operator[:12]}...: "
            + ", ".join(sorted(foreign))
        )
    else:
        facts.append("operator mode")
    no_js = [
        str(v.get("server_name", "?"))
        for v in servers
        if not (v.get("jetstream") or {}).get("config")
    ]
    if no_js:
        problems.append(f"JetStream off: {', '.join(sorted(no_js))}")
    else:
        facts.append("JetStream on")
    return problems, facts


async def check(url: str, creds: str, operator: str, namespace: str) -> CheckResult:
    """NATS answers the system user, trusts the bootstrap's operator, runs JetStream."""
    try:
        nc = await connect(url, creds)
    except Exception as exc:  # nats-py raises several unrelated types for "no"
        return CheckResult(
            "nats",
            "FAIL",
            f"cannot connect to {url} as the system user ({type(exc).__name__}: {exc})",
            port_forward_hint(url, namespace),
        )
    try:
        servers = await varz(nc)
    finally:
        await nc.close()
    problems, facts = assess(servers, operator)
    if problems:
        return CheckResult(
            "nats",
            "FAIL",
            f"{url}: {'; '.join(problems)}",
            "the servers must load resolver.conf from the bootstrap Secret and enable "
            "JetStream (the chart's nats.* values do both)",
        )
    return CheckResult("nats", "PASS", f"{url}: {', '.join(facts)}")
