"""``ferrotunnel demo --cluster`` as a real subprocess: a real redis-server and haproxy, three
server nodes; its summary, its exit codes, what it says when a tool is missing, Ctrl-C, and that
nothing it started outlives it. Without redis-server or haproxy the runs are skipped, or fail
under ``CI=true``."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferrotunnel.cli.demo_cluster import DEPLOY, HAPROXY_TEMPLATE, haproxy_config

#: The repository's deploy/haproxy.cfg (DEPLOY is where the package looks: there only when the
#: package runs from the source tree).
REPO_DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "haproxy.cfg"
from haproxy_server import haproxy_binary
from redis_server import redis_binary, require_redis_py
from test_cli import ENV

DEMO = [sys.executable, "-m", "ferrotunnel", "demo", "--cluster"]
FRONTS = {7835: 17835, 80: 18080}
NODES = [{7835: 20000 + i, 8080: 21000 + i} for i in range(3)]


def _needs_everything() -> None:
    redis_binary()
    haproxy_binary()
    require_redis_py()


def _start(*args: str) -> "subprocess.Popen[str]":
    """The demo in a session of its own: a test that gives up on it ends its whole group."""
    return subprocess.Popen(DEMO + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _kill_group(p: "subprocess.Popen[str]") -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # the demo and what it started, by its process group id
    p.communicate()


def _assert_all_gone(output: str) -> None:
    pids = [int(p) for p in re.findall(r"\(pid (\d+)", output)]
    assert len(pids) >= 5, output  # redis-server, three nodes, haproxy
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_demo_cluster_summary():
    _needs_everything()
    p = _start("--requests", "60")
    try:
        out, err = p.communicate(timeout=100)
    finally:
        _kill_group(p)
    assert p.returncode == 0, out + err
    # an editable install finds the repository's file; an installed package uses its built-in copy
    where = str(DEPLOY) if DEPLOY.is_file() else "a built-in copy of deploy/haproxy.cfg"
    assert f"haproxy with {where}: tunnel clients" in out, out
    owners = dict(re.findall(r"(app\d) on node ([abc])", re.search(r"^tunnels, connected through haproxy "
                                                                   r":\d+: (.*)$", out, re.M)[1]))
    assert sorted(owners) == ["app1", "app2", "app3"], out
    # each entry point got 15 requests, 5 per tunnel; at a node, those for another node's tunnels
    # cross one link (the nodes' metrics count them)
    rows = dict(re.findall(r"^(haproxy|node [abc]) :\d+ +15 / 15 +(\d+)$", out, re.M))
    assert sorted(rows) == ["haproxy", "node a", "node b", "node c"], out
    for node in "abc":
        assert int(rows[f"node {node}"]) == 5 * sum(o != node for o in owners.values()), out
    assert 0 <= int(rows["haproxy"]) <= 15
    assert f"requests: 60 ok of 60, {sum(map(int, rows.values()))} crossed a node link (one hop each)" in out, out
    killed = re.search(r"^failover: killing node ([abc]) \(pid \d+; it holds app1\b.*\) with SIGKILL \.\.\.$", out, re.M)
    m = re.search(r"^failover: app1 answered through haproxy again after ([\d.]+) s, now on node ([abc])", out, re.M)
    assert killed and m and killed[1] == owners["app1"] and m[2] != killed[1] and 0 < float(m[1]) < 20, out
    assert "after failover: 18 ok of 18 (haproxy and the 2 nodes left)" in out, out
    assert out.rstrip().endswith("stopped redis-server, haproxy and the nodes"), out
    assert "logs kept" not in err and "Traceback" not in err, err
    _assert_all_gone(out)


def test_ctrl_c_stops_everything():
    _needs_everything()
    p = _start()
    out = ""
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    try:
        while "tunnels, connected through haproxy" not in out:
            assert time.monotonic() < deadline and p.poll() is None, out
            if sel.select(0.2):
                out += os.read(p.stdout.fileno(), 65536).decode()
        p.send_signal(signal.SIGINT)  # to the demo alone, not to its group: it stops the rest
        rest, err = p.communicate(timeout=30)
    finally:
        _kill_group(p)
    assert p.returncode == 1 and "interrupted" in err, (p.returncode, err)
    _assert_all_gone(out + rest)


@pytest.mark.parametrize("present,missing", [("redis-server", "haproxy"), ("haproxy", "redis-server")])
def test_a_missing_tool_is_named(tmp_path, present, missing):
    """With one tool off PATH the demo names it and how to install it, and starts nothing."""
    binary = redis_binary() if present == "redis-server" else haproxy_binary()
    (tmp_path / present).symlink_to(binary)
    r = subprocess.run(DEMO, capture_output=True, text=True, env={**ENV, "PATH": str(tmp_path)},
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip() == (f"ferrotunnel demo --cluster: {missing} not found on PATH; install it "
                                "(apt-get install redis-server haproxy)"), r.stderr
    assert r.stdout == ""


def test_missing_redis_py_is_named(tmp_path):
    redis_binary()
    haproxy_binary()
    code = ("import sys; sys.modules['redis'] = None\nfrom ferrotunnel.cli import main\n"
            "sys.exit(main(['demo', '--cluster']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 1 and "pip install 'ferrotunnel[cluster]'" in r.stderr, (r.returncode, r.stderr)
    assert r.stdout == ""


def test_the_built_in_config_is_the_deploy_file():
    """The copy used where deploy/haproxy.cfg is not installed maps to the same configuration."""
    assert REPO_DEPLOY.is_file()
    ours = haproxy_config(HAPROXY_TEMPLATE, FRONTS, NODES)
    assert ours == haproxy_config(REPO_DEPLOY.read_text(), FRONTS, NODES)
    assert "10.0.0." not in ours and "9000" not in ours
    assert re.findall(r"bind (\S+)", ours) == ["127.0.0.1:17835", "127.0.0.1:18080"]
    assert sorted(re.findall(r"server [abc] (\S+)", ours)) == sorted(
        f"127.0.0.1:{p}" for n in NODES for p in n.values())
    with pytest.raises(ValueError, match="cannot map"):
        haproxy_config(HAPROXY_TEMPLATE.replace("10.0.0.3:8080", "10.0.0.4:8080"), FRONTS, NODES)


def test_haproxy_accepts_the_mapped_config(tmp_path):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(HAPROXY_TEMPLATE, FRONTS, NODES))
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
