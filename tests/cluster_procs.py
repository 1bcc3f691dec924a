"""CLI cluster nodes as subprocesses for the failover tests: each node's output goes to a log file
(a pipe nobody reads while a test waits could fill up and stall the node), read back to find
which node owns a tunnel; every process is stopped by its PID.

    with RedisServer() as redis, Cluster(tmp_path, redis.url, "abc") as cluster:
        cluster.fronts[80]            # HAProxy's HTTP frontend (7835: tunnel clients, 9000: TCP)
        cluster.nodes["a"].ports      # the node's own ports (7835, 8080, 9000, "link")
        cluster.owner("t1")           # the node whose log says "(tunnel t1) from ... established"
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from conftest import free_port
from haproxy_server import HAProxy
from redis_server import stop_by_pid

TOKEN = "cluster-failover-token"
SECRET = "cluster-failover-secret"

#: The environment of the nodes: no FERROTUNNEL_* of the caller's, except the codec switches.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL_") or k in (
    "FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS")}


class NodeProc:
    """``ferrotunnel server`` as one cluster node with default cluster settings, HTTP ingress and
    one TCP ingress, behind a trusted proxy on 127.0.0.1; output (stdout and stderr) in ``log``."""

    def __init__(self, name: str, url_file: Path, log_dir: Path) -> None:
        self.name = name
        self.ports = {7835: free_port(), 8080: free_port(), 9000: free_port(), "link": free_port()}
        self.log = log_dir / f"node-{name}.log"
        argv = [sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{self.ports[7835]}",
                "--http-bind", f"127.0.0.1:{self.ports[8080]}", "--tcp-bind", f"127.0.0.1:{self.ports[9000]}=t0",
                "--trusted-proxy", "127.0.0.1/32", "--cluster-redis-file", str(url_file), "--node-id", name,
                "--node-bind", f"127.0.0.1:{self.ports['link']}"]
        self.killed = False
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**ENV, "FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_CLUSTER_TOKEN": SECRET})

    @property
    def http(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.ports[8080])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def established(self, tunnel_id: str) -> int:
        """How many sessions of ``tunnel_id`` this node accepted (its log lines)."""
        return len(re.findall(rf"\(tunnel {re.escape(tunnel_id)}\) from [^\n]* established", self.text()))

    def wait_for(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            if not self.alive or time.monotonic() > deadline:
                raise AssertionError(f"node {self.name}: {text!r} not seen; log:\n{self.text()[-3000:]}")
            time.sleep(0.02)

    async def wait_for_async(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            assert time.monotonic() < deadline, f"node {self.name}: {text!r} not seen within {timeout} s"
            await asyncio.sleep(0.05)

    def kill9(self) -> None:
        """SIGKILL by PID: no release of its claims, no drain (a crash)."""
        self.killed = True
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)

    def stop(self) -> Optional[int]:
        stop_by_pid(self.proc)
        return self.proc.returncode


class Cluster:
    """Nodes ``names`` on the Redis at ``redis_url`` behind a real HAProxy (deploy/haproxy.cfg);
    on an exception inside the ``with`` block every node's log is printed."""

    def __init__(self, tmp_path: Path, redis_url: str, names: Iterable[str] = "abc") -> None:
        self.url_file = tmp_path / "redis-url"
        self.url_file.write_text(redis_url + "\n")
        self.log_dir = tmp_path
        self.names = list(names)
        self.nodes: Dict[str, NodeProc] = {}
        self.fronts = {7835: free_port(), 80: free_port(), 9000: free_port()}
        self.haproxy: Optional[HAProxy] = None

    def __enter__(self) -> "Cluster":
        try:
            for name in self.names:
                self.nodes[name] = NodeProc(name, self.url_file, self.log_dir)
            for node in self.nodes.values():
                node.wait_for("HTTP ingress on")
            self.haproxy = HAProxy(self.fronts, [n.ports for n in self.nodes.values()]).start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.haproxy is not None:
                self.haproxy.stop()
                self.haproxy._dir.cleanup()
        finally:
            for node in self.nodes.values():
                node.stop()
            if exc_type is not None:
                self.print_logs()

    def check_exits(self) -> None:
        """After the ``with`` block: every node not killed stopped cleanly on SIGTERM (exit 0), and
        no balancer health check counted as a failed handshake."""
        for node in self.nodes.values():
            text = node.text()
            ok = (node.killed or node.proc.returncode == 0) and "not a handshake" not in text \
                and "no handshake within" not in text
            if not ok:
                self.print_logs()
            assert ok, f"node {node.name}: exit {node.proc.returncode}"

    def print_logs(self, tail: int = 6000) -> None:
        """Each node's log without the per-visitor lines (those are counted instead)."""
        for node in self.nodes.values():
            lines = node.text().splitlines()
            noise = re.compile(r"ferrotunnel\.(http: http |forward: stream )")
            kept = "\n".join(line for line in lines if not noise.search(line))
            print(f"---- node {node.name} (pid {node.proc.pid}, exit {node.proc.returncode}; "
                  f"{len(lines)} lines, per-visitor ones left out)\n{kept[-tail:]}")

    def live(self) -> List[NodeProc]:
        return [n for n in self.nodes.values() if n.alive]

    async def owner(self, tunnel_id: str, timeout: float = 10.0) -> NodeProc:
        """The one node whose log says it accepted a session of ``tunnel_id``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [n for n in self.nodes.values() if n.established(tunnel_id)]
            if found:
                assert len(found) == 1, f"tunnel {tunnel_id} established on {[n.name for n in found]}"
                return found[0]
            assert time.monotonic() < deadline, f"no node logged a session of tunnel {tunnel_id}"
            await asyncio.sleep(0.02)


async def http_get(addr: Tuple[str, int], host: str, path: str = "/", timeout: float = 3.0) -> bytes:
    """One HTTP/1.1 request, the whole answer (until the server closes); a failure as ``b"ERROR ..."``."""
    try:
        async with asyncio.timeout(timeout):
            r, w = await asyncio.open_connection(*addr)
            try:
                w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                return await r.read()
            finally:
                w.close()
    except (OSError, TimeoutError) as exc:
        return f"ERROR {type(exc).__name__}: {exc}".encode()


def status(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


async def redis_claims(redis_url: str) -> Tuple[Dict[str, Dict[str, str]], Dict[str, Dict[str, str]]]:
    """Redis's tunnel claims and node liveness keys: ({tunnel id: fields}, {node id: fields})."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        claims = {k.split(":", 2)[2]: await client.hgetall(k) for k in await client.keys("ferrotunnel:tunnel:*")}
        nodes = {k.split(":", 2)[2]: await client.hgetall(k) for k in await client.keys("ferrotunnel:node:*")}
    finally:
        await client.aclose()
    return claims, nodes
