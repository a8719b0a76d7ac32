"""Problems with the desired state, as data the operator can show to a person.

Bad or conflicting input (two services claiming one subject, a subscription to
a topic nobody publishes, a route to a version that does not exist) is not an
exception: planning returns :class:`Problem` objects naming the resource and a
Kubernetes-condition-style ``reason``; the part of the mesh they affect is left
out and everything else is still planned and applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["NatsService", "NatsRoute", "Mesh"]


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the desired state.

    ``reason`` is CamelCase (a condition reason); ``message`` is a sentence a
    person can act on; ``kind``/``namespace``/``name`` name the resource the
    condition belongs on; ``condition`` is which condition turns False.
    """

    kind: Kind
    namespace: str
    name: str
    reason: str
    message: str
    condition: str = "Ready"

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.reason}: {self.message}"


@dataclass(frozen=True)
class ApplyError:
    """Something the NATS system refused while applying (not a bad input)."""

    namespace: str
    what: str
    message: str

    def __str__(self) -> str:
        return f"{self.namespace}: {self.what}: {self.message}"
