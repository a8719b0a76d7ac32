"""The target cache applies only values its account signed for that key."""

from __future__ import annotations

import pytest

from natsmesh_operator.wiring.keys import Key, Role
from natsmesh_sidecar import signing, subjects
from natsmesh_sidecar.config import Rule, Target, WeightedDestination
from natsmesh_sidecar.policy.targets import MISS, TargetCache

pytestmark = pytest.mark.unit


def target(service: str = "orders", namespace: str = "shop", **kw: object) -> bytes:
    rule = Rule.model_validate(
        {
            "destinations": (
                WeightedDestination(
                    version="v1", weight=100, subject=subjects.request_subject(namespace, service)
                ),
            )
        }
    )
    return Target.model_validate(
        {"namespace": namespace, "service": service, "rules": (rule,), **kw}
    ).to_json()


def signed(key: Key, name: str, value: bytes) -> dict[str, str]:
    return {signing.HEADER: signing.sign_table(key.sign, subjects.target_key(name), value)}


def test_signed_value_is_applied_and_admission_follows_it() -> None:
    account = Key.create(Role.ACCOUNT)
    cache = TargetCache("shop", account=account.public)
    cache.missing["orders"] = 0.0  # a target we asked for
    value = target(admitsNamespace=False, callers=("gateway",))
    cache._on_msg_sync(
        subjects.target_key_subject("orders"), signed(account, "orders", value), value
    )
    found = cache.cached("orders")
    assert isinstance(found, type(cache.found["orders"]))
    assert cache.found["orders"].admits("gateway")
    assert not cache.found["orders"].admits("web")
    assert cache.destinations["orders"].rules[0].destinations[0].subject == "mesh.shop.orders.v1"


@pytest.mark.parametrize("attack", ["unsigned", "other_key", "other_account", "other_namespace"])
def test_planted_values_are_ignored(attack: str) -> None:
    account = Key.create(Role.ACCOUNT)
    cache = TargetCache("shop", account=account.public)
    cache.missing["orders"] = 0.0
    value = target()
    headers = {
        "unsigned": {},
        # a genuine signature, but for payments' key (a direct get replayed here)
        "other_key": signed(account, "payments", value),
        "other_account": signed(Key.create(Role.ACCOUNT), "orders", value),
        "other_namespace": signed(account, "orders", target(namespace="evil")),
    }[attack]
    data = target(namespace="evil") if attack == "other_namespace" else value
    cache._on_msg_sync(subjects.target_key_subject("orders"), headers, data)
    assert "orders" not in cache.found
    assert cache.cached("orders") is MISS


def test_only_signed_deletes_forget() -> None:
    account = Key.create(Role.ACCOUNT)
    cache = TargetCache("shop", account=account.public)
    cache.missing["orders"] = 0.0
    value = target()
    subject = subjects.target_key_subject("orders")
    cache._on_msg_sync(subject, signed(account, "orders", value), value)
    cache._on_msg_sync(subject, {"KV-Operation": "DEL"}, b"")
    assert "orders" in cache.found
    sig = signing.sign_delete(account.sign, subjects.target_key("orders"))
    cache._on_msg_sync(subject, {"KV-Operation": "DEL", signing.HEADER: sig}, b"")
    assert "orders" not in cache.found
    assert cache.cached("orders") is None  # a 404 for a while


def test_values_for_targets_never_asked_for_are_not_kept() -> None:
    account = Key.create(Role.ACCOUNT)
    cache = TargetCache("shop", account=account.public)
    value = target()
    cache._on_msg_sync(
        subjects.target_key_subject("orders"), signed(account, "orders", value), value
    )
    assert cache.found == {}
