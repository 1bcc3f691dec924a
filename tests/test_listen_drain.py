"""``Listener.stop_listening`` (a draining node's listeners, a server's shutdown) closes the
listening sockets without dropping a connection that already reached this host:

* connections the kernel completed and queued for ``accept()`` are taken first; closing the
  socket with them queued resets them, and a balancer that already passed a visitor's bytes on
  may answer that visitor with nothing;
* connections accepted and still reading their PROXY header go on (before, they were cancelled
  and closed: again an empty answer through the balancer).

Each case runs on the listener's two accept paths: uvloop's own (no trusted proxies) and the
listener's accept loop (trusted proxies; the selector event loop always)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ferrotunnel.aio.listen import listen
from ferrotunnel.protocol.proxyproto import TrustedProxies

N = 6


class Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())
        self.transport.close()


async def answer(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    got = b""
    async with asyncio.timeout(10):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 100)
            except ConnectionResetError:
                return got + b"<reset>"
            if not chunk:
                return got
            got += chunk


@pytest.mark.parametrize("proxies", [False, True], ids=["loop-accepts", "listener-accepts"])
def test_connections_queued_in_the_kernel_are_served_after_stop_listening(run, proxies):
    async def body():
        listener = await listen(Echo, "127.0.0.1", 0, "test port",
                                proxies=TrustedProxies(["127.0.0.1/32"]) if proxies else None)
        host, port = listener.sockets[0].getsockname()[:2]
        # connected by the kernel, not yet accepted: the event loop does not run between these
        # lines and stop_listening
        clients = [socket.create_connection((host, port)) for _ in range(N)]
        for i, c in enumerate(clients):
            c.sendall(b"hello %d" % i)
        listener.stop_listening()
        answers = await asyncio.gather(*(answer(c) for c in clients))
        assert answers == [b"HELLO %d" % i for i in range(N)]
        with pytest.raises(ConnectionRefusedError):  # and the port is closed
            socket.create_connection((host, port), timeout=5)
        for c in clients:
            c.close()
        listener.close()
        await listener.wait_closed()

    run(body)


def test_a_connection_still_reading_its_proxy_header_is_served_after_stop_listening(run):
    async def body():
        listener = await listen(Echo, "127.0.0.1", 0, "test port", proxies=TrustedProxies(["127.0.0.1/32"]))
        host, port = listener.sockets[0].getsockname()[:2]
        client = socket.create_connection((host, port))
        async with asyncio.timeout(10):
            while listener.awaiting_header == 0:  # accepted, waiting for its first bytes
                await asyncio.sleep(0.01)
        listener.stop_listening()
        await asyncio.sleep(0.05)
        client.sendall(b"late")
        assert await answer(client) == b"LATE"
        client.close()
        listener.close()
        await listener.wait_closed()

    run(body)
