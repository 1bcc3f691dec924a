"""The HTTP ingress as a reverse proxy through the command line (subprocesses on loopback): two
tunnels under one domain, a keep-alive connection alternating their Hosts reaches both apps, real
curl reaches the printed URL, every app sees X-Forwarded-For/-Proto/-Host, and behind a real
HAProxy (``send-proxy-v2``) the app sees the visitor's own address, not the balancer's."""

from __future__ import annotations

import http.server as http_server
import shutil
import socket
import subprocess
import threading

import pytest

from conftest import free_port
from haproxy_server import HAProxy
from test_cli import TOKEN, Proc, http


class _Handler(http_server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, with a Content-Length on every answer

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        body = f"{self.server.name} {self.path}\n".encode() + bytes(self.headers)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class App:
    """A keep-alive HTTP/1.1 app in a thread: answers its name, the path and the headers it got."""

    def __init__(self, name: str) -> None:
        self.server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.name = name  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def world():
    procs, apps = [], []
    yield procs, apps
    for p in procs:
        p.kill()
    for a in apps:
        a.close()


def _start(world, *server_flags):
    procs, apps = world
    hport, tport = free_port(), free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--http-bind", f"127.0.0.1:{hport}", "--domain",
               "example.test", *server_flags, env={"FERROTUNNEL_TOKEN": TOKEN})
    procs.append(srv)
    srv.wait_for("listening")
    clients = {}
    for name in ("web", "api"):
        app = App(name)
        apps.append(app)
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app.port}",
                   "--tunnel-id", name, env={"FERROTUNNEL_TOKEN": TOKEN})
        procs.append(cli)
        cli.wait_for(f"Forwarding http://{name}.example.test:{hport}")
        clients[name] = cli
    return srv, clients, hport


def test_a_keep_alive_connection_alternating_two_hosts_reaches_two_apps(world):
    srv, clients, hport = _start(world)
    sock = socket.create_connection(("127.0.0.1", hport), timeout=10)
    try:
        for i in range(6):
            name = ("web", "api")[i % 2]
            status, body, sock = http(hport, f"{name}.example.test:{hport}", f"/{i}", sock=sock)
            assert status.startswith("HTTP/1.1 200"), (i, status)
            first = body.splitlines()[0]
            assert first == f"{name} /{i}", (i, body)
            assert "X-Forwarded-For: 127.0.0.1\n" in body and "X-Forwarded-Proto: http\n" in body
            assert f"X-Forwarded-Host: {name}.example.test:{hport}" in body
    finally:
        sock.close()
    # a visitor's own X-Forwarded-For is not believed (no trusted proxy)
    status, body, s = http(hport, f"web.example.test:{hport}", "/spoof", extra=b"X-Forwarded-For: 6.6.6.6\r\n")
    s.close()
    assert "6.6.6.6" not in body and "X-Forwarded-For: 127.0.0.1" in body


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_real_curl_reaches_the_printed_url(world):
    srv, clients, hport = _start(world)
    url = f"http://api.example.test:{hport}/from-curl"
    assert f"Forwarding {url[:-len('/from-curl')]} ->".encode() in clients["api"].out
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--resolve", f"api.example.test:{hport}:127.0.0.1", url],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("api /from-curl\n"), out.stdout
    assert "X-Forwarded-Host: api.example.test" in out.stdout


def test_behind_haproxy_the_app_sees_the_visitors_own_address(world):
    """HAProxy on 127.0.0.1 sends a PROXY v2 header naming the visitor (bound to 127.0.0.2); the
    server trusts 127.0.0.1 for PROXY headers, so X-Forwarded-For names 127.0.0.2."""
    srv, clients, hport = _start(world, "--trusted-proxy", "127.0.0.1/32")
    front = {7835: free_port(), 80: free_port(), 9000: free_port()}
    node = {7835: free_port(), 8080: hport, 9000: free_port()}
    with HAProxy(front, [node] * 3):  # the deploy file has three servers: all this one
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", front[80]))
        try:
            for path in ("/a", "/b"):
                status, body, sock = http(front[80], "web.example.test", path, sock=sock)
                assert status.startswith("HTTP/1.1 200"), status
                forwarded = [ln for ln in body.splitlines() if ln.startswith("X-Forwarded-For:")]
                assert forwarded == ["X-Forwarded-For: 127.0.0.2"], body
        finally:
            sock.close()
