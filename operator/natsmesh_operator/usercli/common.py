"""What the user commands share: their common flags, logging, and how they start."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import httpx2
from lightkube.core.exceptions import ApiError, ConfigError

from natsmesh_operator.usercli import kubeaccess

log = logging.getLogger(__name__)

T = TypeVar("T")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    kubeaccess.add_kube_arguments(p)
    return p


def add_scope(p: argparse.ArgumentParser) -> None:
    """``-n NAMESPACE`` or ``-A``, as kubectl."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    group.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def access(args: argparse.Namespace, prog: str) -> kubeaccess.Access | None:
    """The user's cluster access; None (and the reason on stderr) without one."""
    try:
        return kubeaccess.load(args.kubeconfig, args.context)
    except (kubeaccess.NoKubeconfig, ConfigError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def execute(
    args: argparse.Namespace,
    prog: str,
    command: Callable[[argparse.Namespace, kubeaccess.Access], Coroutine[Any, Any, T]],
) -> T | None:
    """Logging, the cluster, then ``command``; None (and why on stderr) if it could not run."""
    setup_logging(args.verbose)
    found = access(args, prog)
    if found is None:
        return None
    try:
        return asyncio.run(command(args, found))
    except ApiError as exc:
        print(f"{prog}: {exc.status.code} {exc.status.message}", file=sys.stderr)
    except (httpx2.HTTPError, OSError) as exc:
        print(f"{prog}: cannot reach {found.server}: {exc}", file=sys.stderr)
    return None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
