"""The lock-free request metrics render exactly what prometheus_client's own types would."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from natsmesh_sidecar.observe import metrics
from natsmesh_sidecar.policy import permissions

pytestmark = pytest.mark.unit


def _samples(text: bytes) -> set[str]:
    return {
        line
        for line in text.decode().splitlines()
        if line.startswith(("natsmesh_sidecar_requests_total", "natsmesh_sidecar_request_duration"))
    }


def _reference_request_families(ref: CollectorRegistry) -> tuple[Counter, Histogram]:
    """What the request families were as prometheus_client types."""
    labels = ["direction", "source", "destination", "status"]
    count = Counter("natsmesh_sidecar_requests", "Requests handled", labels, registry=ref)
    hist = Histogram(
        "natsmesh_sidecar_request_duration_seconds",
        "Request latency as seen by this sidecar",
        labels,
        buckets=metrics._BUCKETS,
        registry=ref,
    )
    return count, hist


def test_same_exposition_as_counter_and_histogram() -> None:
    m = metrics.Metrics()
    ref = CollectorRegistry(auto_describe=False)
    count, hist = _reference_request_families(ref)
    rnd = random.Random(7)
    # Bucket edges exactly, tiny and huge values, several label sets.
    values = [*metrics._BUCKETS, 0.0, 1e-9, 99.0] + [rnd.expovariate(200) for _ in range(500)]
    for i, v in enumerate(values):
        key = ("outbound", "a.ns", f"d{i % 3}.ns", 200 if i % 5 else 503)
        m.observe(*key, v)
        count.labels(*key[:3], str(key[3])).inc()
        hist.labels(*key[:3], str(key[3])).observe(v)
    mine, theirs = _samples(m.render()), _samples(generate_latest(ref))
    # prometheus_client also emits *_created; the rest must be identical.
    assert mine == {s for s in theirs if "_created" not in s}
    assert m.registry.get_sample_value(
        "natsmesh_sidecar_requests_total",
        {"direction": "outbound", "source": "a.ns", "destination": "d0.ns", "status": "200"},
    )


def test_label_sets_are_capped() -> None:
    m = metrics.Metrics()
    for i in range(metrics.MAX_SERIES + 50):
        m.observe("outbound", "a.ns", f"host{i}", 404, 0.001)
    assert len(m.requests.series) == metrics.MAX_SERIES + 1
    assert (
        m.registry.get_sample_value(
            "natsmesh_sidecar_requests_total",
            {"direction": "outbound", "source": "a.ns", "destination": "_other", "status": "404"},
        )
        == 50
    )


def test_sources_are_capped_per_label_and_junk_is_folded() -> None:
    m = metrics.Metrics()
    for i in range(metrics.MAX_SOURCES + 100):
        m.observe("inbound", f"caller{i}.ns", "orders.shop", 200, 0.001)
    m.observe("inbound", "X" * 5000, "orders.shop", 200, 0.001)
    m.observe("inbound", "bad\nname", "orders.shop", 200, 0.001)
    sources = {key[1] for key in m.requests.series}
    assert len(sources) == metrics.MAX_SOURCES + 1
    assert metrics.OTHER in sources
    folded = m.registry.get_sample_value(
        "natsmesh_sidecar_requests_total",
        {"direction": "inbound", "source": "_other", "destination": "orders.shop", "status": "200"},
    )
    assert folded == 102
    # A source admitted before the cap keeps its own series.
    m.observe("inbound", "caller0.ns", "orders.shop", 200, 0.001)
    assert ("inbound", "caller0.ns", "orders.shop", 200, "") in m.requests.series


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


def test_whole_exposition_is_prometheus_clients() -> None:
    """Every family, escaping and number format as prometheus_client writes them."""
    m = metrics.Metrics()
    ref = CollectorRegistry(auto_describe=False)
    count, hist = _reference_request_families(ref)
    refs: dict[str, Any] = {}
    for family in m.registry.families:
        if not isinstance(family, metrics.Metric):
            continue
        base = family.name.removesuffix("_total")
        kind = Counter if family.kind == "counter" else Gauge
        refs[family.name] = kind(base, family.help, list(family.labelnames), registry=ref)
    observed = [(("outbound", "a.ns", "d.ns", 200), 0.003), (("inbound", "b.ns", "a.ns", 503), 7)]
    for key, v in observed:
        m.observe(*key, v)
        count.labels(*key[:3], str(key[3])).inc()
        hist.labels(*key[:3], str(key[3])).observe(v)
    # Label values that need escaping, big and fractional numbers.
    m.circuit.labels('odd "sub\\ject"\nx').set(2)
    refs["natsmesh_sidecar_circuit_state"].labels('odd "sub\\ject"\nx').set(2)
    m.retries.labels("d.ns").inc(12345678.5)
    refs["natsmesh_sidecar_retries_total"].labels("d.ns").inc(12345678.5)
    m.events_delivered.labels("orders", "ok").inc()
    refs["natsmesh_sidecar_events_delivered_total"].labels("orders", "ok").inc()
    m.nats_connected.set(1)
    refs["natsmesh_sidecar_nats_connected"].set(1)
    m.table_swaps.inc()
    refs["natsmesh_sidecar_table_updates_total"].inc()
    m.inflight_out.set_function(lambda: 3.0)
    refs["natsmesh_sidecar_inflight_requests"].labels("outbound").set_function(lambda: 3.0)
    refs["natsmesh_sidecar_inflight_requests"].labels("inbound")
    assert _without_created(m.render()) == _without_created(generate_latest(ref))
    assert m.registry.get_sample_value("natsmesh_sidecar_table_updates_total") == 1.0
    assert m.registry.get_sample_value("natsmesh_sidecar_nope") is None


def test_a_destination_called_shows_zero_retries() -> None:
    """Retries read 0, not "no data", for every destination this sidecar called."""
    m = metrics.Metrics()
    m.observe("outbound", "a.ns", "d.ns", 200, 0.001)
    m.observe("outbound", "a.ns", "-", 404, 0.0)  # no destination: no series
    m.observe("inbound", "b.ns", "a.ns", 200, 0.001)  # ourselves: not a destination
    get = m.registry.get_sample_value
    assert get("natsmesh_sidecar_retries_total", {"destination": "d.ns"}) == 0.0
    assert get("natsmesh_sidecar_retries_total", {"destination": "-"}) is None
    assert get("natsmesh_sidecar_retries_total", {"destination": "a.ns"}) is None


def test_creds_times_come_from_the_jwt(tmp_path: Path) -> None:
    """The alert on creds near expiry reads exp and iat of the JWT in use."""

    def creds(claims: dict[str, object]) -> permissions.Creds:
        def enc(obj: object) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        jwt = f"{enc({'typ': 'JWT', 'alg': 'ed25519-nkey'})}.{enc(claims)}.sig"
        return permissions.Creds(
            f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\nSUAXXX\n------END USER NKEY SEED------\n"
        )

    held = creds({"iat": 1000, "exp": 87400, "nats": {}})
    assert (held.issued, held.expires) == (1000, 87400)
    # No expiry (a dev server's user), or a claim that is not a number: 0.
    assert creds({"nats": {}}).expires == 0
    assert creds({"exp": "soon", "iat": True, "nats": {}}).expires == 0
    m = metrics.Metrics()
    m.creds_expiry.set_function(lambda: float(held.expires))
    text = m.render().decode()
    assert "natsmesh_sidecar_creds_expiry_timestamp_seconds 87400.0\n" in text


def test_the_grpc_status_is_a_label_of_grpc_calls_only() -> None:
    m = metrics.Metrics()
    m.observe("outbound", "a.ns", "d.ns", 200, 0.001)
    m.observe("outbound", "a.ns", "d.ns", 200, 0.001, "14")
    m.observe("outbound", "a.ns", "d.ns", 200, 0.001, "14")
    m.observe("outbound", "a.ns", "d.ns", 200, 0.001, "0")
    get = m.registry.get_sample_value
    base = {"direction": "outbound", "source": "a.ns", "destination": "d.ns", "status": "200"}
    assert get("natsmesh_sidecar_requests_total", base) == 1.0
    assert get("natsmesh_sidecar_requests_total", {**base, "grpc_status": "14"}) == 2.0
    assert get("natsmesh_sidecar_requests_total", {**base, "grpc_status": "0"}) == 1.0
    text = m.render().decode()
    assert 'grpc_status=""' not in text
    assert (
        'natsmesh_sidecar_request_duration_seconds_count{destination="d.ns",'
        'direction="outbound",grpc_status="14",source="a.ns",status="200"} 2.0'
    ) in text
