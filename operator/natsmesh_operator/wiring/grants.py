"""Grants: the mesh identities a service's ``allowedCallers`` admit in this pass.

An ``allowedCallers`` entry names a NatsService *resource* (namespace, name),
while NATS only knows mesh identities (``<caller-ns>.<caller-service>``, the
tail of every request subject). Each pass resolves an entry to the service
its resource serves *now*, and only if that resource holds it (it got a NATS
user: it is not a later claimant of the subject, not an inconsistent subset,
not invalid). So:

* claiming an unused ``spec.service`` inherits no grant given to another
  resource that once served (or never served) that name;
* a grant follows its resource when the resource's ``spec.service`` changes;
* an entry naming no such resource admits nobody; when the resource goes,
  the callee's permissions narrow and the usual re-issue revokes the old user.

What it cannot tell apart: version subsets of one service share its
identity, so a grant to one of them admits them all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from natsmesh_operator.wiring.desired import ServiceIntent
from natsmesh_operator.wiring.errors import Problem

log = logging.getLogger(__name__)

CONDITION = "CallersResolved"
"""The condition a grant that admits nobody turns False; it does not make the
callee un-Ready (the callee itself works; a caller may come later)."""

Identity = tuple[str, str]
"""``(namespace, service)``: who a caller is on the wire."""


def holders(
    services: Mapping[Identity, Sequence[ServiceIntent]],
) -> dict[tuple[str, str], Identity]:
    """``(namespace, resource) -> (namespace, service)`` of every resource holding a user.

    ``services`` is what survived de-duplication: only those resources get a
    NATS user, so only they can make a call at all.
    """
    return {(i.namespace, i.resource_name): i.key for subsets in services.values() for i in subsets}


def resolve(
    services: Mapping[Identity, Sequence[ServiceIntent]],
) -> tuple[dict[Identity, frozenset[Identity]], list[Problem]]:
    """Per service, the identities its grants admit, and a problem per entry that admits nobody.

    Subsets of a service share its policy (``InconsistentSubsets`` otherwise),
    so the first one's entries stand for all, and each subset gets the problem.
    """
    held = holders(services)
    admitted: dict[Identity, frozenset[Identity]] = {}
    problems: list[Problem] = []
    for key, subsets in sorted(services.items()):
        found: set[Identity] = set()
        unresolved: list[str] = []
        for ref in subsets[0].allowed_callers:
            where = ref.where(key[0])
            identity = held.get(where)
            if identity is None:
                unresolved.append(f"{where[0]}/{where[1]}")
            else:
                found.add(identity)
        admitted[key] = frozenset(found)
        if unresolved:
            message = (
                f"allowedCallers names {', '.join(sorted(set(unresolved)))}: no such NatsService "
                "holds a mesh service (it does not exist, or it is refused: SubjectConflict, "
                "InconsistentSubsets, Invalid), so the entry admits nobody until one does; "
                "entries name NatsService resources (metadata.name), not spec.service"
            )
            problems += [
                Problem(
                    "NatsService", i.namespace, i.resource_name, "UnknownCaller", message, CONDITION
                )
                for i in subsets
            ]
    return admitted, problems
