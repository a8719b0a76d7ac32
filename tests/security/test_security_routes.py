"""Cluster routes (issue 11, item 3): only the chart's own NATS servers may join.

The attack: port 6222 is reachable from a pod; a raw TCP client sends a route
``CONNECT`` and, once accepted, is told every account's interest (``RS+``),
asks for everything (``RS+ <account> >``) and receives other tenants' messages
(``RMSG``). Here three real nats-servers in operator mode run the chart's
rendered configuration: nats.conf from the ConfigMap, routes.conf from the
route credentials Secret, the route TLS Secret (tests/unit/chart/local_nats.py
lays each out like a pod's mounts). The legitimate path beside each attack: the
three form one cluster and a tenant's message published on one server reaches
a subscriber on another.

Each refusal is checked against a control that uses the real credentials
and certificate through the same raw client: it receives ``RS+`` and the
tenant's ``RMSG``. So a refusal here means the credentials were refused, not
that the raw client could not speak the route protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
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

TENANT = "shop"
SUBJECT = f"mesh.{TENANT}.payments.v1"
SECRET = b"card=4111-1111-1111-1111"
ROUTE_TIMEOUT = 15.0


@dataclass
class ChartCluster:
    nats: local_nats.RenderedNats
    pods: list[local_nats.LocalPod]
    boot: bootstrap.Bootstrap
    keyring: KeyRing
    workdir: Path

    @property
    def cluster_name(self) -> str:
        return local_nats.NATS

    def route_port(self, i: int = 0) -> int:
        return self.pods[i].route_port

    def tenant_account(self) -> str:
        return self.keyring.account(TENANT).public

    async def push_tenant_account(self) -> None:
        """The tenant's account JWT, as the operator's code builds it, pushed to the cluster."""
        applier = Applier(
            url=self.pods[0].url,
            signer=self.boot.signing_key,
            system_creds=self.boot.system_user_creds,
            keyring=self.keyring,
        )
        async with applier as a:
            token = jwt.encode(a.account_jwt_claims(plan(shop_intents(TENANT)), TENANT), a.signer)
            await a.push_account(token)

    async def tenant(self, i: int) -> NATS:
        """A user of the tenant's account (the operator's own admin user) on server ``i``."""
        creds = admin_creds(self.keyring.account(TENANT))
        # Until the full resolver has the pushed JWT on server i, it refuses the user.
        deadline = time.monotonic() + ROUTE_TIMEOUT
        while True:
            try:
                return await connect_creds(self.pods[i].url, creds)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def _wait_for_full_mesh(pods: list[local_nats.LocalPod]) -> None:
    deadline = time.monotonic() + ROUTE_TIMEOUT
    seen: list[set[str]] = []
    while time.monotonic() < deadline:
        seen = [{r.get("remote_name", "") for r in p.monitor("/routez")["routes"]} for p in pods]
        if all(s == {q.name for q in pods if q is not p} for p, s in zip(pods, seen, strict=True)):
            return
        time.sleep(0.1)
    raise AssertionError(f"the three servers did not route to each other: {seen}")


@contextlib.contextmanager
def _chart_cluster(workdir: Path, values: dict[str, Any]) -> Iterator[ChartCluster]:
    nats = local_nats.rendered(values)
    assert nats.replicas == 3
    boot = bootstrap.create_or_load(workdir / "bootstrap", resolver_dir=str(workdir / "unused"))

    def resolver_conf(pod_dir: Path) -> str:
        return replace(boot, resolver_dir=str(pod_dir / "data" / "resolver")).auth_conf()

    pods = local_nats.materialise(nats, workdir, resolver_conf)
    with local_nats.running(pods):
        _wait_for_full_mesh(pods)
        yield ChartCluster(nats, pods, boot, KeyRing(), workdir)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartCluster]:
    """The chart's defaults: route credentials and mutual route TLS (chart CA)."""
    with _chart_cluster(tmp_path_factory.mktemp("routes-tls"), {}) as cluster:
        assert cluster.nats.tls is not None
        yield cluster


@pytest.fixture(scope="module")
def plain_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartCluster]:
    """``nats.cluster.tls.enabled=false``: the route credentials are the only guard."""
    values = {"nats": {"cluster": {"tls": {"enabled": False}}}}
    with _chart_cluster(tmp_path_factory.mktemp("routes-plain"), values) as cluster:
        assert cluster.nats.tls is None
        yield cluster


# ---------------------------------------------------------------- a raw route


def _route_credentials(cluster: ChartCluster) -> dict[str, str]:
    """The route user and password from the chart's Secret."""
    user, password = cluster.nats.route_user, cluster.nats.route_password
    assert user
    assert password
    return {"user": user, "pass": password}


def _connect(cluster: ChartCluster, **auth: str) -> dict[str, Any]:
    """A route CONNECT as nats-server sends one (no "lang": that marks a client)."""
    return {
        "echo": True,
        "verbose": False,
        "pedantic": False,
        "tls_required": cluster.nats.tls is not None,
        "name": "NATTACKERATTACKERATTACKERATTACKERATTACKERATTACKERATTACK",
        "cluster": cluster.cluster_name,
        "headers": True,
        "lnoc": True,
        **auth,
    }


@dataclass
class RouteAttempt:
    received: bytes
    error: str | None

    @property
    def interest(self) -> bool:
        return b"RS+" in self.received

    @property
    def messages(self) -> bool:
        return b"RMSG" in self.received

    def assert_learned_nothing(self) -> None:
        assert not self.interest, self.received[-500:]
        assert not self.messages, self.received[-500:]

    def assert_got_the_tenant_traffic(self) -> None:
        assert self.interest, self
        assert self.messages, self.received[-500:]
        assert SECRET in self.received, self.received[-500:]


async def raw_route(
    cluster: ChartCluster,
    connect: dict[str, Any],
    publish: Callable[[], Awaitable[None]],
    ssl_context: ssl.SSLContext | None = None,
    *,
    within: float = 3.0,
) -> RouteAttempt:
    """Join server 0 as a route, ask for all of the tenant's subjects, and listen.

    ``publish`` is called every 50 ms (a tenant sending on another server) until
    an RMSG arrives, the server closes the connection, or ``within`` passes.
    """
    received = b""
    error: str | None = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                cluster.route_port(0),
                ssl=ssl_context,
                server_hostname="" if ssl_context else None,
            ),
            timeout=3,
        )
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        return RouteAttempt(b"", f"{type(exc).__name__}: {exc}")
    info = {"id": connect["name"], "cluster": cluster.cluster_name, "headers": True}
    writer.write(
        b"CONNECT " + json.dumps(connect).encode() + b"\r\n"
        b"INFO " + json.dumps(info).encode() + b"\r\n"
        b"PING\r\n"
        b"RS+ " + cluster.tenant_account().encode() + b" >\r\n"
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    try:
        await writer.drain()
        while loop.time() < deadline and b"RMSG" not in received:
            await publish()
            try:
                chunk = await asyncio.wait_for(reader.read(65536), timeout=0.05)
            except TimeoutError:
                continue
            if not chunk:
                break  # closed by the server
            received += chunk
    except (OSError, ssl.SSLError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return RouteAttempt(received, error)


@contextlib.asynccontextmanager
async def tenant_traffic(cluster: ChartCluster) -> Any:
    """A tenant publishing on server 0 (the one attacked) to a subscriber on server 2."""
    await cluster.push_tenant_account()
    subscriber = await cluster.tenant(2)
    publisher = await cluster.tenant(0)
    got: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        got.append(msg.data)

    await subscriber.subscribe(SUBJECT, cb=on_msg)
    await subscriber.flush()

    async def publish() -> None:
        await publisher.publish(SUBJECT, SECRET)

    try:
        yield publish, got
    finally:
        await subscriber.close()
        await publisher.close()


async def delivered(publish: Callable[[], Awaitable[None]], got: list[bytes]) -> None:
    """The legitimate path: the tenant's message crosses the routes to server 2."""
    deadline = time.monotonic() + ROUTE_TIMEOUT
    while SECRET not in got and time.monotonic() < deadline:
        await publish()
        await asyncio.sleep(0.05)
    assert SECRET in got, "a message published on server 0 never reached server 2"


def _tls_context(cluster: ChartCluster, *, with_cert: bool) -> ssl.SSLContext:
    assert cluster.nats.tls is not None
    ctx = ssl.create_default_context(cadata=cluster.nats.tls["ca.crt"].decode())
    ctx.check_hostname = False  # dialled by IP; the chain is still verified
    if with_cert:
        cert, key = cluster.workdir / "client.crt", cluster.workdir / "client.key"
        cert.write_bytes(cluster.nats.tls["tls.crt"])
        key.write_bytes(cluster.nats.tls["tls.key"])
        ctx.load_cert_chain(cert, key)
    return ctx


def _foreign_cert_context(cluster: ChartCluster) -> ssl.SSLContext:
    """A client certificate for the pods' DNS names, but from a CA the chart did not make."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{local_nats.HEADLESS}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"*.{local_nats.HEADLESS}")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = cluster.workdir / "foreign.crt", cluster.workdir / "foreign.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = _tls_context(cluster, with_cert=False)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("which", ["tls_cluster", "plain_cluster"])
async def test_the_chart_servers_form_one_cluster(
    which: str, request: pytest.FixtureRequest
) -> None:
    """The legitimate path: the routes authenticate, and a tenant's message crosses them."""
    cluster: ChartCluster = request.getfixturevalue(which)
    for pod in cluster.pods:
        routes = pod.monitor("/routez")["routes"]
        assert {r["remote_name"] for r in routes} == {p.name for p in cluster.pods if p is not pod}
    async with tenant_traffic(cluster) as (publish, got):
        await delivered(publish, got)


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"user": "natsmesh-route"},
        {"user": "natsmesh-route", "pass": "guessed"},
        {"user": "route", "pass": ""},
    ],
    ids=["no-credentials", "user-only", "wrong-password", "wrong-user"],
)
async def test_a_route_without_the_credentials_is_refused(
    plain_cluster: ChartCluster, auth: dict[str, str]
) -> None:
    async with tenant_traffic(plain_cluster) as (publish, got):
        attempt = await raw_route(plain_cluster, _connect(plain_cluster, **auth), publish)
        assert b"-ERR 'Authorization Violation'" in attempt.received, attempt
        attempt.assert_learned_nothing()
        # The tenant's own delivery still works beside the attack.
        await delivered(publish, got)


async def test_control_the_generated_route_credentials_let_a_raw_route_in(
    plain_cluster: ChartCluster,
) -> None:
    """What the attack reaches with the Secret's credentials: why they must stay secret."""
    auth = _route_credentials(plain_cluster)
    async with tenant_traffic(plain_cluster) as (publish, _):
        attempt = await raw_route(plain_cluster, _connect(plain_cluster, **auth), publish)
    attempt.assert_got_the_tenant_traffic()


async def test_with_route_tls_plaintext_gets_nothing_even_with_the_password(
    tls_cluster: ChartCluster,
) -> None:
    auth = _route_credentials(tls_cluster)
    async with tenant_traffic(tls_cluster) as (publish, got):
        attempt = await raw_route(tls_cluster, _connect(tls_cluster, **auth), publish)
        attempt.assert_learned_nothing()
        # Not even the server's INFO: with TLS on the routes, the handshake comes first.
        assert b"INFO" not in attempt.received, attempt
        await delivered(publish, got)


@pytest.mark.parametrize("cert", ["no-client-cert", "foreign-ca"])
async def test_with_route_tls_a_client_without_the_chart_certificate_is_refused(
    tls_cluster: ChartCluster, cert: str
) -> None:
    auth = _route_credentials(tls_cluster)
    if cert == "no-client-cert":
        ctx = _tls_context(tls_cluster, with_cert=False)
    else:
        ctx = _foreign_cert_context(tls_cluster)
    async with tenant_traffic(tls_cluster) as (publish, got):
        attempt = await raw_route(tls_cluster, _connect(tls_cluster, **auth), publish, ctx)
        assert attempt.error is not None or not attempt.received, attempt
        attempt.assert_learned_nothing()
        await delivered(publish, got)


async def test_with_route_tls_the_certificate_alone_is_not_enough(
    tls_cluster: ChartCluster,
) -> None:
    """Both layers hold on their own: the chart's certificate with a wrong password fails."""
    auth = {"user": "natsmesh-route", "pass": "guessed"}
    ctx = _tls_context(tls_cluster, with_cert=True)
    async with tenant_traffic(tls_cluster) as (publish, _):
        attempt = await raw_route(tls_cluster, _connect(tls_cluster, **auth), publish, ctx)
    assert b"-ERR 'Authorization Violation'" in attempt.received, attempt
    attempt.assert_learned_nothing()


async def test_control_with_route_tls_certificate_and_credentials_get_in(
    tls_cluster: ChartCluster,
) -> None:
    auth = _route_credentials(tls_cluster)
    ctx = _tls_context(tls_cluster, with_cert=True)
    async with tenant_traffic(tls_cluster) as (publish, _):
        attempt = await raw_route(tls_cluster, _connect(tls_cluster, **auth), publish, ctx)
    attempt.assert_got_the_tenant_traffic()
