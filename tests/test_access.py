"""Per-tunnel access (``access/1``): ``protocol`` (http or tcp only), ``basic_auth`` and ``allow``
lists, enforced at the server's ingresses before a stream is opened — 401 with WWW-Authenticate
until the right credentials arrive (the Authorization header never reaches the app), 403 for an
address outside the allow list, a refused connection at a TCP ingress; the rules as they travel
(only a digest of the credentials), and a client that stops when the server cannot enforce them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
from typing import Optional, Sequence

import pytest

import ferrotunnel as ft
from ferrotunnel.access import TunnelAccess, access_from_capabilities, basic_auth_digest
from ferrotunnel.errors import HandshakeError
from ferrotunnel.protocol.handshake import ClientHandshake, ServerHandshake
from ferrotunnel.server.guard import authorization_values, strip_authorization

from test_http_proxy import App, get, response

TOKEN = "access-token"
WAIT = 20.0


def basic(creds: str) -> str:
    return "Authorization: Basic " + base64.b64encode(creds.encode()).decode() + "\r\n"


# ---------------------------------------------------------------- the rules themselves


def test_rules_travel_as_capabilities_with_only_a_digest_of_the_credentials():
    access = TunnelAccess.build("http", "alice:s3cret", ["10.0.0.0/8", "2001:db8::/32"])
    caps = access.capabilities()
    assert all(len(c) <= 64 for c in caps)
    assert not any("s3cret" in c for c in caps)
    assert access_from_capabilities(("basic", "tcp") + caps) == access
    assert "s3cret" not in repr(access) and basic_auth_digest("alice:s3cret") not in repr(access)
    cfg = ft.ClientConfig(basic_auth="alice:s3cret")
    assert "s3cret" not in repr(cfg)
    assert access_from_capabilities(("basic", "tcp")) is None


@pytest.mark.parametrize("cap", ["access/1=only:udp", "access/1=auth:short", "access/1=allow:not-a-net",
                                 "access/1=what:ever", "access/1=auth:" + "a" * 42 + "!"])
def test_a_malformed_rule_is_refused(cap):
    with pytest.raises(ValueError):
        access_from_capabilities(("basic", cap))


def test_an_access_rule_left_out_of_a_handshake_refuses_the_tunnel():
    """A server keeps at most MAX_CAPABILITIES capabilities of at most MAX_CAPABILITY_LEN bytes.
    An access rule it would leave out must not leave the tunnel served with fewer rules (an allow
    list cut short lets everyone in): the rules it reads say so, and they are refused."""
    from ferrotunnel.protocol.extensions import MAX_CAPABILITIES, keep_capabilities

    long_rule = "access/1=allow:fe80::1%" + "i" * 40 + "/128"  # over 64 bytes
    for caps in (("basic", "tcp", "access/1=only:http", long_rule),
                 ("basic", "tcp") + tuple(f"x-{i}" for i in range(MAX_CAPABILITIES)) + ("access/1=allow:10.0.0.0/8",)):
        kept = keep_capabilities(caps)
        assert len(kept) <= MAX_CAPABILITIES
        with pytest.raises(ValueError, match="did not fit in the handshake"):
            access_from_capabilities(kept)
    # nothing of the rules left out: as before
    assert keep_capabilities(("basic", "x" * 65)) == ("basic",)
    assert access_from_capabilities(keep_capabilities(("basic", "access/1=only:http", "x" * 65))).only == "http"


def test_a_network_with_a_zone_is_a_clear_error():
    with pytest.raises(ValueError, match="zone"):
        TunnelAccess.build(allow=["fe80::1%eth0/128"])
    with pytest.raises(ValueError, match="zone"):
        access_from_capabilities(("basic", "access/1=allow:fe80::1%eth0/128"))


@pytest.mark.parametrize("bad", [dict(protocol="udp"), dict(basic_auth="nopassword"), dict(basic_auth=":pw"),
                                 dict(basic_auth="u:"), dict(allow=["300.1.1.1/8"]), dict(allow=["fe80::1%eth0"]),
                                 dict(allow=[f"10.{i}.0.0/16" for i in range(17)]),
                                 dict(protocol="http", remote_port=0), dict(basic_auth="u:p", extensions=False),
                                 dict(pool=True, extensions=False)])
def test_bad_client_settings_are_clear_errors(bad):
    with pytest.raises(ValueError):
        ft.ClientConfig(**bad)


def test_addresses_and_credentials_are_checked():
    access = TunnelAccess.build(None, "alice:s3cret", ["10.0.0.0/8", "2001:db8::/32"])
    assert access.admits(("10.1.2.3", 5)) and access.admits(("::ffff:10.1.2.3", 5))
    assert access.admits(("2001:db8::1", 5)) and not access.admits(("127.0.0.1", 5))
    assert not access.admits(None) and not access.admits(("not-an-ip", 1))
    good = b"Basic " + base64.b64encode(b"alice:s3cret")
    assert access.authorized(good) and access.authorized(b"basic " + good[6:])
    for wrong in (None, b"", b"Basic " + base64.b64encode(b"alice:wrong"), b"Bearer x", b"Basic !!!",
                  b"Basic " + base64.b64encode(b"alice:s3cret")[:-2]):
        assert not access.authorized(wrong), wrong
    assert TunnelAccess.build().authorized(None) and TunnelAccess.build().admits(None)
    assert TunnelAccess.build(allow=["127.0.0.1"]).allow == (ipaddress.ip_network("127.0.0.1/32"),)


def test_the_authorization_field_is_found_and_removed_in_any_case():
    head = b"GET / HTTP/1.1\r\nHost: web\r\naUTHORIZATION:  Basic abc \r\nX: y\r\n\r\n"
    assert authorization_values(head) == (b"Basic abc",)
    assert strip_authorization(head) == b"GET / HTTP/1.1\r\nHost: web\r\nX: y\r\n\r\n"


def test_a_client_stops_when_the_server_does_not_enforce_its_rules():
    """A server that accepts without answering ``access/1`` (a Rust one, an old one): the client
    must not serve its tunnel unguarded."""
    for cfg, answer in ((ft.ClientConfig(basic_auth="u:p"), "access/1"), (ft.ClientConfig(pool=True), "pool/1")):
        for extra in ((), (answer,)):
            client = ClientHandshake(TOKEN, "web", cfg)
            server = ServerHandshake(ft.ServerConfig())
            server.receive_data(client.data_to_send())
            ack = server.accept(None, extra)
            if extra:
                client.receive_data(ack)
                assert client.result is not None
            else:
                with pytest.raises(HandshakeError, match="does not"):
                    client.receive_data(ack)


# ---------------------------------------------------------------- at the ingresses


@contextlib.asynccontextmanager
async def tunnel(tunnel_id: str = "web", **client_cfg):
    """One tunnel to an App, behind an HttpIngress and a TcpIngress. Yields (server, http, tcp, app)."""
    app = await App(tunnel_id).start()
    server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
    task: Optional[asyncio.Task] = None
    try:
        async with server:
            client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=tunnel_id,
                                     config=ft.ClientConfig(local_addr=app.address, **client_cfg))
            task = asyncio.create_task(client.connect_and_run())
            await server.wait_for_session(tunnel_id, timeout=10)
            async with ft.HttpIngress(server, ("127.0.0.1", 0)) as http, \
                    ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id) as tcp:
                yield server, http, tcp, app
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert app.server is not None
        app.server.close()


async def exchange(address, data: bytes, count: int = 1):
    r, w = await asyncio.open_connection(*address)
    w.write(data)
    out = []
    for _ in range(count):
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), WAIT)
        await asyncio.wait_for(r.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])), WAIT)
        out.append(head)
    w.close()
    return out


async def tcp_reply(address, data: bytes) -> bytes:
    """What a raw TCP visitor reads until the connection ends ("" when it was refused)."""
    r, w = await asyncio.open_connection(*address)
    w.write(data)
    try:
        got = await asyncio.wait_for(r.read(65536), WAIT)
    except ConnectionResetError:
        got = b""
    w.close()
    return got


def test_basic_auth_asks_for_credentials_and_the_app_never_sees_them(run):
    async def body():
        async with tunnel(basic_auth="alice:s3cret") as (server, http, tcp, app):
            (head,) = await exchange(http.address, get("web", "/a"))
            assert head.startswith(b"HTTP/1.1 401 ") and b'WWW-Authenticate: Basic realm="ferrotunnel"' in head
            (head,) = await exchange(http.address, get("web", "/b", basic("alice:wrong")))
            assert head.startswith(b"HTTP/1.1 401 ")
            assert app.heads == []  # nothing reached the app
            # the right credentials: 200, on a keep-alive connection, each request checked
            r, w = await asyncio.open_connection(*http.address)
            w.write(get("web", "/c", basic("alice:s3cret")) + get("web", "/d", basic("alice:s3cret")))
            assert (await response(r))[0] == b"HTTP/1.1 200 OK"
            assert (await response(r))[0] == b"HTTP/1.1 200 OK"
            w.write(get("web", "/e"))  # the same connection, without credentials: refused
            assert (await response(r))[0].startswith(b"HTTP/1.1 401 ")
            w.close()
            assert [h.split(b" ")[1] for h in app.heads] == [b"/c", b"/d"]
            assert not any(b"uthorization" in h.lower() for h in app.heads)
            assert http.refused.get("401") == 3
            # a tunnel with basic auth is never served at a TCP ingress (it could not ask)
            assert await tcp_reply(tcp.address, get("web", "/tcp")) == b""
            assert len(app.heads) == 2
    run(body)


def test_an_allow_list_refuses_other_addresses_with_403_and_at_tcp(run):
    async def body():
        async with tunnel(allow=["10.0.0.0/8"]) as (server, http, tcp, app):
            (head,) = await exchange(http.address, get("web", "/"))
            assert head.startswith(b"HTTP/1.1 403 ")
            assert await tcp_reply(tcp.address, get("web", "/tcp")) == b""
            assert app.heads == []
        async with tunnel(allow=["10.0.0.0/8", "127.0.0.0/8"]) as (server, http, tcp, app):
            (head,) = await exchange(http.address, get("web", "/"))
            assert head.startswith(b"HTTP/1.1 200 ")
            assert (await tcp_reply(tcp.address, get("web", "/tcp"))).startswith(b"HTTP/1.1 200 ")
    run(body)


@pytest.mark.parametrize("only", ["http", "tcp"])
def test_protocol_restricts_a_tunnel_to_one_kind_of_ingress(run, only):
    async def body():
        async with tunnel(protocol=only) as (server, http, tcp, app):
            (head,) = await exchange(http.address, get("web", "/h"))
            assert head.startswith(b"HTTP/1.1 200 " if only == "http" else b"HTTP/1.1 404 "), head
            got = await tcp_reply(tcp.address, get("web", "/t"))
            assert got.startswith(b"HTTP/1.1 200 ") if only == "tcp" else got == b""
            async with ft.TcpIngress(server, ("127.0.0.1", 0)) as unnamed:  # the first tcp session
                got = await tcp_reply(unnamed.address, get("web", "/u"))
                assert got.startswith(b"HTTP/1.1 200 ") if only == "tcp" else got == b""
    run(body)
