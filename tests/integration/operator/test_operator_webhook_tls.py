"""The webhook server picks up a rotated certificate without a restart.

cert-manager (or a re-generated chart Secret) rewrites tls.crt/tls.key in the
mounted Secret; new TLS handshakes must present the new chain while the
process keeps running. Real sockets, real TLS; the server's Kubernetes client
is never reached by the health endpoint used here.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from natsmesh_operator.api import NatsService
from natsmesh_operator.webhook.certgen import make_ca_and_cert
from natsmesh_operator.webhook.inject import InjectionSettings
from natsmesh_operator.webhook.server import WebhookServer
from tests.fixtures.nats_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def presented(port: int, cafile: Path) -> tuple[int, str]:
    """(serial of the served certificate, /healthz body), verified against ``cafile``."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        body = (await reader.read()).decode()
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der).serial_number, body


async def no_services(_: str) -> list[NatsService]:
    return []


async def test_rotated_certificate_is_served_without_restart(tmp_path: Path) -> None:
    first = make_ca_and_cert(tmp_path / "tls", ["127.0.0.1"])
    old_ca = tmp_path / "old-ca.crt"
    old_ca.write_bytes(first.cafile.read_bytes())
    port = free_port()
    server = WebhookServer(
        services_of=no_services,
        injection=InjectionSettings(),
        operator_namespace="natsmesh-system",
        cert=first,
        addr="127.0.0.1",
        port=port,
        cert_check_interval=0.1,
    )
    await server.start()
    try:
        serial, body = await presented(port, old_ca)
        assert body.endswith("ok")
        rotated = make_ca_and_cert(tmp_path / "tls", ["127.0.0.1"])  # a new CA and cert
        new_serial = x509.load_pem_x509_certificate(rotated.certfile.read_bytes()).serial_number
        assert new_serial != serial
        for _ in range(50):
            await asyncio.sleep(0.1)
            try:
                got, body = await presented(port, rotated.cafile)
            except ssl.SSLError:
                continue  # still the old chain
            if got == new_serial:
                break
        else:
            pytest.fail("the webhook kept serving the old certificate")
        assert body.endswith("ok")
        # The old CA no longer verifies the server.
        with pytest.raises(ssl.SSLError):
            await presented(port, old_ca)
    finally:
        await server.stop()
