"""What every natsmesh custom resource shares: metadata, identity, CRD markers.

A resource class names its kind, plural, short names and printer columns as
class variables; the CRD generator reads them, so the model stays the one
source of truth for both the operator and `crds/*.yaml`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from natsmesh_operator.api.common import CATEGORY, GROUP, ApiModel, JsonDict, Name


class ObjectMeta(BaseModel):
    """The parts of `metadata` the operator reads; everything else is kept."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    # The name becomes a NATS subject token, so it is a DNS label (no dots),
    # stricter than the DNS subdomain Kubernetes allows for custom resources.
    name: Name | None = None
    namespace: str | None = None
    generation: int | None = None
    uid: str | None = None
    resource_version: str | None = Field(None, alias="resourceVersion")
    creation_timestamp: str | None = Field(None, alias="creationTimestamp")
    """RFC 3339, set by the API server: who claimed a subject first."""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


def printer_column(
    name: str, json_path: str, type_: str, description: str, *, priority: int = 0
) -> JsonDict:
    column: JsonDict = {
        "name": name,
        "type": type_,
        "jsonPath": json_path,
        "description": description,
    }
    if priority:
        column["priority"] = priority
    return column


READY_COLUMN = printer_column(
    "Ready",
    '.status.conditions[?(@.type=="Ready")].status',
    "string",
    "Whether the resource is wired into NATS",
)
AGE_COLUMN = printer_column("Age", ".metadata.creationTimestamp", "date", "Time since creation")


class CustomResource(ApiModel):
    """Base of NatsService and NatsRoute; subclasses add `kind`, `spec`, `status`."""

    # Server-set fields we do not model (managedFields, …) live only in
    # metadata, which keeps extras; anywhere else an unknown field is an error.
    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]]
    CATEGORIES: ClassVar[tuple[str, ...]] = (CATEGORY,)
    PRINTER_COLUMNS: ClassVar[tuple[JsonDict, ...]] = ()
    #: Spec fields usable with `kubectl get --field-selector`.
    SELECTABLE_FIELDS: ClassVar[tuple[str, ...]] = ()

    api_version: Literal["natsmesh.io/v1alpha1"] = "natsmesh.io/v1alpha1"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @classmethod
    def singular(cls) -> str:
        return cls.KIND.lower()

    @classmethod
    def crd_name(cls) -> str:
        return f"{cls.PLURAL}.{GROUP}"

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        """Parse an object as kopf or a client hands it over (any mapping)."""
        return cls.model_validate(dict(body))
