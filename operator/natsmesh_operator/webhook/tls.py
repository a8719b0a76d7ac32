"""Webhook serving certificates.

In a cluster the chart mounts a certificate (cert-manager or its own
self-signed CA) and the operator reads it from files, re-reading them when
they change. The test bed makes them with
:mod:`natsmesh_operator.webhook.certgen`, which the operator never imports
(cryptography's x509 and key modules are ~8 MB of the operator's RSS).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingCert:
    """Paths of a CA bundle and a serving certificate with its key (PEM)."""

    cafile: Path
    certfile: Path
    keyfile: Path

    def ca_bundle(self) -> bytes:
        return self.cafile.read_bytes()

    def fingerprint(self) -> tuple[float, float]:
        """Modification times: a change means the files were rotated."""
        return (self.certfile.stat().st_mtime, self.keyfile.stat().st_mtime)
