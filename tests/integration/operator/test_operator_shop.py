"""Applying the shop example: everything Ready fast, creds issued, permissions as declared."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from natsmesh_operator.wiring import jwt
from natsmesh_operator.wiring.apply import connect_creds
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import call
from tests.fixtures.operator import OperatorProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SHOP = Path(__file__).resolve().parents[3] / "examples" / "shop"
SERVICES = ("gateway", "orders", "orders-v2", "payments", "inventory")


def creds_of(op: OperatorProcess, namespace: str, resource: str) -> str:
    secret = op.get("secret", f"natsmesh-{resource}-creds", namespace)
    return base64.b64decode(secret["data"]["user.creds"]).decode()


def apply_shop(op: OperatorProcess, namespace: str) -> float:
    started = time.monotonic()
    op.cluster.kubectl("apply", "-n", namespace, "-f", str(SHOP))
    return started


def test_shop_is_ready_within_5s(mesh_operator: OperatorProcess, mesh_namespace: str) -> None:
    started = apply_shop(mesh_operator, mesh_namespace)

    def all_ready() -> bool:
        items = json.loads(
            mesh_operator.cluster.kubectl(
                "get", "natsservices,natsroutes", "-n", mesh_namespace, "-o", "json"
            ).stdout
        )["items"]
        ready = [
            any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in i.get("status", {}).get("conditions", [])
            )
            for i in items
        ]
        return len(items) == len(SERVICES) + 2 and all(ready)

    mesh_operator.wait_for("the shop Ready", all_ready, timeout=5.0)
    elapsed = time.monotonic() - started
    assert elapsed <= 5.0
    orders = mesh_operator.get("natsservice", "orders", mesh_namespace)
    assert orders["status"]["subject"] == f"mesh.{mesh_namespace}.orders.v1"
    assert orders["status"]["observedGeneration"] == orders["metadata"]["generation"]
    conditions = {c["type"]: c for c in orders["status"]["conditions"]}
    assert set(conditions) == {
        "Ready",
        "CredentialsReady",
        "StreamsReady",
        "RoutesReady",
        "CallersResolved",
    }
    # The example's caller from another namespace (analytics/reports) is not
    # deployed here: orders is Ready and says that grant admits nobody yet.
    callers = conditions["CallersResolved"]
    assert (callers["status"], callers["reason"]) == ("False", "UnknownCaller")
    assert "analytics/reports" in callers["message"]
    for c in conditions.values():
        assert c["reason"]
        assert c["lastTransitionTime"]
    route = mesh_operator.get("natsroute", "orders", mesh_namespace)
    assert route["status"]["ruleCount"] == len(route["spec"]["rules"])


def test_creds_secrets_are_owned_labelled_and_readonly_data(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    apply_shop(mesh_operator, mesh_namespace)
    seeds = []
    for name in SERVICES:
        mesh_operator.wait_ready("natsservice", name, mesh_namespace)
        secret = mesh_operator.get("secret", f"natsmesh-{name}-creds", mesh_namespace)
        owner = secret["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "NatsService"
        assert owner["name"] == name
        assert secret["metadata"]["labels"]["natsmesh.io/creds"] == "true"
        creds = base64.b64decode(secret["data"]["user.creds"]).decode()
        assert "-----BEGIN NATS USER JWT-----" in creds
        assert "-----BEGIN USER NKEY SEED-----" in creds
        seeds.append(creds.split("-----BEGIN USER NKEY SEED-----")[1].split()[0])
    # Seeds never reach the operator's log.
    log = mesh_operator.tail(1_000_000)
    assert all(seed.startswith("SU") and seed not in log for seed in seeds)


async def _violations(nc_errors: list[Exception]) -> list[str]:
    return [str(e) for e in nc_errors if "permissions violation" in str(e).lower()]


def jwt_claims(creds: str) -> dict[str, Any]:
    token, _ = jwt.parse_creds(creds)
    return dict(jwt.decode(token, verify_signature=False).claims)


async def connect(
    op: OperatorProcess, namespace: str, service: str, errors: list[Exception]
) -> NATS:
    """Connect as a service's sidecar would: its creds, its own inbox prefix."""

    async def on_error(e: Exception) -> None:
        errors.append(e)

    return await connect_creds(
        op.nats.url,
        creds_of(op, namespace, service),
        error_cb=on_error,
        inbox_prefix=subjects.inbox_prefix(service),
    )


async def test_users_from_secrets_can_call_exactly_what_is_allowed(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns = mesh_namespace
    apply_shop(mesh_operator, ns)
    for name in SERVICES:
        mesh_operator.wait_ready("natsservice", name, ns)
    errors: list[Exception] = []
    gateway = await connect(mesh_operator, ns, "gateway", errors)
    orders = await connect(mesh_operator, ns, "orders", errors)
    payments = await connect(mesh_operator, ns, "payments", errors)
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(b"ok")

        # Each serves exactly what its JWT (from its Secret) lets it hear.
        for nc, name in ((orders, "orders"), (payments, "payments"), (gateway, "gateway")):
            sub_allow = jwt_claims(creds_of(mesh_operator, ns, name))["nats"]["sub"]["allow"]
            for subject, queue in subjects.serve_subjects(
                tuple(sub_allow), subjects.request_subject(ns, name)
            ):
                await nc.subscribe(subject, queue=queue, cb=answer)
        await asyncio.sleep(0.2)
        # Allowed: gateway -> orders, orders -> payments.
        assert (await gateway.request(call(ns, "orders", ns, "gateway"), b"", timeout=2)).data == (
            b"ok"
        )
        assert (await orders.request(call(ns, "payments", ns, "orders"), b"", timeout=2)).data == (
            b"ok"
        )
        # Not admitted: nobody listens to these callers (no responders, at once).
        for caller, name, target in (
            (gateway, "gateway", "payments"),
            (orders, "orders", "gateway"),
            (payments, "payments", "orders"),
        ):
            with pytest.raises(nats.errors.NoRespondersError):
                await caller.request(call(ns, target, ns, name), b"", timeout=2)
        # Naming another caller: the server refuses the publish.
        await payments.publish(call(ns, "orders", ns, "gateway"), b"", reply=payments.new_inbox())
        await asyncio.sleep(0.3)
        assert len(await _violations(errors)) >= 1
        # Cannot listen in on another service's callers either.
        before = len(await _violations(errors))
        await gateway.subscribe(subjects.serve_subject(ns, "orders", "v1", ns, "*"), queue="orders")
        await asyncio.sleep(0.3)
        assert len(await _violations(errors)) > before
    finally:
        for nc in (gateway, orders, payments):
            await nc.close()
