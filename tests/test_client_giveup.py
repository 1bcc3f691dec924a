"""Failures that cannot heal end the client with one clear line and exit 1, instead of retries
forever: TLS on one side only, a client certificate the server requires or refuses, a tunnel id
another client holds (after 3 refusals in a row, about 3 s); a client's own earlier session is
replaced at once (``instance/1``); a wrong token is said once; no traceback and no "Future
exception was never retrieved" in any of it."""

from __future__ import annotations

import asyncio
import re

import pytest

import ferrotunnel as ft
from conftest import free_port
from ferrotunnel import tls
from ferrotunnel.protocol.extensions import instance_of, new_instance_capability
from test_cli import Proc

TOKEN = "giveup-token-123456"
ENV = {"FERROTUNNEL_TOKEN": TOKEN}
NOISE = (b"Traceback", b"never retrieved")


def test_instance_ids():
    a, b = new_instance_capability(), new_instance_capability()
    assert a != b and instance_of(("basic", a)) == a.split("=")[1]
    assert instance_of(("instance/1=xyz",)) is None and instance_of(()) is None


def test_a_clients_own_earlier_session_is_replaced_and_another_client_gives_up(run):
    async def body():
        async with ft.TunnelServer("127.0.0.1:0", TOKEN) as server:
            addr = "%s:%d" % server.address
            first = ft.TunnelClient(addr, TOKEN, tunnel_id="web")
            s1 = await first.connect()
            s2 = await first.connect()  # the same client again (its old session not known dead): replaced
            assert s2.id != s1.id
            await asyncio.wait_for(s1.closed_event.wait(), 10)
            assert server.sessions.get_by_tunnel_id("web") is s2 or \
                server.sessions.get_by_tunnel_id("web").id == s2.id
            other = ft.TunnelClient(addr, TOKEN, tunnel_id="web",
                                    config=ft.ClientConfig(backoff=ft.BackoffConfig(base=0.2, jitter=0, max_delay=1.0)))
            with pytest.raises(ft.HandshakeError, match="held by another client") as ei:  # after SUSPECT_WINDOW
                await asyncio.wait_for(other.connect_and_run(), 45)
            assert re.search(r"refused \d+ times in a row", str(ei.value)) and "--tunnel-id" in str(ei.value)
            assert not s2.is_closed  # the holder kept its tunnel
            await first.close()
            await other.close()
    run(body, timeout=90)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    out = {k: str(v) for k, v in tls.generate_certs(d, client=True).items()}
    other = tls.generate_certs(tmp_path_factory.mktemp("other"), client=True)  # another CA's client pair
    out["other-client.pem"], out["other-client.key"] = str(other["client.pem"]), str(other["client.key"])
    return out


def _server(*extra):
    tport = free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", *extra, env=ENV)
    srv.wait_for("listening")
    return srv, tport


def _client_exits(tport, *extra, tunnel="web"):
    cli = Proc("client", "--server", f"localhost:{tport}", "--tunnel-id", tunnel, *extra, env=ENV)
    try:
        code = cli.p.wait(60)
    finally:
        cli.kill()  # never left running, whatever happened
    cli.finish()
    return code, cli


@pytest.mark.parametrize("case", ["plaintext-to-tls", "tls-to-plaintext", "no-client-cert", "wrong-ca-client-cert",
                                  "http-port", "taken"])
def test_a_failure_that_cannot_heal_exits_1_naming_the_fix(certs, case):
    procs = []
    try:
        if case == "plaintext-to-tls":
            srv, tport = _server("--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"])
            args, says = (), "connect with --tls"
        elif case == "tls-to-plaintext":
            srv, tport = _server()
            args, says = ("--tls", "--tls-ca", certs["ca.pem"]), "drop --tls"
        elif case == "no-client-cert":
            srv, tport = _server("--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"],
                                 "--tls-ca", certs["ca.pem"])
            args, says = ("--tls", "--tls-ca", certs["ca.pem"]), "--tls-cert and --tls-key"
        elif case == "wrong-ca-client-cert":
            srv, tport = _server("--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"],
                                 "--tls-ca", certs["ca.pem"])
            args, says = ("--tls", "--tls-ca", certs["ca.pem"], "--tls-cert", certs["other-client.pem"],
                          "--tls-key", certs["other-client.key"]), "--tls-cert and --tls-key"
        elif case == "http-port":  # the client pointed at the HTTP ingress, not the tunnel port
            hport = free_port()
            srv, _ = _server("--http-bind", f"127.0.0.1:{hport}")
            tport, args, says = hport, (), "server --bind"
        else:
            srv, tport = _server()
            holder = Proc("client", "--server", f"127.0.0.1:{tport}", "--tunnel-id", "web", env=ENV)
            procs.append(holder)
            holder.wait_for("connected to")
            args, says = (), "held by another client"
        procs.append(srv)
        code, cli = _client_exits(tport, *args)
        assert code == 1, (code, cli.err[-2000:])
        last = cli.err.decode().strip().splitlines()[-1]
        assert last.startswith("ferrotunnel: ") and says in last, cli.err[-2000:]
        assert cli.err.count(last.encode()[len("ferrotunnel: "):][:60]) <= 8  # the retry lines, then once
        for noise in NOISE:
            assert noise not in cli.err + cli.out
    finally:
        for p in procs:
            p.kill()


def test_a_wrong_token_is_said_once():
    srv, tport = _server()
    try:
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", env={"FERROTUNNEL_TOKEN": "not-the-right-token-1"})
        assert cli.p.wait(30) == 1
        cli.finish()
        assert cli.err.count(b"rejected the token") == 1, cli.err
        for noise in NOISE:
            assert noise not in cli.err
    finally:
        srv.kill()


def test_failed_attempts_leave_no_unretrieved_future(run, caplog):
    """A server that accepts and never answers: each attempt times out; the attempt's pending
    answer (failed when the connection closes afterwards) is never reported as unretrieved."""
    import gc
    import logging

    async def body():
        async def silent(reader, writer):
            await asyncio.sleep(30)
        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        cfg = ft.ClientConfig(handshake_timeout=0.2, backoff=ft.BackoffConfig(base=0.01, jitter=0, max_attempts=3))
        client = ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, config=cfg)
        with pytest.raises(ft.FerroTunnelError):
            await client.connect_and_run()
        await client.close()
        srv.close()
        await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(0)
    caplog.set_level(logging.ERROR, logger="asyncio")
    run(body)
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_a_throttled_wrong_token_client_is_told_to_check_its_token(run):
    """After too many failed logins from an address the server answers RateLimited without
    looking at the token (no oracle): the client's retry line still says to check the token."""
    async def body():
        cfg = ft.ServerConfig(auth_failure_threshold=1, auth_failure_window=60.0)
        async with ft.TunnelServer("127.0.0.1:0", TOKEN, config=cfg) as server:
            addr = "%s:%d" % server.address
            first = ft.TunnelClient(addr, "not-the-token-12345")
            with pytest.raises(ft.AuthenticationError):
                await first.connect()
            again = ft.TunnelClient(addr, "not-the-token-12345")
            with pytest.raises(ft.RetryableHandshakeError) as ei:
                await again.connect()
            assert "check the client's token" in str(ei.value) and "RATE_LIMITED" in str(ei.value)
    run(body)
