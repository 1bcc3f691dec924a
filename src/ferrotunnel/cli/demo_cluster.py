"""``ferrotunnel demo --cluster``: the cluster picture of docs/cluster.md on loopback.

One real ``redis-server``, three ``ferrotunnel server`` nodes (subprocesses) sharing tunnels
through it, one real ``haproxy`` in front with ``deploy/haproxy.cfg`` mapped to free 127.0.0.1
ports; three small HTTP apps in this process, each behind a ``TunnelClient`` connected through
HAProxy. Requests go through HAProxy and through each node's own HTTP ingress; then the node
holding ``app1`` is killed (SIGKILL) and the time until ``app1`` answers through HAProxy again is
measured. Everything runs in a temporary directory and is stopped by PID at the end."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

__all__ = ["run_cluster_demo", "haproxy_config", "missing_requirements", "HAPROXY_TEMPLATE"]

NODES = ("a", "b", "c")
TUNNELS = ("app1", "app2", "app3")
#: deploy/haproxy.cfg next to the package source (a source checkout or an editable install)
DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "haproxy.cfg"
INSTALL_TOOLS = "apt-get install redis-server haproxy"
FAILOVER_LIMIT = 20.0

#: deploy/haproxy.cfg without its comments and its TCP ingress example, for installs that do not
#: carry the file (tests/test_demo_cluster.py checks that both map to the same configuration)
HAPROXY_TEMPLATE = """\
global
    maxconn 50000

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    option redispatch
    retries 2

frontend tunnel_port
    bind :7835
    default_backend tunnel_nodes

backend tunnel_nodes
    balance roundrobin
    default-server send-proxy-v2 check check-send-proxy inter 1s fall 2 rise 2
    server a 10.0.0.1:7835
    server b 10.0.0.2:7835
    server c 10.0.0.3:7835

frontend http_ingress
    bind :80
    default_backend http_nodes

backend http_nodes
    balance roundrobin
    default-server send-proxy-v2 check check-send-proxy inter 1s fall 2 rise 2
    server a 10.0.0.1:8080
    server b 10.0.0.2:8080
    server c 10.0.0.3:8080
"""


class DemoError(RuntimeError):
    """Something the demo started did not come up; the message says what."""


def missing_requirements() -> Optional[str]:
    """One line naming what ``demo --cluster`` needs and does not find, or None."""
    missing = [name for name in ("redis-server", "haproxy") if shutil.which(name) is None]
    if missing:
        return (f"ferrotunnel demo --cluster: {' and '.join(missing)} not found on PATH; install "
                f"{'them' if len(missing) > 1 else 'it'} ({INSTALL_TOOLS})")
    try:
        import redis.asyncio  # noqa: F401
    except ImportError:
        return "ferrotunnel demo --cluster: redis-py is not installed; pip install 'ferrotunnel[cluster]'"
    return None


def haproxy_config(template: str, fronts: Dict[int, int], nodes: List[Dict[int, int]]) -> str:
    """``template`` (deploy/haproxy.cfg) on loopback: ``bind :P`` becomes ``bind
    127.0.0.1:fronts[P]``, ``server x 10.0.0.N:P`` points at ``127.0.0.1:nodes[N-1][P]``; a
    frontend on a port not in ``fronts`` (the TCP ingress example) is left out with its backend,
    and so are the comments."""
    code = "\n".join(line for line in template.splitlines() if not line.lstrip().startswith("#"))
    blocks = re.split(r"\n(?=\S)", code)
    dropped = set()
    for block in blocks:
        bind = re.search(r"^\s+bind :(\d+)\s*$", block, re.M)
        if block.startswith("frontend") and bind and int(bind[1]) not in fronts:
            dropped.add(block.split()[1])
            dropped.update(re.findall(r"^\s+default_backend (\S+)", block, re.M))

    def server(m: "re.Match[str]") -> str:
        node, port = int(m[1]) - 1, int(m[2])
        if not 0 <= node < len(nodes) or port not in nodes[node]:
            raise ValueError(f"haproxy.cfg has a server this demo cannot map: {m[0]}")
        return f"127.0.0.1:{nodes[node][port]}"

    out = []
    for block in blocks:
        if block.split()[:1] in (["frontend"], ["backend"]) and block.split()[1] in dropped:
            continue
        block = re.sub(r"(?m)^(\s+)bind :(\d+)\s*$", lambda m: f"{m[1]}bind 127.0.0.1:{fronts[int(m[2])]}", block)
        block = re.sub(r"(?m)^(\s+maxconn) \d+", r"\1 2000", block)  # a user's descriptor limit, not a server's
        out.append(re.sub(r"10\.0\.0\.(\d+):(\d+)", server, block))
    text = "\n".join(out).strip() + "\n"
    if "10.0.0." in text or re.search(r"(?m)^\s+bind :", text):
        raise ValueError("haproxy.cfg has an address this demo cannot map to loopback")
    return text


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]  # all open at once: n different ports
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def _name_app(name: str) -> "asyncio.Server":
    """An HTTP app answering ``NAME PATH`` to every request, one request per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            body = f"{name} {head.split(b' ', 2)[1].decode()}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _get(port: int, host: str, path: str, timeout: float = 10.0) -> Optional[bytes]:
    """One GET on a new connection to 127.0.0.1:port: the body of a 200 answer, else None."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ferrotunnel-demo\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = await reader.read()
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")) else None


async def _answers(port: int, tunnel: str, path: str, timeout: float = 10.0) -> bool:
    return await _get(port, tunnel, path, timeout) == f"{tunnel} {path}".encode()


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


class Cluster:
    """The processes of the demo, each logging to a file in ``workdir``."""

    def __init__(self, workdir: str, metrics: bool) -> None:
        self.dir = Path(workdir)
        self.metrics = metrics
        ports = _free_ports(3 + 4 * len(NODES))
        self.redis_port, self.front_tunnel, self.front_http = ports[:3]
        self.nodes = {n: {"tunnel": ports[3 + 4 * i], "http": ports[4 + 4 * i], "link": ports[5 + 4 * i],
                          "metrics": ports[6 + 4 * i]} for i, n in enumerate(NODES)}
        self.procs: Dict[str, "subprocess.Popen[bytes]"] = {}
        self.token = secrets.token_urlsafe(24)
        self.cluster_token = secrets.token_urlsafe(24)
        self.config_source = ""
        self.redis: Any = None

    def _spawn(self, name: str, argv: List[str], env: Optional[Dict[str, str]] = None) -> None:
        with open(self.dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, env=env, cwd=self.dir)

    def log_tail(self, name: str, n: int = 1500) -> str:
        try:
            return (self.dir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def _wait(self, name: str, ready: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not await ready():
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise DemoError(f"{name} did not come up; its log ends with:\n{self.log_tail(name)}")
            await asyncio.sleep(0.05)

    async def start_redis(self) -> None:
        import redis.asyncio as aioredis

        self._spawn("redis", [shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port),
                              "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.dir)])
        self.redis = aioredis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=1)

        async def ping() -> bool:
            try:
                return bool(await self.redis.ping())
            except Exception:  # redis-py's ConnectionError and friends: not up yet
                return False

        await self._wait("redis", ping)

    async def start_nodes(self) -> None:
        # the caller's FERROTUNNEL_* settings (a --tcp-bind, a token file...) are not the demo's
        keep = ("FERROTUNNEL_NO_EXTENSIONS", "FERROTUNNEL_REQUIRE_EXTENSIONS")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("FERROTUNNEL_") or k in keep or k.startswith("FERROTUNNEL_POOL_")}
        env.update(FERROTUNNEL_TOKEN=self.token, FERROTUNNEL_CLUSTER_TOKEN=self.cluster_token,
                   FERROTUNNEL_CLUSTER_REDIS=f"redis://127.0.0.1:{self.redis_port}/0")
        for name, p in self.nodes.items():
            argv = [sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{p['tunnel']}",
                    "--http-bind", f"127.0.0.1:{p['http']}", "--trusted-proxy", "127.0.0.1/32", "--node-id", name,
                    "--node-bind", f"127.0.0.1:{p['link']}", "--grace", "1"]
            if self.metrics:
                argv += ["--metrics", "--metrics-bind", f"127.0.0.1:{p['metrics']}"]
            self._spawn(f"node-{name}", argv, env)
        for name in self.nodes:  # "listening on" is the server's output contract

            async def started(name: str = name) -> bool:
                return "listening on" in self.log_tail(f"node-{name}", 1 << 20)

            await self._wait(f"node-{name}", started, 30)

    async def start_haproxy(self) -> None:
        if DEPLOY.is_file():
            template, self.config_source = DEPLOY.read_text(), str(DEPLOY)
        else:
            template, self.config_source = HAPROXY_TEMPLATE, "a built-in copy of deploy/haproxy.cfg"
        nodes = [{7835: p["tunnel"], 8080: p["http"]} for p in self.nodes.values()]
        try:
            text = haproxy_config(template, {7835: self.front_tunnel, 80: self.front_http}, nodes)
        except ValueError as exc:
            raise DemoError(f"{self.config_source}: {exc}") from None
        cfg = self.dir / "haproxy.cfg"
        cfg.write_text(f"# {self.config_source} on loopback (ferrotunnel demo --cluster)\n{text}")
        binary = shutil.which("haproxy") or "haproxy"
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise DemoError(f"haproxy refused {cfg}:\n{check.stdout}{check.stderr}")
        self._spawn("haproxy", [binary, "-db", "-f", str(cfg)])
        for port in (self.front_tunnel, self.front_http):
            await self._wait("haproxy", functools.partial(_listening, port), 10)

    async def owner(self, tunnel: str) -> Optional[str]:
        """The node that holds ``tunnel``'s session, from its claim in Redis (docs/cluster.md)."""
        from ..config import ClusterConfig

        prefix = ClusterConfig.__dataclass_fields__["key_prefix"].default  # "ferrotunnel:"
        node = await self.redis.hget(f"{prefix}tunnel:{tunnel}", "node")
        return node.decode() if node else None

    async def hops(self) -> Optional[int]:
        """Streams the nodes opened over node links so far (their metrics), None without metrics."""
        if not self.metrics:
            return None
        total = 0
        for p in self.nodes.values():
            body = await _get(p["metrics"], "127.0.0.1", "/metrics")
            if body is None:  # a node is gone
                return None
            for m in re.finditer(rb'^ferrotunnel_cluster_streams_total\{direction="out"[^}]*\} (\S+)$', body, re.M):
                total += int(float(m[1]))
        return total

    def stop(self) -> None:
        """SIGTERM by PID (nodes and haproxy first, Redis last), SIGKILL after 5 s."""
        for group in ([n for n in self.procs if n != "redis"], ["redis"]):
            live = [self.procs[n] for n in group if n in self.procs and self.procs[n].poll() is None]
            for proc in live:
                os.kill(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            for proc in live:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()


async def _send(jobs: List[Tuple[int, str, str]], concurrency: int) -> Tuple[int, List[str]]:
    """(answers that were right, what went wrong) for (port, tunnel, path) jobs."""
    gate = asyncio.Semaphore(max(1, concurrency))
    problems: List[str] = []

    async def one(port: int, tunnel: str, path: str) -> bool:
        async with gate:
            ok = await _answers(port, tunnel, path)
        if not ok:
            problems.append(f"{tunnel}{path} via 127.0.0.1:{port}")
        return ok

    results = await asyncio.gather(*(one(*j) for j in jobs))
    return sum(results), problems


async def _failover(cl: Cluster, owners: Dict[str, Optional[str]]) -> Tuple[Optional[float], str]:
    """Kill app1's node; (seconds until every tunnel it held answers through HAProxy, report)."""
    victim = owners["app1"] or "a"
    held = [t for t in TUNNELS if owners[t] == victim]
    proc = cl.procs[f"node-{victim}"]
    print(f"failover: killing node {victim} (pid {proc.pid}; it holds {', '.join(held)}) with SIGKILL ...", flush=True)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    back: Dict[str, float] = {}
    attempt = 0
    while len(back) < len(held) and time.monotonic() - t0 < FAILOVER_LIMIT:
        attempt += 1
        for t in held:
            if t not in back and await _answers(cl.front_http, t, f"/failover/{attempt}", timeout=2):
                back[t] = time.monotonic() - t0
        await asyncio.sleep(0.05)
    if len(back) < len(held):
        gone = ", ".join(t for t in held if t not in back)
        return None, f"failover: {gone} did not answer through haproxy within {FAILOVER_LIMIT:.0f} s"
    now = {t: await cl.owner(t) for t in held}
    others = "".join(f", {t} after {back[t]:.2f} s (node {now[t]})" for t in held if t != "app1")
    return back["app1"], (f"failover: app1 answered through haproxy again after {back['app1']:.2f} s, now on "
                          f"node {now['app1']}{others}")


async def _scenario(cl: Cluster, requests: int, concurrency: int, started: List["asyncio.Task[None]"]) -> int:
    import ferrotunnel as ft

    print(f"ferrotunnel demo --cluster: everything on 127.0.0.1, working in {cl.dir}", flush=True)
    await cl.start_redis()
    print(f"  redis-server on :{cl.redis_port} (pid {cl.procs['redis'].pid})", flush=True)
    await cl.start_nodes()
    for n, p in cl.nodes.items():
        print(f"  node {n}: tunnels :{p['tunnel']}, HTTP :{p['http']}, node links :{p['link']} "
              f"(pid {cl.procs['node-' + n].pid})", flush=True)
    await cl.start_haproxy()
    print(f"  haproxy with {cl.config_source}: tunnel clients :{cl.front_tunnel}, HTTP visitors "
          f":{cl.front_http} (pid {cl.procs['haproxy'].pid})", flush=True)
    for t in TUNNELS:
        app = await _name_app(t)
        addr = app.sockets[0].getsockname()[:2]
        client = ft.TunnelClient(f"127.0.0.1:{cl.front_tunnel}", cl.token, tunnel_id=t,
                                 config=ft.ClientConfig(local_addr=addr))
        up = asyncio.Event()

        def connected(_session: Any, up: asyncio.Event = up) -> None:
            up.set()

        started.append(asyncio.create_task(client.connect_and_run(on_connected=connected)))
        started.append(asyncio.create_task(app.serve_forever()))
        try:
            await asyncio.wait_for(up.wait(), 15)
        except TimeoutError:
            raise DemoError(f"tunnel {t} did not connect through haproxy in 15 s") from None
    owners = {t: await cl.owner(t) for t in TUNNELS}
    print(f"tunnels, connected through haproxy :{cl.front_tunnel}: "
          + ", ".join(f"{t} on node {owners[t]}" for t in TUNNELS), flush=True)

    entries = [("haproxy", None, cl.front_http)] + [(f"node {n}", n, p["http"]) for n, p in cl.nodes.items()]
    print(f"{'entry point':<20} {'ok / total':>11}   crossed a node link", flush=True)
    ok_total = hops_total = 0
    hops_known = True
    problems: List[str] = []
    for e, (label, node, port) in enumerate(entries):
        paths = [f"/{k}" for k in range(requests) if k % len(entries) == e]
        # each tunnel as often, in random order: a pattern could beat HAProxy's round robin
        names = random.sample([TUNNELS[j % len(TUNNELS)] for j in range(len(paths))], len(paths))
        jobs = [(port, t, path) for t, path in zip(names, paths)]
        before = await cl.hops()
        ok, bad = await _send(jobs, concurrency)
        after = await cl.hops()
        expected = None if node is None else sum(owners[t] != node for _, t, _ in jobs)
        crossed = after - before if before is not None and after is not None else expected
        hops_known = hops_known and crossed is not None
        hops_total += crossed or 0
        ok_total += ok
        problems += bad
        print(f"{f'{label} :{port}':<20} {f'{ok} / {len(jobs)}':>11}   {'?' if crossed is None else crossed}", flush=True)
    hop_text = (f"{hops_total} crossed a node link (one hop each)" if hops_known else
                f"{hops_total} of those sent to a node's own ingress crossed a node link (one hop each; "
                "those through haproxy are counted with ferrotunnel[metrics])")
    print(f"requests: {ok_total} ok of {requests}, {hop_text}", flush=True)

    seconds, report = await _failover(cl, owners)
    print(report, flush=True)
    after_ok = after_n = 0
    if seconds is not None:
        live = [cl.front_http] + [q["http"] for n, q in cl.nodes.items() if cl.procs[f"node-{n}"].poll() is None]
        jobs = [(port, t, f"/after/{k}") for k in range(2) for port in live for t in TUNNELS]
        after_ok, bad = await _send(jobs, concurrency)
        after_n, problems = len(jobs), problems + bad
        print(f"after failover: {after_ok} ok of {after_n} (haproxy and the {len(live) - 1} nodes left)", flush=True)
    for what in problems[:5]:
        print(f"  no right answer: {what}", file=sys.stderr)
    return 0 if ok_total == requests and seconds is not None and after_ok == after_n else 1


async def run_cluster_demo(requests: int = 300, concurrency: int = 8) -> int:
    problem = missing_requirements()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    metrics = importlib.util.find_spec("prometheus_client") is not None  # the nodes' metrics count the hops
    workdir = tempfile.mkdtemp(prefix="ferrotunnel-demo-cluster-")
    # this process's tunnel clients log to a file: their reconnect warnings during the failover
    # are part of the picture, not of the summary
    ft_log = logging.getLogger("ferrotunnel")
    handler = logging.FileHandler(Path(workdir) / "clients.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = ft_log.propagate, ft_log.level
    ft_log.addHandler(handler)
    ft_log.propagate = False
    ft_log.setLevel(logging.INFO)
    cl = Cluster(workdir, metrics)
    tasks: List["asyncio.Task[None]"] = []
    loop = asyncio.get_running_loop()
    body = asyncio.ensure_future(_scenario(cl, requests, concurrency, tasks))
    interrupted: List[int] = []

    def interrupt(sig: int) -> None:  # Ctrl-C or a kill: everything is stopped below
        interrupted.append(sig)
        body.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupt, sig)
    code, keep = 1, True  # the logs stay when something went wrong
    try:
        code = await body
        keep = code != 0
    except asyncio.CancelledError:
        if not interrupted:
            raise
        print("ferrotunnel demo --cluster: interrupted", file=sys.stderr)
        keep = False
    except DemoError as exc:
        print(f"ferrotunnel demo --cluster: {exc}", file=sys.stderr)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        cl.stop()
        if cl.redis is not None:
            await (getattr(cl.redis, "aclose", None) or cl.redis.close)()  # aclose: redis-py 5.0.1
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        ft_log.removeHandler(handler)
        handler.close()
        ft_log.propagate = saved[0]
        ft_log.setLevel(saved[1])
        if keep:
            print(f"ferrotunnel demo --cluster: logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if code == 0:
        print("stopped redis-server, haproxy and the nodes", flush=True)
    return code
