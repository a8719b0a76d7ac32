"""Admission decisions: pod ownership, selector overlap, route warnings, patches, restarts."""

from __future__ import annotations

from typing import Any

import pytest

from natsmesh_operator.api import LabelSelector, NatsRoute, NatsService
from natsmesh_operator.handlers.rollout import wants_restart
from natsmesh_operator.webhook import admission


def svc(name: str, labels: dict[str, str], version: str = "v1", **spec: Any) -> NatsService:
    return NatsService.from_body(
        {
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"selector": {"matchLabels": labels}, "port": 8080, "version": version, **spec},
        }
    )


def sel(labels: dict[str, str], **expr: Any) -> LabelSelector:
    body: dict[str, Any] = {"matchLabels": labels}
    if expr:
        body["matchExpressions"] = [expr]
    return LabelSelector.model_validate(body)


def test_owner_of_picks_the_selecting_service() -> None:
    services = [svc("orders", {"app": "orders"}), svc("payments", {"app": "payments"})]
    owner = admission.owner_of({"app": "payments", "x": "1"}, services)
    assert owner is not None
    assert owner.metadata.name == "payments"
    assert admission.owner_of({"app": "web"}, services) is None


def test_target_uses_mesh_service_name_and_resource_secret() -> None:
    canary = svc("orders-v2", {"app": "orders", "version": "v2"}, version="v2", service="orders")
    target = admission.target_of(canary)
    assert (target.service, target.version, target.creds_secret) == (
        "orders",
        "v2",
        "natsmesh-orders-v2-creds",
    )


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ({"app": "x"}, {"app": "x", "tier": "web"}, True),
        ({"app": "x", "version": "v1"}, {"app": "x", "version": "v2"}, False),
        ({"app": "x"}, {"app": "y"}, False),
        ({"app": "x"}, {"team": "t"}, True),
    ],
)
def test_selectors_overlap(a: dict[str, str], b: dict[str, str], overlap: bool) -> None:
    assert admission.selectors_overlap(sel(a), sel(b)) is overlap


def test_expression_selector_matches_with_kubernetes_semantics() -> None:
    s = sel({"app": "orders"}, key="version", operator="In", values=["v2"])
    assert s.matches({"app": "orders", "version": "v2"})
    assert not s.matches({"app": "orders", "version": "v1"})
    assert not s.matches({"app": "orders"})
    n = sel({"app": "orders"}, key="canary", operator="DoesNotExist")
    assert n.matches({"app": "orders"})
    assert not n.matches({"app": "orders", "canary": "yes"})


def test_validate_service_refuses_overlap_without_looking_at_pods() -> None:
    # Selectors decide: a pod labelled app=x,tier=web could exist any time,
    # so no pods are listed or counted (that told callers about other pods).
    existing = svc("a", {"app": "x"})
    new = svc("b", {"tier": "web"})
    errors = admission.validate_service(new, [existing])
    assert len(errors) == 1
    assert "overlaps NatsService 'a'" in errors[0]
    assert admission.validate_service(svc("a", {"app": "x"}), [existing]) == []
    assert admission.validate_service(svc("c", {"app": "y"}), [existing]) == []


def claimant(name: str, created: str | None, uid: str, **spec: Any) -> NatsService:
    meta: dict[str, Any] = {"name": name, "namespace": "shop", "uid": uid}
    if created:
        meta["creationTimestamp"] = created
    return NatsService.from_body(
        {"metadata": meta, "spec": {"selector": {"matchLabels": {"app": name}}, "port": 80, **spec}}
    )


def test_a_claimed_subject_is_refused_naming_its_owner() -> None:
    orders = claimant("orders", "2026-01-01T00:00:00Z", "u-orders")
    # As the API server hands a CREATE to validating admission: a later time
    # (or none at all, which never outranks an existing claim).
    for created in ("2026-01-02T00:00:00Z", None):
        aaa = claimant("aaa", created, "u-aaa", service="orders")
        (error,) = admission.validate_service(aaa, [orders])
        assert "mesh.shop.orders.v1" in error
        assert "already claimed by NatsService 'orders'" in error
    # Another version of the service is a subset (a canary), not a claim.
    v2 = claimant("orders-v2", "2026-01-02T00:00:00Z", "u-v2", service="orders", version="v2")
    assert admission.validate_service(v2, [orders]) == []
    # The owner itself stays editable, even next to a claimant that got in
    # while the webhook was down.
    late = claimant("aaa", "2026-01-02T00:00:00Z", "u-aaa", service="orders")
    assert admission.validate_service(orders, [orders, late]) == []
    assert admission.validate_service(late, [orders, late]) != []


def test_same_second_claims_go_by_uid_except_on_create() -> None:
    at = "2026-01-01T00:00:00Z"
    first = claimant("zzz", at, "0002", service="orders")
    second = claimant("aaa", at, "0001", service="orders")
    # Two that got in (webhook down) in one second: uid decides, as in the plan.
    assert admission.subject_owner(second, [first]) is None
    assert admission.subject_owner(first, [second]) is second
    # Creating, whatever the API server stamped: the existing one came first.
    assert admission.subject_owner(second, [first], creating=True) is first
    assert admission.validate_service(second, [first], creating=True) != []


def test_a_pod_selected_by_two_services_has_no_owner() -> None:
    services = [svc("zzz", {"app": "orders"}), svc("aaa", {"app": "orders", "tier": "web"})]
    with pytest.raises(admission.AmbiguousOwner, match="'aaa', 'zzz'"):
        admission.owner_of({"app": "orders", "tier": "web"}, services)
    only = admission.owner_of({"app": "orders"}, services)
    assert only is not None
    assert only.metadata.name == "zzz"


def test_route_warnings() -> None:
    route = NatsRoute.from_body(
        {
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {
                "service": "orders",
                "rules": [
                    {
                        "destinations": [
                            {"version": "v1", "weight": 90},
                            {"version": "v2", "weight": 10},
                        ]
                    }
                ],
            },
        }
    )
    assert "no NatsService serves 'orders'" in admission.route_warnings(route, [])[0]
    only_v1 = [svc("orders", {"app": "orders"})]
    assert "version(s) v2" in admission.route_warnings(route, only_v1)[0]
    both = [*only_v1, svc("orders-v2", {"app": "o2"}, version="v2", service="orders")]
    assert admission.route_warnings(route, both) == []


def test_a_same_namespace_grant_naming_no_resource_is_admitted_with_a_warning() -> None:
    web = svc("web-frontend", {"app": "web"}, service="frontend")
    orders = svc(
        "orders",
        {"app": "orders"},
        allowedCallers=[
            {"name": "web-frontend"},  # exists: no warning
            {"name": "frontend"},  # the old meaning: a spec.service
            {"name": "later"},  # nothing by that name (yet)
            {"name": "elsewhere", "namespace": "other"},  # not this namespace's business
        ],
    )
    hinted, plain = admission.caller_warnings(orders, [web])
    assert hinted.startswith("spec.allowedCallers[1]: no NatsService 'frontend'")
    assert "NatsService 'web-frontend' serves spec.service 'frontend'" in hinted
    assert "write name: web-frontend" in hinted
    assert plain.startswith("spec.allowedCallers[2]: no NatsService 'later'")
    assert "serves spec.service" not in plain
    # Naming itself, or its own namespace spelled out, is fine.
    own = svc("orders", {"app": "orders"}, allowedCallers=[{"name": "orders", "namespace": "shop"}])
    assert admission.caller_warnings(own, []) == []


def test_review_response_and_patch_shape() -> None:
    ops = admission.json_patch({"metadata": {"labels": {"a": "b"}}, "spec": {"volumes": []}})
    assert ops == [
        {"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},
        {"op": "add", "path": "/spec/volumes", "value": []},
    ]
    denied = admission.review_response("u1", allowed=False, message="no")
    assert denied["response"]["status"]["message"] == "no"
    assert denied["response"]["allowed"] is False
    patched = admission.review_response("u2", patch=ops, warnings=["w"])
    assert patched["response"]["patchType"] == "JSONPatch"
    assert patched["response"]["warnings"] == ["w"]


@pytest.mark.parametrize(
    ("annotations", "pods", "injecting", "expected"),
    [
        ({}, [False], True, True),
        ({}, [True], True, False),
        ({"natsmesh.io/restart": "false"}, [False], True, False),
        ({}, [True], False, True),
        ({}, [], True, False),
    ],
)
def test_wants_restart(
    annotations: dict[str, str], pods: list[bool], injecting: bool, expected: bool
) -> None:
    selector = sel({"app": "orders"})
    assert (
        wants_restart(annotations, {"app": "orders"}, pods, selector, injecting=injecting)
        is expected
    )
    assert not wants_restart(annotations, {"app": "web"}, pods, selector, injecting=injecting)


def test_moving_onto_a_subject_is_a_new_claim() -> None:
    at = "2026-01-01T00:00:00Z"
    bbb = claimant("bbb", at, "0001")
    moved = claimant("bbb", at, "0001", service="orders")
    assert admission.claims_anew(moved, None)
    assert admission.claims_anew(moved, bbb.model_dump(by_alias=True, exclude_none=True))
    assert not admission.claims_anew(moved, moved.model_dump(by_alias=True, exclude_none=True))
