"""CRDs under templates/ with the crds.enabled / crds.keep toggles."""

from __future__ import annotations

import pytest

from .render import CHART, REPO, render
from .values_sets import VALUE_SETS

pytestmark = pytest.mark.unit

MESH_CRDS = {"natsservices.natsmesh.io", "natsroutes.natsmesh.io"}
KOPF_CRD = "clusterkopfpeerings.kopf.dev"
CHART_COPIES = CHART / "files" / "crds"
KOPF_CRD_FILE = CHART / "crds" / f"{KOPF_CRD}.yaml"


def test_default_installs_and_keeps_every_crd() -> None:
    crds = {d["metadata"]["name"]: d for d in render().all("CustomResourceDefinition")}
    # kopf's peering CRD is not a template: it is in crds/ (test_kopf_peering_crd).
    assert set(crds) == MESH_CRDS
    for name, crd in crds.items():
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}, name
        assert crd["metadata"]["labels"]["app.kubernetes.io/component"] == "crds"


def test_keep_off_drops_the_resource_policy() -> None:
    for crd in render(VALUE_SETS["crds-no-keep"]).all("CustomResourceDefinition"):
        assert "annotations" not in crd["metadata"]


def test_crds_off_renders_none() -> None:
    manifest = render(VALUE_SETS["crds-off"])
    assert not manifest.has("CustomResourceDefinition")
    # The peering object still exists: the CRDs were installed some other way.
    assert manifest.has("ClusterKopfPeering")


def test_mesh_crds_are_the_generated_ones() -> None:
    """The template passes the generated spec through unchanged."""
    import yaml

    rendered = {d["metadata"]["name"]: d for d in render().all("CustomResourceDefinition")}
    for path in sorted(CHART_COPIES.glob("*.yaml")):
        generated = yaml.safe_load(path.read_text())
        assert rendered[generated["metadata"]["name"]]["spec"] == generated["spec"], path.name


def test_mesh_crds_shape() -> None:
    crds = [
        d for d in render().all("CustomResourceDefinition") if d["metadata"]["name"] in MESH_CRDS
    ]
    for crd in crds:
        spec = crd["spec"]
        assert spec["group"] == "natsmesh.io"
        assert spec["scope"] == "Namespaced"
        assert "natsmesh" in spec["names"]["categories"]
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1"
        assert version["subresources"] == {"status": {}}
        assert version["schema"]["openAPIV3Schema"]["type"] == "object"


def test_chart_copies_match_crds_dir() -> None:
    """charts/natsmesh/files/crds is a copy of crds/ (`natsmesh crds` writes both)."""
    source = REPO / "crds"
    originals = {p.name: p.read_text() for p in source.glob("*.yaml")}
    if not originals:
        pytest.skip("crds/ has not been generated yet")
    copies = {p.name: p.read_text() for p in CHART_COPIES.glob("*.yaml")}
    assert copies == originals, (
        "charts/natsmesh/files/crds is stale: run "
        "`natsmesh crds --dir charts/natsmesh/files/crds --no-docs`"
    )


def test_kopf_peering_crd() -> None:
    """In crds/: installed before the manifest that holds the peering object, never deleted."""
    import yaml

    crd = yaml.safe_load(KOPF_CRD_FILE.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == KOPF_CRD
    assert not list((CHART / "crds").glob("natsmesh.io_*")), "mesh CRDs belong to templates/"
    spec = crd["spec"]
    assert spec["group"] == "kopf.dev"
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == "ClusterKopfPeering"
    (version,) = spec["versions"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
