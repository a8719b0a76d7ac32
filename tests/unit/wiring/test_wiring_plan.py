"""Planning: permissions derivation, exports/imports, tables and problems."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.accounts import account_claims
from natsmesh_operator.wiring.desired import (
    CallerRef,
    Publish,
    ServiceIntent,
    StreamSettings,
    Subscribe,
)
from natsmesh_operator.wiring.keys import Key, KeyRing, Role
from natsmesh_operator.wiring.permissions import may_publish
from natsmesh_operator.wiring.plan import Export, Import, plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import shop_intents

pytestmark = pytest.mark.unit


def test_worked_example_orders_permissions() -> None:
    """The example docs/wiring.md walks through, exactly."""
    p = plan(shop_intents())
    assert p.problems == ()
    perms = p.user("shop", "orders").permissions
    assert perms.pub_allow == (
        # one wildcard ending in its own identity, whoever it calls
        "mesh.*.*.*.shop.orders",
        # replies only into the inbox of its one admitted caller
        "_INBOX.mesh.gateway.>",
        "events.shop.orders.order.created",
        # its own tap records, sent only while the namespace's tap user asks
        "natsmesh.tap.shop.orders.rec.*",
        "$JS.API.DIRECT.GET.KV_natsmesh-routes.$KV.natsmesh-routes.orders",
        "$JS.API.DIRECT.GET.KV_natsmesh-routes.$KV.natsmesh-routes.to.*",
        "_INBOX.natsmesh.>",
    )
    assert perms.sub_allow == (
        # it hears exactly gateway, nobody else
        "mesh.shop.orders.v1.shop.gateway orders",
        # and only gateway's streamed calls (each instance the calls it took)
        "mesh._shop.orders.*.shop.gateway",
        "_INBOX.mesh.orders.>",
        "$KV.natsmesh-routes.orders",
        "$KV.natsmesh-routes.to.*",
        "$SRV.PING",
        "$SRV.INFO",
        "$SRV.STATS",
        "$SRV.*.orders",
        "$SRV.*.orders.*",
        # every replica hears a tap of orders (no queue group)
        "natsmesh.tap.shop.orders.ctl",
    )
    assert "resp" not in perms.to_claims()


def test_worked_example_payments_consumer_permissions() -> None:
    p = plan(shop_intents())
    pub = p.user("shop", "payments").permissions.pub_allow
    consumer = "payments--orders--order_created"
    assert f"$JS.API.CONSUMER.MSG.NEXT.EVENTS_orders.{consumer}" in pub
    assert f"$JS.API.CONSUMER.INFO.EVENTS_orders.{consumer}" in pub
    assert f"$JS.ACK.EVENTS_orders.{consumer}.>" in pub
    assert f"deadletter.shop.payments.{consumer}" in pub
    assert not any("inventory" in s for s in pub)
    # Callers' permission is one wildcard; payments hears only orders.
    assert [s for s in pub if s.startswith("mesh.")] == ["mesh.*.*.*.shop.payments"]
    sub = p.user("shop", "payments").permissions.sub_allow
    assert [s for s in sub if s.startswith("mesh.")] == [
        "mesh.shop.payments.v1.shop.orders payments",
        "mesh._shop.payments.*.shop.orders",
    ]


@pytest.mark.parametrize(
    ("caller", "target", "allowed"),
    [
        ("gateway", "orders", True),
        ("orders", "payments", True),
        ("gateway", "payments", False),
        ("payments", "orders", False),
        ("inventory", "orders", False),
        ("orders", "orders", False),
    ],
)
def test_callee_hears_only_admitted_callers(caller: str, target: str, allowed: bool) -> None:
    users_ = plan(shop_intents())
    subject = subjects.call_subject(subjects.request_subject("shop", target, "v1"), "shop", caller)
    # The caller may always publish its own identity...
    assert may_publish(users_.user("shop", caller).permissions, subject)
    # ...and whether anyone hears it is the callee's subscription.
    sub = users_.user("shop", target).permissions.sub_allow
    hears = any(subjects.subject_matches(e.split(" ")[0], subject) for e in sub)
    assert hears is allowed
    # Nobody can name another caller.
    forged = subjects.call_subject(subjects.request_subject("shop", target, "v1"), "shop", "x")
    assert not may_publish(users_.user("shop", caller).permissions, forged)


def test_size_does_not_grow_with_the_namespace() -> None:
    small = plan([ServiceIntent("a", f"s{i}") for i in range(10)])
    big = plan([ServiceIntent("a", f"s{i}") for i in range(2000)])
    assert small.user("a", "s1").permissions == big.user("a", "s1").permissions
    assert len(big.user("a", "s1").permissions.pub_allow) < 10
    # Nor the caller's table: its namespace's services are one Target each.
    assert small.tables[("a", "s1")].to_json() == big.tables[("a", "s1")].to_json()
    assert len(big.targets) == 2000


def test_default_policy_is_same_namespace_only() -> None:
    p = plan([ServiceIntent("a", "x"), ServiceIntent("a", "y"), ServiceIntent("b", "z")])
    x = p.user("a", "x").permissions
    assert x.pub_allow[:2] == ("mesh.*.*.*.a.x", "_INBOX.mesh.*.>")
    assert x.sub_allow[0] == "mesh.a.x.v1.a.* x"
    assert p.user("b", "z").permissions.sub_allow[0] == "mesh.b.z.v1.b.* z"
    # A namespace's own services are Target keys, not entries of every table.
    assert p.tables[("b", "z")].known == ()
    assert p.tables[("a", "x")].destinations == {}
    assert set(p.targets) == {("a", "x"), ("a", "y"), ("b", "z")}
    assert p.targets[("a", "y")].admits_namespace
    assert p.targets[("a", "y")].rules[0].destinations[0].subject == "mesh.a.y.v1"
    assert p.accounts["a"].imports == ()
    assert p.accounts["b"].exports == ()


def test_cross_namespace_caller_is_an_export_and_import() -> None:
    intents = [
        ServiceIntent("shop", "orders", allowed_callers=(CallerRef("frontend", "web"),)),
        ServiceIntent("web", "frontend"),
    ]
    p = plan(intents)
    streams = "orders.shop from frontend (streams)"
    assert p.accounts["shop"].exports == (
        # its streamed calls' chunks and credit: many answers on one reply
        Export("mesh._shop.orders.*.web.frontend", "service", streams, "Stream"),
        # unary calls: one answer each (Singleton, as before)
        Export("mesh.shop.orders.*.web.frontend", "service", "orders.shop from frontend"),
    )
    assert p.accounts["web"].imports == (
        Import("mesh._shop.orders.*.web.frontend", "shop", "", "service", streams),
        Import(
            "mesh.shop.orders.*.web.frontend", "shop", "", "service", "orders.shop from frontend"
        ),
    )
    orders = p.user("shop", "orders").permissions
    assert "mesh.shop.orders.v1.web.frontend orders" in orders.sub_allow
    # the call subjects of frontend's streamed calls, without a queue group
    assert "mesh._shop.orders.*.web.frontend" in orders.sub_allow
    assert "_R_.>" in orders.pub_allow
    ring = KeyRing()
    claims = account_claims(
        p.accounts["web"], ring.account("web").public, lambda ns: ring.account(ns).public
    )
    assert [(i["subject"], i["account"], i["type"]) for i in claims["nats"]["imports"]] == [
        ("mesh._shop.orders.*.web.frontend", ring.account("shop").public, "service"),
        ("mesh.shop.orders.*.web.frontend", ring.account("shop").public, "service"),
    ]
    exported = account_claims(
        p.accounts["shop"], ring.account("shop").public, lambda ns: ring.account(ns).public
    )["nats"]["exports"]
    assert {e["subject"]: e["response_type"] for e in exported} == {
        "mesh._shop.orders.*.web.frontend": "Stream",
        "mesh.shop.orders.*.web.frontend": "Singleton",
    }
    # JetStream is on for any non-zero storage limit; -1 is "unlimited", no reservation.
    assert claims["nats"]["limits"]["disk_storage"] == -1
    assert claims["nats"]["limits"]["mem_storage"] == -1
    assert p.tables[("web", "frontend")].known == ("orders.shop",)
    assert set(p.tables[("web", "frontend")].destinations) == {"orders.shop"}


def test_streamed_calls_cross_only_where_a_caller_is_admitted() -> None:
    """Least privilege of the call subjects across namespaces: a caller can
    publish only its own (its identity last), its account imports only the
    call subjects of services that admit it, and a callee hears only the
    streamed calls of callers it admits; a namespace with no grant is as
    before (no export, no import)."""
    intents = [
        ServiceIntent(
            "shop",
            "orders",
            allow_same_namespace=False,
            allowed_callers=(CallerRef("frontend", "web"),),
        ),
        ServiceIntent("shop", "payments", allowed_callers=(CallerRef("orders"),)),
        ServiceIntent("web", "frontend"),
        ServiceIntent("web", "other"),
        ServiceIntent("third", "evil"),
    ]
    p = plan(intents)
    assert p.problems == ()
    call = "0123456789abcdef01234567"
    chunks = f"mesh._shop.orders.{call}.web.frontend"
    frontend = p.user("web", "frontend").permissions
    assert may_publish(frontend, chunks)
    # Its publish permission would name payments' call subjects too, but
    # nothing imports them into web's account: they reach nobody.
    imported = {i.subject for i in p.accounts["web"].imports}
    assert not any(
        subjects.subject_matches(i, f"mesh._shop.payments.{call}.web.frontend") for i in imported
    )
    assert any(subjects.subject_matches(i, chunks) for i in imported)
    # Another caller of web cannot publish frontend's chunks, and its own
    # (which it may publish) are not imported.
    other = p.user("web", "other").permissions
    assert not may_publish(other, chunks)
    assert not any(
        subjects.subject_matches(i, f"mesh._shop.orders.{call}.web.other") for i in imported
    )
    # orders hears frontend's chunks, never another namespace's or caller's.
    sub = [e for e in p.user("shop", "orders").permissions.sub_allow if e.startswith("mesh._")]
    assert sub == ["mesh._shop.orders.*.web.frontend"]
    assert not any(subjects.subject_matches(e, f"mesh._shop.orders.{call}.third.evil") for e in sub)
    # No other account changes: a third namespace has nothing to import, and
    # a namespace's own streams need no export.
    assert p.accounts["third"].exports == ()
    assert p.accounts["third"].imports == ()
    exported = {e.subject for e in p.accounts["shop"].exports}
    assert exported == {"mesh.shop.orders.*.web.frontend", "mesh._shop.orders.*.web.frontend"}


def test_cross_namespace_subscription_exports_the_consumer_api() -> None:
    intents = [
        *shop_intents(),
        ServiceIntent(
            "web",
            "audit",
            subscriptions=(Subscribe("order.created", "orders", "/a", namespace="shop"),),
        ),
    ]
    intents = [
        replace(i, allowed_callers=(CallerRef("gateway"), CallerRef("audit", "web")))
        if i.name == "orders"
        else i
        for i in intents
    ]
    p = plan(intents)
    assert p.problems == ()
    consumer = "web_audit--orders--order_created"
    (c,) = [c for c in p.consumers if c.name == consumer]
    assert c.namespace == "shop"
    assert c.subscriber == ("web", "audit")
    exported = {e.subject: e.response_type for e in p.accounts["shop"].exports}
    assert exported[f"$JS.API.CONSUMER.MSG.NEXT.EVENTS_orders.{consumer}"] == "Stream"
    assert f"$JS.ACK.EVENTS_orders.{consumer}.>" in exported
    local = {i.local_subject for i in p.accounts["web"].imports}
    assert f"natsmesh.jsapi.shop.CONSUMER.MSG.NEXT.EVENTS_orders.{consumer}" in local
    assert any(s.name == "DLQ_audit" and s.namespace == "web" for s in p.streams)


# ------------------------------------------------------------------ problems


def reasons(intents: list[ServiceIntent]) -> list[tuple[str, str]]:
    return [(p.name, p.reason) for p in plan(intents).problems]


def test_two_services_claiming_one_subject() -> None:
    a = ServiceIntent("shop", "orders", resource="orders")
    b = ServiceIntent("shop", "orders", resource="orders-copy")
    p = plan([b, a])
    (problem,) = p.problems
    assert (problem.name, problem.reason) == ("orders-copy", "SubjectConflict")
    assert "mesh.shop.orders.v1" in problem.message
    assert "orders" in problem.message
    assert [u.resource for u in p.users] == ["orders"]


def test_first_claimant_keeps_the_subject_whatever_the_names() -> None:
    # "aaa" sorts first but was created later: it takes nothing over.
    orders = ServiceIntent(
        "shop", "orders", resource="orders", created="2026-01-01T00:00:00Z", uid="u-2"
    )
    aaa = ServiceIntent("shop", "orders", resource="aaa", created="2026-01-01T00:00:05Z", uid="u-1")
    for order in ([orders, aaa], [aaa, orders]):
        p = plan(order)
        (problem,) = p.problems
        assert (problem.name, problem.reason) == ("aaa", "SubjectConflict")
        assert "NatsService orders" in problem.message
        assert [u.resource for u in p.users] == ["orders"]


def test_same_second_claims_are_decided_by_uid_not_name() -> None:
    at = "2026-01-01T00:00:00Z"
    zzz = ServiceIntent("shop", "orders", resource="zzz", created=at, uid="0000")
    aaa = ServiceIntent("shop", "orders", resource="aaa", created=at, uid="ffff")
    assert reasons([aaa, zzz]) == [("aaa", "SubjectConflict")]


def test_a_claim_without_a_creation_time_never_wins() -> None:
    dated = ServiceIntent("shop", "orders", resource="zzz", created="2026-01-01T00:00:00Z")
    undated = ServiceIntent("shop", "orders", resource="aaa")
    assert reasons([undated, dated]) == [("aaa", "SubjectConflict")]


def test_first_created_version_sets_the_policy() -> None:
    # A later subset with another policy is the inconsistent one, even when
    # its version sorts first; routes still see the versions sorted.
    v1 = ServiceIntent(
        "shop",
        "orders",
        resource="orders",
        allowed_callers=(CallerRef("gateway", "web"),),
        created="2026-01-01T00:00:00Z",
    )
    v0 = ServiceIntent("shop", "orders", "v0", resource="aaa", created="2026-01-02T00:00:00Z")
    gateway = ServiceIntent("web", "gateway")
    assert reasons([v0, v1, gateway]) == [("aaa", "InconsistentSubsets")]
    v0_same = replace(v0, allowed_callers=v1.allowed_callers)
    p = plan([v0_same, v1, gateway])
    assert p.problems == ()
    assert sorted(u.version for u in p.users if u.service == "orders") == ["v0", "v1"]


def test_subscription_to_a_topic_nobody_publishes() -> None:
    intents = [
        *shop_intents(),
        ServiceIntent("shop", "mailer", subscriptions=(Subscribe("order.paid", "orders", "/x"),)),
    ]
    p = plan(intents)
    (problem,) = p.problems
    assert (problem.name, problem.reason, problem.condition) == (
        "mailer",
        "UnknownTopic",
        "StreamsReady",
    )
    assert "order.paid" in problem.message
    assert ("shop", "mailer") in p.tables, "the service itself is still planned"
    assert not p.tables[("shop", "mailer")].subscriptions


def test_subscription_to_an_unknown_service() -> None:
    assert reasons(
        [ServiceIntent("shop", "mailer", subscriptions=(Subscribe("x", "ghost", "/x"),))]
    ) == [("mailer", "UnknownService")]


def test_backoff_longer_than_max_deliver() -> None:
    bad = Subscribe("order.created", "orders", "/x", max_deliver=2, backoff_ms=(1, 2))
    intents = [
        replace(i, subscriptions=(bad,)) if i.name == "payments" else i for i in shop_intents()
    ]
    assert reasons(intents) == [("payments", "InvalidSubscription")]


def test_conflicting_stream_settings_of_one_service() -> None:
    i = ServiceIntent(
        "shop",
        "orders",
        publishes=(Publish("a"), Publish("b", StreamSettings(storage="memory"))),
    )
    p = plan([i])
    assert [(x.reason) for x in p.problems] == ["ConflictingStreamSettings"]
    assert p.streams[0].subjects == ("events.shop.orders.a",)


def test_version_subsets_must_agree() -> None:
    v1 = ServiceIntent("shop", "orders", "v1", allowed_callers=(CallerRef("gateway"),))
    v2 = replace(v1, version="v2", resource="orders-v2")
    v2_bad = replace(v2, allowed_callers=())
    gateway = ServiceIntent("shop", "gateway")
    assert plan([v1, v2, gateway]).problems == ()
    assert reasons([v1, v2_bad, gateway]) == [("orders-v2", "InconsistentSubsets")]
    subs = {u.version: u.permissions.sub_allow[0] for u in plan([v1, v2]).users}
    assert subs == {
        "v1": "mesh.shop.orders.v1.shop.* orders",
        "v2": "mesh.shop.orders.v2.shop.* orders",
    }


@pytest.mark.parametrize(
    ("intent", "reason"),
    [
        (ServiceIntent("Shop", "orders"), "InvalidName"),
        (ServiceIntent("shop", "or.ders"), "InvalidName"),
        (ServiceIntent("shop", "orders", version="v.1"), "InvalidVersion"),
        (ServiceIntent("shop", "orders", publishes=(Publish("a..b"),)), "InvalidTopic"),
    ],
)
def test_malformed_input(intent: ServiceIntent, reason: str) -> None:
    assert [p.reason for p in plan([intent]).problems] == [reason]


names = st.sampled_from(["a", "b", "orders", "x-y", "BAD", "", "a.b"])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.builds(
            ServiceIntent,
            namespace=st.sampled_from(["ns1", "ns2", "NS"]),
            name=names,
            version=st.sampled_from(["v1", "v2", "v.3"]),
            allowed_callers=st.lists(
                st.builds(CallerRef, names, st.none() | st.sampled_from(["ns1", "ns2"]))
            ).map(tuple),
            allow_same_namespace=st.booleans(),
            publishes=st.lists(st.builds(Publish, st.sampled_from(["t", "u.v", "..", "T"]))).map(
                tuple
            ),
            subscriptions=st.lists(
                st.builds(
                    Subscribe,
                    topic=st.sampled_from(["t", "u.v", "nope"]),
                    service=names,
                    path=st.sampled_from(["/", "x"]),
                    namespace=st.none() | st.sampled_from(["ns1", "ns2"]),
                    max_deliver=st.integers(-1, 4),
                    backoff_ms=st.lists(st.integers(0, 5), max_size=4).map(tuple),
                )
            ).map(tuple),
        ),
        max_size=6,
    )
)
def test_any_input_gives_a_plan_never_an_exception(intents: list[ServiceIntent]) -> None:
    p = plan(intents)
    for problem in p.problems:
        assert problem.reason
        assert problem.message
        assert str(problem)
    for u in p.users:
        assert all(" " not in s for s in u.permissions.pub_allow)
    # Every planned consumer's stream is planned too.
    streams = {(s.namespace, s.name) for s in p.streams}
    assert all((c.namespace, c.stream) in streams for c in p.consumers)


# ------------------------------------------------------------------- users


def test_needs_reissue() -> None:
    p = plan(shop_intents())
    account = Key.create(Role.ACCOUNT)
    user = p.user("shop", "orders")
    issued = users.issue(user, account, ttl_seconds=1000, now=10_000)
    check = users.needs_reissue
    assert check(issued.creds, user, account.public, ttl_seconds=1000, now=10_100) == ""
    assert check(issued.creds, user, account.public, ttl_seconds=1000, now=10_800) == (
        "expires soon"
    )
    assert check(None, user, account.public) == "no credentials yet"
    other = Key.create(Role.ACCOUNT).public
    assert check(issued.jwt, user, other, ttl_seconds=1000) == "signed by another account key"
    # orders stops admitting gateway: orders' creds must be re-issued (its
    # callers' are not: their permission names only themselves).
    changed = plan(
        [replace(i, allowed_callers=()) if i.name == "orders" else i for i in shop_intents()]
    ).user("shop", "orders")
    assert changed.permissions.narrows(user.permissions)
    assert not user.permissions.narrows(changed.permissions)
    assert check(issued.creds, changed, account.public, ttl_seconds=1000, now=10_100) == (
        "permissions changed"
    )
    forever = users.issue(user, account)
    assert check(forever.creds, user, account.public) == ""
    assert check(forever.creds, user, account.public, ttl_seconds=60) == "expiry policy changed"


def test_tap_users_one_per_namespace_fixed_permissions() -> None:
    """The tap user may start taps and read records of its namespace, nothing else,
    and neither its JWT nor a service's grows with the namespace."""
    small = plan([ServiceIntent("shop", "a"), ServiceIntent("other", "b")])
    assert [(u.namespace, u.resource) for u in small.tap_users] == [
        ("other", "natsmesh-tap"),
        ("shop", "natsmesh-tap"),
    ]
    shop_tap = small.tap_users[1].permissions
    assert shop_tap.pub_allow == ("natsmesh.tap.shop.*.ctl",)
    assert shop_tap.sub_allow == ("natsmesh.tap.shop.*.rec.*",)
    assert not may_publish(shop_tap, "mesh.shop.a.v1.shop.a")
    big = plan([ServiceIntent("shop", f"s{i}") for i in range(300)])
    assert big.tap_users[0].permissions == shop_tap
    grown = big.user("shop", "s0").permissions
    assert len(grown.pub_allow) == len(small.user("shop", "a").permissions.pub_allow)
    assert len(grown.sub_allow) == len(small.user("shop", "a").permissions.sub_allow)


def test_the_plan_kept_after_a_pass_holds_what_its_readers_use() -> None:
    full = plan(shop_intents())
    kept = full.kept()
    assert full.users
    assert full.tables
    assert (kept.users, kept.tables, kept.targets, kept.tap_users) == ((), {}, {}, ())
    assert kept.accounts == full.accounts
    assert kept.streams == full.streams
    assert kept.consumers == full.consumers
    assert kept.problems == full.problems
