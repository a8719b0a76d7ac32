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
