"""Three CLI cluster nodes behind a real HAProxy (``deploy/haproxy.cfg`` on loopback ports), one
real redis-server: ten tunnels connected through the balancer spread over the nodes, and 200
visitors through HAProxy's HTTP frontend and through each node's own ingress reach the right
tunnel; the balancer's health checks (PROXY headers, then a close) are never failed handshakes."""

from __future__ import annotations

import asyncio
import collections
import re
import time

import ferrotunnel as ft

from conftest import free_port
from haproxy_server import HAProxy
from redis_server import RedisServer
from test_cli import Proc
from test_cluster_nodes import _get, _name_app

TOKEN = "cluster-haproxy-token"
SECRET = "cluster-haproxy-secret"
#: the tunnels whose clients announce no extensions (a Rust client's capabilities)
PLAIN = (3, 7)


def test_ten_tunnels_and_200_visitors_through_haproxy(run, tmp_path):
    with RedisServer() as redis:
        url_file = tmp_path / "redis-url"
        url_file.write_text(redis.url + "\n")
        env = {"FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_CLUSTER_TOKEN": SECRET}
        nodes, procs = [], []
        try:
            for name in ("a", "b", "c"):
                ports = {7835: free_port(), 8080: free_port(), 9000: free_port(), "link": free_port()}
                p = Proc("server", "--bind", f"127.0.0.1:{ports[7835]}", "--http-bind", f"127.0.0.1:{ports[8080]}",
                         "--tcp-bind", f"127.0.0.1:{ports[9000]}=t0", "--trusted-proxy", "127.0.0.1/32",
                         "--cluster-redis-file", str(url_file), "--node-id", name,
                         "--node-bind", f"127.0.0.1:{ports['link']}", env=env)
                procs.append(p)
                p.wait_for("listening on")
                nodes.append(ports)
            fronts = {7835: free_port(), 80: free_port(), 9000: free_port()}
            with HAProxy(fronts, nodes):

                async def body():
                    apps, clients, tasks = [], [], []
                    try:
                        for i in range(10):
                            app, addr = await _name_app(f"app{i}")
                            apps.append(app)
                            # t3 and t7 announce only basic and tcp, exactly like a Rust FerroTunnel client
                            c = ft.TunnelClient(f"127.0.0.1:{fronts[7835]}", TOKEN, tunnel_id=f"t{i}",
                                                config=ft.ClientConfig(local_addr=addr, extensions=i not in PLAIN))
                            connected = asyncio.Event()
                            clients.append(c)
                            tasks.append(asyncio.create_task(c.connect_and_run(on_connected=lambda s, e=connected: e.set())))
                            await asyncio.wait_for(connected.wait(), 15)
                            assert c.session is not None and c.session.flow_control == (i not in PLAIN), i
                        entry = [("127.0.0.1", fronts[80])] + [("127.0.0.1", n[8080]) for n in nodes]
                        jobs = [(entry[k % len(entry)], k % 10, k) for k in range(200)]
                        t0 = time.monotonic()
                        answers = await asyncio.gather(*(_get(addr, f"t{i}", f"/{k}") for addr, i, k in jobs))
                        print(f"[{run.loop_name}] 200 visitors (tunnels t3 and t7 with extensions-off clients) "
                              f"answered in {time.monotonic() - t0:.2f} s")
                        for (addr, i, k), answer in zip(jobs, answers):
                            assert answer.startswith(b"HTTP/1.1 200"), (addr, i, answer[:300])
                            assert answer.endswith(f"app{i} /{k}".encode()), (addr, i, answer[-80:])
                        # the TCP ingress for t0 through the balancer, whichever node it lands on
                        for _ in range(6):
                            r, w = await asyncio.open_connection("127.0.0.1", fronts[9000])
                            w.write(b"ECHO through the balancer")
                            w.write_eof()
                            assert await asyncio.wait_for(r.read(), 15) == b" through the balancer"
                            w.close()
                    finally:
                        for t in tasks:
                            t.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
                        for a in apps:
                            a.close()

                try:
                    run(body, timeout=120)
                except BaseException:
                    for name, p in zip("abc", procs):  # the nodes' logs, shown with the failure
                        p.finish()
                        print(f"---- node {name}\n{(p.out + p.err).decode()[-4000:]}")
                    raise
            owners = collections.Counter()
            for p in procs:
                assert p.finish() == 0
                text = (p.out + p.err).decode()
                owners[p] = len(re.findall(r"\(tunnel t\d\) from .* established", text))
                for i in range(10):  # the extensions-off clients got a plain session (no flow control)
                    for line in re.findall(rf"\(tunnel t{i}\) from .* established.*", text):
                        assert line.endswith("with flow control") == (i not in PLAIN), line
                assert "not a handshake" not in text and "no handshake within" not in text, text[-2000:]
            # the balancer spread the ten tunnels over the three nodes (round robin: 4, 3, 3)
            assert sum(owners.values()) == 10 and all(owners.values()), owners
        finally:
            for p in procs:
                p.kill()
