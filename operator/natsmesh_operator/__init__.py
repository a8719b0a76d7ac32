"""natsmesh operator: the control plane of the mesh.

Layers, outermost first:

* :mod:`natsmesh_operator.cli` -- the ``natsmesh`` command.
* :mod:`natsmesh_operator.handlers` / :mod:`natsmesh_operator.webhook` -- kopf
  handlers and admission: read the cluster, call wiring, write status.
* :mod:`natsmesh_operator.wiring` -- desired NATS state and applying it
  (keys, JWTs, accounts, users, streams, consumers, route tables). No
  Kubernetes in here.
* :mod:`natsmesh_operator.api` -- pydantic models of the custom resources,
  the one source of truth for CRDs, handlers and docs.
"""

from __future__ import annotations

__version__ = "0.1.0"
