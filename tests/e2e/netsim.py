"""Cluster networking for emulated pods: what kube-proxy and cluster DNS would do.

Every emulated pod (tests/e2e/podsim.py) listens on this host's loopback, on
ports podsim picked for it. :class:`ServiceNetwork` makes Services work on top
of that:

* :meth:`ServiceNetwork.address` gives a local TCP forwarder for a Service
  port; each connection goes to a ready pod the Service selects (its
  ``targetPort``, by number or name, mapped to that pod's local port), chosen
  when the connection opens, as kube-proxy does. podsim rewrites
  ``<svc>.<ns>.svc[.cluster.local]:<port>`` in env values, args and
  configuration files to such a forwarder (:meth:`ServiceNetwork.rewrite`);
  ``<pod>.<headless svc>.<ns>.svc:<port>`` (a StatefulSet pod's own name, as
  in the NATS cluster's routes) forwards to that pod.
* :meth:`ServiceNetwork.start` serves an HTTP CONNECT proxy on the address
  ``hack/cluster.sh`` gave kube-apiserver as ``HTTPS_PROXY``, so the API server
  reaches webhooks named by a Service (``clientConfig.service``) the same way,
  with TLS end to end (the tunnel never sees the plain text).

A Service with no ready pod refuses connections (the forwarder closes them, the
proxy answers 502), as a Service without endpoints does.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.e2e.podsim import PodSim

log = logging.getLogger("netsim")

_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
#: ``[<pod>.]<svc>.<ns>.svc[.cluster.local][.]:<port>``: the names a pod uses for
#: a Service, or for one pod of a headless Service (a StatefulSet's
#: ``<hostname>.<subdomain>``, where the port is the pod's own).
SERVICE_ADDRESS = re.compile(
    rf"\b(?:({_LABEL})\.)?({_LABEL})\.({_LABEL})\.svc(?:\.cluster\.local)?\.?:(\d+)\b"
)
SERVICE_CACHE_SECONDS = 2.0
CONNECT_TIMEOUT = 5.0
BUFFER = 65536


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then half-close, so the other direction can finish."""
    try:
        while chunk := src.recv(BUFFER):
            dst.sendall(chunk)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def splice(a: socket.socket, b: socket.socket) -> None:
    """Relay both directions between two connected sockets, then close both."""
    other = threading.Thread(target=_pipe, args=(b, a), daemon=True)
    other.start()
    _pipe(a, b)
    other.join(timeout=3600)
    for s in (a, b):
        with contextlib.suppress(OSError):
            s.close()


class _Listener:
    """A loopback listener that hands each accepted connection to ``handle``."""

    def __init__(self, host: str, port: int, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self._handle = handle
        self._closed = False
        threading.Thread(target=self._accept, name=f"listen-{self.address}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()


class ServiceNetwork:
    """Services of the namespaces whose pods the attached :class:`PodSim` s run."""

    def __init__(self, kubectl: Sequence[str], proxy_address: str | None = None) -> None:
        self.kubectl_argv = list(kubectl)
        self.proxy_address = proxy_address
        self.sims: list[PodSim] = []
        self._services: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._forwarders: dict[tuple[str, str, int, str | None], _Listener] = {}
        self._proxy: _Listener | None = None
        self._lock = threading.Lock()
        self._turn = itertools.count()

    # -- lifecycle ------------------------------------------------------------

    def attach(self, sim: PodSim) -> None:
        self.sims.append(sim)

    def start(self) -> ServiceNetwork:
        if self.proxy_address:
            host, _, port = self.proxy_address.rpartition(":")
            try:
                self._proxy = _Listener(host, int(port), self._connect_tunnel)
            except OSError as exc:
                raise RuntimeError(
                    f"cannot serve the API server's service proxy on {self.proxy_address} "
                    f"({exc}); is another podsim using this cluster?"
                ) from exc
        return self

    def stop(self) -> None:
        with self._lock:
            listeners = [*self._forwarders.values(), *([self._proxy] if self._proxy else [])]
            self._forwarders.clear()
            self._proxy = None
        for listener in listeners:
            listener.close()

    # -- resolution -----------------------------------------------------------

    def _service(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = (namespace, name)
        now = time.monotonic()
        cached = self._services.get(key)
        if cached and now - cached[0] < SERVICE_CACHE_SECONDS:
            return cached[1]
        proc = subprocess.run(
            [*self.kubectl_argv, "-n", namespace, "get", "service", name, "-o", "json"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        svc = json.loads(proc.stdout) if proc.returncode == 0 else None
        self._services[key] = (now, svc)
        return svc

    def backends(self, namespace: str, name: str, port: int) -> list[int]:
        """Local ports of the ready pods behind ``name:port`` (may be empty)."""
        svc = self._service(namespace, name)
        if svc is None:
            return []
        spec = svc.get("spec") or {}
        entry = next((p for p in spec.get("ports") or [] if int(p["port"]) == port), None)
        if entry is None:
            return []
        target = entry.get("targetPort", port)
        selector: dict[str, str] = spec.get("selector") or {}
        if not selector:
            return []
        include_unready = bool(spec.get("publishNotReadyAddresses"))
        out = []
        for sim in self.sims:
            if sim.namespace != namespace:
                continue
            for pod in sim.select(**selector):
                if pod.stopping or not (pod.ready or (include_unready and pod.ports)):
                    continue
                container_port = pod.container_port(target)
                if container_port is not None and container_port in pod.ports:
                    out.append(pod.ports[container_port])
        return out

    def pod_port(self, namespace: str, subdomain: str, hostname: str, port: int) -> int | None:
        """The local port of ``port`` on the pod ``<hostname>.<subdomain>`` (DNS of a
        headless Service: published as soon as the pod runs, ready or not)."""
        for sim in self.sims:
            if sim.namespace != namespace:
                continue
            for pod in sim.select():
                spec = pod.spec
                if spec.get("hostname") == hostname and spec.get("subdomain") == subdomain:
                    return pod.ports.get(port)
        return None

    def _dial(
        self, namespace: str, name: str, port: int, pod: str | None = None
    ) -> socket.socket | None:
        if pod is not None:
            local = self.pod_port(namespace, name, pod, port)
            ports = [] if local is None else [local]
        else:
            ports = self.backends(namespace, name, port)
        if not ports:
            return None
        start = next(self._turn)
        for i in range(len(ports)):
            local = ports[(start + i) % len(ports)]
            try:
                return socket.create_connection(("127.0.0.1", local), timeout=CONNECT_TIMEOUT)
            except OSError:
                continue
        return None

    # -- forwarders (kube-proxy) ------------------------------------------------

    def address(self, namespace: str, name: str, port: int, pod: str | None = None) -> str:
        """``127.0.0.1:N`` that forwards to the Service port (or to one pod of a
        headless Service), created on first use."""
        key = (namespace, name, port, pod)
        with self._lock:
            listener = self._forwarders.get(key)
            if listener is None:

                def handle(conn: socket.socket) -> None:
                    upstream = self._dial(namespace, name, port, pod)
                    if upstream is None:
                        conn.close()
                        return
                    upstream.settimeout(None)
                    splice(conn, upstream)

                listener = self._forwarders[key] = _Listener("127.0.0.1", 0, handle)
                where = f"{pod}." if pod else ""
                log.info("%s%s.%s:%d is %s here", where, name, namespace, port, listener.address)
            return listener.address

    def rewrite(self, value: str) -> str:
        """Service addresses in ``value`` replaced by their local forwarders."""

        def sub(m: re.Match[str]) -> str:
            pod, name, namespace, port = m.group(1), m.group(2), m.group(3), int(m.group(4))
            if not any(sim.namespace == namespace for sim in self.sims):
                return m.group(0)  # not a namespace emulated here
            return self.address(namespace, name, port, pod)

        return SERVICE_ADDRESS.sub(sub, value)

    # -- the API server's proxy ---------------------------------------------------

    def _connect_tunnel(self, conn: socket.socket) -> None:
        conn.settimeout(CONNECT_TIMEOUT)
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = conn.recv(4096)
                if not chunk:
                    raise OSError("client went away")
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = [*line.split(" "), "", ""][:3]
            m = SERVICE_ADDRESS.fullmatch(target)
            if method != "CONNECT" or m is None:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                conn.close()
                return
            upstream = self._dial(m.group(3), m.group(2), int(m.group(4)), m.group(1))
            if upstream is None:
                log.warning("service proxy: no ready pod behind %s", target)
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                conn.close()
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rest = head.split(b"\r\n\r\n", 1)[1]
            if rest:
                upstream.sendall(rest)
        except OSError as exc:
            log.warning("service proxy: %s", exc)
            with contextlib.suppress(OSError):
                conn.close()
            return
        conn.settimeout(None)
        upstream.settimeout(None)
        splice(conn, upstream)
