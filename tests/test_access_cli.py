"""Per-tunnel access through the command line (subprocesses on loopback, real curl): basic auth
from ``FERROTUNNEL_BASIC_AUTH`` gives 401 then 200 (the password in no output), ``--allow`` for
another network gives 403, ``--protocol tcp`` keeps a tunnel off the HTTP ingress, and a config
file sets the same per tunnel; bad values are usage errors that never repeat the password."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from test_cli import TOKEN, Proc, http
from test_config_cli import _server as config_server
from test_http_proxy_cli import App, world  # noqa: F401 (world is a fixture)

PASSWORD = "pa55-word-never-shown"


def _server(procs):
    """test_config_cli's server (HTTP ingress, domain example.test): (process, tunnel port, HTTP port)."""
    tport, hport = config_server(procs)
    return procs[-1], tport, hport


def _curl(hport: int, name: str, *extra: str) -> str:
    """The status code curl saw for http://NAME.example.test:PORT/."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20", "--resolve",
                          f"{name}.example.test:{hport}:127.0.0.1", *extra, f"http://{name}.example.test:{hport}/"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_basic_auth_and_allow_through_the_cli(world):
    procs, apps = world
    srv, tport, hport = _server(procs)
    app = App("web")
    apps.append(app)
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app.port}",
               "--tunnel-id", "web", env={"FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_BASIC_AUTH": f"alice:{PASSWORD}"})
    procs.append(cli)
    cli.wait_for(f"Forwarding http://web.example.test:{hport}")
    assert _curl(hport, "web") == "401"
    assert _curl(hport, "web", "-u", "alice:wrong") == "401"
    assert _curl(hport, "web", "-u", f"alice:{PASSWORD}") == "200"
    status, body, s = http(hport, "web.example.test", "/x")  # no credentials: the challenge
    s.close()
    assert status.startswith("HTTP/1.1 401")
    # an allow list without 127.0.0.1: 403
    shy = App("shy")
    apps.append(shy)
    cli2 = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{shy.port}",
                "--tunnel-id", "shy", "--allow", "10.0.0.0/8", "--allow", "192.168.0.0/16",
                env={"FERROTUNNEL_TOKEN": TOKEN})
    procs.append(cli2)
    cli2.wait_for(f"Forwarding http://shy.example.test:{hport}")
    assert _curl(hport, "shy") == "403"
    assert cli.finish() == 0 and cli2.finish() == 0
    srv.finish()
    for p in (srv, cli, cli2):
        assert PASSWORD.encode() not in p.out + p.err


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_a_config_file_sets_access_per_tunnel(world, tmp_path):
    procs, apps = world
    srv, tport, hport = _server(procs)
    web, db = App("web"), App("db")
    apps += [web, db]
    cfg = tmp_path / "tunnels.toml"
    cfg.write_text(f'server = "127.0.0.1:{tport}"\n'
                   f'[[tunnel]]\nid = "web"\nlocal = "127.0.0.1:{web.port}"\nprotocol = "http"\n'
                   f'basic_auth = "bob:{PASSWORD}"\nallow = ["127.0.0.0/8"]\n'
                   f'[[tunnel]]\nid = "db"\nlocal = "127.0.0.1:{db.port}"\nprotocol = "tcp"\n')
    cli = Proc("client", "--config", str(cfg), env={"FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_SERVER": ""})
    procs.append(cli)
    cli.wait_until(lambda: cli.out.count(b"connected to") >= 2, what="2 sessions")
    cli.wait_for(f"Forwarding http://web.example.test:{hport}")
    assert _curl(hport, "web") == "401"
    assert _curl(hport, "web", "-u", f"bob:{PASSWORD}") == "200"
    assert _curl(hport, "db") == "404"  # protocol = "tcp": not at the HTTP ingress
    assert cli.finish() == 0
    assert PASSWORD.encode() not in cli.out + cli.err


@pytest.mark.skipif(shutil.which("curl") is None or not os.path.exists("/proc/self/cmdline"),
                    reason="needs curl and /proc")
@pytest.mark.parametrize("flag", [["--basic-auth", f"carol:{PASSWORD}"], [f"--basic-auth=carol:{PASSWORD}"],
                                  ["--basic", f"carol:{PASSWORD}"],
                                  # given twice: argparse takes the last; none stays in the list
                                  ["--basic-auth", "carol:first-password", f"--basic-a=carol:{PASSWORD}"]])
def test_a_basic_auth_flag_is_removed_from_the_process_list(world, flag):
    procs, apps = world
    srv, tport, hport = _server(procs)
    app = App("web")
    apps.append(app)
    cli = Proc("client", "--server", f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app.port}",
               "--tunnel-id", "web", *flag, env={"FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_BASIC_AUTH": "x:other"})
    procs.append(cli)
    cli.wait_for(f"Forwarding http://web.example.test:{hport}")
    with open(f"/proc/{cli.p.pid}/cmdline", "rb") as f:
        line = f.read()
    assert b"ferrotunnel" in line and PASSWORD.encode() not in line and b"--basic" not in line, line
    assert b"first-password" not in line, line
    warnings = [x for x in cli.err.decode().splitlines() if "WARNING" in x and "--basic-auth" in x]
    assert len(warnings) == 1 and "removed from it at start-up" in warnings[0], cli.err
    # the flag's password is the one in force (it wins over the environment's)
    assert _curl(hport, "web") == "401"
    assert _curl(hport, "web", "-u", "x:other") == "401"
    assert _curl(hport, "web", "-u", f"carol:{PASSWORD}") == "200"
    assert cli.finish() == 0
    assert PASSWORD.encode() not in cli.out + cli.err


@pytest.mark.parametrize("args,env,says", [
    (["--basic-auth", "nopassword"], {}, "USER:PASSWORD"),
    ([], {"FERROTUNNEL_BASIC_AUTH": f":{PASSWORD}"}, "USER:PASSWORD"),
    (["--allow", "10.0.0.300/8"], {}, "CIDR"),
    (["--protocol", "http", "--remote-port", "0"], {}, "remote_port"),
    ([], {"FERROTUNNEL_PROTOCOL": "udp"}, "--protocol must be http or tcp"),
])
def test_bad_access_flags_are_usage_errors(args, env, says):
    cli = Proc("client", "--server", "127.0.0.1:1", *args, env={"FERROTUNNEL_TOKEN": TOKEN, **env})
    cli.p.wait(20)
    assert cli.finish() == 2 and b"Traceback" not in cli.err
    assert says.encode() in cli.err, cli.err
    if "--basic-auth" in args:
        assert b"WARNING: the password given with --basic-auth was visible" in cli.err
    assert PASSWORD.encode() not in cli.out + cli.err


@pytest.mark.parametrize("line,says", [
    ('basic_auth = "nocolon"', "key 'basic_auth'"),
    (f'basic_auth = ":{PASSWORD}"', "key 'basic_auth'"),
    ('allow = "10.0.0.0/8"', "key 'allow'"),
    ('allow = ["nope"]', "key 'allow'"),
    ('protocol = "udp"', "key 'protocol'"),
    ('pool = "yes"', "key 'pool'"),
])
def test_bad_access_keys_in_a_file_name_the_table_and_key(tmp_path, line, says):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f'server = "127.0.0.1:1"\n[[tunnel]]\nid = "a"\nlocal = "127.0.0.1:1"\n'
                   f'[[tunnel]]\nid = "b"\nlocal = "127.0.0.1:2"\n{line}\n')
    cli = Proc("client", "--config", str(cfg), env={"FERROTUNNEL_TOKEN": TOKEN})
    cli.p.wait(20)
    assert cli.finish() == 2 and b"Traceback" not in cli.err
    assert b"tunnel[2]" in cli.err and says.encode() in cli.err, cli.err
    assert PASSWORD.encode() not in cli.out + cli.err
