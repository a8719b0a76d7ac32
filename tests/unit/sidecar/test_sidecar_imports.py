"""The sidecar's import graph stays lean: no kopf, no Kubernetes client, no operator."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

FORBIDDEN = (
    "kopf",
    "kubernetes",
    "kubernetes_asyncio",
    "lightkube",
    "natsmesh_operator",
    "aiohttp",
)


def modules_after(code: str) -> list[str]:
    """Every module a fresh sidecar process has loaded after running ``code``."""
    script = (
        "import sys, json\n"
        "import natsmesh_sidecar.__main__ as m\n"
        "m._block_websocket_deps('nats://127.0.0.1:4222')\n"
        "m._import_nats_without_metadata()\n"
        "import natsmesh_sidecar.app\n"
        f"{code}\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    mods: list[str] = json.loads(out)
    return mods


@functools.cache
def runtime_modules() -> list[str]:
    """Every module a fresh sidecar process has loaded once it can serve."""
    return modules_after("")


def test_main_module_imports_nothing_forbidden() -> None:
    mods = runtime_modules()
    bad = [m for m in mods if m.split(".")[0] in FORBIDDEN and sys.modules.get(m) is not None]
    bad = [m for m in bad if m.split(".")[0] != "aiohttp"] + [
        m for m in mods if m == "aiohttp.client"
    ]
    assert bad == []
    assert "natsmesh_sidecar.calls.outbound" in mods


def test_sidecar_runtime_does_not_import_importlib_metadata() -> None:
    """nats-py imports it only to learn its version (1.5 MB RSS with what it
    drags in); CONNECT still names the real version."""
    mods = runtime_modules()
    assert [m for m in mods if m.startswith("importlib.metadata") or m == "zipfile"] == []
    assert "nats.aio.client" in mods
    script = (
        "import natsmesh_sidecar.__main__ as m, importlib\n"
        "m._import_nats_without_metadata()\n"
        "import nats.aio.client\n"
        "print(nats.aio.client.__version__)\n"
        # Whoever needs it later still gets the real module.
        "print(importlib.import_module('importlib.metadata').version('nats-py'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == out[1] != "0.0.0"


def test_sidecar_runtime_does_not_import_pydantic() -> None:
    """The table is parsed by natsmesh_sidecar.wire, not the pydantic models."""
    mods = runtime_modules()
    assert [m for m in mods if m.split(".")[0] in ("pydantic", "pydantic_core")] == []
    assert "natsmesh_sidecar.config" not in mods


def test_sidecar_runtime_does_not_import_prometheus_client() -> None:
    """metrics.py writes the exposition itself: the library and its servers cost ~2 MB RSS."""
    mods = runtime_modules()
    assert [m for m in mods if m.split(".")[0] == "prometheus_client"] == []
    assert "natsmesh_sidecar.observe.metrics" in mods


def test_tap_is_imported_only_when_someone_taps() -> None:
    """A sidecar nobody taps holds one idle subscription and none of the tap's code."""
    assert "natsmesh_sidecar.observe.tap" not in runtime_modules()


def _with_a_sidecar(otlp_endpoint: str | None) -> list[str]:
    return modules_after(
        "from natsmesh_sidecar.wire import Settings\n"
        f"natsmesh_sidecar.app.Sidecar(Settings('a', 'b', otlp_endpoint={otlp_endpoint!r}))"
    )


def test_tracing_off_loads_nothing_of_it_and_on_loads_only_our_exporter() -> None:
    """No OTLP endpoint: neither tracing module is imported (the sidecar's
    idle RSS must not grow). With one: our two modules, no SDK, no HTTP client."""
    off = _with_a_sidecar(None)
    assert "natsmesh_sidecar.observe.tracing" not in off
    assert "natsmesh_sidecar.observe.otlp" not in off
    on = _with_a_sidecar("http://127.0.0.1:4318")
    assert sorted(set(on) - set(off)) == [
        "natsmesh_sidecar.observe.otlp",
        "natsmesh_sidecar.observe.tracing",
    ]


def test_stream_is_imported_only_when_a_body_streams() -> None:
    """A sidecar whose calls all fit one message holds none of the stream code
    (idle RSS must not grow), nor of the WebSocket tunnel: outbound, inbound
    and natsfast import them lazily."""
    for mods in (runtime_modules(), _with_a_sidecar(None)):
        assert [m for m in mods if m.startswith("natsmesh_sidecar.transport.stream")] == []


def test_http2_is_imported_only_when_a_connection_speaks_it() -> None:
    """No ``h2`` (nor our HTTP/2 edges) until a client sends the HTTP/2
    preface or a gRPC call reaches a ``protocol: grpc`` app: the HTTP/1.1
    path and idle RSS stay as they were."""
    for mods in (runtime_modules(), _with_a_sidecar(None)):
        assert [m for m in mods if m == "h2" or m.startswith(("h2.", "hpack", "hyperframe"))] == []
        assert "natsmesh_sidecar.edge.h2" not in mods
        assert "natsmesh_sidecar.edge.h2app" not in mods
