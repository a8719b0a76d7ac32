"""Label selectors (`metav1.LabelSelector`) that may not select everything."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from natsmesh_operator.api.common import (
    MAX_EXPRESSIONS,
    MAX_LABEL_VALUES,
    MAX_LABELS,
    ApiModel,
    LabelKey,
    LabelValue,
    cel,
    schema_extra,
)

_VALUES_NEEDED = "values must be non-empty for In and NotIn and empty for Exists and DoesNotExist"
_SELECTOR_EMPTY = (
    "selector must set matchLabels or matchExpressions: "
    "an empty selector would select every pod in the namespace"
)


class LabelSelectorRequirement(ApiModel):
    """A set-based requirement on one label."""

    model_config = ConfigDict(
        json_schema_extra=schema_extra(
            cel(
                "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
                " : (!has(self.values) || size(self.values) == 0)",
                _VALUES_NEEDED,
                field_path=".values",
            )
        )
    )

    key: LabelKey
    """The label key the requirement applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the label's value relates to `values`."""
    values: Annotated[list[LabelValue], Field(max_length=MAX_LABEL_VALUES)] = Field(
        default_factory=list, json_schema_extra=schema_extra(x_kubernetes_list_type="set")
    )
    """Label values for `In` and `NotIn`; must be empty otherwise."""

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        if (self.operator in ("In", "NotIn")) != bool(self.values):
            raise ValueError(_VALUES_NEEDED)
        return self


class LabelSelector(ApiModel):
    """Which pods belong to the service; `matchLabels` and `matchExpressions` are ANDed."""

    model_config = ConfigDict(
        json_schema_extra=schema_extra(
            cel(
                "(has(self.matchLabels) && size(self.matchLabels) > 0)"
                " || (has(self.matchExpressions) && size(self.matchExpressions) > 0)",
                _SELECTOR_EMPTY,
            )
        )
    )

    match_labels: Annotated[dict[str, LabelValue], Field(max_length=MAX_LABELS)] = Field(
        default_factory=dict
    )
    """Exact label values a pod must carry."""
    match_expressions: Annotated[
        list[LabelSelectorRequirement], Field(max_length=MAX_EXPRESSIONS)
    ] = Field(default_factory=list)
    """Set-based requirements a pod's labels must meet."""

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.match_labels and not self.match_expressions:
            raise ValueError(_SELECTOR_EMPTY)
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a pod with ``labels`` is selected (Kubernetes semantics)."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            value = labels.get(req.key)
            if req.operator == "In" and not (present and value in req.values):
                return False
            if req.operator == "NotIn" and present and value in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True
