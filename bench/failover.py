"""Failover time of a cluster node killed with SIGKILL, with default settings: three CLI nodes
behind a real HAProxy (deploy/haproxy.cfg on loopback ports), one real redis-server, one client
connected through the balancer; the node holding its tunnel is killed and the time until an HTTP
request through HAProxy is answered by the app again is measured. Needs redis-server and haproxy.

    python bench/failover.py [RUNS]
"""

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the real-process helpers
from haproxy_server import HAProxy  # noqa: E402
from redis_server import RedisServer  # noqa: E402

LOGS = tempfile.mkdtemp(prefix="ft-failover-")
def fp():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def http(port, host="web"):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            d = b""
            while True:
                c = s.recv(4096)
                if not c: break
                d += c
            return d.split(b"\r\n", 1)[0]
    except OSError as e:
        return repr(e).encode()
results = []
for run in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
  with RedisServer() as redis:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL")}, "FERROTUNNEL_TOKEN": "fo-token", "FERROTUNNEL_CLUSTER_TOKEN": "fo-secret", "FERROTUNNEL_CLUSTER_REDIS": redis.url, "FERROTUNNEL_LOG_LEVEL": "info"}
    app_port = fp()
    app = subprocess.Popen([sys.executable, "-m", "http.server", str(app_port), "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes, procs = [], [app]
    for name in ("a", "b", "c"):
        ports = {7835: fp(), 8080: fp(), 9000: fp(), "link": fp()}
        p = subprocess.Popen([sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{ports[7835]}", "--http-bind", f"127.0.0.1:{ports[8080]}", "--trusted-proxy", "127.0.0.1/32", "--node-id", name, "--node-bind", f"127.0.0.1:{ports['link']}"], env=env, stdout=subprocess.DEVNULL, stderr=open(f"{LOGS}/{name}.log", "w"))
        procs.append(p); nodes.append(ports)
    time.sleep(1.5)
    fronts = {7835: fp(), 80: fp(), 9000: fp()}
    with HAProxy(fronts, nodes):
        cl = subprocess.Popen([sys.executable, "-m", "ferrotunnel", "client", "--server", f"127.0.0.1:{fronts[7835]}", "--tunnel-id", "web", "--local-addr", f"127.0.0.1:{app_port}"], env=env, stdout=subprocess.DEVNULL, stderr=open(f"{LOGS}/client.log", "w"))
        procs.append(cl)
        t0 = time.monotonic()
        while not http(fronts[80]).startswith(b"HTTP/1.0 200") and not http(fronts[80]).startswith(b"HTTP/1.1 200"):
            time.sleep(0.1)
            assert time.monotonic() - t0 < 20
        owner = None
        for i, name in enumerate("abc"):
            if "(tunnel web)" in open(f"{LOGS}/{name}.log").read():
                owner = i
        victim = procs[1 + owner]
        victim.send_signal(signal.SIGKILL); victim.wait()
        t_kill = time.monotonic()
        fails = 0
        while True:
            r = http(fronts[80])
            if r.startswith(b"HTTP/1.0 200") or r.startswith(b"HTTP/1.1 200"):
                break
            time.sleep(0.05)
            if time.monotonic() - t_kill > 60: break
        dt = time.monotonic() - t_kill
        results.append(dt)
        print(f"run {run}: owner {'abc'[owner]} killed; reachable again through HAProxy after {dt:.2f} s", flush=True)
    for p in procs:
        if p.poll() is None: p.kill(); p.wait()
print("median", f"{statistics.median(results):.2f}", "s; all", [f"{x:.2f}" for x in results])
