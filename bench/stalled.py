"""An honest visitor's download speed beside visitors that stopped reading, on one tunnel.

    python bench/stalled.py [--stalled 50] [--mb 64] [--rounds 3] [--json FILE]

The ferrotunnel server and client run as the CLI commands, each in its own process, with a TCP
ingress; the local app streams bytes to every connection for as long as it is read. Each round
measures, interleaved: the honest visitor alone (downloads ``--mb`` MB, three times, median
MB/s), then with ``--stalled`` visitors that read 1 MiB and stop reading (their sockets stay
open, with a small receive buffer), and the server's RSS before and while they are stalled.
The figure is the ratio "beside stalled / alone" of the medians, both measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

TOKEN = "bench-stalled-token"
CHUNK = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Source(asyncio.Protocol):
    """Writes bytes for as long as the connection takes them."""

    def connection_made(self, t):
        self.t = t
        self.block = b"s" * CHUNK
        self.paused = False
        self.fill()

    def fill(self):
        while not self.paused and not self.t.is_closing():
            self.t.write(self.block)

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.fill()

    def data_received(self, data):
        pass

    def connection_lost(self, exc):
        self.paused = True


async def role_app(port: int) -> None:
    await asyncio.get_running_loop().create_server(Source, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await asyncio.Event().wait()


def download(port: int, nbytes: int) -> float:
    """Seconds to read ``nbytes`` from a new visitor connection."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    got = 0
    while got < nbytes:
        n = s.recv_into(view)
        if not n:
            raise RuntimeError(f"download cut after {got} bytes")
        got += n
    dt = time.perf_counter() - t0
    s.close()
    return dt


def stall(port: int, count: int) -> list:
    """``count`` visitors that read 1 MiB each and then stop reading."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.settimeout(30)
        got = 0
        while got < 1 << 20:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("a stalled visitor was cut before it stalled")
            got += len(chunk)
        socks.append(s)
    return socks


def wait_line(p: subprocess.Popen, text: str, stream: str = "stdout", timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    pipe = getattr(p, stream)
    while time.monotonic() < deadline:
        line = pipe.readline()
        if not line:
            raise RuntimeError(f"process ended before {text!r}")
        if text in line:
            return
    raise RuntimeError(f"{text!r} not seen")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stalled", type=int, default=50)
    ap.add_argument("--mb", type=int, default=64, help="MB per honest download")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    tport, iport, aport = free_port(), free_port(), free_port()
    env = {**os.environ, "FERROTUNNEL_TOKEN": TOKEN, "FERROTUNNEL_LOG_LEVEL": "warning"}
    procs = []
    try:
        app = subprocess.Popen([sys.executable, __file__, "--role", "app", str(aport)], stdout=subprocess.PIPE, text=True)
        procs.append(app)
        wait_line(app, "ready")
        server = subprocess.Popen([sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{tport}",
                                   "--tcp-bind", f"127.0.0.1:{iport}=bench"], stderr=subprocess.PIPE, text=True, env=env)
        procs.append(server)
        client = subprocess.Popen([sys.executable, "-m", "ferrotunnel", "client", "--server", f"127.0.0.1:{tport}",
                                   "--local-addr", f"127.0.0.1:{aport}", "--tunnel-id", "bench", "--log-level", "info"],
                                  stderr=subprocess.PIPE, text=True, env=env)
        procs.append(client)
        wait_line(client, "connected to", "stderr")
        nbytes = args.mb * 1_000_000
        download(iport, nbytes)  # warm up
        alone, beside, rss_idle, rss_stalled = [], [], [], []
        for r in range(args.rounds):
            alone += [nbytes / download(iport, nbytes) / 1e6 for _ in range(3)]
            rss_idle.append(rss_kib(server.pid))
            socks = stall(iport, args.stalled)
            time.sleep(1.0)  # let the tunnel fill what the stalled ones are allowed to hold
            rss_stalled.append(rss_kib(server.pid))
            beside += [nbytes / download(iport, nbytes) / 1e6 for _ in range(3)]
            for s in socks:
                s.close()
            time.sleep(0.5)
            print(f"round {r + 1}: alone {statistics.median(alone[-3:]):.0f} MB/s, beside {args.stalled} stalled "
                  f"{statistics.median(beside[-3:]):.0f} MB/s; server RSS {rss_idle[-1] // 1024} -> "
                  f"{rss_stalled[-1] // 1024} MiB", flush=True)
        out = {"alone_mbps": statistics.median(alone), "beside_mbps": statistics.median(beside),
               "ratio": statistics.median(beside) / statistics.median(alone),
               "server_rss_idle_kib": statistics.median(rss_idle), "server_rss_stalled_kib": statistics.median(rss_stalled),
               "stalled": args.stalled, "mb": args.mb, "rounds": args.rounds}
        print(f"honest visitor beside {args.stalled} stalled ones: {out['beside_mbps']:.0f} MB/s, alone "
              f"{out['alone_mbps']:.0f} MB/s: ratio {out['ratio']:.2f}; server RSS "
              f"{out['server_rss_idle_kib'] / 1024:.0f} -> {out['server_rss_stalled_kib'] / 1024:.0f} MiB with them stalled")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--role"]:
        import uvloop

        uvloop.run(role_app(int(sys.argv[3])))
    else:
        main()
