"""The HTTPS ingress's connection caps (``ingress_max_per_address``, ``ingress_max_connections``,
``ingress_fd_reserve``) hold from the accept on, before any TLS: a stranger cannot keep
connections that never finish their handshake beyond them. A connection counted before TLS
leaves the count once, whether its handshake fails, runs out of time, or succeeds and the
connection closes later. On both event loops (uvloop takes another listening path)."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket

import pytest

from ferrotunnel.aio import listen as listen_mod
from ferrotunnel.aio.listen import FdHeadroom
from ferrotunnel.protocol.proxyproto import TrustedProxies, encode_v2
from ferrotunnel.server.https import HttpsIngress

from test_http_proxy import response
from test_https_ingress import DOMAIN, _client_ctx, certs, get, https_tunnels  # noqa: F401  (certs: a fixture)

#: Only catches hangs: a refused connection is closed at once.
WAIT = 20.0
DEST = ("127.0.0.1", 443)


@pytest.fixture(autouse=True)
def _slow_tls_handshakes(monkeypatch):
    """A handshake timeout far beyond WAIT, so a connection closed within WAIT was closed by a cap
    (a test that wants the timeout sets its own)."""
    monkeypatch.setattr(listen_mod, "TLS_HANDSHAKE_TIMEOUT", 120.0)


async def _open_from(host: str, addr) -> tuple:
    """A bare TCP connection from ``host`` (a loopback address): no TLS byte is sent."""
    return await asyncio.open_connection(*addr, local_addr=(host, 0))


async def _closed(reader: asyncio.StreamReader) -> None:
    """Wait (at most WAIT) until the server closes the connection: EOF or a reset."""
    try:
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
    except ConnectionResetError:
        pass


async def _until(cond, what: str) -> None:
    """Poll ``cond`` until it holds; fail after WAIT seconds."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


async def _request(certs, port: int, tunnel: str = "web", path: str = "/") -> bytes:  # noqa: F811
    """One full TLS request through the ingress; the app's answer."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(certs),
                                         server_hostname=f"{tunnel}.{DOMAIN}")
    try:
        w.write(get(f"{tunnel}.{DOMAIN}", path))
        return (await response(r))[1]
    finally:
        w.close()


def test_per_address_cap_closes_bare_connections_before_tls(run, certs, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="ferrotunnel")

    async def body():
        async with https_tunnels(certs) as (ing, apps):
            gate = ing.server.ingress_gate
            gate.per_address = 2  # this server's cap, made small
            held = [await _open_from("127.0.0.1", ing.address) for _ in range(2)]
            await _until(lambda: gate.open == 2, "the first two were not counted at the accept")
            extra = [await _open_from("127.0.0.1", ing.address) for _ in range(6)]
            for r, _ in extra:
                await _closed(r)
            assert gate.open == 2 and gate.refused["per_address"] == 6
            assert not any(r.at_eof() for r, _ in held)  # the allowed ones stay
            # another address is not held back by this one
            r2, w2 = await _open_from("127.0.0.2", ing.address)
            await _until(lambda: gate.open == 3, "another address was not admitted")
            for _, w in held + extra + [(r2, w2)]:
                w.close()
            await _until(lambda: gate.open == 0, "the count did not come back to 0")
            # admitted again: a full request through TLS, twice from one address (cap 2)
            assert await _request(certs, ing.address[1], "web", "/a") == b"web GET /a "
            assert await _request(certs, ing.address[1], "api", "/b") == b"api GET /b "
            await _until(lambda: gate.open == 0, "a finished TLS connection kept its slot")
            assert gate.refused["per_address"] == 6
    run(body)
    said = [r.getMessage() for r in caplog.records if "refusing connections from" in r.getMessage()]
    assert len(said) == 1 and "127.0.0.1" in said[0], said  # six refusals, one line


def test_total_cap_closes_bare_connections_before_tls(run, certs):  # noqa: F811
    async def body():
        async with https_tunnels(certs) as (ing, apps):
            gate = ing.server.ingress_gate
            gate.total = 3
            held = [await _open_from(f"127.0.0.{i}", ing.address) for i in (1, 2, 3)]
            await _until(lambda: gate.open == 3, "the first three were not counted at the accept")
            extra = [await _open_from(f"127.0.0.{i}", ing.address) for i in (4, 5, 6, 7)]
            for r, _ in extra:
                await _closed(r)
            assert gate.open == 3 and gate.refused["total"] == 4
            assert not any(r.at_eof() for r, _ in held)
            for _, w in held + extra:
                w.close()
            await _until(lambda: gate.open == 0, "the count did not come back to 0")
            assert await _request(certs, ing.address[1]) == b"web GET / "
            await _until(lambda: gate.open == 0, "a finished TLS connection kept its slot")
    run(body)


def test_descriptor_reserve_closes_bare_connections_before_tls(run, certs):  # noqa: F811
    async def body():
        async with https_tunnels(certs) as (ing, apps):
            gate = ing.server.ingress_gate
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            gate.headroom = FdHeadroom(soft - 1, limit=soft)  # every new descriptor is in the reserve
            r, w = await _open_from("127.0.0.1", ing.address)
            await _closed(r)
            w.close()
            assert gate.refused["fd_reserve"] == 1 and gate.open == 0
    run(body)


def test_a_failed_or_timed_out_handshake_leaves_the_count_once(run, certs, monkeypatch):  # noqa: F811
    async def body():
        async with https_tunnels(certs) as (ing, apps):
            gate = ing.server.ingress_gate
            gate.per_address = 1  # a slot kept by mistake would refuse the next connection
            # not TLS: the handshake fails
            r, w = await _open_from("127.0.0.1", ing.address)
            w.write(b"GET / HTTP/1.1\r\nHost: web.example.test\r\n\r\n")
            await _closed(r)
            w.close()
            await _until(lambda: gate.open == 0, "a failed handshake kept its slot")
            assert await _request(certs, ing.address[1], path="/after-failure") == b"web GET /after-failure "
            await _until(lambda: gate.open == 0, "a finished TLS connection kept its slot")
            # nothing sent: the handshake runs out of time
            monkeypatch.setattr(listen_mod, "TLS_HANDSHAKE_TIMEOUT", 0.5)
            r, w = await _open_from("127.0.0.1", ing.address)
            await _until(lambda: gate.open == 1, "the idle connection was not counted")
            await _closed(r)
            w.close()
            await _until(lambda: gate.open == 0, "a timed-out handshake kept its slot")
            assert await _request(certs, ing.address[1], path="/after-timeout") == b"web GET /after-timeout "
            await _until(lambda: gate.open == 0, "a finished TLS connection kept its slot")
            # a client that goes away in the middle of its handshake
            r, w = await _open_from("127.0.0.1", ing.address)
            await _until(lambda: gate.open == 1, "the connection was not counted")
            w.close()
            await _until(lambda: gate.open == 0, "an abandoned handshake kept its slot")
            assert gate.refused == {}
            # a finished handshake: the bridge takes the slot over, and counts it once (not twice)
            r, w = await asyncio.open_connection("127.0.0.1", ing.address[1], ssl=_client_ctx(certs),
                                                 server_hostname=f"web.{DOMAIN}")
            w.write(get(f"web.{DOMAIN}", "/held"))
            assert (await response(r))[1] == b"web GET /held "
            assert gate.open == 1
            r2, w2 = await _open_from("127.0.0.1", ing.address)  # over the cap of 1
            await _closed(r2)
            w2.close()
            assert gate.open == 1 and gate.refused == {"per_address": 1}
            w.close()
            await _until(lambda: gate.open == 0, "a finished TLS connection kept its slot")
    run(body)


def test_behind_a_trusted_proxy_the_visitor_named_counts_before_tls(run, certs):  # noqa: F811
    async def body():
        async with https_tunnels(certs) as (ing, apps):
            server = ing.server
            server.trusted_proxies = TrustedProxies(("127.0.0.1/32",))
            gate = server.ingress_gate
            gate.per_address = 1
            async with HttpsIngress(server, ("127.0.0.1", 0), str(certs["wildcard.pem"]),
                                    str(certs["wildcard.key"]), domain=DOMAIN) as proxied:
                addr = proxied.address
                visitor = encode_v2(("203.0.113.7", 4444), DEST)
                r1, w1 = await _open_from("127.0.0.1", addr)
                w1.write(visitor)  # and no TLS yet
                await _until(lambda: gate.open == 1, "the named visitor was not counted before TLS")
                r2, w2 = await _open_from("127.0.0.1", addr)
                w2.write(visitor)  # the same visitor again: over its cap
                await _closed(r2)
                assert gate.refused == {"per_address": 1}
                # another visitor through the same proxy: a full request over TLS after its header
                sock = socket.create_connection(addr)
                sock.sendall(encode_v2(("198.51.100.1", 1), DEST))
                sock.setblocking(False)
                r3, w3 = await asyncio.open_connection(sock=sock, ssl=_client_ctx(certs),
                                                       server_hostname=f"web.{DOMAIN}")
                w3.write(get(f"web.{DOMAIN}", "/proxied"))
                assert (await response(r3))[1] == b"web GET /proxied "
                assert gate.open == 2
                for w in (w1, w2, w3):
                    w.close()
                await _until(lambda: gate.open == 0, "the count did not come back to 0")
    run(body)
