"""The admission webhook answers only the API server, fails closed, and tells nothing extra.

Real TLS sockets on 127.0.0.1, a real API server for the NatsServices the
webhook reads. The attacker is any pod that can reach the webhook port and
forges AdmissionReviews: without a client certificate from the configured CA
its handshake is refused; with a certificate from another CA too; with the
right CA but a name not allowed, 403. The API server's identity (a client
certificate, as kube-apiserver presents when its admission configuration says
so) gets real answers. Beside that: an internal error refuses (never "allowed,
with a warning"), a pod two NatsServices select is refused rather than given
the alphabetically first one's creds, and set-based selectors that can select
one pod are refused by the API server through the operator's validating
webhook.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from lightkube import AsyncClient, KubeConfig

from natsmesh_operator.handlers import kube as kube_mod
from natsmesh_operator.webhook.certgen import make_ca_and_cert, make_client_certs
from natsmesh_operator.webhook.inject import InjectionSettings
from natsmesh_operator.webhook.server import ClientIdentity, WebhookServer
from natsmesh_operator.webhook.tls import ServingCert
from tests.fixtures import admission
from tests.fixtures.cluster import Cluster, fresh_namespace
from tests.fixtures.nats_server import free_port
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.timeout(120)

API_SERVER_NAME = "kube-apiserver-webhook-client"


@dataclass
class Bed:
    port: int
    server_ca: Path
    apiserver: ServingCert
    stranger: ServingCert
    """A client certificate from a CA the webhook does not trust."""
    impostor: ServingCert
    """From the trusted CA, under a name the webhook does not accept."""
    namespace: str
    cluster: Cluster


def service(name: str, selector: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "natsmesh.io/v1alpha1",
            "kind": "NatsService",
            "metadata": {"name": name},
            "spec": {"selector": selector, "port": 8080},
        }
    )


async def post(
    port: int, path: str, body: bytes, server_ca: Path, client: ServingCert | None
) -> tuple[int, dict[str, Any] | None]:
    """POST over TLS; (HTTP status, AdmissionReview response or None)."""
    ctx = ssl.create_default_context(cafile=str(server_ca))
    if client is not None:
        ctx.load_cert_chain(str(client.certfile), str(client.keyfile))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(admission.request(path, body))
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    status, payload = admission.answer(raw)
    if status != 200:
        return status, None
    answer: dict[str, Any] = json.loads(payload)["response"]
    return status, answer


@pytest.fixture
def namespace_with_services(crds: Cluster) -> Iterator[str]:
    # A namespace no test operator watches: its validating webhook lets the
    # overlapping pair in, as if it had been down.
    with fresh_namespace(crds, "wh") as ns:
        crds.kubectl(
            "apply", "-n", ns, "-f", "-", input=service("zeta", {"matchLabels": {"app": "orders"}})
        )
        crds.kubectl(
            "apply",
            "-n",
            ns,
            "-f",
            "-",
            input=service(
                "alpha",
                {
                    "matchExpressions": [
                        {"key": "app", "operator": "In", "values": ["orders"]},
                        {"key": "track", "operator": "Exists"},
                    ]
                },
            ),
        )
        yield ns


@pytest.fixture
async def bed(crds: Cluster, namespace_with_services: str, tmp_path: Path) -> AsyncIterator[Bed]:
    serving = make_ca_and_cert(tmp_path / "tls", ["127.0.0.1"])
    # The impostor's certificate comes from the trusted CA, under another name.
    apiserver, impostor = make_client_certs(
        tmp_path / "apiserver", [API_SERVER_NAME, "system:serviceaccount:evil:pod"]
    )
    (stranger,) = make_client_certs(tmp_path / "stranger", [API_SERVER_NAME], ca_name="evil")
    kube = AsyncClient(config=KubeConfig.from_file(str(crds.kubeconfig)))
    port = free_port()
    server = WebhookServer(
        services_of=lambda ns: kube_mod.namespace_services(kube, ns),
        injection=InjectionSettings(),
        operator_namespace="natsmesh-system",
        cert=serving,
        client=ClientIdentity(apiserver.cafile, [API_SERVER_NAME]),
        addr="127.0.0.1",
        port=port,
    )
    await server.start()
    try:
        yield Bed(
            port, serving.cafile, apiserver, stranger, impostor, namespace_with_services, crds
        )
    finally:
        await server.stop()
        await kube.close()


async def test_forged_reviews_are_refused_and_the_api_server_is_answered(bed: Bed) -> None:
    forged = admission.review("Pod", bed.namespace, admission.pod({"app": "orders"}))
    # No certificate: refused in the handshake, before any review is read.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await post(bed.port, "/inject", forged, bed.server_ca, None)
    # A certificate from a CA the webhook does not trust: refused likewise.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await post(bed.port, "/validate", forged, bed.server_ca, bed.stranger)
    # The trusted CA, but not the API server's name: 403, no review read.
    status, answer = await post(bed.port, "/inject", forged, bed.server_ca, bed.impostor)
    assert (status, answer) == (403, None)

    # The API server: real answers. A pod only "zeta" selects gets zeta's sidecar.
    status, answer = await post(
        bed.port,
        "/inject",
        admission.review("Pod", bed.namespace, admission.pod({"app": "orders"})),
        bed.server_ca,
        bed.apiserver,
    )
    assert status == 200
    assert answer is not None
    assert answer["allowed"] is True
    assert "patch" in answer
    # A pod nobody selects: allowed untouched, and nothing about the others.
    status, answer = await post(
        bed.port,
        "/inject",
        admission.review("Pod", bed.namespace, admission.pod({"app": "web"})),
        bed.server_ca,
        bed.apiserver,
    )
    assert answer is not None
    assert answer == {"uid": answer["uid"], "allowed": True}


async def test_a_pod_two_services_select_is_refused_not_given_the_first_ones_creds(
    bed: Bed,
) -> None:
    # "alpha" sorts first and would have won: both select app=orders,track=*.
    status, answer = await post(
        bed.port,
        "/inject",
        admission.review("Pod", bed.namespace, admission.pod({"app": "orders", "track": "stable"})),
        bed.server_ca,
        bed.apiserver,
    )
    assert status == 200
    assert answer is not None
    assert answer["allowed"] is False
    assert "'alpha', 'zeta'" in answer["status"]["message"]
    assert "patch" not in answer


async def test_internal_errors_fail_closed(crds: Cluster, tmp_path: Path) -> None:
    serving = make_ca_and_cert(tmp_path / "tls", ["127.0.0.1"])
    # A real client to an API server that is not there: every read fails.
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}
                ],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    kube = AsyncClient(config=KubeConfig.from_file(str(dead)), timeout=httpx2.Timeout(2.0))
    port = free_port()
    server = WebhookServer(
        services_of=lambda ns: kube_mod.namespace_services(kube, ns),
        injection=InjectionSettings(),
        operator_namespace="natsmesh-system",
        cert=serving,
        addr="127.0.0.1",
        port=port,
    )
    await server.start()
    try:
        for path, obj, kind in (
            ("/inject", admission.pod({"app": "orders"}), "Pod"),
            ("/validate", json.loads(service("x", {"matchLabels": {"app": "x"}})), "NatsService"),
        ):
            status, answer = await post(
                port, path, admission.review(kind, "shop", obj), serving.cafile, None
            )
            assert status == 200
            assert answer is not None
            assert answer["allowed"] is False, answer
            assert answer["status"]["code"] == 500
            assert "warnings" not in answer
        # Beside it: what needs no read is still answered (opted-out pod).
        opted_out = admission.pod({"app": "orders"})
        opted_out["metadata"]["annotations"] = {"natsmesh.io/inject": "false"}
        status, answer = await post(
            port, "/inject", admission.review("Pod", "shop", opted_out), serving.cafile, None
        )
        assert answer is not None
        assert answer["allowed"] is True
    finally:
        await server.stop()
        await kube.close()


def test_set_based_selectors_that_can_meet_are_refused_by_the_api_server(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    ns, kubectl = mesh_namespace, mesh_operator.cluster.kubectl
    first = {"matchExpressions": [{"key": "app", "operator": "In", "values": ["orders"]}]}
    kubectl("apply", "-n", ns, "-f", "-", input=service("orders", first))
    # Not identical, yet a pod app=orders,tier=web matches both: refused.
    sneaky = {
        "matchExpressions": [
            {"key": "app", "operator": "NotIn", "values": ["payments"]},
            {"key": "tier", "operator": "Exists"},
        ]
    }
    refused = kubectl("apply", "-n", ns, "-f", "-", input=service("aaa", sneaky), check=False)
    assert refused.returncode != 0
    assert "overlaps NatsService 'orders'" in refused.stderr
    # Beside it, a selector that cannot meet the first is accepted and served.
    apart = {
        "matchLabels": {"tier": "web"},
        "matchExpressions": [{"key": "app", "operator": "In", "values": ["payments"]}],
    }
    kubectl("apply", "-n", ns, "-f", "-", input=service("payments", apart))
    mesh_operator.wait_ready("natsservice", "payments", ns)
