"""``natsmesh analyze [-n NS | -A]``: what looks wrong in the applied resources.

Like ``istioctl analyze``: one line per finding, ``Severity [CODE] (Kind
namespace/name) message``; exit status 1 if any finding is an Error. The rules
and their codes are in :mod:`natsmesh_operator.usercli.rules`.
"""

from __future__ import annotations

import argparse
import logging

from natsmesh_operator.usercli import common, snapshot
from natsmesh_operator.usercli.kubeaccess import Access
from natsmesh_operator.usercli.rules import Finding, analyze

log = logging.getLogger(__name__)

PROG = "natsmesh analyze"


def summary(findings: list[Finding], where: str) -> str:
    if not findings:
        return f"No problems found in {where}."
    counts = [
        (sum(f.severity == s for f in findings), word)
        for s, word in (("Error", "error"), ("Warning", "warning"), ("Info", "info"))
    ]
    text = ", ".join(
        f"{n} {word}{'s' if n != 1 and word != 'info' else ''}" for n, word in counts if n
    )
    return f"{text} in {where}."


async def run(args: argparse.Namespace, access: Access) -> tuple[list[Finding], str]:
    namespace = None if args.all_namespaces else (args.namespace or access.namespace)
    client = access.client()
    try:
        snap = await snapshot.load(client, namespace, pods=True)
    finally:
        await client.close()
    where = "all namespaces" if namespace is None else f"namespace {namespace}"
    return analyze(snap), where


def main(argv: list[str]) -> int:
    parser = common.parser(PROG, "Find mistakes in the applied NatsServices and NatsRoutes.")
    common.add_scope(parser)
    args = parser.parse_args(argv)
    result = common.execute(args, PROG, run)
    if result is None:
        return 2
    findings, where = result
    if args.output == "json":
        common.print_json({"findings": [f.to_json() for f in findings], "scope": where})
    else:
        for finding in findings:
            print(finding.line())
        print(summary(findings, where))
    return 1 if any(f.severity == "Error" for f in findings) else 0
