"""Building blocks shared by the custom resource models.

* :class:`ApiModel` -- camelCase on the wire, unknown fields refused, attribute
  docstrings become schema descriptions.
* Name, version and topic types reuse the patterns of
  :mod:`natsmesh_sidecar.subjects`, so what the API server accepts is exactly
  what the data plane can turn into a NATS subject.
* Durations are Kubernetes-style strings (`250ms`, `2s`, `1m30s`): the
  same text CEL's `duration()` parses, so cross-field rules can compare them
  on the server; :func:`parse_duration_ms` is the one Python parser.
* :func:`cel` attaches a CEL rule to a schema; each rule also has a Python
  check in the model, with the same message, so the operator and the API
  server refuse the same objects.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StringConstraints,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from natsmesh_sidecar import subjects

GROUP = "natsmesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "natsmesh"

# Bounds for lists and maps. Besides keeping objects small, the API server
# needs them to estimate the cost of CEL rules that iterate (an unbounded list
# makes a rule's estimated cost exceed the budget and the CRD is refused).
MAX_LABELS = 32
MAX_EXPRESSIONS = 16
MAX_LABEL_VALUES = 32
MAX_CALLERS = 64
MAX_TOPICS = 64
MAX_SUBSCRIPTIONS = 64
MAX_BACKOFF_STEPS = 10
MAX_RULES = 32
MAX_DESTINATIONS = 8
MAX_HEADERS = 16
MAX_RETRY_CODES = 16
MAX_CONDITIONS = 16

JsonDict = dict[str, Any]


def cel(rule: str, message: str, *, field_path: str | None = None) -> JsonDict:
    """One `x-kubernetes-validations` entry.

    `fieldPath` makes the API server report the offending field itself rather
    than the object holding the rule. (No `messageExpression`: the server
    estimates its cost separately and refused even a small one on a list.)
    """
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def schema_extra(*rules: JsonDict, **extra: Any) -> JsonDict:
    """`json_schema_extra` for a model or field: CEL rules plus any
    `x-kubernetes-*` markers (given with underscores, e.g.
    `x_kubernetes_list_type="map"`)."""
    out: JsonDict = {key.replace("_", "-"): value for key, value in extra.items()}
    if rules:
        out["x-kubernetes-validations"] = list(rules)
    return out


class ApiModel(BaseModel):
    """Base of every model that is part of a custom resource."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    def to_wire(self) -> JsonDict:
        """The object as the API server stores it: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------

#: A Kubernetes object name that is also one NATS subject token.
Name = Annotated[str, StringConstraints(pattern=subjects.NAME_PATTERN, max_length=63)]
#: A version subset label; becomes the last token of the request subject.
Version = Annotated[str, StringConstraints(pattern=subjects.VERSION_PATTERN, max_length=63)]
#: An event topic: dot-separated tokens, no wildcards.
Topic = Annotated[str, StringConstraints(pattern=subjects.TOPIC_PATTERN, max_length=200)]

#: A label key: optional DNS-subdomain prefix and a name (Kubernetes rules).
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: An HTTP path on the app: absolute, no query or fragment, no whitespace.
PATH_PATTERN = r"^/[^\s?#]*$"
HttpPath = Annotated[str, StringConstraints(pattern=PATH_PATTERN, max_length=256)]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN, max_length=316)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN, max_length=63)]

# --------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------

#: Go/Kubernetes duration text without sign; CEL `duration()` parses it too.
DURATION_PATTERN = r"^([0-9]{1,9}(\.[0-9]{1,9})?(ms|s|m|h))+$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_MS = {"ms": 1.0, "s": 1_000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_duration_ms(text: str) -> int:
    """Milliseconds in a duration such as `250ms`, `2s`, `1m30s` or `1.5h`.

    Fractions of a millisecond round up, so a non-zero duration never becomes 0.
    """
    if not _DURATION_RE.match(text):
        raise ValueError(f"{text!r} is not a duration such as 250ms, 2s, 1m30s or 1h")
    total = sum(float(n) * _UNIT_MS[unit] for n, unit in _DURATION_PART_RE.findall(text))
    return math.ceil(round(total, 6))


#: A duration; bound it with :class:`DurationRange`.
Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN, max_length=32)]


@dataclass(frozen=True)
class DurationRange:
    """Annotation bounding a :data:`Duration` to ``[low, high]``, checked in
    Python and, through a CEL rule, by the API server."""

    low: str
    high: str

    @property
    def message(self) -> str:
        return f"must be between {self.low} and {self.high}"

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        low_ms, high_ms = parse_duration_ms(self.low), parse_duration_ms(self.high)

        def check(value: str) -> str:
            if not low_ms <= parse_duration_ms(value) <= high_ms:
                raise ValueError(self.message)
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        rule = (
            f"duration(self) >= duration('{self.low}') && duration(self) <= duration('{self.high}')"
        )
        json_schema.setdefault("x-kubernetes-validations", []).append(cel(rule, self.message))
        return json_schema


# --------------------------------------------------------------------------
# Status conditions (Kubernetes API conventions, metav1.Condition)
# --------------------------------------------------------------------------

CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(ApiModel):
    """One observation of the resource's state (`metav1.Condition`)."""

    type: Annotated[str, StringConstraints(pattern=CONDITION_TYPE_PATTERN, max_length=316)]
    """CamelCase kind of condition, e.g. `Ready`, `CredentialsReady`, `StreamsReady`."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: Annotated[
        str, StringConstraints(pattern=CONDITION_REASON_PATTERN, min_length=1, max_length=1024)
    ]
    """CamelCase, machine-readable cause of the last transition."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """What a person needs to know, e.g. what to fix."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The `metadata.generation` this condition was computed from."""


#: `conditions` fields: a list-map keyed by type, as the API conventions ask.
CONDITIONS_EXTRA = schema_extra(x_kubernetes_list_type="map", x_kubernetes_list_map_keys=["type"])
