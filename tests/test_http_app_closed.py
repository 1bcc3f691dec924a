"""An app that closes its keep-alive connection after a complete response (a keep-alive timeout,
``Connection: close``): the visitor's connection ends after that response. Before, it was only
half-closed and the ingress kept reading requests on it: the next one went to whatever tunnel its
Host named, whose answer could not be written (``write() after write_eof()``, a traceback in the
session's read loop), and an answer of the ingress's own (a 404) raised before the connection was
closed, so its descriptor and its slot in the connection caps stayed held until the idle sweep."""

from __future__ import annotations

import asyncio
import logging

import ferrotunnel as ft


def test_a_request_after_the_app_closed_the_connection_goes_nowhere(run, caplog):
    async def body():
        got = {"web": [], "api": []}

        def app(name):
            async def handle(r, w):
                head = await r.readuntil(b"\r\n\r\n")
                got[name].append(head.split(b"\r\n")[0])
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await w.drain()
                w.close()  # one request answered, then the app closes its connection
            return handle

        apps = {n: await asyncio.start_server(app(n), "127.0.0.1", 0) for n in got}
        server = ft.TunnelServer(("127.0.0.1", 0), "tok")
        async with server:
            tasks = [asyncio.create_task(ft.TunnelClient(
                "%s:%d" % server.address, "tok", tunnel_id=n,
                config=ft.ClientConfig(local_addr=s.sockets[0].getsockname()[:2])).connect_and_run())
                for n, s in apps.items()]
            for n in got:
                await server.wait_for_session(n, timeout=10)
            async with ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
                for second in (b"GET /b HTTP/1.1\r\nHost: api\r\n\r\n", b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n"):
                    r, w = await asyncio.open_connection(*ing.address)
                    w.write(b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n")
                    first = await asyncio.wait_for(r.readuntil(b"ok"), 10)
                    assert first.startswith(b"HTTP/1.1 200 OK")
                    async with asyncio.timeout(10):
                        while ing.connections and not r.at_eof():  # the app's end reaches the visitor
                            if await r.read(100) == b"":
                                break
                    try:
                        w.write(second)  # too late: the connection is over
                        await w.drain()
                        assert await asyncio.wait_for(r.read(100), 10) == b""
                    except ConnectionError:
                        pass
                    w.close()
                async with asyncio.timeout(10):
                    while server.ingress_gate.open:  # both connections are gone: no slot stays held
                        await asyncio.sleep(0.02)
            assert got == {"web": [b"GET /a HTTP/1.1", b"GET /a HTTP/1.1"], "api": []}
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for s in apps.values():
            s.close()

    with caplog.at_level(logging.WARNING):
        run(body)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
