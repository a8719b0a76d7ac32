"""natsmesh sidecar: the HTTP <-> NATS bridge that runs beside each app.

This package must stay importable without kopf, a Kubernetes client or
``natsmesh_operator``: the sidecar image installs only its own dependencies.
The operator imports :mod:`natsmesh_sidecar.subjects` and
:mod:`natsmesh_sidecar.config` so both sides agree on one wire contract.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
