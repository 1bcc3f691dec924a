"""The command line as a finished tool (subprocesses): ``--version``; every flag documented with its
environment variable and default; bad numbers, a ``scheme://`` server and TLS files that cannot
work are usage errors (exit 2) that name the file and the likely mistake, never a traceback; the
banners say the TLS mode and where each file came from (the ``*_SERVER_TLS_*``/``*_CLIENT_TLS_*``
variables before the shared ones), with a warning for ``--tls-skip-verify``; a server without an
ingress says visitors cannot reach it; the client gives open streams ``--grace`` seconds after
SIGTERM, and a second Ctrl-C ends either command at once with 130."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import time
import sys

import pytest

from conftest import free_port
from ferrotunnel.cli import commands
from test_cli import ENV, TOKEN, Proc, helper

TOKEN_ENV = {"FERROTUNNEL_TOKEN": TOKEN}


def _run(*args, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "ferrotunnel", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def test_version_flag():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("ferrotunnel ") and "protocol v1" in r.stdout


def test_every_flag_says_its_environment_variable_and_default():
    parser = commands.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sp in sub.choices.items():
        assert sp.description, f"{name} has no description"
        if name in ("server", "client", "demo"):
            assert "example:" in (sp.epilog or ""), f"{name} has no example"
        for action in sp._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = action.help or ""
            if len(text) < 10 or (name != "certs" and "default" not in text):
                missing.append(f"{name} {action.option_strings[0]}: {text!r}")
    assert not missing, missing
    out = _run("client", "--help").stdout
    for needle in ("FERROTUNNEL_CLIENT_TLS_CA", "FERROTUNNEL_TLS_CA", "{debug,info,warning,error}", "--max-retries"):
        assert needle in out, needle
    out = _run("server", "--help", env={"FERROTUNNEL_TOKEN": TOKEN}).stdout
    assert TOKEN not in out and "FERROTUNNEL_SERVER_TLS_CERT" in out


@pytest.mark.parametrize("args,says", [
    (["server", "--grace", "-1"], "--grace: must be a finite number >= 0"),
    (["client", "--grace", "nan", "--server", "127.0.0.1:1"], "--grace"),
    (["demo", "--requests", "-5"], "--requests: must be at least 1"),
    (["demo", "--concurrency", "0"], "--concurrency: must be at least 1"),
    (["client", "--max-retries", "0", "--server", "127.0.0.1:1"], "--max-retries: must be at least 1"),
    (["client", "--server", "http://127.0.0.1:7835"], "without a scheme"),
    (["server", "--log-level", "loud"], "--log-level"),
])
def test_bad_values_are_usage_errors(args, says):
    r = _run(*args, env=TOKEN_ENV)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    r = _run("certs", "--out", out, "--client")
    assert r.returncode == 0, r.stderr
    (out / "garbage.pem").write_text("this is not a certificate\n")
    other = tmp_path_factory.mktemp("other")
    assert _run("certs", "--out", other).returncode == 0
    return out, other


def test_tls_files_that_cannot_work_are_usage_errors(certs):
    d, other = certs
    cases = [
        (["server", "--tls-cert", d / "server.key", "--tls-key", d / "server.pem"], "swapped"),
        (["server", "--tls-cert", d / "server.pem", "--tls-key", other / "server.key"], "does not belong"),
        (["server", "--tls-cert", d / "server.pem", "--tls-key", d / "server.key", "--tls-ca", d / "garbage.pem"],
         "no CA certificate"),
        (["client", "--server", "127.0.0.1:1", "--tls-ca", d / "garbage.pem"], "no CA certificate"),
        (["client", "--server", "127.0.0.1:1", "--tls-ca", d / "ca.pem", "--tls-cert", d / "client.pem",
          "--tls-key", other / "server.key"], "does not belong"),
    ]
    for args, says in cases:
        r = _run(*args, "--bind" if args[0] == "server" else "--log-level", f"127.0.0.1:{free_port()}"
                 if args[0] == "server" else "info", env=TOKEN_ENV)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_banners_say_the_tls_mode_and_where_each_file_came_from(certs):
    d, _ = certs
    tport = free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--tls-key", d / "server.key",
               env={**TOKEN_ENV, "FERROTUNNEL_SERVER_TLS_CERT": str(d / "server.pem"),
                    "FERROTUNNEL_TLS_CERT": str(d / "client.pem"), "FERROTUNNEL_SERVER_TLS_CA": str(d / "ca.pem")})
    try:
        out = srv.wait_for("note: no ingress")
        assert "TLS: TLS 1.3, client certificates required" in out
        assert f"certificate {d / 'server.pem'} (from FERROTUNNEL_SERVER_TLS_CERT)" in out  # before the shared name
        assert f"key {d / 'server.key'} (from --tls-key)" in out
        assert "note: no ingress: visitors cannot reach any tunnel" in out and "client CA" in out
        cli = Proc("client", "--server", f"localhost:{tport}", "--tls-skip-verify", "--max-retries", "1",
                   env={**TOKEN_ENV, "FERROTUNNEL_CLIENT_TLS_CERT": str(d / "client.pem"),
                        "FERROTUNNEL_CLIENT_TLS_KEY": str(d / "client.key")})
        try:
            cli.wait_for("connected to")
            assert "server certificate NOT verified" in cli.out.decode()
            assert "(from FERROTUNNEL_CLIENT_TLS_CERT)" in cli.out.decode()
            cli.wait_until(lambda: b"warning: --tls-skip-verify" in cli.err, what="the warning")
        finally:
            cli.kill()
    finally:
        srv.kill()
    plain = Proc("client", "--server", "127.0.0.1:1", "--max-retries", "1", env=TOKEN_ENV)
    plain.p.wait(30)
    assert plain.finish() == 1 and b"TLS: off" in plain.out and b"giving up after 1 retry (2 attempts)" in plain.err


def test_an_address_not_on_this_machine_is_named():
    r = _run("server", "--bind", "192.0.2.1:7835", env=TOKEN_ENV)  # TEST-NET-1: on no interface here
    assert r.returncode == 1 and "is the address one of this machine's?" in r.stderr, r.stderr
    assert "another process" not in r.stderr


@contextlib.contextmanager
def open_stream(server_grace: str = "10", client_grace: str = "10"):
    """A server with a TCP ingress, a client to a keep-alive app, and one visitor connection that
    has had an answer (its stream stays open). Yields (server, client, visitor socket)."""
    tport, iport, app = free_port(), free_port(), free_port()
    procs = [helper("httpapp", app, "slow")]
    try:
        srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--tcp-bind", f"127.0.0.1:{iport}", "--grace",
                   server_grace, env=TOKEN_ENV)
        procs.append(srv)
        srv.wait_for("listening")
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app}", "--grace",
                   client_grace, env=TOKEN_ENV)
        procs.append(cli)
        cli.wait_for("connected")
        with socket.create_connection(("127.0.0.1", iport), timeout=10) as s:
            s.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"slow /one" in s.recv(1000)
            yield srv, cli, s
    finally:
        for p in procs:
            p.kill()


def test_the_client_gives_open_streams_its_grace_after_sigterm():
    with open_stream(client_grace="20") as (srv, cli, s):
        cli.p.send_signal(signal.SIGTERM)  # the stream is open: the client waits for it
        cli.wait_for("shutting down (up to 20s for 1 open streams)")
        s.sendall(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")  # still served
        assert b"slow /two" in s.recv(1000)
        assert cli.p.poll() is None
        s.close()  # the last stream ends: the client exits well before its grace is over
        assert cli.p.wait(15) == 0


@pytest.mark.parametrize("role", ["server", "client"])
def test_a_second_ctrl_c_exits_at_once_with_130(role):
    with open_stream("60", "60") as (srv, cli, s):
        target = srv if role == "server" else cli
        target.p.send_signal(signal.SIGINT)
        target.wait_for("shutting down")  # in its grace period (an open stream)
        target.p.send_signal(signal.SIGINT)
        assert target.p.wait(15) == 130
        target.finish()
        assert b"second signal" in target.err and b"Traceback" not in target.err


def test_help_lists_every_command_with_an_example():
    r = _run("--help")
    assert r.returncode == 0
    for cmd in ("server", "client", "certs", "demo", "version", "--version"):
        assert cmd in r.stdout



def test_nothing_says_listening_when_an_ingress_cannot_bind():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = _run("server", "--bind", f"127.0.0.1:{free_port()}", "--http-bind", "%s:%d" % busy.getsockname(),
                 env=TOKEN_ENV)
    finally:
        busy.close()
    assert r.returncode == 1 and "is another process using the port?" in r.stderr, r.stderr
    assert "listening" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_both_ends_count_the_same_bytes_for_a_stream():
    """What the server logs as sent to the tunnel the client logs as received from it, and the
    other way round: bytes that arrive before the local connection is up count too."""
    import re

    tport, iport, app = free_port(), free_port(), free_port()
    procs = [helper("httpapp", app, "counted")]
    try:
        srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--tcp-bind", f"127.0.0.1:{iport}", env=TOKEN_ENV)
        procs.append(srv)
        srv.wait_for("listening")
        cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app}", env=TOKEN_ENV)
        procs.append(cli)
        cli.wait_for("connected")
        with socket.create_connection(("127.0.0.1", iport), timeout=10) as s:
            s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n" + b"b" * 300)
            assert b"counted /x 300" in s.recv(1000)
        pattern = re.compile(rb"stream \d+ closed: (\d+) bytes to the tunnel, (\d+) from it")
        srv.wait_until(lambda: pattern.search(srv.err), 15, "the server's stream line")
        cli.wait_until(lambda: pattern.search(cli.err), 15, "the client's stream line")
        up_s, down_s = map(int, pattern.search(srv.err).groups())
        up_c, down_c = map(int, pattern.search(cli.err).groups())
        assert up_s == down_c == len(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 300\r\n\r\n") + 300
        assert down_s == up_c > 0
        # the logs name addresses one way (HOST:PORT), and an ingress's line has single spaces
        log = srv.err.decode()
        assert f"TCP ingress listening on 127.0.0.1:{iport} -> first tcp session" in log, log
        assert re.search(r"session \S+ \(tunnel \S+\) from 127\.0\.0\.1:\d+ established", log), log
        assert "('127.0.0.1'" not in log
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("flag,var", [("--allow", "FERROTUNNEL_ALLOW"), ("--trusted-proxy", "FERROTUNNEL_TRUSTED_PROXY"),
                                      ("--tcp-bind", "FERROTUNNEL_TCP_BIND")])
def test_a_repeatable_flag_replaces_its_environment_list(monkeypatch, flag, var):
    """A stray environment value must not widen what the command line says (an allow list, the
    trusted proxies): the flags' values replace it; without the flag it applies."""
    monkeypatch.setenv(var, "10.0.0.0/8,10.1.0.0/16")
    role = "client" if flag == "--allow" else "server"
    dest = flag[2:].replace("-", "_")
    parser = commands.build_parser()
    assert getattr(parser.parse_args([role, flag, "192.168.0.0/16", flag, "1.2.3.4"]), dest) == \
        ["192.168.0.0/16", "1.2.3.4"]
    assert getattr(parser.parse_args([role]), dest) == ["10.0.0.0/8", "10.1.0.0/16"]


def _on_a_terminal(args, until: bytes, stop: bytes = b""):
    """Run ``ferrotunnel ARGS`` with stdout and stderr on one pseudo-terminal; return what it
    showed once ``until`` appeared (SIGTERM then), or None when it did not within 30 s."""
    import os
    import pty
    import select

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "ferrotunnel", *map(str, args)], stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave, env={**ENV, **TOKEN_ENV}, close_fds=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    try:
        while until not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        time.sleep(0.3)  # anything said right after it
        while select.select([master], [], [], 0.1)[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(15)
        os.close(master)
    return seen if until in seen else None


def test_on_a_terminal_each_event_is_shown_once():
    """A person at a terminal sees each event once: the log lines that repeat a banner line are
    left out there (files and pipes keep both: an output contract, see test_cli)."""
    tport, hport = free_port(), free_port()
    import threading

    shown = {}
    t = threading.Thread(target=lambda: shown.setdefault("server", _on_a_terminal(
        ["server", "--bind", f"127.0.0.1:{tport}", "--http-bind", f"127.0.0.1:{hport}"], b"established")))
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", tport)) == 0:
                break
        time.sleep(0.1)
    client = _on_a_terminal(["client", "--server", f"127.0.0.1:{tport}", "--tunnel-id", "web"], b"Forwarding")
    t.join(60)
    server = shown.get("server")
    assert server is not None and client is not None, (server, client)
    assert server.count(f"listening on 127.0.0.1:{tport}".encode()) == 1, server
    assert server.count(f"127.0.0.1:{hport}".encode()) == 1, server
    assert client.count(b"connected to") == 1 and b"Forwarding http://" in client, client
