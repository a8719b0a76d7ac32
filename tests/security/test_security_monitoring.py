"""NATS monitoring (issue 11, item 5): no per-user auth detail for other pods.

The attack: any pod fetches ``/connz?auth=1&subs=detail`` (every user's JWT,
account and inbox prefix), ``/accountz`` and ``/jsz`` from port 8222.
nats-server has no setting that hides the auth detail or puts the monitoring
endpoint behind authentication, so by default the chart binds the listener to
the pod's loopback (``nats.monitoring.expose=false``).

One host has one loopback, so "another pod" is played by another address:
the chart's ``0.0.0.0`` listeners are started on 127.0.0.2 (the pod's IP, as
other pods reach it) and its ``127.0.0.1`` listeners stay on 127.0.0.1 (the
pod's own loopback, where the exec probes run). Linux accepts a connection to
127.0.0.2 only on a socket bound to it or to 0.0.0.0, as a pod IP does. The
control (``expose=true``) shows the same fetch from the pod address does
return the JWTs, so the refusal is the binding, not the test.

The legitimate paths beside it: the probes' exact URLs (from the rendered
StatefulSet) answer on the loopback, and the operator reads server state over
NATS as the system account, which a tenant cannot do.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from natsmesh_operator.wiring import bootstrap, jwt
from natsmesh_operator.wiring.apply import Applier, admin_creds, connect_creds
from natsmesh_operator.wiring.keys import KeyRing
from natsmesh_operator.wiring.plan import plan
from tests.fixtures.nats_operator import shop_intents
from tests.unit.chart import local_nats
from tests.unit.chart.render import render

POD_IP = "127.0.0.2"
TENANT = "shop"


@dataclass
class MonitoredServer:
    pod: local_nats.LocalPod
    boot: bootstrap.Bootstrap
    keyring: KeyRing
    nats: local_nats.RenderedNats

    def fetch(self, host: str, path: str) -> Any:
        with urllib.request.urlopen(f"http://{host}:{self.pod.monitor_port}{path}", timeout=3) as r:
            return json.load(r)

    async def tenant(self) -> NATS:
        """A tenant user, connected through the pod address as a sidecar would be."""
        async with Applier(
            url=self.pod.url,
            signer=self.boot.signing_key,
            system_creds=self.boot.system_user_creds,
            keyring=self.keyring,
        ) as a:
            token = jwt.encode(a.account_jwt_claims(plan(shop_intents(TENANT)), TENANT), a.signer)
            await a.push_account(token)
        return await connect_creds(self.pod.url, admin_creds(self.keyring.account(TENANT)))


@contextlib.contextmanager
def _server(workdir: Path, values: dict[str, Any]) -> Iterator[MonitoredServer]:
    # One server is enough: the monitoring line is the same at any size.
    values = {**values, "nats": {**values.get("nats", {}), "replicas": 1}}
    rendered = local_nats.rendered(values)
    boot = bootstrap.create_or_load(workdir / "bootstrap", resolver_dir=str(workdir / "unused"))

    def resolver_conf(pod_dir: Path) -> str:
        return replace(boot, resolver_dir=str(pod_dir / "data" / "resolver")).auth_conf()

    (pod,) = local_nats.materialise(rendered, workdir, resolver_conf, pod_ip=POD_IP)
    with local_nats.running([pod]):
        yield MonitoredServer(pod, boot, KeyRing(), rendered)


@pytest.fixture
def default_server(tmp_path: Path) -> Iterator[MonitoredServer]:
    with _server(tmp_path, {}) as server:
        yield server


@pytest.fixture
def exposed_server(tmp_path: Path) -> Iterator[MonitoredServer]:
    with _server(tmp_path, {"nats": {"monitoring": {"expose": True}}}) as server:
        yield server


@pytest.fixture
async def tenant_of_default(default_server: MonitoredServer) -> AsyncIterator[NATS]:
    nc = await default_server.tenant()
    try:
        yield nc
    finally:
        await nc.close()


def _jwts_in(connz: dict[str, Any]) -> list[str]:
    return [c["jwt"] for c in connz.get("connections", []) if c.get("jwt")]


async def test_other_pods_cannot_reach_monitoring_by_default(
    default_server: MonitoredServer, tenant_of_default: NATS
) -> None:
    await tenant_of_default.flush()
    with pytest.raises(urllib.error.URLError) as refused:
        default_server.fetch(POD_IP, "/connz?auth=1&subs=detail")
    assert isinstance(refused.value.reason, ConnectionRefusedError), refused.value
    for path in ("/accountz", "/jsz?accounts=true", "/varz"):
        with pytest.raises(urllib.error.URLError):
            default_server.fetch(POD_IP, path)
    # Inside the pod the same endpoint does hold the secrets worth hiding.
    assert _jwts_in(default_server.fetch("127.0.0.1", "/connz?auth=1"))
    # And the NATS clients still reach the pod address.
    assert tenant_of_default.is_connected
    assert tenant_of_default.connected_url is not None
    assert tenant_of_default.connected_url.hostname == POD_IP


def test_the_probes_answer_on_the_pod_loopback(default_server: MonitoredServer) -> None:
    paths = default_server.nats.probe_url_paths()
    assert set(paths) == {"startupProbe", "livenessProbe", "readinessProbe"}
    for probe, path in paths.items():
        assert default_server.fetch("127.0.0.1", path) == {"status": "ok"}, probe


async def test_the_operator_reads_server_state_as_the_system_account_a_tenant_only_its_own(
    default_server: MonitoredServer, tenant_of_default: NATS
) -> None:
    """What replaces scraping 8222 for the operator: $SYS requests with the system creds.

    nats-server maps a tenant's ``$SYS.REQ.SERVER.PING.CONNZ`` to its own
    account's connections, so a tenant learns nothing about the others.
    """
    system = await connect_creds(default_server.pod.url, default_server.boot.system_user_creds)
    try:
        reply = await system.request("$SYS.REQ.SERVER.PING.CONNZ", b'{"auth": true}', timeout=3)
        everyone = json.loads(reply.data)["data"]["connections"]
        tenant_account = default_server.keyring.account(TENANT).public
        system_account = default_server.boot.system_account.public
        assert {c.get("account") for c in everyone} >= {tenant_account, system_account}
        reply = await tenant_of_default.request(
            "$SYS.REQ.SERVER.PING.CONNZ", b'{"auth": true}', timeout=3
        )
        own = json.loads(reply.data)["data"]["connections"]
        assert own, "the tenant sees at least its own connection"
        assert {c.get("account") for c in own} == {tenant_account}, own
    finally:
        await system.close()


async def test_control_exposed_monitoring_serves_every_jwt_to_the_pod_address(
    exposed_server: MonitoredServer,
) -> None:
    """``nats.monitoring.expose=true``: reachable from other pods, so only the
    NetworkPolicy (operator and Prometheus only) stands between them and the JWTs."""
    nc = await exposed_server.tenant()
    try:
        await nc.flush()
        assert _jwts_in(exposed_server.fetch(POD_IP, "/connz?auth=1&subs=detail"))
    finally:
        await nc.close()
    policy = render({"nats": {"monitoring": {"expose": True}}}).get(
        "NetworkPolicy", local_nats.NATS
    )
    (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "monitor"]
    assert len(rule["from"]) == 2  # the operator's pods and Prometheus', nothing else
