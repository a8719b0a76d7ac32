"""`helm lint` is clean and every values set renders valid, well-labelled objects."""

from __future__ import annotations

from typing import Any

import pytest

from .render import FULLNAME, NAMESPACE, render, render_notes, run
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

SETS = pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))

CLUSTER_SCOPED = {
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ClusterKopfPeering",
}


@SETS
def test_lint_is_clean(values: dict[str, Any]) -> None:
    proc = run("lint", values, "--strict")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout
    assert "[ERROR]" not in proc.stdout


@SETS
def test_renders_with_standard_labels(values: dict[str, Any]) -> None:
    manifest = render(values)
    for doc in manifest.docs:
        labels = doc["metadata"].get("labels", {})
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "natsmesh", where
        assert labels.get("app.kubernetes.io/instance") == "nm", where
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", where
        assert "app.kubernetes.io/version" in labels, where


@SETS
def test_names_are_unique_and_namespaced_correctly(values: dict[str, Any]) -> None:
    manifest = render(values)
    keys = [(d["kind"], d["metadata"]["name"]) for d in manifest.docs]
    assert len(keys) == len(set(keys)), keys
    for doc in manifest.docs:
        meta = doc["metadata"]
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in meta, doc["kind"]
        else:
            assert meta.get("namespace") == NAMESPACE, f"{doc['kind']}/{meta['name']}"
        assert len(meta["name"]) <= 63


def test_long_release_names_fit_dns_labels() -> None:
    manifest = render({"fullnameOverride": "x" * 80})
    for doc in manifest.docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_fullname_defaults() -> None:
    manifest = render()
    assert manifest.get("Deployment")["metadata"]["name"] == f"{FULLNAME}-operator"


def test_notes_give_next_steps() -> None:
    notes = render_notes()
    assert "kubectl label namespace <your-namespace> natsmesh.io/inject=enabled" in notes
    assert "kubectl get natsmesh -A" in notes
    assert f"deployment/{FULLNAME}-operator" in notes
    assert "nats://nm-natsmesh-nats.mesh.svc:4222" in notes


def test_notes_for_external_nats() -> None:
    notes = render_notes(VALUE_SETS["nats-external"])
    assert "nats://nats.example.internal:4222 (external)" in notes
    assert "statefulset/" not in notes
