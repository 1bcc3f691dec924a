"""Client failures say what to do: each names the likely cause and the flag that fixes it, and no
reason is ever empty. Real servers (TunnelServer with and without TLS, certificates made by
generate_certs), on uvloop and on the asyncio loop; raw servers only where a real one of this
package cannot produce the case (a TLS alert to a plaintext client, a server that never answers)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl

import pytest

import ferrotunnel as ft
from conftest import echo_handler, free_port
from ferrotunnel import tls
from ferrotunnel.client.client import describe_error

TOKEN = "secret-token-012"
ADD_TLS = "add --tls (and --tls-ca if its certificate is self-signed)"
NO_TLS = "drop --tls, or start the server with --tls-cert/--tls-key"
FAST = ft.ClientConfig(handshake_timeout=0.5)
# the alert rustls sends when the first bytes are not a TLS record (decode_error)
TLS_ALERT = bytes.fromhex("1503030002" "0232")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    paths = {k: str(v) for k, v in tls.generate_certs(d, client=True).items()}
    paths["other_ca"] = str(tls.generate_certs(d / "other")["ca.pem"])
    expired = tls.generate_certs(d / "expired", days=-1)
    paths["expired.pem"], paths["expired.key"] = str(expired["server.pem"]), str(expired["server.key"])
    paths["expired_ca"] = str(expired["ca.pem"])
    return paths


def tls_server(certs, *, mtls=False, cert="server"):
    ctx = tls.server_context(certs[f"{cert}.pem"], certs[f"{cert}.key"], certs["ca.pem"] if mtls else None,
                             require_client_cert=mtls)
    return ft.TunnelServer(("127.0.0.1", 0), TOKEN, tls=ctx)


def addr(server):
    return "%s:%d" % server.address


async def failure(client):
    with pytest.raises(Exception) as ei:
        await client.connect(echo_handler)
    msg = str(ei.value)
    assert msg and ": :" not in msg and not msg.endswith(":")
    return ei.value, msg


async def raw_server(answer):
    """A server that reads the Handshake and calls ``answer(reader, writer)``."""
    async def handle(reader, writer):
        await reader.read(100)
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, "127.0.0.1:%d" % srv.sockets[0].getsockname()[1]


def test_tls_client_against_plaintext_server(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server:
            client = ft.TunnelClient(addr(server), TOKEN, tls=tls.client_context(skip_verify=True), config=FAST)
            exc, msg = await failure(client)
            # not retried: the server answers a ClientHello in plaintext, so it demonstrably does not speak TLS
            assert type(exc) is ft.HandshakeError
            assert "does not speak TLS" in msg and NO_TLS in msg and addr(server) in msg
    run(body)


def test_tls_client_against_a_plaintext_answer(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server, ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
            client = ft.TunnelClient("%s:%d" % ing.address, TOKEN, tls=tls.client_context(skip_verify=True),
                                     config=FAST)
            exc, msg = await failure(client)
            assert type(exc) is ft.HandshakeError  # not retried: the server demonstrably does not speak TLS
            assert "WRONG_VERSION_NUMBER" in msg
            assert "the server does not speak TLS (it answered in plaintext)" in msg and NO_TLS in msg
            with pytest.raises(ft.HandshakeError):
                await client.connect_and_run(echo_handler)
    run(body)


def test_plaintext_client_against_tls_server(run, certs):
    async def body():
        async with tls_server(certs) as server:
            client = ft.TunnelClient(addr(server), TOKEN, config=FAST)
            exc, msg = await failure(client)
            # not retried: the server says so, in plaintext, before it closes
            assert type(exc) is ft.HandshakeError
            assert "this port speaks TLS: connect with --tls" in msg
    run(body)


def test_a_server_that_closes_without_answering_is_retried(run):
    """Any server that closes before answering (a balancer whose backend is down, a TLS server
    of another kind): retried, with the guess in the retry line, never given up for it."""
    async def body():
        async def close(reader, writer):
            pass
        srv, where = await raw_server(close)
        async with srv:
            client = ft.TunnelClient(where, TOKEN, config=FAST)
            exc, msg = await failure(client)
            assert type(exc) is ft.ConnectionLostError and "either it expects TLS" in msg and "turned the connection away" in msg and ADD_TLS in msg
            cfg = ft.ClientConfig(backoff=ft.BackoffConfig(base=0.01, factor=1.0, jitter=0, max_attempts=8))
            client = ft.TunnelClient(where, TOKEN, config=cfg)
            with pytest.raises(ft.FerroTunnelError, match=r"giving up after 8 retries \(9 attempts\)"):
                await client.connect_and_run(echo_handler)
    run(body)


@pytest.mark.parametrize("split", [False, True])
def test_plaintext_client_gets_a_tls_record(run, split):
    async def body():
        async def alert(reader, writer):
            if split:  # the record's first byte alone, then the rest
                writer.write(TLS_ALERT[:1])
                await writer.drain()
                await asyncio.sleep(0.05)
            writer.write(TLS_ALERT[1:] if split else TLS_ALERT)
            await writer.drain()

        srv, where = await raw_server(alert)
        async with srv:
            exc, msg = await failure(ft.TunnelClient(where, TOKEN, config=FAST))
            assert type(exc) is ft.HandshakeError
            assert msg == f"the server at {where} answered with TLS: {ADD_TLS}"
    run(body)


def test_plaintext_client_against_http_port(run):
    async def body():
        async with ft.TunnelServer(("127.0.0.1", 0), TOKEN) as server, ft.HttpIngress(server, ("127.0.0.1", 0)) as ing:
            exc, msg = await failure(ft.TunnelClient("%s:%d" % ing.address, TOKEN, config=FAST))
            assert type(exc) is ft.HandshakeError
            assert "answered in HTTP" in msg and "server --bind" in msg
    run(body)


def test_garbage_reply_names_the_tunnel_port(run):
    async def body():
        async def junk(reader, writer):
            writer.write(b"\x00\x00\x00\x02\x07\x07")
            await writer.drain()

        srv, where = await raw_server(junk)
        async with srv:
            exc, msg = await failure(ft.TunnelClient(where, TOKEN, config=FAST))
            assert type(exc) is ft.HandshakeError
            assert msg.startswith("malformed reply to the handshake")
            assert "tunnel port" in msg and "server --bind" in msg
    run(body)


@pytest.mark.parametrize("case,expect", [
    ("wrong_ca", ["not signed by a CA this client trusts", "--tls-ca"]),
    ("wrong_name", ["the certificate is not valid for 'wrong.example' — connect with a name on the certificate",
                    "--tls-server-name"]),
    ("expired", ["has expired", "renew it on the server"]),
])
def test_certificate_failures(run, certs, case, expect):
    async def body():
        async with tls_server(certs, cert="expired" if case == "expired" else "server") as server:
            ca = {"wrong_ca": certs["other_ca"], "expired": certs["expired_ca"]}.get(case, certs["ca.pem"])
            client = ft.TunnelClient(addr(server), TOKEN, tls=tls.client_context(ca), config=FAST,
                                     server_name="wrong.example" if case == "wrong_name" else None)
            exc, msg = await failure(client)
            assert isinstance(exc, ft.TlsVerificationError) and "failed verification" in msg
            for text in expect:
                assert text in msg
            with pytest.raises(ft.TlsVerificationError):
                await client.connect_and_run(echo_handler)  # fatal: not retried
    run(body)


def test_missing_client_certificate(run, certs):
    async def body():
        async with tls_server(certs, mtls=True) as server:
            exc, msg = await failure(ft.TunnelClient(addr(server), TOKEN, tls=tls.client_context(certs["ca.pem"]),
                                                     config=FAST))
            assert isinstance(exc, ft.ConnectionLostError)
            assert "requires a client certificate" in msg and "--tls-cert and --tls-key" in msg
    run(body)


def test_connection_refused(run):
    async def body():
        port = free_port()
        exc, msg = await failure(ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, config=FAST))
        assert isinstance(exc, ConnectionRefusedError) and exc.errno == errno.ECONNREFUSED  # still retried
        assert msg == (f"cannot connect to 127.0.0.1:{port}: connection refused — is the server running, and is "
                       f"{port} its tunnel port (server --bind)?")
    run(body)


@pytest.mark.parametrize("use_tls", [False, True])
def test_no_answer_times_out_with_a_hint(run, use_tls):
    async def body():
        async def silent(reader, writer):
            await asyncio.sleep(5)

        srv, where = await raw_server(silent)
        async with srv:
            ctx = tls.client_context(skip_verify=True) if use_tls else None
            exc, msg = await failure(ft.TunnelClient(where, TOKEN, tls=ctx, config=FAST))
            assert isinstance(exc, ft.TunnelTimeoutError) and "within 0.5s" in msg
            if use_tls:
                assert "TLS handshake did not complete" in msg and NO_TLS in msg
            else:
                assert msg.startswith(f"no handshake answer from {where}") and "server --bind" in msg
                assert ADD_TLS in msg
    run(body)


def test_connect_timeout(run):
    async def body():
        # a listener that never accepts, its queue filled: the next SYN gets no answer
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        port = ls.getsockname()[1]
        fillers = []
        try:
            for _ in range(3):
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                fillers.append(s)
            await asyncio.sleep(0.1)
            exc, msg = await failure(ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, config=FAST))
            assert isinstance(exc, ft.TunnelTimeoutError)
            assert msg.startswith(f"cannot connect to 127.0.0.1:{port} within 0.5s") and "--server" in msg
        finally:
            for s in fillers:
                s.close()
            ls.close()
    run(body)


def test_retry_log_lines_carry_the_hint(run, caplog):
    where = []

    async def body():
        async def close(reader, writer):
            pass
        srv, here = await raw_server(close)
        async with srv:
            where.append(here)
            cfg = ft.ClientConfig(handshake_timeout=0.5, backoff=ft.BackoffConfig(base=0.01, max_attempts=2))
            client = ft.TunnelClient(here, TOKEN, config=cfg)
            with pytest.raises(ft.FerroTunnelError, match=r"giving up after 2 retries \(3 attempts\)") as ei:
                await client.connect_and_run(echo_handler)
            assert ADD_TLS in str(ei.value)
    caplog.set_level(logging.WARNING, logger="ferrotunnel.client")
    run(body)
    lines = [r.getMessage() for r in caplog.records if "reconnecting in" in r.getMessage()]
    assert len(lines) == 2
    for line in lines:
        assert line.startswith(f"tunnel to {where[0]}: ") and "either it expects TLS" in line and ADD_TLS in line


@pytest.mark.parametrize("exc,text", [
    (ConnectionResetError(), "ConnectionResetError: the connection was reset"),
    (TimeoutError(), "TimeoutError: no answer in time"),
    (ssl.SSLEOFError(), "SSLEOFError: the TLS connection was closed"),
    (RuntimeError(), "RuntimeError, no details given"),
    (ValueError("kept as it is"), "kept as it is"),
])
def test_no_empty_reasons(exc, text):
    assert describe_error(exc).startswith(text)


@pytest.mark.parametrize("server_tls", [False, True])
def test_cli_client_prints_the_hint(tmp_path, server_tls):
    """The command shows the same hints, in its one last line (TLS on one side only: exit 1 at once)."""
    from test_cli import Proc

    certs = {k: str(v) for k, v in tls.generate_certs(tmp_path).items()}
    tport = free_port()
    stls = ["--tls-cert", certs["server.pem"], "--tls-key", certs["server.key"]] if server_tls else []
    ctls = [] if server_tls else ["--tls", "--tls-ca", certs["ca.pem"]]
    env = {"FERROTUNNEL_TOKEN": TOKEN}
    procs = [Proc("server", "--bind", f"127.0.0.1:{tport}", *stls, env=env)]
    try:
        procs[0].wait_for("listening on")
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", *ctls, "--local-addr", "127.0.0.1:9", env=env)
        procs.append(cli)
        assert cli.p.wait(30) == 1
        cli.finish()
        line = cli.err.decode().strip().splitlines()[-1]
        assert line.startswith("ferrotunnel: ") and ("connect with --tls" if server_tls else NO_TLS) in line
        assert b"Traceback" not in cli.err
    finally:
        for p in procs:
            p.kill()
