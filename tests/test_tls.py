"""TLS 1.3 with real certificates from generate_certs: tunnel, mTLS and every failure mode."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import stat

import pytest

import ferrotunnel as ft
from conftest import echo_handler
from ferrotunnel import tls


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    paths = tls.generate_certs(d, client=True)
    other = tls.generate_certs(d / "other")            # a CA the server does not trust
    expired = tls.generate_certs(d / "expired", days=-1)
    return {"dir": d, **{k: str(v) for k, v in paths.items()}, "other": other, "expired": expired}


def server_ctx(certs, mtls=False):
    return tls.server_context(certs["server.pem"], certs["server.key"], certs["ca.pem"] if mtls else None,
                              require_client_cert=mtls)


async def start(ctx, **kw):
    server = ft.TunnelServer(("127.0.0.1", 0), "secret-token", tls=ctx, **kw)
    await server.start()
    return server, "%s:%d" % server.address


def test_generated_files(certs):
    for name in ("ca", "server", "client"):
        assert os.path.exists(certs[f"{name}.pem"])
        mode = stat.S_IMODE(os.stat(certs[f"{name}.key"]).st_mode)
        assert mode == 0o600
    from cryptography import x509
    leaf = x509.load_pem_x509_certificate(open(certs["server.pem"], "rb").read())
    ca = x509.load_pem_x509_certificate(open(certs["ca.pem"], "rb").read())
    assert leaf.issuer == ca.subject and leaf.subject != ca.subject
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def test_contexts_default_to_tls13(certs):
    assert tls.server_context(certs["server.pem"], certs["server.key"]).minimum_version == ssl.TLSVersion.TLSv1_3
    c = tls.client_context(certs["ca.pem"])
    assert c.minimum_version == ssl.TLSVersion.TLSv1_3 and c.verify_mode == ssl.CERT_REQUIRED and c.check_hostname
    assert tls.client_context(skip_verify=True).verify_mode == ssl.CERT_NONE
    with pytest.raises(FileNotFoundError):
        tls.client_context("/nonexistent/ca.pem")
    with pytest.raises(ValueError):
        tls.server_context(certs["server.pem"], certs["server.key"], require_client_cert=True)


def test_tls_tunnel_carries_data(run, certs):
    async def body():
        server, addr = await start(server_ctx(certs))
        client = ft.TunnelClient(addr, "secret-token", tunnel_id="tls", tls=tls.client_context(certs["ca.pem"]))
        task = asyncio.create_task(client.connect_and_run(echo_handler))
        try:
            session = await server.wait_for_session("tls", timeout=10)
            assert session.connection.tls.version == "TLSv1.3"
            while client.session is None:
                await asyncio.sleep(0.01)
            assert client.session.connection.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
            s = await session.open_stream()
            data = os.urandom(3 * 1024 * 1024)
            s.write(data)
            s.write_eof()
            got = bytearray()
            async for chunk in s:
                got += chunk
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.close()
    run(body)


def test_mutual_tls(run, certs, caplog):
    async def body():
        server, addr = await start(server_ctx(certs, mtls=True))
        try:
            good = ft.TunnelClient(addr, "secret-token", tunnel_id="m1",
                                   tls=tls.client_context(certs["ca.pem"], certfile=certs["client.pem"],
                                                          keyfile=certs["client.key"]))
            session = await good.connect(echo_handler)
            assert session.tunnel_id == "m1"
            anonymous = ft.TunnelClient(addr, "secret-token", tunnel_id="m2", tls=tls.client_context(certs["ca.pem"]))
            with pytest.raises((ft.ConnectionLostError, ssl.SSLError, ConnectionError)):
                await anonymous.connect(echo_handler)  # refused: retryable, the client cannot tell it from a restart
            assert server.sessions.get_by_tunnel_id("m2") is None
            assert not session.is_closed
            await good.close()
        finally:
            await server.close()
    caplog.set_level(logging.INFO, logger="ferrotunnel")
    run(body)
    assert sum("TLS handshake from" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("case", ["plaintext", "tls12", "unknown_ca", "expired", "name_mismatch"])
def test_tls_failures_are_clear_and_leave_server_serving(run, certs, caplog, case):
    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=0)
        if case == "expired":
            ctx = tls.server_context(certs["expired"]["server.pem"], certs["expired"]["server.key"])
        else:
            ctx = server_ctx(certs)
        server, addr = await start(ctx, config=cfg)
        host, port = server.address
        try:
            if case == "plaintext":
                c = ft.TunnelClient(addr, "secret-token")
                with pytest.raises(ft.HandshakeError, match="this port speaks TLS: connect with --tls"):
                    await c.connect(echo_handler)  # told in plaintext: not retried
            elif case == "tls12":
                ctx12 = ssl.create_default_context(cafile=certs["ca.pem"])
                ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
                with pytest.raises(ssl.SSLError):
                    await asyncio.open_connection(host, port, ssl=ctx12, server_hostname="localhost")
            else:
                ca = certs["other"]["ca.pem"] if case == "unknown_ca" else (
                    certs["expired"]["ca.pem"] if case == "expired" else certs["ca.pem"])
                name = "wrong.example" if case == "name_mismatch" else None
                c = ft.TunnelClient(addr, "secret-token", tls=tls.client_context(ca), server_name=name)
                with pytest.raises(ft.TlsVerificationError, match="failed verification"):
                    await c.connect_and_run(echo_handler)  # fatal: raised, not retried
            await asyncio.sleep(0.1)
            if case != "expired":  # the server still serves a good client
                ok = ft.TunnelClient(addr, "secret-token", tunnel_id="ok", tls=tls.client_context(certs["ca.pem"]))
                await ok.connect(echo_handler)
                await ok.close()
        finally:
            await server.close()
    caplog.set_level(logging.INFO, logger="ferrotunnel")
    run(body)
    assert sum("TLS handshake from" in r.message for r in caplog.records) == 1


def test_skip_verify_only_when_asked(run, certs):
    async def body():
        server, addr = await start(server_ctx(certs))
        try:
            c = ft.TunnelClient(addr, "secret-token", tls=tls.client_context(skip_verify=True), server_name="anything")
            session = await c.connect(echo_handler)
            assert not session.is_closed
            await c.close()
        finally:
            await server.close()
    run(body)


def test_health_checks_are_not_authentication_failures(run, certs):
    """A connection closed before its first byte (a balancer's TCP check) is neither a TLS failure
    nor counted against its address: ten of them, then a real client from the same address."""

    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=2)
        server, addr = await start(server_ctx(certs), config=cfg)
        try:
            for _ in range(10):
                r, w = await asyncio.open_connection(*server.address)
                w.close()
                await w.wait_closed()
            await asyncio.sleep(0.2)
            assert server.tls_failures == 0
            ok = ft.TunnelClient(addr, "secret-token", tunnel_id="hc", tls=tls.client_context(certs["ca.pem"]))
            await ok.connect(echo_handler)  # not throttled
            await ok.close()
        finally:
            await server.close()
    run(body)


def test_bytes_of_unfinished_tls_handshakes_count_toward_max_preauth_bytes(run, certs, caplog):
    """A TLS record the handshake has not processed yet (here: 16 KiB of a record that never
    completes) is held by the connection as surely as a tunnel handshake's bytes: counted in
    ``max_preauth_bytes`` as it arrives (before, TLS connections held it uncounted, so this cap did
    not bound what a stranger's pending TLS handshakes could make the server hold)."""
    import struct

    cap = 40 * 1024

    async def body():
        server, addr = await start(server_ctx(certs),
                                   config=ft.ServerConfig(max_preauth_bytes=cap, handshake_timeout=60.0))
        try:
            conns = [await asyncio.open_connection(*server.address) for _ in range(6)]
            async with asyncio.timeout(10):
                while server.pending_handshakes < 6:
                    await asyncio.sleep(0.01)
            record = struct.pack(">BHH", 0x16, 0x0301, 16384) + b"\x01" * 16000  # never finished
            for _, w in conns:
                w.write(record)
                await w.drain()

            async def closed(r):
                try:
                    return await asyncio.wait_for(r.read(), 3.0) == b""
                except ConnectionError:
                    return True
                except TimeoutError:
                    return False

            ended = await asyncio.gather(*(closed(r) for r, _ in conns))
            assert sum(ended) >= 4, ended  # two hold about 32 KiB; each further one passes the cap
            assert server.preauth_bytes <= cap
            assert server.refused_connections["max_preauth_bytes"] == sum(ended)
            for _, w in conns:
                w.close()
            async with asyncio.timeout(10):
                while server.pending_handshakes:
                    await asyncio.sleep(0.01)
            assert server.preauth_bytes == 0
            # a real TLS client is served, and holds nothing once accepted
            client = ft.TunnelClient(addr, "secret-token", tunnel_id="after",
                                     tls=tls.client_context(certs["ca.pem"]))
            task = asyncio.create_task(client.connect_and_run(echo_handler))
            await server.wait_for_session("after", timeout=10)
            assert server.preauth_bytes == 0
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await server.close()

    run(body)


def test_a_throttled_address_gets_no_tls_handshake(run, certs):
    """Failed TLS handshakes throttle their address like failed logins, and a throttled address's
    connections are closed at accept: a stranger replaying ClientHellos no longer makes the server
    do a key exchange and a signature for each (an audit measured 9,252 full server flights in 5 s)."""

    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=2)
        server, addr = await start(server_ctx(certs), config=cfg)
        host, port = server.address
        wrong = tls.client_context(certs["other"]["ca.pem"])  # fails verification: a TLS failure each
        try:
            for _ in range(3):
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await asyncio.open_connection(host, port, ssl=wrong, server_hostname="localhost")
            await asyncio.sleep(0.2)
            assert server.throttled((host, 1))
            failures, refused = server.tls_failures, server.refused_connections.get("auth_failure_threshold", 0)
            assert failures == 2 and refused == 1  # the third was closed at accept already
            good = tls.client_context(certs["ca.pem"])
            with pytest.raises((ssl.SSLError, ConnectionError)):  # no ServerHello comes: closed at accept
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=good, server_hostname="localhost"), 10)
                w.close()
            await asyncio.sleep(0.1)
            assert server.refused_connections.get("auth_failure_threshold") == refused + 1
            assert server.tls_failures == failures  # no handshake was attempted
        finally:
            await server.close()
    run(body)
