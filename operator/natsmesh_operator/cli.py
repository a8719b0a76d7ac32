"""The ``natsmesh`` command: ``operator``, ``bootstrap``, ``crds`` and ``sidecar``,
and for the people who run a mesh ``check``, ``status``, ``tap`` and ``analyze``.

Each subcommand imports its implementation lazily, so ``natsmesh sidecar``
never loads kopf or a Kubernetes client, ``natsmesh crds`` starts fast, and
the operator never loads the user commands (:mod:`natsmesh_operator.usercli`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

#: subcommand -> (module, function, one-line help). The function takes argv.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "operator": ("natsmesh_operator.main", "main", "run the kopf operator and webhooks"),
    "bootstrap": (
        "natsmesh_operator.bootstrap_cli",
        "main",
        "create the NATS operator key, system account and server config (--apply: as a Secret)",
    ),
    "crds": ("natsmesh_operator.crdgen", "main", "write or check crds/*.yaml from the models"),
    "sidecar": ("natsmesh_sidecar.__main__", "main", "run the HTTP <-> NATS sidecar"),
    "check": (
        "natsmesh_operator.usercli.check",
        "main",
        "pre-install (--pre) and post-install checks, PASS/FAIL with fixes",
    ),
    "status": (
        "natsmesh_operator.usercli.status",
        "main",
        "the mesh as tables: services, callers, routes, events and lag",
    ),
    "tap": (
        "natsmesh_operator.usercli.tap",
        "main",
        "live requests to and from a service, from its sidecars (Ctrl-C to stop)",
    ),
    "analyze": (
        "natsmesh_operator.usercli.analyze",
        "main",
        "find mistakes in the applied resources (exit 1 on errors)",
    ),
}


#: Commands that reach NATS over TCP/TLS: started without nats-py's websocket
#: transport (aiohttp), a third of their start-up; a websocket URL brings it
#: back when it is connected to (natsmesh_sidecar.natsload).
LEAN_NATS = frozenset({"bootstrap", "check", "status", "tap", "analyze"})


def usage() -> str:
    lines = ["usage: natsmesh <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"natsmesh: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    if name in LEAN_NATS:
        from natsmesh_sidecar import natsload

        natsload.without_websocket_transport()
    func: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
    if name == "operator":
        # After the imports: traced, they took 35x the CPU (44.5 s against
        # 1.25 s), too slow to start; what grows afterwards is what we look for.
        from natsmesh_operator import memtrace

        memtrace.start_from_env()
    return func(rest)


if __name__ == "__main__":
    raise SystemExit(main())
