"""Service hijack inside a namespace (issue 12, item 2): the first claimant owns a subject.

The attacker may create NatsServices in the namespace and names one ``aaa``
with ``spec.service: orders`` -- before, the alphabetically first resource
took ``mesh.<ns>.orders.v1`` and the real ``orders`` got SubjectConflict.
Now the validating webhook refuses the claim (create or update) naming the
owner, and if the claim gets in while the webhook is down, the mesh pass
still gives the subject, the NATS user and the creds to the resource created
first. Beside each attack, the legitimate resource keeps working and a
legitimate second version of the service is accepted.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from natsmesh_operator.wiring.desired import ServiceIntent
from natsmesh_operator.wiring.plan import plan
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.timeout(180)


def service(name: str, app: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "natsmesh.io/v1alpha1",
            "kind": "NatsService",
            "metadata": {"name": name},
            # Selectors apart from orders', so only the subject claim is at stake.
            "spec": {"selector": {"matchLabels": {"app": app}}, "port": 8080, **spec},
        }
    )


def exists(op: OperatorProcess, kind: str, name: str, namespace: str) -> bool:
    return op.cluster.kubectl("get", kind, name, "-n", namespace, check=False).returncode == 0


def orders_keeps_its_subject(op: OperatorProcess, ns: str) -> dict[str, Any]:
    op.wait_ready("natsservice", "orders", ns)
    orders = op.get("natsservice", "orders", ns)
    assert orders["status"]["subject"] == f"mesh.{ns}.orders.v1"
    assert exists(op, "secret", "natsmesh-orders-creds", ns)
    return orders


def test_a_later_claim_on_a_subject_is_refused_naming_the_owner(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns, kubectl = mesh_operator, mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=service("orders", "orders"))
    orders_keeps_its_subject(op, ns)

    refused = kubectl(
        "apply", "-n", ns, "-f", "-", input=service("aaa", "evil", service="orders"), check=False
    )
    assert refused.returncode != 0
    assert "already claimed by NatsService 'orders'" in refused.stderr
    assert f"mesh.{ns}.orders.v1" in refused.stderr
    assert not exists(op, "natsservice", "aaa", ns)

    # In by another name first, then moved onto the subject: refused too.
    kubectl("apply", "-n", ns, "-f", "-", input=service("bbb", "evil"))
    op.wait_ready("natsservice", "bbb", ns)
    moved = kubectl(
        "patch",
        "natsservice",
        "bbb",
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"service": "orders"}}),
        check=False,
    )
    assert moved.returncode != 0
    assert "already claimed by NatsService 'orders'" in moved.stderr
    assert "service" not in op.get("natsservice", "bbb", ns)["spec"]

    # Legitimate: another version of orders is a subset, not a claim.
    kubectl(
        "apply",
        "-n",
        ns,
        "-f",
        "-",
        input=service("orders-v2", "orders-v2", service="orders", version="v2"),
    )
    op.wait_ready("natsservice", "orders-v2", ns)
    orders_keeps_its_subject(op, ns)


def test_a_claim_that_got_in_while_the_webhook_was_down_takes_nothing(
    mesh_operator: OperatorProcess, mesh_namespace: str
) -> None:
    op, ns, kubectl = mesh_operator, mesh_namespace, mesh_operator.cluster.kubectl
    kubectl("apply", "-n", ns, "-f", "-", input=service("orders", "orders"))
    before = orders_keeps_its_subject(op, ns)
    creds_before = op.get("secret", "natsmesh-orders-creds", ns)["data"]

    # The webhook is down (failurePolicy Ignore here): the API server lets it in.
    op.stop()
    try:
        kubectl("apply", "-n", ns, "-f", "-", input=service("aaa", "evil", service="orders"))
    finally:
        op.start()

    # The later claimant is marked and gets no NATS user, no creds.
    op.wait_for(
        "aaa marked SubjectConflict",
        lambda: op.condition("natsservice", "aaa", ns).get("reason") == "SubjectConflict",
    )
    ready = op.condition("natsservice", "aaa", ns)
    assert ready["status"] == "False"
    assert "NatsService orders" in ready["message"]
    assert not exists(op, "secret", "natsmesh-aaa-creds", ns)
    # The owner keeps the subject and the very same creds (no re-issue).
    after = orders_keeps_its_subject(op, ns)
    assert after["status"]["user"] == before["status"]["user"]
    assert op.get("secret", "natsmesh-orders-creds", ns)["data"] == creds_before
    # Still refused on any edit while orders owns the subject.
    relabel = kubectl(
        "patch",
        "natsservice",
        "aaa",
        "-n",
        ns,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"port": 8081}}),
        check=False,
    )
    assert relabel.returncode != 0
    assert "already claimed by NatsService 'orders'" in relabel.stderr
    # Metadata updates still pass (kopf's finalizer went on), so it can be deleted.
    assert op.get("natsservice", "aaa", ns)["metadata"].get("finalizers")
    kubectl("delete", "natsservice", "aaa", "-n", ns, "--timeout=30s")
    orders_keeps_its_subject(op, ns)


def test_the_plan_gives_a_bypassing_claim_nothing() -> None:
    # The webhook bypassed entirely: the pass alone decides, by creation order.
    orders = ServiceIntent(
        "shop", "orders", resource="orders", created="2026-01-01T00:00:00Z", uid="f"
    )
    aaa = ServiceIntent("shop", "orders", resource="aaa", created="2026-01-01T00:00:09Z", uid="0")
    mesh = plan([aaa, orders])
    (user,) = mesh.users
    assert user.resource == "orders"
    # Only orders subscribes to its inbox; aaa has no user at all.
    assert any(s.startswith("mesh.shop.orders.v1.") for s in user.permissions.sub_allow)
    with pytest.raises(KeyError):
        mesh.user("shop", "aaa")
    (problem,) = mesh.problems_for("NatsService", "shop", "aaa")
    assert problem.reason == "SubjectConflict"
    assert "NatsService orders" in problem.message
    # Legitimate: alone, aaa serving its own name is fine.
    assert (
        plan([orders, ServiceIntent("shop", "aaa", created="2026-01-01T00:00:09Z")]).problems == ()
    )
