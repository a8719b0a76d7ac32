"""Which namespaces the operator manages (``NATSMESH_WATCH_NAMESPACES``).

Globs select namespaces; no pattern means every namespace. When every
pattern is a plain name, the operator lists only in those namespaces, one by
one: that is what a namespaced install (Roles per namespace, no cluster-wide
read of Secrets) permits, and it never asks the API server for more.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

GLOB_CHARS = frozenset("*?[!,")


@dataclass(frozen=True)
class Watched:
    patterns: tuple[str, ...] = ()

    def __call__(self, namespace: str) -> bool:
        return not self.patterns or any(
            fnmatch.fnmatchcase(namespace, pattern) for pattern in self.patterns
        )

    @property
    def exact(self) -> tuple[str, ...] | None:
        """The namespaces to list in, one by one; None: list across the cluster."""
        if self.patterns and not any(GLOB_CHARS & set(p) for p in self.patterns):
            return self.patterns
        return None


EVERYWHERE = Watched()
