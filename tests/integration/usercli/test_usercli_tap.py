"""``natsmesh tap`` as a user runs it, against the real operator, NATS and sidecars.

The real operator (operator-mode NATS, JWTs) issues ``front``'s and
``back``'s creds and the namespace's ``natsmesh-tap`` Secret; ``front`` and
two replicas of ``back`` are real sidecars signing with those creds; the CLI
is a subprocess with only ``KUBECONFIG``. Traffic front -> back is tapped on
both ends at once: back's records are its inbound calls (from both replicas),
front's its outbound ones, with the same request ids.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from natsmesh_sidecar.app import Sidecar
from tests.fixtures.cluster import token_kubeconfig
from tests.fixtures.operator import OperatorProcess
from tests.integration.sidecar.sidecar_harness import TestApp, request, settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SERVICES = """
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: back}
spec:
  selector: {matchLabels: {app: back}}
  port: 8080
---
apiVersion: natsmesh.io/v1alpha1
kind: NatsService
metadata: {name: front}
spec:
  selector: {matchLabels: {app: front}}
  port: 8080
"""


def creds_file(op: OperatorProcess, namespace: str, secret: str, path: Path) -> Path:
    data = op.get("secret", secret, namespace)["data"]
    path.write_bytes(base64.b64decode(data["user.creds"]))
    return path


async def tap(op: OperatorProcess, *args: str, env: dict[str, str] | None = None) -> Any:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "natsmesh_operator.cli",
        "tap",
        *args,
        env=env or op.cluster.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.fixture
async def mesh(
    mesh_operator: OperatorProcess, mesh_namespace: str, tmp_path: Path
) -> AsyncIterator[tuple[OperatorProcess, str, Sidecar, list[Sidecar]]]:
    op, ns = mesh_operator, mesh_namespace
    op.apply(ns, SERVICES)
    for name in ("back", "front"):
        await asyncio.to_thread(op.wait_ready, "natsservice", name, ns)
    await asyncio.to_thread(
        op.wait_for,
        "the tap Secret",
        lambda: (
            op.cluster.kubectl("get", "secret", "natsmesh-tap", "-n", ns, check=False).returncode
            == 0
        ),
    )
    app = await TestApp().start()
    back_creds = creds_file(op, ns, "natsmesh-back-creds", tmp_path / "back.creds")
    front_creds = creds_file(op, ns, "natsmesh-front-creds", tmp_path / "front.creds")
    backs = [
        Sidecar(settings("back", ns, op.nats.url, app.port, creds_file=str(back_creds)))
        for _ in range(2)
    ]
    front = Sidecar(settings("front", ns, op.nats.url, creds_file=str(front_creds)))
    started: list[Sidecar] = []
    try:
        for sidecar in (*backs, front):
            await sidecar.start()
            started.append(sidecar)
            await sidecar.wait_ready()
        yield op, ns, front, backs
    finally:
        for sidecar in started:
            await sidecar.stop()
        await app.stop()


async def test_tap_shows_both_directions_from_every_replica_and_stops(
    mesh: tuple[OperatorProcess, str, Sidecar, list[Sidecar]],
) -> None:
    op, ns, front, backs = mesh
    assert all(s.tap is None for s in (front, *backs))  # nobody taps: nothing installed
    # A CLI killed -9 cannot say stop: its session must lapse by itself.
    killed = await tap(op, "back", "-n", ns)
    await until(lambda: all(s.tap is not None for s in backs), 30)
    killed.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await killed.wait()
    tapped = backs[0].tap
    assert tapped is not None
    (session,) = tapped.sessions
    lapsed = asyncio.create_task(
        until(lambda: all(session not in s._tapper.sessions for s in backs), 30)
    )

    taps = [
        await tap(op, "back", "-n", ns, "-o", "json", "--max", "20", "--duration", "30"),
        await tap(op, "front", "-n", ns, "-o", "json", "--max", "20", "--duration", "30"),
    ]
    text = await tap(op, "front", "-n", ns)  # until Ctrl-C
    # Python and its imports, four at once on a shared box: seconds each.
    await until(lambda: front.tap is not None and len(front.tap.sessions) == 2, 30)
    sent: list[str] = []
    deadline = time.monotonic() + 30
    while any(t.returncode is None for t in taps) and time.monotonic() < deadline:
        resp = await request(
            front.outbound_port,
            "GET",
            "/items/7?token=topsecret",
            host=f"back.{ns}",
            headers=[
                ("authorization", "Bearer topsecret"),
                ("cookie", "s=topsecret"),
                ("idempotency-key", "topsecret"),
                ("x-request-id", f"tap-{len(sent)}"),
            ],
        )
        assert resp.status == 200
        sent.append(f"tap-{len(sent)}")
        await asyncio.sleep(0.03)
    outs = [await t.communicate() for t in taps]
    text.send_signal(signal.SIGINT)  # Ctrl-C: a clean exit, the session stopped
    out, err = await text.communicate()
    assert text.returncode == 0, err.decode()
    assert "request(s) shown from 1 sidecar(s) of front" in err.decode()
    lines = out.decode().splitlines()
    print(err.decode(), *lines[:3], sep="\n")
    assert len(lines) >= 20
    assert all("  out  GET /items/7  200  " in line for line in lines), lines
    assert all(f"front.{ns} -> back.{ns}  rid=tap-" in line for line in lines), lines
    assert b"topsecret" not in out + err
    for t, (out, err) in zip(taps, outs, strict=True):
        assert t.returncode == 0, err.decode()
        assert b"topsecret" not in out + err
    back_records = [json.loads(x) for x in outs[0][0].decode().splitlines()]
    front_records = [json.loads(x) for x in outs[1][0].decode().splitlines()]
    assert len(back_records) == 20
    assert len(front_records) == 20
    assert {(r["direction"], r["source"], r["destination"]) for r in back_records} == {
        ("inbound", f"front.{ns}", f"back.{ns}")
    }
    assert {(r["direction"], r["source"], r["destination"]) for r in front_records} == {
        ("outbound", f"front.{ns}", f"back.{ns}")
    }
    for r in back_records + front_records:
        assert (r["method"], r["path"], r["status"]) == ("GET", "/items/7", 200)
        assert r["latencyMs"] > 0
        assert r["requestId"] in sent
    # Both replicas of back report; the request ids are the same on both ends.
    assert {r["instance"] for r in back_records} == {s.instance_id for s in backs}
    assert {r["requestId"] for r in back_records} & {r["requestId"] for r in front_records}
    assert "from 2 sidecar(s) of back" in outs[0][1].decode()
    # The clean exits said stop (front had only their sessions) ...
    await until(lambda: front.tap is None, 3)
    # ... and the killed CLI's session lapsed within its ttl (renewed at most
    # once more between the sidecars' first record and the kill).
    gone = await lapsed - killed_at
    print(f"killed tap's session lapsed {gone:.1f} s after the kill")
    assert gone <= 11.0
    await until(lambda: all(s.tap is None for s in backs), 3)


async def test_tap_refuses_unknown_services_and_users_without_the_secret(
    mesh_operator: OperatorProcess, mesh_namespace: str, tmp_path: Path
) -> None:
    op, ns = mesh_operator, mesh_namespace
    op.apply(ns, SERVICES)  # the CLI reads the resources: no need to wait for Ready
    unknown = await tap(op, "nosuch", "-n", ns)
    # May see the services, may not read Secrets: may not tap.
    kubectl = op.cluster.kubectl
    kubectl("create", "serviceaccount", "viewer", "-n", ns)
    kubectl("create", "role", "viewer", "-n", ns, "--verb=get,list",
            "--resource=natsservices.natsmesh.io")  # fmt: skip
    kubectl("create", "rolebinding", "viewer", "-n", ns, "--role=viewer",
            f"--serviceaccount={ns}:viewer")  # fmt: skip
    env = op.cluster.env()
    env["KUBECONFIG"] = str(token_kubeconfig(op.cluster, "viewer", ns, tmp_path / "viewer"))
    refused = await tap(op, "back", "-n", ns, env=env)
    _, err = await unknown.communicate()
    assert unknown.returncode == 2
    assert f"no service 'nosuch' in namespace {ns} (services there: back, front)" in err.decode()
    _, err = await refused.communicate()
    assert refused.returncode == 3, err.decode()
    assert f"you may not read Secret {ns}/natsmesh-tap" in err.decode()
    # The namespace's last service gone: its tap Secret goes and its user is revoked.
    await asyncio.to_thread(op.wait_for, "the tap Secret", lambda: tap_creds(op, ns) is not None)
    creds = tap_creds(op, ns)
    assert creds is not None
    assert await op.connects(creds)
    kubectl("delete", "natsservices", "--all", "-n", ns)
    await asyncio.to_thread(op.wait_for, "no tap Secret", lambda: tap_creds(op, ns) is None)
    await op.refused_within(creds, 10)


def tap_creds(op: OperatorProcess, ns: str) -> str | None:
    out = op.cluster.kubectl("get", "secret", "natsmesh-tap", "-n", ns, "-o", "json", check=False)
    if out.returncode != 0:
        return None
    return base64.b64decode(json.loads(out.stdout)["data"]["user.creds"]).decode()


async def until(check: Any, within: float) -> float:
    """Poll ``check`` until true; the monotonic time it became true."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s")
        await asyncio.sleep(0.05)
    return time.monotonic()
