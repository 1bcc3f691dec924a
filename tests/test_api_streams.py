"""The idiomatic API (issue 13, point 3): VirtualStream as asyncio's StreamReader/StreamWriter
(read to EOF under a cap, readline/readuntil/readexactly, get_extra_info, bytes-like writes),
addresses as "host:port" or (host, port), ``async with TunnelClient`` and ``async for stream in
session``. A real TunnelServer and TunnelClient on 127.0.0.1, on uvloop and asyncio."""

from __future__ import annotations

import asyncio

import pytest

import ferrotunnel as ft
import ferrotunnel.aio.stream as stream_mod
from conftest import tunnel

TOKEN = "secret-token"


def scripted(*steps):
    """A client stream handler that writes ``steps`` (bytes; a float: sleep that long; an Event:
    wait for it), then half-closes and waits for the opener to close."""
    async def handler(stream):
        for step in steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
            elif isinstance(step, asyncio.Event):
                await step.wait()
            else:
                stream.write(step)
                await stream.drain()
        stream.write_eof()
        await stream.read()

    return handler


# ---------------------------------------------------------------- reading

def test_read_without_size_reads_to_eof_past_the_flow_window(run):
    big = bytes(range(256)) * 4096  # 1 MiB: four times the initial flow window
    chunks = [big[i:i + 65536] for i in range(0, len(big), 65536)]

    async def body():
        async with tunnel(scripted(*chunks)) as (server, client, session):
            assert session.flow_control
            s = await session.open_stream()
            assert await s.read() == big  # everything, not what happened to be buffered
            assert s.at_eof() and await s.read() == b"" and await s.read(10) == b""
            await s.aclose()
    run(body)


def test_read_to_eof_cap_raises_limit_exceeded_and_keeps_the_bytes(run, monkeypatch):
    payload = b"0123456789" * 30_000  # 300 kB

    async def body():
        async with tunnel(scripted(payload[:100_000], 0.01, payload[100_000:])) as (server, client, session):
            s = await session.open_stream()
            with pytest.raises(ft.LimitExceededError, match="limit"):
                await s.read(limit=50_000)
            assert await s.read(limit=1_000_000) == payload  # nothing was lost
            windows = session.connection.core.windows
            assert windows.total_unread == 0  # each byte's credit went back once: none held, none twice
            await s.aclose()

            s = await session.open_stream()  # the per-stream cap
            s.read_limit = 1000
            with pytest.raises(ft.LimitExceededError):
                await s.read()
            with pytest.raises(ValueError, match="positive"):
                await s.read(limit=0)
            s.abort()

            monkeypatch.setattr(stream_mod, "READ_TO_EOF_LIMIT", 2000)  # the module default
            s = await session.open_stream()
            with pytest.raises(ft.LimitExceededError):
                await s.read()
            assert await s.read(-1, limit=10**6) == payload
            assert windows.total_unread == 0
            await s.aclose()
    run(body)


def test_readline_readuntil_and_partial_at_eof(run):
    async def body():
        handler = scripted(b"li", 0.01, b"ne1\nlin", 0.01, b"e2\r", 0.01, b"\nthird\nrest")
        async with tunnel(handler) as (server, client, session):
            s = await session.open_stream()
            assert await s.readline() == b"line1\n"
            assert await s.readuntil(b"\r\n") == b"line2\r\n"
            assert await s.readuntil(b"\n") == b"third\n"
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await s.readuntil(b"\n")
            assert info.value.partial == b"rest" and info.value.expected is None
            assert s.at_eof()
            assert await s.readline() == b""
            with pytest.raises(ValueError):
                await s.readuntil(b"")
            await s.aclose()
        async with tunnel(scripted(b"abc")) as (server, client, session):  # a last line without its newline
            s = await session.open_stream()
            assert await s.readline() == b"abc"
            assert await s.readline() == b""
            await s.aclose()
    run(body)


def test_readuntil_limit_overrun_keeps_data_and_readline_drops_the_line(run):
    async def body():
        gate = asyncio.Event()
        handler = scripted(b"x" * 200 + b"\n", 0.01, b"short\n", b"y" * 300 + b"\nlast\n", 0.01, b"z" * 300, gate,
                           b"\nend\n")
        async with tunnel(handler) as (server, client, session):
            s = await session.open_stream()
            with pytest.raises(asyncio.LimitOverrunError) as info:
                await s.readuntil(b"\n", limit=100)
            assert info.value.consumed > 100
            assert await s.readuntil(b"\n", limit=1000) == b"x" * 200 + b"\n"  # still buffered
            assert await s.readline(limit=100) == b"short\n"
            with pytest.raises(ValueError, match="limit"):
                await s.readline(limit=100)
            assert await s.readline() == b"last\n"  # the long line was dropped with its newline
            with pytest.raises(ValueError, match="limit"):
                await s.readline(limit=100)  # no newline yet: what is buffered is dropped, as asyncio does
            gate.set()
            assert await s.readline() == b"\n" and await s.readline() == b"end\n"
            s.line_limit = 3
            assert await s.readline() == b""
            await s.aclose()
    run(body)


def test_readexactly(run):
    async def body():
        async with tunnel(scripted(b"0123", 0.01, b"456789")) as (server, client, session):
            s = await session.open_stream()
            assert await s.readexactly(0) == b""
            assert await s.readexactly(5) == b"01234"
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await s.readexactly(10)
            assert info.value.partial == b"56789" and info.value.expected == 10
            with pytest.raises(ValueError):
                await s.readexactly(-1)
            await s.aclose()
    run(body)


def test_read_n_and_read_some_return_what_is_there(run):
    async def body():
        gate = asyncio.Event()

        async def handler(stream):
            stream.write(b"first")
            await gate.wait()
            stream.write(b"second")
            stream.write_eof()
            await stream.read()

        async with tunnel(handler) as (server, client, session):
            s = await session.open_stream()
            assert await s.read(100) == b"first"  # does not wait for more
            gate.set()
            assert await s.read_some() == b"second"
            assert await s.read_some() == b""
            await s.aclose()
    run(body)


# ---------------------------------------------------------------- writing

def test_write_takes_bytes_like_and_refuses_text(run):
    async def body():
        async with tunnel() as (server, client, session):  # echo
            s = await session.open_stream()
            with pytest.raises(TypeError, match="encode"):
                s.write("text")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="bytes, bytearray or memoryview"):
                s.write(123)  # type: ignore[arg-type]
            s.write(b"a")
            s.write(bytearray(b"b"))
            s.write(memoryview(b"xcx")[1:2])
            s.writelines([b"d", bytearray(b"e"), memoryview(b"f")])
            s.writelines(iter([b"g"]))
            await s.drain()
            assert s.can_write_eof()
            s.write_eof()
            assert await s.read() == b"abcdefg"
            assert not s.is_closing()
            s.close()
            assert s.is_closing()
            await asyncio.wait_for(s.wait_closed(), 10)
            with pytest.raises(ft.StreamClosedError):
                s.write(b"late")
    run(body)


# ---------------------------------------------------------------- get_extra_info

def test_get_extra_info_on_both_ends(run):
    async def body():
        seen = asyncio.get_running_loop().create_future()

        async def handler(stream):
            keys = ("peername", "tunnel_id", "session_id", "protocol", "stream_id")
            seen.set_result({k: stream.get_extra_info(k) for k in keys})
            await stream.read()

        async with tunnel(handler, tunnel_id="info") as (server, client, session):
            s = session.open_stream_nowait(ft.Protocol.TCP, ft.StreamPriority.NORMAL,
                                           (("ft-visitor", "198.51.100.9:5555"),), peername=("203.0.113.7", 4242))
            got = await asyncio.wait_for(seen, 10)
            assert got == {"peername": ("198.51.100.9", 5555), "tunnel_id": "info",
                           "session_id": client.session.id, "protocol": ft.Protocol.TCP,
                           "stream_id": s.stream_id}
            assert s.get_extra_info("peername") == ("203.0.113.7", 4242)  # what the opener passed
            assert s.get_extra_info("tunnel_id") == "info"
            assert s.get_extra_info("session_id") == session.id
            assert s.get_extra_info("protocol") is ft.Protocol.TCP
            assert s.get_extra_info("sockname", "none") == "none"
            plain = await session.open_stream()
            assert plain.get_extra_info("peername") is None
            assert plain.get_extra_info("peername", ("?", 0)) == ("?", 0)
            s.write_eof()
            plain.abort()
            await s.aclose()
    run(body)


def test_peername_is_the_visitor_through_a_tcp_ingress(run):
    async def body():
        seen = asyncio.get_running_loop().create_future()

        async def handler(stream):
            seen.set_result(stream.get_extra_info("peername"))
            stream.write(b"hi")
            stream.write_eof()
            await stream.read()

        # proxy_protocol makes the client ask for visitor-addr/1, so the server names the visitor
        cfg = ft.ClientConfig(proxy_protocol="v1")
        async with tunnel(handler, client_config=cfg, tunnel_id="vis") as (server, client, session):
            async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="vis") as ingress:
                r, w = await asyncio.open_connection(*ingress.address)
                try:
                    assert await asyncio.wait_for(r.read(), 10) == b"hi"
                    assert await asyncio.wait_for(seen, 10) == w.get_extra_info("sockname")[:2]
                finally:
                    w.close()
    run(body)


# ---------------------------------------------------------------- addresses

def test_as_address_forms_and_errors():
    assert ft.as_address("127.0.0.1:7835") == ("127.0.0.1", 7835)
    assert ft.as_address(("127.0.0.1", 7835)) == ("127.0.0.1", 7835)
    assert ft.as_address(["example.test", 80]) == ("example.test", 80)
    assert ft.as_address("[::1]:7835") == ("::1", 7835)
    assert ft.as_address(("::1", 7835)) == ("::1", 7835)
    assert ft.as_address(("[::1]", 7835)) == ("::1", 7835)
    assert ft.as_address("127.0.0.1:0", bind=True) == ("127.0.0.1", 0)
    assert ft.as_address(("", 0), bind=True) == ("", 0)
    for bad, kind, words in [
        ("127.0.0.1", ValueError, "HOST:PORT"),
        ("127.0.0.1:0", ValueError, "1..65535"),
        ("127.0.0.1:65536", ValueError, "1..65535"),
        ("http://127.0.0.1:7835", ValueError, "scheme"),
        ("::1:7835", ValueError, "brackets"),
        ("[]:7835", ValueError, "empty"),
        (("127.0.0.1", 70000), ValueError, "1..65535"),
        (("127.0.0.1", 0), ValueError, "1..65535"),
        (("", 80), ValueError, "empty"),
        (("127.0.0.1",), ValueError, "1 items"),
        (("127.0.0.1", "7835"), TypeError, "port must be an int"),
        (("127.0.0.1", True), TypeError, "port must be an int"),
        ((b"127.0.0.1", 7835), TypeError, "host must be a str"),
        (7835, TypeError, "got int"),
        (None, TypeError, "got NoneType"),
    ]:
        with pytest.raises(kind) as info:
            ft.as_address(bad, "the_arg")
        msg = str(info.value)
        assert msg.startswith("the_arg") and words in msg, (bad, msg)
        assert "(host, port)" in msg or "port must be in" in msg or "scheme" in msg, msg


def test_tunnel_client_names_the_bad_argument():
    with pytest.raises(ValueError, match=r"^server_addr: .*HOST:PORT.*\(host, port\)"):
        ft.TunnelClient("127.0.0.1", TOKEN)
    with pytest.raises(TypeError, match=r"^server_addr must be .*got int"):
        ft.TunnelClient(7835, TOKEN)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^server_addr: .*scheme"):
        ft.TunnelClient("http://127.0.0.1:7835", TOKEN)
    with pytest.raises(ValueError, match=r"^local_addr: "):
        ft.TunnelClient("127.0.0.1:7835", TOKEN, local_addr="localhost")
    with pytest.raises(TypeError, match=r"^local_addr: the port"):
        ft.TunnelClient("127.0.0.1:7835", TOKEN, config=ft.ClientConfig(local_addr=("h", "80")))  # type: ignore[arg-type]
    c = ft.TunnelClient(("::1", 7835), TOKEN, local_addr="[::1]:8080")
    assert (c.host, c.port, c.address, c.local_addr) == ("::1", 7835, "[::1]:7835", ("::1", 8080))
    assert c.config.local_addr == ("::1", 8080)
    assert ft.TunnelClient("127.0.0.1:7835", TOKEN).local_addr == ft.ClientConfig().local_addr


@pytest.mark.parametrize("form", ["string", "tuple"])
def test_both_address_forms_connect_and_forward(run, form):
    async def body():
        async def echo(r, w):
            w.write(await r.read())
            await w.drain()
            w.close()

        local = await asyncio.start_server(echo, "127.0.0.1", 0)
        lport = local.sockets[0].getsockname()[1]
        try:
            async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
                host, port = server.address
                if form == "string":
                    client = ft.TunnelClient(f"{host}:{port}", TOKEN, tunnel_id="f", local_addr=f"127.0.0.1:{lport}")
                else:
                    client = ft.TunnelClient((host, port), TOKEN, tunnel_id="f", local_addr=("127.0.0.1", lport))
                async with client:
                    task = asyncio.create_task(client.connect_and_run())  # the default handler forwards
                    session = await server.wait_for_session("f", timeout=10)
                    s = await session.open_stream()
                    s.write(b"through the local address")
                    s.write_eof()
                    assert await asyncio.wait_for(s.read(), 10) == b"through the local address"
                    await s.aclose()
                assert task.done()
        finally:
            local.close()
    run(body)


def test_ipv6_address_in_brackets(run):
    async def body():
        async with ft.TunnelServer(("::1", 0), TOKEN) as server:
            port = server.address[1]
            async with ft.TunnelClient(f"[::1]:{port}", TOKEN, tunnel_id="six") as client:
                session = await client.connect(accept=True)
                assert session.established and client.address == f"[::1]:{port}"
    run(body)


# ---------------------------------------------------------------- async with / async for

def test_async_with_starts_nothing_and_cancels_connect_and_run(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            host, port = server.address
            async with ft.TunnelClient((host, port), TOKEN, tunnel_id="w") as client:
                await asyncio.sleep(0.1)
                assert client.session is None and len(server.sessions) == 0  # nothing started
                task = asyncio.create_task(client.connect_and_run(scripted(b"x")))
                session = await server.wait_for_session("w", timeout=10)
            # leaving the block cancelled the run and closed the client
            assert task.done() and task.cancelled()
            assert client.session is None
            await asyncio.wait_for(session.wait_closed(), 10)

            # connect_and_run awaited inside the block: an exception leaves through it
            client = ft.TunnelClient((host, port), TOKEN, tunnel_id="w2")
            with pytest.raises(asyncio.TimeoutError):
                async with client:
                    await asyncio.wait_for(client.connect_and_run(), 0.5)
            assert client.session is None
    run(body)


def test_async_for_over_a_session_on_both_ends(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:  # no stream handler: accept()
            host, port = server.address
            async with ft.TunnelClient((host, port), TOKEN, tunnel_id="it") as client:
                csession = await client.connect(accept=True)
                ssession = await server.wait_for_session("it", timeout=10)

                async def collect(session):
                    return [await stream.read() async for stream in session]

                # server-opened streams, iterated on the client
                on_client = asyncio.create_task(collect(csession))
                for i in range(3):
                    s = await ssession.open_stream()
                    s.write(b"to client %d" % i)
                    s.write_eof()
                # client-opened streams, iterated on the server
                on_server = asyncio.create_task(collect(ssession))
                for i in range(2):
                    s = await csession.open_stream()
                    s.write(b"to server %d" % i)
                    s.write_eof()
                await asyncio.sleep(0.2)
                assert not on_client.done() and not on_server.done()  # still waiting for more
                await client.close()  # the session ends: both loops end
                assert await asyncio.wait_for(on_client, 10) == [b"to client 0", b"to client 1", b"to client 2"]
                assert await asyncio.wait_for(on_server, 10) == [b"to server 0", b"to server 1"]
    run(body)


def test_async_for_refuses_a_session_with_a_stream_handler(run):
    async def body():
        async with tunnel() as (server, client, session):
            with pytest.raises(RuntimeError, match="stream handler"):
                aiter(client.session)
            it = aiter(session)  # the server side has no handler: iterable
            await it.aclose()
            with pytest.raises(ValueError, match="not both"):
                await client.connect(scripted(), accept=True)
    run(body)


def test_the_server_and_its_ingresses_take_both_address_forms(run):
    async def body():
        for form in ("127.0.0.1:0", ("127.0.0.1", 0)):
            async with ft.TunnelServer(form, "address-token-1234") as server:
                async with ft.TcpIngress(server, form) as tcp, ft.HttpIngress(server, form) as http:
                    assert tcp.address[0] == http.address[0] == server.address[0] == "127.0.0.1"
        for bad in ("nope", ("127.0.0.1",), 7835):
            try:
                ft.TunnelServer(bad, "address-token-1234")
            except (TypeError, ValueError) as exc:
                assert "address" in str(exc)
            else:
                raise AssertionError(f"{bad!r} accepted")
    run(body)
