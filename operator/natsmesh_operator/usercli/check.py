"""``natsmesh check [--pre]``: is natsmesh installed and working here?

One line per check, PASS / WARN / FAIL / SKIP, with how to fix what failed;
exit status 1 if anything failed, so scripts can gate on it.

    natsmesh check --pre          before installing: API server version,
                                  permissions, CRDs, webhooks left behind
    natsmesh check                after: the above, the operator Deployment,
                                  webhooks served with a caBundle that verifies,
                                  the bootstrap, NATS (operator mode, JetStream),
                                  every meshed namespace's account
    natsmesh check -n NS          the release lives in NS (default natsmesh-system)

NATS is reached at the operator's own URL (its Deployment's NATSMESH_NATS_URL)
unless ``--nats-url`` says otherwise, e.g. through ``kubectl port-forward``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable

from lightkube.core.exceptions import ApiError

from natsmesh_operator.usercli import common, natsinfo, probes, webhooks
from natsmesh_operator.usercli.checks import CheckResult, exit_code, render
from natsmesh_operator.usercli.kubeaccess import Access
from natsmesh_operator.usercli.release import (
    DEFAULT_NAMESPACE,
    Release,
    discover,
    serving_secret,
)

log = logging.getLogger(__name__)

PROG = "natsmesh check"


async def _guarded(
    name: str, probe: Callable[[], Awaitable[list[CheckResult]]]
) -> list[CheckResult]:
    """A probe's results; an unexpected error is that check's FAIL, not the end of all."""
    try:
        return await probe()
    except Exception as exc:
        log.debug("probe %s failed", name, exc_info=True)
        return [CheckResult(name, "FAIL", f"{type(exc).__name__}: {exc}")]


async def _one(result: Awaitable[CheckResult]) -> list[CheckResult]:
    return [await result]


async def pre_install(access: Access, namespace: str) -> list[CheckResult]:
    client = access.client()
    try:
        return [
            *await _guarded(
                "permissions", lambda: _one(probes.install_permissions(client, namespace))
            ),
            *await _guarded("crds", lambda: probes.crds(access, pre=True)),
            *await _guarded("old webhooks", lambda: webhooks.leftovers(access)),
        ]
    finally:
        await client.close()


async def post_install(
    access: Access, namespace: str, nats_url: str | None, bootstrap_secret: str | None
) -> list[CheckResult]:
    client = access.client()
    try:
        crds = await _guarded("crds", lambda: probes.crds(access, pre=False))
        results = list(crds)
        try:
            release = await discover(client, namespace)
        except ApiError as exc:
            results.append(
                CheckResult(
                    "operator",
                    "FAIL",
                    f"cannot list Deployments in {namespace}: {exc.status.message}",
                )
            )
            release = Release(namespace)
        else:
            results += probes.operator_deployments(release)
        results += await _guarded(
            "webhooks",
            lambda: webhooks.webhooks(access, namespace, serving_secret(release)),
        )
        secret = bootstrap_secret or release.bootstrap_secret
        try:
            boot_results, boot = await probes.bootstrap(client, namespace, secret)
        except Exception as exc:
            boot_results, boot = (
                [CheckResult("bootstrap", "FAIL", f"{type(exc).__name__}: {exc}")],
                None,
            )
        results += boot_results
        url = nats_url or release.nats_url
        if boot is None:
            results.append(
                CheckResult("nats", "SKIP", f"{url}: needs the bootstrap Secret's system user")
            )
        else:
            results += await _guarded(
                "nats",
                lambda: _one(
                    natsinfo.check(url, boot.system_user_creds, boot.operator_public, namespace)
                ),
            )
        if any(r.name.startswith("crd ") and "not installed" in r.message for r in crds):
            results.append(CheckResult("namespaces", "SKIP", "needs the CRDs"))
        else:
            results += await _guarded(
                "namespaces", lambda: probes.meshed_namespaces(client, release.watched)
            )
        return results
    finally:
        await client.close()


async def run(args: argparse.Namespace, access: Access) -> list[CheckResult]:
    api = await probes.api_server(access)
    if api.status == "FAIL":
        return [api, CheckResult("everything else", "SKIP", "needs the API server")]
    if args.pre:
        return [api, *await pre_install(access, args.namespace)]
    return [api, *await post_install(access, args.namespace, args.nats_url, args.bootstrap_secret)]


def main(argv: list[str]) -> int:
    parser = common.parser(PROG, "Check that natsmesh can be installed (--pre) or works.")
    parser.add_argument("--pre", action="store_true", help="checks before installing")
    parser.add_argument(
        "-n",
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help=f"the release's namespace (default {DEFAULT_NAMESPACE})",
    )
    parser.add_argument("--nats-url", help="NATS URL (default: the operator's NATSMESH_NATS_URL)")
    parser.add_argument(
        "--bootstrap-secret",
        help="bootstrap Secret (default: the operator's NATSMESH_BOOTSTRAP_SECRET)",
    )
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    access = common.access(args, PROG)
    if access is None:
        results = [
            CheckResult(
                "kubeconfig",
                "FAIL",
                "no cluster access",
                "set KUBECONFIG or pass --kubeconfig (as for kubectl)",
            )
        ]
    else:
        results = common.run(run(args, access))
    if args.output == "json":
        common.print_json({"checks": [r.to_json() for r in results], "ok": exit_code(results) == 0})
    else:
        sys.stdout.write(render(results))
    return exit_code(results)
