"""Plain aligned columns, as kubectl prints them: no borders, no colour."""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

GAP = "   "


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns three spaces apart; no trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} columns")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        GAP.join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *rows)
    ]
    return "\n".join(lines)


def without_column(
    headers: Sequence[str], rows: Sequence[Sequence[str]], name: str
) -> tuple[list[str], list[list[str]]]:
    """``headers`` and ``rows`` without the column ``name`` (e.g. NAMESPACE under ``-n``)."""
    if name not in headers:
        return list(headers), [list(r) for r in rows]
    i = list(headers).index(name)
    return [h for j, h in enumerate(headers) if j != i], [
        [c for j, c in enumerate(r) if j != i] for r in rows
    ]
