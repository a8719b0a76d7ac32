"""The user's Kubernetes access, found where kubectl finds it.

Order: ``--kubeconfig``, then ``KUBECONFIG`` (the first file of the list that
exists), then ``~/.kube/config``, then the pod's service account. The
operator's own lookup (:func:`natsmesh_operator.handlers.kube.client_from_env`)
tries the service account first, which is right for a pod and wrong for a
laptop that happens to have one mounted.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import httpx2
from lightkube import AsyncClient, KubeConfig
from lightkube.config.client_adapter import AsyncClient as HttpClient
from lightkube.config.client_adapter import ConnectionParams
from lightkube.config.kubeconfig import SingleConfig
from lightkube.core.exceptions import ConfigError

log = logging.getLogger(__name__)

DEFAULT_KUBECONFIG = Path("~/.kube/config")
FIELD_MANAGER = "natsmesh-cli"
TIMEOUT = 10.0


class NoKubeconfig(RuntimeError):
    """No kubeconfig file and not inside a pod."""


def add_kube_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", type=Path, help="kubeconfig file (default: as kubectl)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")


def kubeconfig_path(explicit: Path | None, env: str | None) -> Path | None:
    """The kubeconfig file to read, None when there is none (then: in-cluster)."""
    if explicit is not None:
        return explicit
    for item in (env or "").split(os.pathsep):
        if item and Path(item).expanduser().exists():
            return Path(item).expanduser()
    default = DEFAULT_KUBECONFIG.expanduser()
    return default if default.exists() else None


@dataclass(frozen=True)
class Access:
    """A resolved kubeconfig context: what every command's clients are built from."""

    config: SingleConfig
    source: str
    """Where it came from, for messages: a file path or ``in-cluster``."""

    @property
    def server(self) -> str:
        return str(self.config.cluster.server)

    @property
    def namespace(self) -> str:
        """The context's namespace (kubectl's default for ``-n``)."""
        return str(self.config.namespace or "default")

    def client(self) -> AsyncClient:
        return AsyncClient(
            config=self.config, timeout=httpx2.Timeout(TIMEOUT), field_manager=FIELD_MANAGER
        )

    def http(self) -> httpx2.AsyncClient:
        """A raw client on the API server (for paths lightkube has no resource for)."""
        return HttpClient(self.config, ConnectionParams(timeout=httpx2.Timeout(TIMEOUT)))


def load(kubeconfig: Path | None = None, context: str | None = None) -> Access:
    path = kubeconfig_path(kubeconfig, os.environ.get("KUBECONFIG"))
    if path is not None:
        config = KubeConfig.from_file(path).get(context)
        if config is None:  # only with a default, which we do not give
            raise NoKubeconfig(f"{path} has no context")
        return Access(config, str(path))
    try:
        in_cluster = KubeConfig.from_service_account().get(context)
    except ConfigError as exc:
        raise NoKubeconfig(
            "no kubeconfig: set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config"
        ) from exc
    if in_cluster is None:
        raise NoKubeconfig("the service account config has no context")
    return Access(in_cluster, "in-cluster")
