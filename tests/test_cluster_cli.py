"""``ferrotunnel server`` in cluster mode, as real processes on one real redis-server: the flags'
usage errors, and a visitor on one node reaching a client connected to the other."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from redis_server import RedisServer
from test_cli import ENV, Proc, cleanup  # noqa: F401  (cleanup is a fixture)

TOKEN = "cluster-cli-token"
SECRET = "cluster-cli-secret"
PROCS = str(Path(__file__).with_name("procs.py"))


def _server(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, timeout=30, env={**ENV, "FERROTUNNEL_TOKEN": TOKEN, **(env or {})})


def test_a_cluster_node_without_the_secret_exits_2():
    r = _server("--cluster-redis", "redis://127.0.0.1:1/0", "--node-bind", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2
    assert "FERROTUNNEL_CLUSTER_TOKEN" in r.stderr and "--cluster-token-file" in r.stderr


def test_a_secret_file_of_raw_bytes_is_a_usage_error(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(range(128, 256)))  # not UTF-8 (as from head -c 32 /dev/urandom)
    r = _server("--cluster-redis", "redis://127.0.0.1:1/0", "--node-bind", f"127.0.0.1:{free_port()}",
                "--cluster-token-file", str(secret))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--cluster-token-file {secret} is not UTF-8 text" in r.stderr, r.stderr
    # only the first line counts: text past the bytes read, cut inside a character, is no error
    from ferrotunnel.cli.cluster import MAX_SECRET_FILE, _first_line
    secret.write_bytes(b"a-good-secret-line\n" + "\u00e9".encode() * MAX_SECRET_FILE)
    assert _first_line(str(secret), "--cluster-token-file") == "a-good-secret-line"


def test_a_redis_password_on_the_command_line_is_refused():
    r = _server("--cluster-redis", "redis://:hunter2@127.0.0.1:1/0", "--node-bind", f"127.0.0.1:{free_port()}",
                env={"FERROTUNNEL_CLUSTER_TOKEN": SECRET})
    assert r.returncode == 2 and "visible to every local user" in r.stderr
    assert "hunter2" not in r.stderr and "hunter2" not in r.stdout


def test_node_flags_without_cluster_mode_are_an_error():
    r = _server("--node-id", "a")
    assert r.returncode == 2 and "--cluster-redis" in r.stderr


def test_a_wildcard_node_bind_needs_an_advertised_address():
    r = _server("--cluster-redis", "redis://127.0.0.1:1/0", "--node-bind", "0.0.0.0:7999",
                env={"FERROTUNNEL_CLUSTER_TOKEN": SECRET})
    assert r.returncode == 2 and "--node-advertise" in r.stderr


def test_a_visitor_on_one_node_reaches_a_client_on_the_other(cleanup, tmp_path):  # noqa: F811
    with RedisServer(password="redis-pw") as redis:
        url_file = tmp_path / "redis-url"
        url_file.write_text(redis.url + "\n")
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET + "\n")
        echo_port = free_port()
        echo = subprocess.Popen([sys.executable, PROCS, "echo", str(echo_port)], stdout=subprocess.PIPE, text=True)
        try:
            assert echo.stdout.readline().startswith("ready")
            env = {"FERROTUNNEL_TOKEN": TOKEN}
            nodes = []
            for name in ("a", "b"):
                tunnel, ingress, link = free_port(), free_port(), free_port()
                p = Proc("server", "--bind", f"127.0.0.1:{tunnel}", "--tcp-bind", f"127.0.0.1:{ingress}=web",
                         "--cluster-redis-file", str(url_file), "--cluster-token-file", str(secret_file),
                         "--node-id", name, "--node-bind", f"127.0.0.1:{link}", env=env)
                cleanup.append(p)
                p.wait_for("listening on")
                nodes.append((p, tunnel, ingress))
            client = Proc("client", "--server", f"127.0.0.1:{nodes[0][1]}", "--local-addr", f"127.0.0.1:{echo_port}",
                          "--tunnel-id", "web", env=env)
            cleanup.append(client)
            client.wait_until(lambda: b"connected to" in client.err)
            for p, _, ingress in nodes:  # node a owns the tunnel; node b carries its visitor over the link
                with socket.create_connection(("127.0.0.1", ingress), timeout=10) as s:
                    s.sendall(b"hello through node")
                    got = b""
                    while len(got) < 18:
                        chunk = s.recv(64)
                        assert chunk, p.err[-2000:]
                        got += chunk
                    assert got == b"hello through node"
            for p, _, _ in nodes:
                assert p.finish() == 0
                assert b"redis-pw" not in p.out + p.err  # the password is in no log line
        finally:
            echo.kill()
            echo.wait()


def test_redis_passwords_are_redacted_wherever_they_are():
    from ferrotunnel.config import ClusterConfig, redact_url

    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:pw@h/0?password=x&db=1") == "rediss://user:***@h/0?password=***&db=1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    # an "@" in the password: the user info ends at the authority's last "@" (as redis-py reads it)
    assert redact_url("redis://:p@ssw0rd-secret@redis.internal:6379/0") == "redis://:***@redis.internal:6379/0"
    # a "/" or "#" in the password cuts the authority short: all of it up to the last "@" goes
    assert redact_url("redis://:pa/ss-secret@h:1/0") == "redis://***@h:1/0"
    assert redact_url("redis://u:Sup3rSecret#tail@h:1/0") == "redis://***@h:1/0"
    assert redact_url("redis://h:1/0?client=a@b") == "redis://***@b"  # (too much, never too little)
    # "@" and "/" both in the password: the "@" past the authority is what counts
    assert redact_url("redis://:p@ss/word-secret@h:6379/0") == "redis://***@h:6379/0"
    with pytest.raises(ValueError, match="percent-encoded") as err:
        ClusterConfig(redis_url="redis://:p@ss/word-secret@h:6379/0", node_id="n", node_advertise=("h", 1),
                      cluster_token="x")
    assert "word-secret" not in str(err.value)
    cfg = ClusterConfig(redis_url="redis://:s3cret@h/0?password=s3cret", node_id="n", node_advertise=("h", 1),
                        cluster_token="also-secret")
    assert "s3cret" not in repr(cfg) and "also-secret" not in repr(cfg)


@pytest.mark.parametrize("url", ["redis://:Sup3rSecret#tail@127.0.0.1:6390/0", "redis://:pa/Sup3rSecret@127.0.0.1/0"])
def test_a_redis_url_that_does_not_parse_is_a_usage_error_without_the_password(url):
    r = _server("--node-bind", f"127.0.0.1:{free_port()}",
                env={"FERROTUNNEL_CLUSTER_TOKEN": SECRET, "FERROTUNNEL_CLUSTER_REDIS": url})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "not a valid URL" in r.stderr and "percent-encoded" in r.stderr, r.stderr
    assert "Sup3rSecret" not in r.stderr + r.stdout


def test_a_redis_password_in_the_query_is_refused_on_the_command_line():
    r = _server("--cluster-redis", "redis://127.0.0.1:1/0?password=hunter2", "--node-bind", f"127.0.0.1:{free_port()}",
                env={"FERROTUNNEL_CLUSTER_TOKEN": SECRET})
    assert r.returncode == 2 and "hunter2" not in r.stderr
