"""The custom resources of natsmesh: the one source of truth for the CRDs, the
operator and the reference docs.

Group `natsmesh.io`, version `v1alpha1`: :class:`NatsService` (a workload on
the mesh) and :class:`NatsRoute` (traffic policy for calls to one service).
"""

from __future__ import annotations

from natsmesh_operator.api.common import (
    API_VERSION,
    CATEGORY,
    DURATION_PATTERN,
    GROUP,
    VERSION,
    ApiModel,
    Condition,
    parse_duration_ms,
)
from natsmesh_operator.api.resource import CustomResource, ObjectMeta
from natsmesh_operator.api.route import (
    CircuitBreaker,
    Destination,
    Fault,
    FaultAbort,
    FaultDelay,
    Match,
    NatsRoute,
    NatsRouteSpec,
    NatsRouteStatus,
    Retries,
    RetryBackoff,
    Rule,
)
from natsmesh_operator.api.selector import LabelSelector, LabelSelectorRequirement
from natsmesh_operator.api.service import (
    Caller,
    Events,
    NatsService,
    NatsServiceSpec,
    NatsServiceStatus,
    Publication,
    StreamSettings,
    Subscription,
)

#: Every custom resource, in the order the CRDs and docs list them.
RESOURCES: tuple[type[CustomResource], ...] = (NatsService, NatsRoute)

__all__ = [
    "API_VERSION",
    "CATEGORY",
    "DURATION_PATTERN",
    "GROUP",
    "RESOURCES",
    "VERSION",
    "ApiModel",
    "Caller",
    "CircuitBreaker",
    "Condition",
    "CustomResource",
    "Destination",
    "Events",
    "Fault",
    "FaultAbort",
    "FaultDelay",
    "LabelSelector",
    "LabelSelectorRequirement",
    "Match",
    "NatsRoute",
    "NatsRouteSpec",
    "NatsRouteStatus",
    "NatsService",
    "NatsServiceSpec",
    "NatsServiceStatus",
    "ObjectMeta",
    "Publication",
    "Retries",
    "RetryBackoff",
    "Rule",
    "StreamSettings",
    "Subscription",
    "parse_duration_ms",
]
