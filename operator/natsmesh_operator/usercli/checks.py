"""``natsmesh check``'s verdicts and the pure decisions behind them.

A check ends in one :class:`CheckResult`: ``PASS``, ``WARN`` (works, but
look), ``FAIL`` (the mesh does not work as installed) or ``SKIP`` (could not
be decided, e.g. because an earlier check failed). The decisions that need no
server -- is this API version supported, does a live CRD match the generated
one, is a Deployment ready -- are here so they can be tested alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Status = Literal["PASS", "WARN", "FAIL", "SKIP"]

MIN_KUBERNETES = (1, 31)
"""The CRDs declare ``selectableFields`` (field selectors on spec.service and
spec.version): beta and on by default since Kubernetes 1.31, GA in 1.32."""

CRD_VERSION_FIELDS = (
    ("served", "served"),
    ("storage", "storage"),
    ("schema", "schema"),
    ("subresources", "subresources"),
    ("additionalPrinterColumns", "printer columns"),
    ("selectableFields", "selectable fields"),
)


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    message: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.status:<4}  {self.name:<{NAME_WIDTH}}  {self.message}"]
        if self.fix and self.status in ("FAIL", "WARN"):
            out.append(f"{'':<4}  {'':<{NAME_WIDTH}}  fix: {self.fix}")
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


NAME_WIDTH = 28


SUMMARY_WORDS = {"PASS": "passed", "WARN": "warning", "FAIL": "failed", "SKIP": "skipped"}


def summary(results: Sequence[CheckResult]) -> str:
    """``7 passed, 1 warning, 1 failed``: only what occurred."""
    parts = []
    for status, word in SUMMARY_WORDS.items():
        n = sum(r.status == status for r in results)
        if n:
            parts.append(f"{n} {word}{'s' if status == 'WARN' and n != 1 else ''}")
    return ", ".join(parts) or "no checks"


def render(results: Sequence[CheckResult]) -> str:
    lines = [line for r in results for line in r.lines()]
    lines += ["", summary(results)]
    return "\n".join(lines) + "\n"


def exit_code(results: Iterable[CheckResult]) -> int:
    return 1 if any(r.status == "FAIL" for r in results) else 0


# --------------------------------------------------------------------------
# Kubernetes version
# --------------------------------------------------------------------------

_MINOR = re.compile(r"^(\d+)")


def server_version(info: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(major, minor)`` from ``/version``; providers write minor as ``31+``."""
    try:
        major = _MINOR.match(str(info.get("major", "")))
        minor = _MINOR.match(str(info.get("minor", "")))
        if major and minor:
            return int(major.group(1)), int(minor.group(1))
        found = re.match(r"^v?(\d+)\.(\d+)", str(info.get("gitVersion", "")))
        if found:
            return int(found.group(1)), int(found.group(2))
    except (TypeError, ValueError):
        pass
    return None


# --------------------------------------------------------------------------
# CRDs
# --------------------------------------------------------------------------


def _versions(crd: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(v.get("name")): v for v in (crd.get("spec") or {}).get("versions") or []}


def crd_differences(live: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """What in the installed CRD ``live`` differs from the generated ``want``.

    Only what the models decide is compared (names, schema, columns...):
    the API server adds its own defaults (conversion, status) to the rest.
    """
    problems: list[str] = []
    live_spec, want_spec = live.get("spec") or {}, want.get("spec") or {}
    for key in ("group", "scope"):
        if live_spec.get(key) != want_spec.get(key):
            problems.append(f"{key} is {live_spec.get(key)!r}, not {want_spec.get(key)!r}")
    live_names, want_names = live_spec.get("names") or {}, want_spec.get("names") or {}
    for key in ("kind", "plural", "singular", "shortNames", "categories"):
        if (live_names.get(key) or None) != (want_names.get(key) or None):
            problems.append(f"names.{key} differs")
    live_versions = _versions(live)
    for name, want_v in _versions(want).items():
        live_v = live_versions.get(name)
        if live_v is None:
            problems.append(f"version {name} missing")
            continue
        for key, label in CRD_VERSION_FIELDS:
            if (live_v.get(key) or None) != (want_v.get(key) or None):
                problems.append(f"{name} {label} differ")
    conditions = {
        c.get("type"): c.get("status") for c in (live.get("status") or {}).get("conditions") or []
    }
    if conditions.get("Established") != "True":
        problems.append("not Established")
    return problems


# --------------------------------------------------------------------------
# Deployments
# --------------------------------------------------------------------------


def deployment_result(name: str, desired: int, ready: int, available: int) -> tuple[Status, str]:
    text = f"{name}: {ready}/{desired} ready"
    if desired == 0:
        return "FAIL", f"{name}: scaled to 0 replicas"
    if ready == 0 or available == 0:
        return "FAIL", text
    if ready < desired:
        return "WARN", text
    return "PASS", text
