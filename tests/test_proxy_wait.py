"""With trusted proxies a listener waits for a new connection's first bytes to look for a PROXY v2
header, before any protocol (and with it any other cap) exists. That wait must not be a way in:

* one address cannot hold every waiting slot (``MAX_AWAITING_PER_ADDRESS``, an IPv6 address
  counted under its /64): others, and tunnel clients, still get in; a trusted balancer, which
  carries every visitor, has only the listener's cap (``MAX_AWAITING_HEADER``);
* a connection that sent part of a signature costs nothing while it waits (it was looked at
  every 10 ms: ~1,000 of them kept a core busy); the rest of the header, or bytes that turn out
  not to be one, still go through as before.

Real sockets on 127.0.0.1 and 127.0.0.2 (both loopback on Linux)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import ferrotunnel.aio.listen as listen_mod
from ferrotunnel.addr import address_key as _awaiting_key
from ferrotunnel.aio.listen import MAX_AWAITING_PER_ADDRESS, listen
from ferrotunnel.protocol.proxyproto import TrustedProxies, encode_v2

PARTIAL = b"\r\n\r\n\x00"  # the first 5 bytes of the 12-byte PROXY v2 signature


class Echo(asyncio.Protocol):
    """Answers the first bytes upper-cased, then the peer a PROXY header named (if any), and closes."""

    peer_address = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer_address
        self.transport.write(data.upper() + (b" from %s" % peer[0].encode() if peer else b""))
        self.transport.close()


async def connect(addr, source: str = "127.0.0.1", send: bytes = b"") -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.bind((source, 0))
    except OSError:
        sock.close()
        pytest.skip(f"{source} is not a local address here")
    sock.setblocking(False)
    await loop.sock_connect(sock, addr)
    if send:
        await loop.sock_sendall(sock, send)
    return sock


async def answer(sock: socket.socket, timeout: float = 10) -> bytes:
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 100)
            except ConnectionResetError:
                return got + b"<reset>"
            if not chunk:
                return got
            got += chunk


async def until(cond, what: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_one_address_cannot_take_every_waiting_slot(run, monkeypatch):
    """Silent connections from one untrusted address beyond MAX_AWAITING_PER_ADDRESS are closed at
    once; a visitor from another address still gets in (before: the first address took all of
    MAX_AWAITING_HEADER, and every other visitor was reset until those timed out)."""
    monkeypatch.setattr(listen_mod, "MAX_AWAITING_HEADER", MAX_AWAITING_PER_ADDRESS + 36)  # (fewer sockets)
    total = MAX_AWAITING_PER_ADDRESS + 40  # over both caps from one address

    async def body():
        listener = await listen(Echo, "127.0.0.1", 0, "test port", proxies=TrustedProxies(["10.0.0.0/8"]),
                                header_timeout=30.0)
        addr = listener.sockets[0].getsockname()[:2]
        silent = [await connect(addr) for _ in range(total)]
        await until(lambda: listener.awaiting_header + sum(listener.proxy_refused.values()) == total,
                    "every connection taken")
        assert listener.awaiting_header == MAX_AWAITING_PER_ADDRESS
        assert listener.proxy_refused["awaiting_per_address"] == total - MAX_AWAITING_PER_ADDRESS
        assert await answer(silent[-1]) in (b"", b"<reset>")  # one over the cap: closed at once
        other = await connect(addr, "127.0.0.2", b"hello")
        assert await answer(other) == b"HELLO"
        other.close()
        for sock in silent:
            sock.close()
        await until(lambda: listener.awaiting_header == 0, "the waits end")
        assert not listener._awaiting_from
        again = await connect(addr, send=b"back")  # the first address has its slots back
        assert await answer(again) == b"BACK"
        again.close()
        listener.close()
        await listener.wait_closed()

    run(body)


def test_a_trusted_proxy_has_only_the_listener_cap(run):
    """The balancer's own address is not capped per address: all its visitors come from it."""
    count = MAX_AWAITING_PER_ADDRESS + 16

    async def body():
        listener = await listen(Echo, "127.0.0.1", 0, "test port", proxies=TrustedProxies(["127.0.0.1/32"]),
                                header_timeout=30.0)
        addr = listener.sockets[0].getsockname()[:2]
        silent = [await connect(addr) for _ in range(count)]
        await until(lambda: listener.awaiting_header == count, "every connection waiting")
        assert not listener.proxy_refused
        via = silent[0]
        await asyncio.get_running_loop().sock_sendall(via, encode_v2(("203.0.113.7", 4444), ("127.0.0.1", 80)) + b"hi")
        assert await answer(via) == b"HI from 203.0.113.7"
        for sock in silent:
            sock.close()
        listener.close()
        await listener.wait_closed()

    run(body)


def test_ipv6_addresses_count_under_their_64():
    assert _awaiting_key("192.0.2.1") == "192.0.2.1"
    assert _awaiting_key("2001:db8:1:2::5") == _awaiting_key("2001:db8:1:2:ffff:ffff:ffff:1") == "2001:db8:1:2::/64"
    assert _awaiting_key("2001:db8:1:3::5") != _awaiting_key("2001:db8:1:2::5")
    assert _awaiting_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert _awaiting_key("fe80::1%lo") == "fe80::/64"


def test_partial_signatures_cost_no_cpu_while_they_wait(run):
    """Connections that sent the first 5 bytes of a signature and nothing more: the process uses
    next to no CPU while they wait (before: each was looked at every 10 ms; 200 of them took
    half a core or more). Then the rest of a header still completes it, and bytes that turn out not
    to be one reach the protocol whole."""
    count = 200

    async def body():
        loop = asyncio.get_running_loop()
        listener = await listen(Echo, "127.0.0.1", 0, "test port", proxies=TrustedProxies(["127.0.0.1/32"]),
                                header_timeout=30.0)
        addr = listener.sockets[0].getsockname()[:2]
        held = [await connect(addr, send=PARTIAL) for _ in range(count)]
        await until(lambda: listener.awaiting_header == count, "every connection waiting")
        await asyncio.sleep(0.3)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(1.5)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        assert cpu < 0.1 * wall, f"{cpu:.2f}s of CPU in {wall:.2f}s with {count} partial signatures waiting"
        header = encode_v2(("203.0.113.7", 4444), ("127.0.0.1", 80))
        assert header.startswith(PARTIAL)
        await loop.sock_sendall(held[0], header[len(PARTIAL):] + b"hi")  # the rest of a header
        assert await answer(held[0]) == b"HI from 203.0.113.7"
        await loop.sock_sendall(held[1], header[len(PARTIAL):8])  # more of it, then something else
        await asyncio.sleep(0.05)
        await loop.sock_sendall(held[1], b"xyz")
        assert await answer(held[1], 5) == header[:8] + b"XYZ"
        await loop.sock_sendall(held[2], b"abc")  # not a header after all
        assert await answer(held[2], 5) == PARTIAL + b"ABC"
        for sock in held:
            sock.close()
        listener.close()
        await listener.wait_closed()

    run(body)


def test_a_partial_signature_then_a_close_is_not_looked_at_in_a_loop(run):
    """The peer sends part of a signature and half-closes: the socket stays readable with nothing
    new. The looks at it are spaced out (up to MAX_SIGNATURE_PAUSE), not made every 10 ms."""
    count = 200

    async def body():
        listener = await listen(Echo, "127.0.0.1", 0, "test port", proxies=TrustedProxies(["127.0.0.1/32"]),
                                header_timeout=30.0)
        addr = listener.sockets[0].getsockname()[:2]
        held = [await connect(addr, send=PARTIAL) for _ in range(count)]
        for sock in held:
            sock.shutdown(socket.SHUT_WR)
        await until(lambda: listener.awaiting_header == count, "every connection waiting")
        await asyncio.sleep(2.0)  # the pauses reach MAX_SIGNATURE_PAUSE
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(1.5)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        assert cpu < 0.1 * wall, f"{cpu:.2f}s of CPU in {wall:.2f}s with {count} half-closed partial signatures"
        for sock in held:
            sock.close()
        listener.close()
        await listener.wait_closed()

    run(body)


def test_close_ends_the_waits_even_as_their_sockets_turn_readable(run):
    """``close`` cancels the connections still waiting for their first bytes. Their peers closing
    in the same turn makes those sockets readable as the cancellation comes: before Python 3.12,
    ``asyncio.wait_for`` then swallowed it, and a connection that had sent part of a signature
    went on waiting, and ``wait_closed`` with it, for all of ``header_timeout``."""
    count = 100

    async def body():
        listener = await listen(Echo, "127.0.0.1", 0, "test port", proxies=TrustedProxies(["127.0.0.1/32"]),
                                header_timeout=30.0)
        addr = listener.sockets[0].getsockname()[:2]
        held = [await connect(addr, send=PARTIAL) for _ in range(count)]
        await until(lambda: listener.awaiting_header == count, "every connection waiting")
        await asyncio.sleep(0.1)
        for sock in held:
            sock.close()
        time.sleep(0.05)  # (the loop does not run) the ends arrive: the next turn finds the sockets readable
        await asyncio.sleep(0)  # this task goes first in that turn, the sockets' callbacks after it
        listener.close()
        async with asyncio.timeout(5):
            await listener.wait_closed()
        assert listener.awaiting_header == 0

    run(body)
