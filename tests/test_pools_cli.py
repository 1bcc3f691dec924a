"""A pool of two through the command line (subprocesses on loopback): two ``ferrotunnel client
--pool`` processes serve one tunnel id with two apps; real curl through the server's HTTP ingress
reaches both in turn; a third client without ``--pool`` is refused, told to pass ``--pool``;
after one pool client is killed, every request still succeeds, served by the other."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import free_port
from test_cli import TOKEN, Proc
from test_http_proxy_cli import App, world  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(hport: int, path: str) -> str:
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--resolve", f"web.example.test:{hport}:127.0.0.1",
                          f"http://web.example.test:{hport}{path}"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[0] if out.stdout else ""


def test_a_pool_of_two_survives_the_loss_of_one(world):  # noqa: F811
    procs, apps = world
    hport, tport = free_port(), free_port()
    env = {"FERROTUNNEL_TOKEN": TOKEN}
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--http-bind", f"127.0.0.1:{hport}", "--domain",
               "example.test", env=env)
    procs.append(srv)
    srv.wait_for("listening")
    clients = []
    for name in ("one", "two"):
        app = App(name)
        apps.append(app)
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app.port}",
                   "--tunnel-id", "web", "--pool", env=env)
        procs.append(cli)
        cli.wait_for(f"Forwarding http://web.example.test:{hport}")
        clients.append(cli)
    served = [curl(hport, f"/{i}") for i in range(6)]
    assert [line.split(" ")[1] for line in served] == [f"/{i}" for i in range(6)], served
    names = [line.split(" ")[0] for line in served]
    assert {names[0], names[1]} == {"one", "two"} and names == names[:2] * 3, served  # in turn
    # not in the pool: refused at once, told what to do
    solo = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{apps[0].port}",
                "--tunnel-id", "web", env=env)
    procs.append(solo)
    solo.wait_until(lambda: b"pass --pool to join it" in solo.err + solo.out, 20, "the refusal")
    # one pool client dies: the server notices, and the other serves every request
    clients[0].kill()
    srv.wait_until(lambda: re.search(rb"session \S+ \(tunnel web\) from .* closed", srv.err) is not None, 20,
                   "the killed client's session closing")
    served = [curl(hport, f"/after{i}") for i in range(8)]
    assert served == [f"two /after{i}" for i in range(8)], served
