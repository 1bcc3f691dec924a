"""``ferrotunnel client --inspect HOST:PORT`` through the command line (subprocesses on loopback):
a real server with an HTTP ingress, a client with the inspector, a local app; real curl sends
visitors' requests; /api/requests lists them; a replay with the page's token reaches the app again.
Skipped until the client has the ``--inspect`` flag."""

from __future__ import annotations

import http.server as http_server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, List

import pytest

from conftest import free_port
from test_cli import ENV, TOKEN, Proc


class _Handler(http_server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        body = f"app {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _has_inspect_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "ferrotunnel", "client", "--help"], capture_output=True,
                         text=True, timeout=60, env=ENV)
    return "--inspect" in out.stdout


def _get(port: int, path: str, headers: Any = None, method: str = "GET") -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.status, r.read()


@pytest.fixture
def procs():
    started: List[Proc] = []
    app = http_server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    app.paths = []  # type: ignore[attr-defined]
    threading.Thread(target=app.serve_forever, daemon=True).start()
    yield started, app
    for p in started:
        p.kill()
    app.shutdown()
    app.server_close()


def _server_and_client(started: List[Any], app: Any, *client_args: str) -> Any:
    """A CLI server with an HTTP ingress for ``*.example.test`` and a CLI client with --inspect;
    (HTTP port, inspector port, the client's Proc)."""
    hport, tport, iport = free_port(), free_port(), free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--http-bind", f"127.0.0.1:{hport}", "--domain",
               "example.test", env={"FERROTUNNEL_TOKEN": TOKEN})
    started.append(srv)
    srv.wait_for("listening")
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app.server_address[1]}",
               *client_args, "--inspect", f"127.0.0.1:{iport}", env={"FERROTUNNEL_TOKEN": TOKEN})
    started.append(cli)
    return hport, iport, cli


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_client_inspect_lists_curl_requests_and_replays_them(procs):
    if not _has_inspect_flag():
        pytest.skip("--inspect flag not wired yet")
    started, app = procs
    hport, iport, cli = _server_and_client(started, app, "--tunnel-id", "web")
    cli.wait_for(f"Forwarding http://web.example.test:{hport}")
    deadline = time.monotonic() + 20
    while True:  # the inspector answers
        try:
            status, page = _get(iport, "/")
            break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert status == 200 and b"ferrotunnel inspector" in page
    token = re.search(rb'name="ft-token" content="([^"]+)"', page)[1].decode()

    base = f"http://web.example.test:{hport}"
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--resolve", f"web.example.test:{hport}:127.0.0.1",
                          "-H", "Authorization: Bearer curl-secret", f"{base}/first?x=1", f"{base}/second"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "app /first?x=1\napp /second\n"

    deadline = time.monotonic() + 20
    while True:
        rows = json.loads(_get(iport, "/api/requests")[1])["requests"]
        if len(rows) == 2 and all(r["state"] == "done" for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [(r["method"], r["path"], r["status"], r["tunnel"]) for r in rows] == [
        ("GET", "/second", 200, "web"), ("GET", "/first?x=1", 200, "web")]
    assert all(r["visitor"] == "127.0.0.1" for r in rows)
    assert "request_head" not in rows[1]  # the list has no heads: a request's own endpoint has them
    first = _get(iport, f"/api/requests/{rows[1]['id']}")[1].decode()
    assert "Authorization: [redacted]" in json.loads(first)["request_head"] and "curl-secret" not in first

    with pytest.raises(urllib.error.HTTPError) as refused:  # no token
        _get(iport, f"/api/requests/{rows[1]['id']}/replay", method="POST")
    assert refused.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as refused:  # a rebinding Host
        _get(iport, "/api/requests", {"Host": f"rebound.example:{iport}"})
    assert refused.value.code == 403
    assert app.paths == ["/first?x=1", "/second"]
    status, body = _get(iport, f"/api/requests/{rows[1]['id']}/replay", {"X-Ferrotunnel-Token": token},
                        method="POST")
    assert status == 200 and json.loads(body)["replay_of"] == rows[1]["id"]
    assert app.paths == ["/first?x=1", "/second", "/first?x=1"]
    assert token.encode() not in cli.out + cli.err


def test_rows_name_the_tunnel_when_no_tunnel_id_was_given(procs):
    """Without --tunnel-id the client's tunnel id is its own (printed); each row names it (it
    was None: the handler was made with the id asked for, not the one the client has)."""
    started, app = procs
    hport, iport, cli = _server_and_client(started, app)
    cli.wait_for("Forwarding http://")
    m = re.search(rb"Forwarding http://([^.]+)\.example\.test", cli.out)
    tid = m[1].decode()
    out = subprocess.run(["curl", "-sS", "--resolve", f"{tid}.example.test:{hport}:127.0.0.1",
                          f"http://{tid}.example.test:{hport}/x"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "app /x\n", out.stderr
    deadline = time.monotonic() + 10
    while True:
        rows = json.loads(_get(iport, "/api/requests")[1])["requests"]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert rows[0]["tunnel"] == tid
