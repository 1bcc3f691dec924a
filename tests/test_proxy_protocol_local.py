"""Real visitor addresses for TCP: a client with ``proxy_protocol = "v1" | "v2"`` (``--proxy-protocol``)
asks for each stream's visitor address (``visitor-addr/1``; the server puts it in the OpenStream
headers) and sends its local service a PROXY header naming the visitor before the stream's bytes."""

from __future__ import annotations

import asyncio
import socket

import pytest

import ferrotunnel as ft
from ferrotunnel.protocol.proxyproto import ProxyV2Reader, encode_v1, header_for

from conftest import free_port
from test_cli import TOKEN, Proc


def test_headers_for_the_local_service():
    assert header_for("v1", "127.0.0.2:4000", ("127.0.0.1", 8000)) == b"PROXY TCP4 127.0.0.2 127.0.0.1 4000 8000\r\n"
    assert header_for("v1", "[::1]:4000", ("::1", 8000)) == b"PROXY TCP6 ::1 ::1 4000 8000\r\n"
    assert header_for("v1", "::1:4000", ("127.0.0.1", 8000)) == b"PROXY TCP6 ::1 :: 4000 8000\r\n"  # families differ
    assert header_for("v1", "127.0.0.2:4000", ("localhost", 8000)) == b"PROXY TCP4 127.0.0.2 0.0.0.0 4000 8000\r\n"
    assert header_for("v1", None, ("127.0.0.1", 8000)) == b"PROXY UNKNOWN\r\n"
    assert header_for("v1", "not-an-ip:1", ("127.0.0.1", 8000)) == b"PROXY UNKNOWN\r\n"
    assert header_for("v1", "::ffff:10.1.2.3:5", ("127.0.0.1", 8000)) == b"PROXY TCP4 10.1.2.3 127.0.0.1 5 8000\r\n"
    for visitor, want in (("127.0.0.2:4000", ("127.0.0.2", 4000)), (None, None)):
        r = ProxyV2Reader()
        h = r.feed(header_for("v2", visitor, ("127.0.0.1", 8000)))
        assert h is not None and h.source == want
        assert h.command == ("proxy" if want else "local")
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    # an IPv6 zone (scope id) is not part of the header's address: never a space or a line break
    # of it in the text header, which the local service parses
    for zone in ("eth0", "eth0\r\nX-Evil: 1", "a b"):
        assert header_for("v1", f"[fe80::1%{zone}]:80", ("::1", 8000)) == b"PROXY TCP6 fe80::1 ::1 80 8000\r\n"
        h = ProxyV2Reader().feed(header_for("v2", f"[fe80::1%{zone}]:80", ("::1", 8000)))
        assert h is not None and h.source == ("fe80::1", 80)
    with pytest.raises(ValueError):
        encode_v1(("fe80::1%eth0\r\nX: 1", 80), ("::1", 8000))
    # the local service's own zone (a link-local local_addr) is left out as well
    assert header_for("v1", "[fe80::2]:80", ("fe80::1%lo", 8000)) == b"PROXY TCP6 fe80::2 fe80::1 80 8000\r\n"
    h = ProxyV2Reader().feed(header_for("v2", "[fe80::2]:80", ("fe80::1%lo", 8000)))
    assert h is not None and h.destination == ("fe80::1", 8000)


class App:
    """A TCP app that reads what comes first (a PROXY header or not), then echoes."""

    def __init__(self) -> None:
        self.firsts: "asyncio.Queue[bytes]" = asyncio.Queue()

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def handle(self, reader, writer):
        first = await reader.read(512)
        await self.firsts.put(first)
        writer.write(b"echo:" + first)
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()


@pytest.mark.parametrize("version", ["v1", "v2", None])
def test_the_local_service_gets_the_visitors_address_first(run, version):
    async def body():
        app = App()
        local = await app.start()
        server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
        async with server:
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id="db",
                                     config=ft.ClientConfig(local_addr=local, proxy_protocol=version))
            task = asyncio.create_task(client.connect_and_run())
            try:
                await server.wait_for_session("db", timeout=10)
                async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="db") as ing:
                    r, w = await asyncio.open_connection(*ing.address, local_addr=("127.0.0.2", 0))
                    sport = w.get_extra_info("sockname")[1]
                    w.write(b"hello")
                    first = await asyncio.wait_for(app.firsts.get(), 15)
                    if version == "v1":
                        head = f"PROXY TCP4 127.0.0.2 127.0.0.1 {sport} {local[1]}\r\n".encode()
                        assert first.startswith(head) and first[len(head):] in (b"", b"hello"), first
                    elif version == "v2":
                        reader = ProxyV2Reader()
                        header = None
                        i = 0
                        while header is None:
                            n = reader.needed
                            header = reader.feed(first[i:i + n])
                            i += n
                        assert header.source == ("127.0.0.2", sport) and header.destination == tuple(local)
                    else:
                        assert first == b"hello"  # no header, and the server sent no visitor header
                    w.close()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        app.server.close()
    run(body, timeout=60)


def test_cli_client_sends_a_v1_header(tmp_path):
    async def app_main(port_box, got):
        async def handle(reader, writer):
            got.append(await reader.readuntil(b"\r\n"))
            got.append(await reader.read(5))
            writer.close()
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_box.append(srv.sockets[0].getsockname()[1])
        return srv

    async def body():
        box, got = [], []
        srv = await app_main(box, got)
        tport, iport = free_port(), free_port()
        server = Proc("server", "--bind", f"127.0.0.1:{tport}", "--tcp-bind", f"127.0.0.1:{iport}=db",
                      env={"FERROTUNNEL_TOKEN": TOKEN})
        client = None
        try:
            await asyncio.to_thread(server.wait_for, "listening")
            client = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{box[0]}",
                          "--tunnel-id", "db", "--proxy-protocol", "v1", env={"FERROTUNNEL_TOKEN": TOKEN})
            await asyncio.to_thread(client.wait_for, "connected to")
            r, w = await asyncio.open_connection("127.0.0.1", iport, local_addr=("127.0.0.2", 0))
            sport = w.get_extra_info("sockname")[1]
            w.write(b"hello")
            for _ in range(300):
                if len(got) == 2:
                    break
                await asyncio.sleep(0.05)
            w.close()
            assert got == [f"PROXY TCP4 127.0.0.2 127.0.0.1 {sport} {box[0]}\r\n".encode(), b"hello"], got
        finally:
            srv.close()
            server.kill()
            if client is not None:
                client.kill()

    asyncio.run(body())
