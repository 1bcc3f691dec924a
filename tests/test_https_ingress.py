"""HTTPS for visitors: the HTTP ingress behind TLS with a wildcard certificate from
``ferrotunnel certs --domain``, routed by SNI then Host (a Host that disagrees with the SNI gets
421), X-Forwarded-Proto https; through the CLI, the printed https URL works with real curl."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess

import pytest

import ferrotunnel as ft
from ferrotunnel import tls
from ferrotunnel.server.https import HttpsIngress

from conftest import free_port
from test_cli import TOKEN, Proc
from test_http_proxy import App, response
from test_http_proxy_cli import App as ThreadApp

DOMAIN = "example.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("https-certs")
    return tls.generate_certs(d, domain=DOMAIN, pairs={"server", "wildcard"})


@contextlib.asynccontextmanager
async def https_tunnels(certs):
    apps = {n: await App(n).start() for n in ("web", "api")}
    server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
    tasks = []
    try:
        async with server:
            for name, app in apps.items():
                client = ft.TunnelClient("%s:%d" % server.address, TOKEN, tunnel_id=name,
                                         config=ft.ClientConfig(local_addr=app.address))
                tasks.append(asyncio.create_task(client.connect_and_run()))
                await server.wait_for_session(name, timeout=10)
            ing = HttpsIngress(server, ("127.0.0.1", 0), str(certs["wildcard.pem"]), str(certs["wildcard.key"]),
                               domain=DOMAIN)
            async with ing:
                yield ing, apps
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for app in apps.values():
            app.server.close()


def _client_ctx(certs, sni: bool = True) -> ssl.SSLContext:
    ctx = tls.client_context(certs["ca.pem"])
    if not sni:
        ctx.check_hostname = False  # no server_hostname: no SNI (the chain is still verified)
    return ctx


def get(host: str, path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def test_routed_by_sni_then_host_and_421_when_they_disagree(run, certs):
    async def body():
        async with https_tunnels(certs) as (ing, apps):
            port = ing.address[1]
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(certs),
                                                 server_hostname=f"web.{DOMAIN}")
            w.write(get(f"web.{DOMAIN}:{port}", "/one") + get(f"web.{DOMAIN}", "/two"))
            assert (await response(r))[1] == b"web GET /one "
            assert (await response(r))[1] == b"web GET /two "
            w.write(get(f"api.{DOMAIN}", "/other"))  # the SNI said web: not for api on this connection
            line, text = await response(r)
            assert line == b"HTTP/1.1 421 Misdirected Request", (line, text)
            w.close()
            assert all(b"X-Forwarded-Proto: https\r\n" in h for h in apps["web"].heads)
            assert apps["api"].heads == []
            # without SNI, Host alone routes
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(certs, sni=False))
            w.write(get(f"api.{DOMAIN}", "/nosni"))
            assert (await response(r))[1] == b"api GET /nosni "
            w.close()
    run(body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_cli_prints_the_https_url_and_curl_reaches_it(certs):
    app = ThreadApp("secure")
    tport, sport = free_port(), free_port()
    procs = []
    try:
        srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--https-bind", f"127.0.0.1:{sport}", "--https-cert",
                   certs["wildcard.pem"], "--https-key", certs["wildcard.key"], "--domain", DOMAIN,
                   env={"FERROTUNNEL_TOKEN": TOKEN})
        procs.append(srv)
        srv.wait_for("listening")
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app.port}",
                   "--tunnel-id", "secure", env={"FERROTUNNEL_TOKEN": TOKEN})
        procs.append(cli)
        url = f"https://secure.{DOMAIN}:{sport}"
        cli.wait_for(f"Forwarding {url} -> 127.0.0.1:{app.port}")
        out = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", str(certs["ca.pem"]), "--resolve",
                              f"secure.{DOMAIN}:{sport}:127.0.0.1", url + "/tls"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("secure /tls\n") and "X-Forwarded-Proto: https" in out.stdout, out.stdout
    finally:
        for p in procs:
            p.kill()
        app.close()


def test_cli_https_flags_are_checked(certs):
    for flags, said in ((["--https-bind", "127.0.0.1:1"], "needs --https-cert and --https-key"),
                        (["--https-bind", "127.0.0.1:1", "--https-cert", str(certs["ca.pem"]), "--https-key",
                          str(certs["wildcard.key"])], "cannot load --https-cert")):
        p = Proc("server", "--bind", f"127.0.0.1:{free_port()}", *flags, env={"FERROTUNNEL_TOKEN": TOKEN})
        p.p.wait(20)
        assert p.finish() == 2 and said.encode() in p.err, p.err


def test_a_tls_visitor_gets_the_end_when_the_tunnel_stream_ends(run, certs):
    """A TLS connection cannot half-close (the SSL transport has no write_eof): when the stream
    ends, the visitor still gets everything before the end, then the end itself (the connection
    closed gracefully), never a connection that stays open waiting for the visitor to go first."""
    from ferrotunnel.aio.bridge import TcpBridge
    from ferrotunnel.aio.listen import listen
    from conftest import tunnel

    async def app(stream):
        stream.write(b"bye")
        stream.write_eof()
        await stream.read()

    async def body():
        async with tunnel(app) as (_server, _client, session):
            bridges = []

            def factory():
                b = TcpBridge(session.open_stream_nowait())
                bridges.append(b)
                return b

            lst = await listen(factory, "127.0.0.1", 0, "test", ssl=tls.server_context(
                str(certs["server.pem"]), str(certs["server.key"])))
            try:
                port = lst.sockets[0].getsockname()[1]
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(certs, sni=False))
                got = b""
                async with asyncio.timeout(15):
                    while chunk := await r.read(100):
                        got += chunk
                assert got == b"bye"
                w.close()
                async with asyncio.timeout(15):
                    while not bridges[0].finished:
                        await asyncio.sleep(0.01)
            finally:
                lst.close()

    run(body, timeout=60)
