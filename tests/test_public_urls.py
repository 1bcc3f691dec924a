"""Domains and printed URLs (issue 12, point 1): the public-URLs extension, lower-cased ids, ids
that must be DNS labels under a domain, and the client's "Forwarding URL -> LOCAL" lines."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest

import ferrotunnel as ft
from ferrotunnel import frames as F
from ferrotunnel.protocol import SessionCore
from ferrotunnel.protocol.extensions import PUBLIC_URLS_CAPABILITY, PUBLIC_URLS_PLUGIN_ID, client_capabilities
from ferrotunnel.protocol.publicurls import MAX_PUBLIC_URLS, MAX_URL_LEN, decode_public_urls, encode_public_urls
from ferrotunnel.server.public import PublicEndpoint, is_dns_label, normalize_domain, public_urls

from conftest import echo_handler, free_port
from test_cli import TOKEN, Proc, helper, http

TOK = "public-urls-token"

# ---------------------------------------------------------------- sans-IO: payload, core, URLs


def test_payload_round_trip_and_what_is_left_out():
    urls = ("http://web.example.test:8080", "tcp://example.test:9000", "https://web.example.test")
    assert decode_public_urls(encode_public_urls(urls)) == urls
    assert decode_public_urls(encode_public_urls([])) == ()
    # invalid URLs are not sent; at most MAX_PUBLIC_URLS are
    bad = ["ftp://x", "http://a b", "http://\x1b[2Jx", "http://é.example", "http://" + "a" * MAX_URL_LEN]
    assert decode_public_urls(encode_public_urls(bad + ["tcp://h:1"])) == ("tcp://h:1",)
    many = [f"tcp://h:{i}" for i in range(1, 40)]
    assert len(decode_public_urls(encode_public_urls(many))) == MAX_PUBLIC_URLS


def _entry(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


@pytest.mark.parametrize("payload", [
    b"",                                                  # nothing
    bytes([MAX_PUBLIC_URLS + 1]) + _entry(b"tcp://h:1") * (MAX_PUBLIC_URLS + 1),  # too many
    b"\x01\x00",                                          # truncated length
    b"\x01" + struct.pack(">H", 50) + b"tcp://h:1",       # length past the end
    b"\x01" + _entry(b"tcp://h:1") + b"x",                # trailing bytes
    b"\x01" + _entry(b"http://\xc3\xa9"),                 # not ASCII
    b"\x01" + _entry(b"http://a\x1b[31m"),                # a terminal escape
    b"\x01" + _entry(b"file:///etc/passwd"),              # not http(s)/tcp
    b"\x01" + _entry(b"http://" + b"a" * MAX_URL_LEN),    # too long
    b"\x01" + b"\xff" * 100_000,                          # huge
])
def test_malformed_payloads_are_refused(payload):
    with pytest.raises(ValueError):
        decode_public_urls(payload)


class Listener:
    def __init__(self):
        self.urls = []

    def public_urls_received(self, urls):
        self.urls.append(urls)

    def __getattr__(self, name):  # every other CoreListener event: nothing to do
        return lambda *a: None


def _client_core(listener, caps=None):
    caps = caps if caps is not None else ["basic", PUBLIC_URLS_CAPABILITY]
    return SessionCore(is_client=True, config=ft.ClientConfig(), listener=listener, now=0.0, peer_capabilities=caps)


def test_core_takes_the_first_good_list_and_ignores_the_rest():
    rec = Listener()
    core = _client_core(rec)
    core.receive(F.encode(F.PluginData(PUBLIC_URLS_PLUGIN_ID, b"\x01\x00")), 1.0)  # malformed: ignored
    assert core.public_urls == () and rec.urls == [] and not core.closed
    core.receive(F.encode(F.PluginData(PUBLIC_URLS_PLUGIN_ID, encode_public_urls(["tcp://h:1"]))), 1.0)
    core.receive(F.encode(F.PluginData(PUBLIC_URLS_PLUGIN_ID, encode_public_urls(["tcp://h:2"]))), 1.0)
    assert core.public_urls == ("tcp://h:1",) and rec.urls == [("tcp://h:1",)] and not core.closed


def test_core_without_the_extension_ignores_the_frame():
    rec = Listener()
    core = _client_core(rec, ["basic"])  # a Rust server: not negotiated
    core.receive(F.encode(F.PluginData(PUBLIC_URLS_PLUGIN_ID, encode_public_urls(["tcp://h:1"]))), 1.0)
    assert core.public_urls == () and rec.urls == [] and not core.closed
    server = SessionCore(is_client=False, config=ft.ServerConfig(), listener=rec, now=0.0,
                         peer_capabilities=["basic", "tcp"])
    assert not server.send_public_urls(["tcp://h:1"]) and not server.has_output  # nothing to a Rust client
    server = SessionCore(is_client=False, config=ft.ServerConfig(), listener=rec, now=0.0,
                         peer_capabilities=client_capabilities(ft.ClientConfig()))
    assert server.send_public_urls(["tcp://h:1"]) and server.has_output


def test_urls_from_endpoints():
    eps = [PublicEndpoint("http", "example.test", 8080), PublicEndpoint("tcp", "example.test", 9000),
           PublicEndpoint("tcp", "example.test", 9001, "Other"), PublicEndpoint("tcp", "example.test", 9002, "web")]
    assert public_urls(eps, "web", ("basic", "tcp"), "example.test") == (
        "http://web.example.test:8080", "tcp://example.test:9000", "tcp://example.test:9002")
    assert public_urls(eps, "other", ("basic",), "example.test") == (
        "http://other.example.test:8080", "tcp://example.test:9001")  # no tcp capability: no shared port
    assert public_urls([PublicEndpoint("http", "::1", 80)], "web", (), None) == ("http://[::1]",)
    assert is_dns_label("a") and is_dns_label("my-app-1") and is_dns_label("x" * 63)
    for bad in ("", "-a", "a-", "a_b", "a.b", "x" * 64, "Ab", "é"):
        assert not is_dns_label(bad)
    assert normalize_domain("Example.TEST.") == "example.test"
    for bad in ("", "a..b", "-a.b", "a_b.test", "x" * 254):
        with pytest.raises(ValueError):
            normalize_domain(bad)


# ---------------------------------------------------------------- in process, real sockets


async def _connected(server, tunnel_id, config=None, on_public_urls=None):
    host, port = server.address
    client = ft.TunnelClient(f"{host}:{port}", TOK, tunnel_id=tunnel_id, config=config or ft.ClientConfig())
    task = asyncio.create_task(client.connect_and_run(echo_handler, on_public_urls=on_public_urls))
    await server.wait_for_session(tunnel_id, timeout=10)
    while client.session is None:
        await asyncio.sleep(0.01)
    return client, task


def test_client_is_told_its_urls_once(run):
    async def body():
        eps = [PublicEndpoint("http", "example.test", 8080), PublicEndpoint("tcp", "example.test", 9000)]
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, domain="Example.Test", public_endpoints=eps) as server:
            seen = []
            client, task = await _connected(server, "web", on_public_urls=seen.append)
            for _ in range(200):
                if seen:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            want = ("http://web.example.test:8080", "tcp://example.test:9000")
            assert seen == [want] and client.public_urls == want
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert client.public_urls == ()

    run(body)


def test_rust_style_client_gets_nothing_and_still_works(run):
    async def body():
        eps = [PublicEndpoint("http", "example.test", 8080), PublicEndpoint("tcp", "example.test", 9000)]
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, domain="example.test", public_endpoints=eps) as server:
            seen = []
            client, task = await _connected(server, "web", ft.ClientConfig(extensions=False), seen.append)
            session = server.sessions.get_by_tunnel_id("web")
            assert PUBLIC_URLS_CAPABILITY not in session.capabilities
            stream = await session.open_stream(ft.Protocol.TCP)
            stream.write(b"ping")
            await stream.drain()
            assert await stream.readexactly(4) == b"ping"
            stream.write_eof()
            await stream.aclose()
            await asyncio.sleep(0.2)
            assert seen == [] and client.public_urls == ()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(body)


def test_a_rust_client_on_the_wire_sees_no_extension_frame(run):
    """What a Rust client announces (basic, tcp): after the ack, no PluginData reaches it."""
    async def body():
        eps = [PublicEndpoint("http", "example.test", 8080), PublicEndpoint("tcp", "example.test", 9000)]
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, domain="example.test", public_endpoints=eps) as server:
            hs = ft.ClientHandshake(TOK, "web", ft.ClientConfig(extensions=False))
            assert hs.capabilities == ["basic", "tcp"]
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(hs.data_to_send())
            while hs.result is None:
                hs.receive_data(await reader.read(65536))
            wire = bytearray(hs.leftover)
            try:
                async with asyncio.timeout(0.5):
                    while chunk := await reader.read(65536):
                        wire += chunk
            except TimeoutError:
                pass
            frames = list(F.FrameDecoder().feed(bytes(wire)))
            assert not [f for f in frames if isinstance(f, F.PluginData)], frames
            assert server.public_urls("web") == ("http://web.example.test:8080", "tcp://example.test:9000")
            writer.close()

    run(body)


@pytest.mark.parametrize("extensions", [True, False])
def test_id_that_is_no_dns_label_is_refused_at_once(run, extensions):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, domain="example.test") as server:
            host, port = server.address
            client = ft.TunnelClient(f"{host}:{port}", TOK, tunnel_id="Bad_Id",
                                     config=ft.ClientConfig(extensions=extensions))
            t0 = time.monotonic()
            with pytest.raises(ft.HandshakeError) as info:
                await client.connect_and_run()
            assert time.monotonic() - t0 < 2  # not retried
            assert not isinstance(info.value, ft.RetryableHandshakeError)
            if extensions:  # the reason travels to a client that understands reasons
                assert "'Bad_Id' cannot be a DNS label under example.test" in str(info.value)
            assert len(server.sessions) == 0
        # without a domain the same id is fine (claimed in lower case)
        async with ft.TunnelServer(("127.0.0.1", 0), TOK) as server:
            client, task = await _connected(server, "Bad_Id", ft.ClientConfig(extensions=extensions))
            assert server.sessions.get_by_tunnel_id("bad_id") is not None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(body)


def test_mixed_case_id_is_claimed_in_lower_case(run):
    async def body():
        eps = [PublicEndpoint("http", "example.test", 80)]
        async with ft.TunnelServer(("127.0.0.1", 0), TOK, domain="example.test", public_endpoints=eps) as server:
            seen = []
            client, task = await _connected(server, "MyApp", on_public_urls=seen.append)
            session = server.sessions.get_by_tunnel_id("myapp")
            assert session is not None and session.tunnel_id == "myapp"
            assert server.sessions.get_by_tunnel_id("MyApp") is None
            for _ in range(200):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == [("http://myapp.example.test",)]
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    run(body)


def test_tcp_url_reaches_the_service(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOK) as server:
            async with ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="echo") as ing:
                server.public_endpoints = (PublicEndpoint("tcp", "127.0.0.1", ing.address[1], "echo"),)
                seen = []
                client, task = await _connected(server, "Echo", on_public_urls=seen.append)
                for _ in range(200):
                    if seen:
                        break
                    await asyncio.sleep(0.01)
                (url,), = seen
                assert url == f"tcp://127.0.0.1:{ing.address[1]}"
                host, port = url[len("tcp://"):].rsplit(":", 1)
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"hello")
                await writer.drain()
                assert await reader.readexactly(5) == b"hello"
                writer.close()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(body)


# ---------------------------------------------------------------- the command line, as subprocesses


def _server(cleanup, *flags, env=None):
    tport = free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN, *flags, env=env)
    cleanup.append(srv)
    srv.wait_for("listening")
    return srv, tport


def _client(cleanup, tport, local_port, tunnel_id):
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{local_port}",
               "--tunnel-id", tunnel_id, env={"FERROTUNNEL_TOKEN": TOKEN})
    cleanup.append(cli)
    return cli


def _http_get(port, host):
    status, body, sock = http(port, host)
    sock.close()
    return f"{status} {body}"


@pytest.fixture
def cleanup():
    procs = []
    yield procs
    for p in procs:
        p.kill()


def test_cli_prints_urls_with_a_domain(cleanup):
    app, hport, iport, iport2 = free_port(), free_port(), free_port(), free_port()
    cleanup.append(helper("httpapp", app, "webapp"))
    srv, tport = _server(cleanup, "--http-bind", f"127.0.0.1:{hport}", "--tcp-bind", f"127.0.0.1:{iport}",
                         "--tcp-bind", f"127.0.0.1:{iport2}=MyApp", env={"FERROTUNNEL_DOMAIN": "Example.Test"})
    cli = _client(cleanup, tport, app, "MyApp")
    cli.wait_until(lambda: cli.out.count(b"Forwarding") >= 3 and cli.out.endswith(b"\n"), what="3 Forwarding lines")
    lines = [x for x in cli.out.decode().splitlines() if x.startswith("Forwarding")]
    assert lines == [f"Forwarding http://myapp.example.test:{hport} -> 127.0.0.1:{app}",
                     f"Forwarding tcp://example.test:{iport} -> 127.0.0.1:{app}",
                     f"Forwarding tcp://example.test:{iport2} -> 127.0.0.1:{app}"]
    # the printed URL's host name reaches the app (the Host a browser sends), and so does the TCP
    # ingress named with the id as the client spelled it
    assert "webapp" in _http_get(hport, f"myapp.example.test:{hport}")
    assert "webapp" in _http_get(iport2, "anything")
    assert cli.finish() == 0 and srv.finish() == 0
    assert TOKEN.encode() not in cli.out + cli.err + srv.out + srv.err


def test_cli_prints_urls_with_a_public_host_and_port(cleanup):
    app, hport, iport = free_port(), free_port(), free_port()
    cleanup.append(helper("httpapp", app, "webapp"))
    srv, tport = _server(cleanup, "--http-bind", f"127.0.0.1:{hport}", "--tcp-bind", f"127.0.0.1:{iport}=other",
                         "--public-host", "tunnel.example.net", "--public-http-port", "80")
    cli = _client(cleanup, tport, app, "web")
    cli.wait_for("Forwarding")
    time.sleep(0.3)  # a second line would come with the first (one frame)
    cli.wait_until(lambda: b"\n" in cli.out.split(b"Forwarding", 1)[1], what="the whole line")
    lines = [x for x in cli.out.decode().splitlines() if x.startswith("Forwarding")]
    # the TCP ingress serves another tunnel: not listed; no domain: visitors send Host: web
    assert lines == [f"Forwarding http://tunnel.example.net -> 127.0.0.1:{app} (visitors send Host: web)"]
    assert "webapp" in _http_get(hport, "web")
    assert cli.finish() == 0 and srv.finish() == 0


def test_cli_client_exits_1_for_an_id_that_is_no_dns_label(cleanup):
    srv, tport = _server(cleanup, "--domain", "example.test")
    cli = _client(cleanup, tport, free_port(), "Bad_Id")
    t0 = time.monotonic()
    cli.p.wait(timeout=10)
    assert cli.finish() == 1 and time.monotonic() - t0 < 5
    err = cli.err.decode()
    last = err.strip().splitlines()[-1]
    assert last.startswith("ferrotunnel: ") and "'Bad_Id' cannot be a DNS label under example.test" in last, err
    assert "reconnecting" not in err
    assert srv.finish() == 0  # the server keeps running, and says why it refused
    assert "cannot be a DNS label" in srv.err.decode()
    assert TOKEN.encode() not in cli.err + srv.err


def test_cli_bad_public_flags_are_usage_errors():
    for flags in (["--domain", "bad_domain.test"], ["--public-http-port", "0"], ["--public-host", "http://x/"]):
        p = Proc("server", "--bind", f"127.0.0.1:{free_port()}", "--token", TOKEN, *flags)
        p.p.wait(timeout=15)
        assert p.finish() == 2, flags
        assert flags[0] in p.err.decode()


def test_public_flags_in_help():
    p = Proc("server", "--help")
    p.p.wait(timeout=15)
    assert p.finish() == 0
    for flag in ("--domain", "--public-host", "--public-http-port"):
        assert flag in p.out.decode()
