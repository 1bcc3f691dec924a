"""``ferrotunnel client --config FILE.toml`` through the command line (subprocesses on loopback):
two tunnels from one file reach two apps, flags win over the file, and a bad file is a usage
error (exit 2) naming the file, the table and the key."""

from __future__ import annotations

import re

from conftest import free_port
from test_cli import TOKEN, Proc, http
from test_http_proxy_cli import App, world  # noqa: F401 (world is a fixture)


def _server(procs):
    hport, tport = free_port(), free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--http-bind", f"127.0.0.1:{hport}", "--domain",
               "example.test", env={"FERROTUNNEL_TOKEN": TOKEN})
    procs.append(srv)
    srv.wait_for("listening")
    return tport, hport


def test_two_tunnels_from_one_file_reach_two_apps(world, tmp_path):
    procs, apps = world
    tport, hport = _server(procs)
    web, api = App("web"), App("api")
    apps += [web, api]
    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    cfg = tmp_path / "tunnels.toml"
    cfg.write_text(f'server = "127.0.0.1:{tport}"\ntoken_file = "token.txt"\n'
                   f'[[tunnel]]\nid = "web"\nlocal = "127.0.0.1:{web.port}"\n'
                   f'[[tunnel]]\nid = "api"\nlocal = "127.0.0.1:{api.port}"\n')
    # no token in the environment: the file's token_file is used (relative to the file)
    cli = Proc("client", "--config", str(cfg), env={"FERROTUNNEL_TOKEN": "", "FERROTUNNEL_SERVER": ""})
    procs.append(cli)
    cli.wait_until(lambda: cli.out.count(b"Forwarding http://") >= 2 and cli.out.endswith(b"\n"), what="2 URLs")
    assert f"Forwarding http://web.example.test:{hport} -> 127.0.0.1:{web.port}".encode() in cli.out
    assert f"Forwarding http://api.example.test:{hport} -> 127.0.0.1:{api.port}".encode() in cli.out
    for name in ("web", "api"):
        status, body, s = http(hport, f"{name}.example.test", "/x")
        s.close()
        assert status.startswith("HTTP/1.1 200") and body.startswith(f"{name} /x"), body
    # both tunnels on one connection (tunnels/1): one session, the second id registered on it
    said = re.findall(rb"connected to \S+: session (\S+), tunnel id (\w+)", cli.out)
    assert sorted(t for _, t in said) == [b"api", b"web"] and said[0][0] == said[1][0], cli.out
    srv = procs[0]
    srv.wait_until(lambda: b"tunnel api registered on session " + said[0][0] in srv.out + srv.err, what="register")
    assert (srv.out + srv.err).count(b") from ") == 1  # one "session ... (tunnel web) from ... established"
    assert cli.finish() == 0
    assert TOKEN.encode() not in cli.out + cli.err


def test_a_server_without_the_extension_gets_one_connection_per_tunnel(world, tmp_path):
    """A server that never answers tunnels/1 (a Rust one, an older one): each tunnel of the file
    gets a connection of its own, as before."""
    procs, apps = world
    (tmp_path / "sitecustomize.py").write_text(
        "import ferrotunnel.protocol.handshake as hs\n"
        "_real = hs.server_capabilities\n"
        "hs.server_capabilities = lambda config: [c for c in _real(config) if c != 'tunnels/1']\n")
    hport, tport = free_port(), free_port()
    srv = Proc("server", "--bind", f"127.0.0.1:{tport}", "--http-bind", f"127.0.0.1:{hport}", "--domain",
               "example.test", env={"FERROTUNNEL_TOKEN": TOKEN, "PYTHONPATH": str(tmp_path)})
    procs.append(srv)
    srv.wait_for("listening")
    web, api = App("web"), App("api")
    apps += [web, api]
    cfg = tmp_path / "tunnels.toml"
    cfg.write_text(f'server = "127.0.0.1:{tport}"\n'
                   f'[[tunnel]]\nid = "web"\nlocal = "127.0.0.1:{web.port}"\n'
                   f'[[tunnel]]\nid = "api"\nlocal = "127.0.0.1:{api.port}"\n')
    cli = Proc("client", "--config", str(cfg), env={"FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_SERVER": ""})
    procs.append(cli)
    cli.wait_until(lambda: cli.out.count(b"Forwarding http://") >= 2 and cli.out.endswith(b"\n"), what="2 URLs")
    said = re.findall(rb"connected to \S+: session (\S+), tunnel id (\w+)", cli.out)
    assert sorted(t for _, t in said) == [b"api", b"web"] and said[0][0] != said[1][0], cli.out
    for name in ("web", "api"):
        status, body, s = http(hport, f"{name}.example.test", "/y")
        s.close()
        assert status.startswith("HTTP/1.1 200") and body.startswith(f"{name} /y"), body
    assert b"registered on session" not in srv.out + srv.err
    assert cli.finish() == 0


def test_flags_win_over_a_one_tunnel_file_and_are_refused_for_many(world, tmp_path):
    procs, apps = world
    tport, hport = _server(procs)
    app = App("flagged")
    apps.append(app)
    one = tmp_path / "one.toml"
    one.write_text('server = "127.0.0.1:1"\n[[tunnel]]\nid = "fromfile"\nlocal = "127.0.0.1:1"\n')
    cli = Proc("client", "--config", str(one), "--server", f"127.0.0.1:{tport}", "--tunnel-id", "flagged",
               "--local-addr", f"127.0.0.1:{app.port}", env={"FERROTUNNEL_TOKEN": TOKEN})
    procs.append(cli)
    cli.wait_for(f"Forwarding http://flagged.example.test:{hport}")
    status, body, s = http(hport, "flagged.example.test")
    s.close()
    assert body.startswith("flagged /"), body
    assert cli.finish() == 0
    two = tmp_path / "two.toml"
    two.write_text('[[tunnel]]\nid = "a"\nlocal = "127.0.0.1:1"\n[[tunnel]]\nid = "b"\nlocal = "127.0.0.1:2"\n')
    bad = Proc("client", "--config", str(two), "--server", f"127.0.0.1:{tport}", "--tunnel-id", "x",
               env={"FERROTUNNEL_TOKEN": TOKEN})
    bad.p.wait(20)
    assert bad.finish() == 2
    assert b"--tunnel-id apply to one tunnel" in bad.err and str(two).encode() in bad.err


def test_a_bad_file_is_a_usage_error_naming_the_table_and_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('server = "127.0.0.1:7835"\n[[tunnel]]\nid = "a"\nlocal = "127.0.0.1:1"\n'
                   '[[tunnel]]\nid = "b"\nlocal = "127.0.0.1:2"\nlocal_port = 5\n')
    p = Proc("client", "--config", str(cfg), env={"FERROTUNNEL_TOKEN": TOKEN})
    p.p.wait(20)
    assert p.finish() == 2
    line = p.err.decode().strip().splitlines()[-1]
    assert f"config file {cfg}: tunnel[2]: key 'local_port': unknown key" in line, p.err
    assert b"Traceback" not in p.err
