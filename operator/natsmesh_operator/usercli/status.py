"""``natsmesh status [-n NS | -A]``: the mesh as tables.

Services (version, Ready, live endpoints), who may call whom (allowedCallers
resolved as the operator resolves them), routes with their rules and
weights, and events: every published topic with its subscribers and, when
NATS answers, each subscription's backlog (pending, awaiting ack,
redelivered). ``--no-nats`` skips NATS; ``-o json`` prints the same as JSON.

The backlog is read as the system account's user (the bootstrap Secret in
``--system-namespace``), at the operator's NATS URL unless ``--nats-url``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError

from natsmesh_operator.handlers import kube
from natsmesh_operator.usercli import common, natsinfo, snapshot, view
from natsmesh_operator.usercli.kubeaccess import Access
from natsmesh_operator.usercli.release import DEFAULT_NAMESPACE, discover
from natsmesh_operator.wiring.bootstrap import Bootstrap, BootstrapError
from natsmesh_operator.wiring.keys import NKeyError

log = logging.getLogger(__name__)

PROG = "natsmesh status"


async def lag(
    client: AsyncClient, system_namespace: str, nats_url: str | None
) -> tuple[dict[view.ConsumerKey, view.ConsumerLag] | None, str]:
    """Consumer backlogs, or None and why not."""
    try:
        release = await discover(client, system_namespace)
        secret = release.bootstrap_secret
        data = await kube.read_secret(client, secret, system_namespace)
    except ApiError as exc:
        return (
            None,
            f"not shown: cannot read the release in {system_namespace} ({exc.status.message})",
        )
    if data is None:
        return None, (
            f"not shown: no bootstrap Secret {system_namespace}/{secret} "
            "(give the release's namespace with --system-namespace)"
        )
    try:
        creds = Bootstrap.from_files(data).system_user_creds
    except (BootstrapError, NKeyError) as exc:
        return None, f"not shown: bootstrap Secret {system_namespace}/{secret}: {exc}"
    url = nats_url or release.nats_url
    try:
        return await natsinfo.consumer_lag(url, creds), f"from {url}"
    except Exception as exc:  # nats-py raises several unrelated types for "no"
        log.debug("consumer lag", exc_info=True)
        return None, (
            f"not shown: NATS at {url} not reachable ({type(exc).__name__}); "
            + natsinfo.port_forward_hint(url, system_namespace)
            + ", or --no-nats"
        )


async def run(args: argparse.Namespace, access: Access) -> view.MeshStatus:
    namespace = None if args.all_namespaces else (args.namespace or access.namespace)
    client = access.client()
    try:
        snap = await snapshot.load(client, namespace, pods=False)
        subscribed = any(s.spec.events.subscriptions for s in snap.services)
        if args.no_nats:
            consumers, note = None, "not shown (--no-nats)"
        elif not subscribed:
            consumers, note = None, ""
        else:
            consumers, note = await lag(client, args.system_namespace, args.nats_url)
        return view.build(snap, consumers, note)
    finally:
        await client.close()


def main(argv: list[str]) -> int:
    parser = common.parser(PROG, "Show the mesh: services, callers, routes, events and lag.")
    common.add_scope(parser)
    parser.add_argument("--no-nats", action="store_true", help="do not ask NATS for consumer lag")
    parser.add_argument("--nats-url", help="NATS URL (default: the operator's NATSMESH_NATS_URL)")
    parser.add_argument(
        "--system-namespace",
        default=DEFAULT_NAMESPACE,
        help=f"the release's namespace, for NATS access (default {DEFAULT_NAMESPACE})",
    )
    args = parser.parse_args(argv)
    mesh = common.execute(args, PROG, run)
    if mesh is None:
        return 1
    if args.output == "json":
        common.print_json(mesh.to_json())
    else:
        sys.stdout.write(mesh.render(all_namespaces=args.all_namespaces))
    return 0
