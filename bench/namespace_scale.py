"""Namespace scale: JWT and table sizes, and N services of one namespace connecting and calling.

With the default policy (every service admits its namespace) nothing a service
holds may grow with the namespace: its user JWT (one request wildcard, one
serve subscription), its own route table (its events; other namespaces'
grants), and what it reads to call a neighbour (that neighbour's ``to.<svc>``
key). This benchmark plans N services with the operator's own code, applies
them to a real operator-mode nats-server, connects every service with its own
creds and makes random calls between them the way sidecars do (the caller
reads the callee's target key, publishes as itself; the callee hears exactly
what its JWT allows), and prints:

* the largest user JWT and route table at 10 / 100 / N services, beside the
  4,096-byte default ``max_control_line`` (the old scheme crossed it at 81);
* plan, apply and connect times for N, and the calls that worked.

    .venv/bin/python -m bench.namespace_scale [--services 2000] [--calls 500]
    .venv/bin/python -m bench.namespace_scale --quick   # CI smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from natsmesh_operator.wiring import users
from natsmesh_operator.wiring.apply import connect_creds
from natsmesh_operator.wiring.desired import ServiceIntent
from natsmesh_operator.wiring.plan import plan
from natsmesh_sidecar import subjects
from tests.fixtures.nats_operator import start_operator_nats

NS = "big"


def sizes(n: int) -> tuple[int, int, int]:
    """(largest JWT, largest table, seconds to plan) for n services."""
    started = time.monotonic()
    p = plan([ServiceIntent(NS, f"svc-{i:04d}") for i in range(n)])
    took = time.monotonic() - started
    from natsmesh_operator.wiring.keys import Key, Role

    account = Key.create(Role.ACCOUNT)
    sample = [p.users[i] for i in range(0, n, max(1, n // 20))]
    jwt_max = max(len(users.issue(u, account, ttl_seconds=86400).jwt) for u in sample)
    table_max = max(len(t.to_json()) for t in p.tables.values())
    return jwt_max, table_max, int(took * 1000)


async def run(n: int, calls: int) -> int:
    print(f"{'services':>9} {'largest JWT':>12} {'largest table':>14} {'plan':>8}")
    for k in sorted({10, 100, n}):
        jwt_max, table_max, plan_ms = sizes(k)
        print(f"{k:>9} {jwt_max:>10} B {table_max:>12} B {plan_ms:>6} ms")
    print("(default max_control_line: 4096 B; the chart sets 16384 B)")

    with tempfile.TemporaryDirectory() as tmp:
        on = start_operator_nats(Path(tmp))
        conns: list[NATS] = []
        try:
            started = time.monotonic()
            p = plan([ServiceIntent(NS, f"svc-{i:04d}") for i in range(n)])
            async with on.applier() as a:
                report = await a.apply(p)
            if not report.ok:
                print(f"apply failed: {report.errors}", file=sys.stderr)
                return 1
            applied = time.monotonic() - started
            account = on.keyring.account(NS)
            names = [f"svc-{i:04d}" for i in range(n)]
            started = time.monotonic()
            sem = asyncio.Semaphore(64)

            async def one(name: str) -> NATS:
                creds = users.issue(p.user(NS, name), account, ttl_seconds=86400).creds
                async with sem:
                    nc = await connect_creds(
                        on.url, creds, inbox_prefix=subjects.inbox_prefix(name)
                    )

                async def answer(msg: Msg, name: str = name) -> None:
                    await msg.respond(name.encode())

                user = p.user(NS, name)
                base = subjects.request_subject(NS, name, user.version)
                for subject, queue in subjects.serve_subjects(user.permissions.sub_allow, base):
                    await nc.subscribe(subject, queue=queue, cb=answer)
                return nc

            conns = list(await asyncio.gather(*(one(name) for name in names)))
            for nc in conns:
                await nc.flush()
            connected = time.monotonic() - started
            rnd = random.Random(7)
            ok = 0
            started = time.monotonic()
            direct = f"{subjects.JS_API_PREFIX}.DIRECT.GET.{subjects.routes_stream()}."
            for _ in range(calls):
                a_i, b_i = rnd.randrange(n), rnd.randrange(n)
                caller, callee = conns[a_i], names[b_i]
                # What the caller's sidecar does on a first call: read the policy...
                got = await caller.request(direct + subjects.target_key_subject(callee), b"", 2)
                policy = json.loads(got.data)
                subject = policy["rules"][0]["destinations"][0]["subject"]
                # ...and publish as itself.
                call = subjects.call_subject(subject, NS, names[a_i])
                reply = await caller.request(call, b"", timeout=2)
                ok += reply.data == callee.encode()
            called = time.monotonic() - started
            print(
                f"\n{n} services in one namespace: plan+apply {applied:.1f} s, "
                f"{n} connections with their own creds in {connected:.1f} s, "
                f"{ok}/{calls} random calls answered by the right service "
                f"({called / max(calls, 1) * 1000:.2f} ms each incl. the policy read)"
            )
            return 0 if ok == calls else 1
        finally:
            for nc in conns:
                await nc.close()
            on.server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="a small run for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.services, args.calls = 30, 20
    return asyncio.run(run(args.services, args.calls))


if __name__ == "__main__":
    sys.exit(main())
