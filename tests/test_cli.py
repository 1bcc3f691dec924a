"""The ferrotunnel command as real subprocesses on 127.0.0.1 with free ports."""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port

TOKEN = "cli-secret-token-42"
PROCS = str(Path(__file__).with_name("procs.py"))
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL_") or k in (
    "FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS")}


class Proc:
    def __init__(self, *args, env=None):
        self.p = subprocess.Popen([sys.executable, "-m", "ferrotunnel", *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env={**ENV, **(env or {})})
        self.out = b""
        self.err = b""

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        self.wait_until(lambda: text.encode() in self.out, timeout, repr(text))
        return self.out.decode()

    def wait_until(self, cond, timeout: float = 15.0, what: str = "the condition") -> None:
        """Read stdout and stderr until ``cond()`` holds."""
        sel = selectors.DefaultSelector()
        sel.register(self.p.stdout, selectors.EVENT_READ)
        sel.register(self.p.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0 or self.p.poll() is not None and not sel.select(0):
                raise AssertionError(f"{what} not seen; stdout={self.out!r} stderr={self.err[-2000:]!r}")
            for key, _ in sel.select(min(left, 0.2)):
                chunk = os.read(key.fd, 65536)
                if key.fileobj is self.p.stdout:
                    self.out += chunk
                else:
                    self.err += chunk

    def finish(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
        out, err = self.p.communicate(timeout=timeout)
        self.out += out
        self.err += err
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


def helper(*args):
    p = subprocess.Popen([sys.executable, PROCS, *map(str, args)], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()
    return p


def http(port, host, path="/", *, sock=None, extra=b""):
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b"\r\n")[0].decode(), body.decode(errors="replace"), s


@pytest.fixture
def cleanup():
    procs = []
    yield procs
    for p in procs:
        p.kill() if isinstance(p, Proc) else p.kill()


def test_tcp_ingress_through_cli(cleanup):
    echo_port, tport, iport = free_port(), free_port(), free_port()
    cleanup.append(helper("echo", echo_port))
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN, "--tcp-bind", f"127.0.0.1:{iport}=svc",
               "--log-level", "debug")
    cleanup.append(srv)
    srv.wait_for("listening")
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{echo_port}",
               "--tunnel-id", "svc", "--log-level", "debug", env={"FERROTUNNEL_TOKEN": TOKEN})
    cleanup.append(cli)
    out = cli.wait_for("connected")
    assert "tunnel id svc" in out and "session " in out
    payload = os.urandom(2_000_000)
    with socket.create_connection(("127.0.0.1", iport), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert cli.finish() == 0 and srv.finish() == 0
    for p in (srv, cli):
        assert TOKEN.encode() not in p.out + p.err  # never echoed or logged, even at debug


def test_http_ingress_routes_by_host_keepalive_and_upgrade(cleanup):
    a_port, b_port, tport, hport = free_port(), free_port(), free_port(), free_port()
    cleanup += [helper("httpapp", a_port, "alpha"), helper("httpapp", b_port, "beta")]
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN, "--http-bind", f"127.0.0.1:{hport}")
    cleanup.append(srv)
    srv.wait_for("HTTP ingress")
    for name, port in (("alpha", a_port), ("beta", b_port)):
        c = Proc("client", "--server", f"127.0.0.1:{tport}", "--token", TOKEN, "--local-addr", f"127.0.0.1:{port}",
                 "--tunnel-id", name)
        cleanup.append(c)
        c.wait_for("connected")
    status, body, s = http(hport, "alpha")
    assert status == "HTTP/1.1 200 OK" and body == "alpha / 0"
    status, body, s = http(hport, "ALPHA.:8080", "/again", sock=s)  # same connection: keep-alive
    assert body == "alpha /again 0"
    s.close()
    assert http(hport, " Beta ")[1] == "beta / 0"
    assert http(hport, "nobody")[0] == "HTTP/1.1 404 Not Found"
    assert http(hport, "whatever", "/health")[0] == "HTTP/1.1 200 OK"
    status, _, s = http(hport, "beta", "/ws", extra=b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
    assert status.startswith("HTTP/1.1 101")
    s.sendall(b"\x81\x05hello")
    assert s.recv(100) == b"\x81\x05hello"
    s.close()


def test_http_ingress_502_when_local_service_is_down(cleanup):
    tport, hport, dead = free_port(), free_port(), free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN, "--http-bind", f"127.0.0.1:{hport}")
    cleanup.append(srv)
    srv.wait_for("HTTP ingress")
    c = Proc("client", "--server", f"127.0.0.1:{tport}", "--token", TOKEN, "--local-addr", f"127.0.0.1:{dead}",
             "--tunnel-id", "down")
    cleanup.append(c)
    c.wait_for("connected")
    assert http(hport, "down")[0] == "HTTP/1.1 502 Bad Gateway"


@pytest.mark.parametrize("mtls", [False, True])
def test_tls_and_mtls_with_generated_certs(cleanup, tmp_path, mtls):
    certs = tmp_path / "certs"
    r = subprocess.run([sys.executable, "-m", "ferrotunnel", "certs", "--out", str(certs), "--client"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and "server.pem" in r.stdout
    echo_port, tport, iport = free_port(), free_port(), free_port()
    cleanup.append(helper("echo", echo_port))
    extra = ["--tls-ca", certs / "ca.pem"] if mtls else []
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN, "--tcp-bind", f"127.0.0.1:{iport}",
               "--tls-cert", certs / "server.pem", "--tls-key", certs / "server.key", *extra)
    cleanup.append(srv)
    srv.wait_for("(TLS)")
    cextra = ["--tls-cert", certs / "client.pem", "--tls-key", certs / "client.key"] if mtls else []
    cli = Proc("client", "--server", f"localhost:{tport}", "--token", TOKEN, "--local-addr",
               f"127.0.0.1:{echo_port}", "--tls", "--tls-ca", certs / "ca.pem", *cextra)
    cleanup.append(cli)
    cli.wait_for("connected")
    with socket.create_connection(("127.0.0.1", iport), timeout=10) as s:
        s.sendall(b"over tls")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"over tls"
    if mtls:  # a client without a certificate is refused and retries; the server logs it
        bad = Proc("client", "--server", f"localhost:{tport}", "--token", TOKEN, "--local-addr",
                   f"127.0.0.1:{echo_port}", "--tls", "--tls-ca", certs / "ca.pem")
        cleanup.append(bad)
        # its first attempt has reached the server: the client is up and its signal handlers are in
        # place (a SIGTERM before that, while it starts and re-executes, would kill it outright)
        srv.wait_until(lambda: b"TLS handshake from" in srv.err, 30, "the refused handshake")
        assert bad.finish() == 0
        assert b"connected" not in bad.out


def test_demo_exits_zero():
    r = subprocess.run([sys.executable, "-m", "ferrotunnel", "demo", "--requests", "60"], capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "60 ok of 60" in r.stdout and "latency" in r.stdout


@pytest.mark.parametrize("args,code,message", [
    (["server", "--token", TOKEN, "--bind", "nonsense"], 2, "HOST:PORT"),
    (["server", "--bind", "127.0.0.1:0"], 2, "no token"),
    (["server", "--token", "bad token\t", "--bind", "127.0.0.1:0"], 2, "invalid token"),
    (["server", "--token", TOKEN, "--tls-cert", "/nope/cert.pem", "--tls-key", "/nope/key.pem"], 2, "not found"),
    (["server", "--token", TOKEN, "--tls-cert", "x.pem"], 2, "both --tls-cert and --tls-key"),
    (["server", "--token", TOKEN, "--frobnicate"], 2, "unrecognized arguments"),
    (["client", "--token", TOKEN], 2, "--server"),
    (["client", "--token", TOKEN, "--server", "127.0.0.1:1", "--tls-ca", "/nope/ca.pem"], 2, "not found"),
    (["client", "--token", TOKEN, "--server", "127.0.0.1:1", "--local-addr", "8000"], 2, "HOST:PORT"),
    (["certs"], 2, "--out"),
    ([], 2, "usage"),
])
def test_bad_usage(args, code, message):
    r = subprocess.run([sys.executable, "-m", "ferrotunnel", *args], capture_output=True, text=True, env=ENV,
                       stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == code and message in r.stderr, (r.returncode, r.stderr)
    assert "bad token" not in r.stderr


def test_port_in_use_is_a_runtime_failure():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ferrotunnel", "server", "--token", TOKEN, "--bind",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, env=ENV, timeout=30)
    assert r.returncode == 1 and "cannot listen" in r.stderr


def test_wrong_token_client_exits_1(cleanup):
    tport = free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN)
    cleanup.append(srv)
    srv.wait_for("listening")
    r = subprocess.run([sys.executable, "-m", "ferrotunnel", "client", "--server", f"127.0.0.1:{tport}",
                        "--token", "another-token-9"], capture_output=True, text=True, env=ENV, timeout=30)
    assert r.returncode == 1 and "rejected the token" in r.stderr
    assert "another-token-9" not in r.stderr + r.stdout


def test_sigterm_drains_open_streams_and_exits_zero(cleanup):
    tport, iport, app = free_port(), free_port(), free_port()
    cleanup.append(helper("httpapp", app, "slow"))
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN, "--tcp-bind", f"127.0.0.1:{iport}",
               "--grace", "5")
    cleanup.append(srv)
    srv.wait_for("listening")
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--token", TOKEN, "--local-addr", f"127.0.0.1:{app}")
    cleanup.append(cli)
    cli.wait_for("connected")
    s = socket.create_connection(("127.0.0.1", iport), timeout=10)
    s.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"slow /one" in s.recv(1000)
    srv.p.send_signal(signal.SIGTERM)  # an open stream: the server waits for it (up to --grace)
    time.sleep(0.5)
    assert srv.p.poll() is None
    s.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")  # still served while draining
    assert b"slow /two" in s.recv(1000)
    s.close()
    assert srv.finish(timeout=10) == 0
    assert b"shutting down" in srv.out


def test_metrics_endpoint(cleanup):
    echo_port, tport, iport, mport = free_port(), free_port(), free_port(), free_port()
    cleanup.append(helper("echo", echo_port))
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--token", TOKEN, "--tcp-bind", f"127.0.0.1:{iport}",
               "--metrics", "--metrics-bind", f"127.0.0.1:{mport}")
    cleanup.append(srv)
    srv.wait_for("metrics on")
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--token", TOKEN, "--local-addr", f"127.0.0.1:{echo_port}")
    cleanup.append(cli)
    cli.wait_for("connected")
    with socket.create_connection(("127.0.0.1", iport), timeout=10) as s:
        s.sendall(b"x" * 1000)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    r = subprocess.run([sys.executable, "-m", "ferrotunnel", "client", "--server", f"127.0.0.1:{tport}",
                        "--token", "wrong-token-1"], capture_output=True, env=ENV, timeout=30)
    assert r.returncode == 1
    status, body, _ = http(mport, "m", "/metrics")
    assert status == "HTTP/1.1 200 OK"
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
               if line and not line.startswith("#")}
    assert metrics["ferrotunnel_sessions"] == 1
    assert "ferrotunnel_streams" in metrics  # a stable name (output contract)
    assert metrics['ferrotunnel_bytes_total{direction="in"}'] > 1000
    assert metrics['ferrotunnel_frames_total{direction="out"}'] > 2
    assert metrics['ferrotunnel_handshake_failures_total{status="INVALID_TOKEN"}'] == 1
    assert any(k.startswith("ferrotunnel_ingress_connections_total") and v == 1 for k, v in metrics.items())
    assert http(mport, "m", "/health/ready")[0] == "HTTP/1.1 200 OK"


def test_output_contract(cleanup):
    """Operators' scripts read these lines; they stay as they are: the server's "listening on ADDR"
    when the tunnel port is ready, the client's "connected to ADDR" with the session id on each
    handshake and "reconnecting in N.Ns" before each retry."""
    tport = free_port()
    addr = f"127.0.0.1:{tport}"
    srv = Proc("server", "--bind", addr, "--token", TOKEN)
    cleanup.append(srv)
    srv.wait_for(f"listening on {addr}")
    with socket.create_connection(("127.0.0.1", tport), timeout=5):
        pass  # ready when it says so
    cli = Proc("client", "--server", addr, "--token", TOKEN, "--local-addr", "127.0.0.1:9")
    cleanup.append(cli)
    connected = re.compile(rf"connected to {re.escape(addr)}: session ([0-9a-f-]{{36}})")
    cli.wait_for("connected to")
    first = connected.findall(cli.out.decode())
    assert len(first) == 1
    assert srv.finish() == 0
    assert re.search(rf"listening on {re.escape(addr)}", srv.err.decode())  # the log line too
    retry = re.compile(r"reconnecting in \d+\.\ds")
    cli.wait_until(lambda: retry.search(cli.err.decode()), 15, "reconnecting in N.Ns")
    srv2 = Proc("server", "--bind", addr, "--token", TOKEN)
    cleanup.append(srv2)
    srv2.wait_for(f"listening on {addr}")
    cli.wait_until(lambda: len(connected.findall(cli.out.decode())) == 2, 20, "a second connected to")
    second = connected.findall(cli.out.decode())
    assert second[0] == first[0] and second[1] != first[0]  # a new session after the reconnect
    assert cli.finish() == 0
    log = cli.err.decode()
    assert connected.findall(log) == second  # the log says it as well, each time
    assert retry.search(log)
