"""The lock-free request metrics render exactly what prometheus_client's own types would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from natsmesh_sidecar import metrics

pytestmark = pytest.mark.unit


def _samples(text: bytes) -> set[str]:
    return {
        line
        for line in text.decode().splitlines()
        if line.startswith(("natsmesh_sidecar_requests_total", "natsmesh_sidecar_request_duration"))
    }


def test_same_exposition_as_counter_and_histogram() -> None:
    m = metrics.Metrics()
    ref = CollectorRegistry(auto_describe=False)
    labels = ["direction", "source", "destination", "status"]
    count = Counter("natsmesh_sidecar_requests", "Requests handled", labels, registry=ref)
    hist = Histogram(
        "natsmesh_sidecar_request_duration_seconds",
        "Request latency as seen by this sidecar",
        labels,
        buckets=metrics._BUCKETS,
        registry=ref,
    )
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
    assert ("inbound", "caller0.ns", "orders.shop", 200) in m.requests.series
