"""End-to-end benchmark: ferrotunnel (server and client each in its own process, traffic in
through TcpIngress) beside direct loopback, a minimal 1:1 uvloop relay and two such relays in
series, in one run.

    python bench/e2e.py [--mb 512] [--rounds 3] [--tls] [--quick] [--json FILE]

Figures per path: bulk MB/s (10^6 B/s of payload delivered) for 1 and 16 streams, CPU seconds per
GB of the relaying processes (both tunnel ends together), 64-byte echo RTT p50/p99, new streams
per second, and memory per idle open stream (RSS of the relaying processes before and one second
after opening 1,000 idle connections, on fresh processes). Ratios are against the 1:1 relay
measured in the same run. FERROTUNNEL_NO_EXTENSIONS=1 measures the pure-Python twins.

The paths: ``direct`` (load to backend), ``relay`` (one 1:1 uvloop relay process in between),
``relay2`` (two such relays in series: the hop structure every reverse tunnel has, visitor ->
server process -> client process -> service, with no framing, multiplexing or Python work beyond
the relay's own) and ``tunnel`` (ferrotunnel server and client, traffic in through TcpIngress).
``relay2`` shows what the extra process hop alone costs on the machine at hand; the tunnel's
ratio to it is what the tunnel itself adds.
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
import tempfile
import time

import uvloop

CHUNK = 256 * 1024
TOKEN = "bench-token-0123"
IDLE_STREAMS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodelay(t):
    sock = t.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ---------------------------------------------------------------- roles (each its own process)


class Backend(asyncio.Protocol):
    """First byte picks the mode: S = sink (count, answer at EOF), E = echo, H = hold idle."""

    def connection_made(self, t):
        self.t, self.mode, self.n = t, None, 0
        nodelay(t)

    def data_received(self, data):
        if self.mode is None:
            self.mode, data = data[:1], data[1:]
        if self.mode == b"S":
            self.n += len(data)
        elif self.mode == b"E":
            self.t.write(data)

    def eof_received(self):
        if self.mode == b"S":
            self.t.write(self.n.to_bytes(8, "big"))
        self.t.close()
        return True


def _forward_eof(transport, other_side_done):
    # once both directions ended, close() (flush, then FIN) instead of write_eof: uvloop 0.23 has
    # aborted with "double free or corruption" on write_eof paths under churn (see ANCHORS.md)
    if other_side_done:
        transport.close()
    else:
        transport.write_eof()


class RelayIn(asyncio.Protocol):
    """A 1:1 forwarder: one upstream connection per downstream connection, no framing."""

    def __init__(self, target):
        self.target, self.peer, self.pending, self.eof = target, None, [], False

    def connection_made(self, t):
        self.t = t
        nodelay(t)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self):
        loop = asyncio.get_running_loop()
        _, peer = await loop.create_connection(lambda: RelayOut(self), *self.target)
        self.peer = peer
        for d in self.pending:
            peer.t.write(d)
        if self.eof:
            peer.t.write_eof()

    def data_received(self, data):
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.t.write(data)

    def eof_received(self):
        self.eof = True
        if self.peer is not None:
            _forward_eof(self.peer.t, self.peer.eof)
        return True

    def connection_lost(self, exc):
        if self.peer is not None:
            self.peer.t.close()

    def pause_writing(self):
        if not self.peer.eof:
            self.peer.t.pause_reading()

    def resume_writing(self):
        if not self.peer.eof:  # never resume a transport that saw EOF (uvloop 0.23 aborts)
            self.peer.t.resume_reading()


class RelayOut(asyncio.Protocol):
    def __init__(self, down):
        self.down = down

    def connection_made(self, t):
        self.t = t
        self.eof = False
        nodelay(t)

    def data_received(self, data):
        self.down.t.write(data)

    def eof_received(self):
        self.eof = True
        _forward_eof(self.down.t, self.down.eof)
        return True

    def connection_lost(self, exc):
        self.down.t.close()

    def pause_writing(self):
        if not self.down.eof:
            self.down.t.pause_reading()

    def resume_writing(self):
        if not self.down.eof:  # never resume a transport that saw EOF
            self.down.t.resume_reading()


async def role_backend(port):
    await asyncio.get_running_loop().create_server(Backend, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def role_relay(port, target):
    await asyncio.get_running_loop().create_server(lambda: RelayIn(("127.0.0.1", target)), "127.0.0.1", port,
                                                   backlog=4096)
    print("ready", flush=True)
    await asyncio.Event().wait()


def _overrides():
    """Config fields set with --set NAME=VALUE on the driver (passed down in the environment)."""
    return json.loads(os.environ.get("FT_BENCH_CONFIG", "{}"))


async def role_server(port, ingress_port, certdir=""):
    import ferrotunnel as ft

    ctx = ft.tls.server_context(f"{certdir}/server.pem", f"{certdir}/server.key") if certdir else None
    server = ft.TunnelServer(("127.0.0.1", port), TOKEN, tls=ctx, config=ft.ServerConfig(**_overrides()))
    async with server, ft.TcpIngress(server, ("127.0.0.1", ingress_port)):
        await server.wait_for_session(timeout=30)
        print("ready", flush=True)
        await asyncio.Event().wait()


async def role_client(port, target, certdir=""):
    import ferrotunnel as ft

    ctx = ft.tls.client_context(f"{certdir}/ca.pem") if certdir else None
    client = ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, tls=ctx,
                             config=ft.ClientConfig(local_addr=("127.0.0.1", target), **_overrides()))
    await client.connect_and_run()


def main_role(argv):
    role, *args = argv
    fn = {"backend": role_backend, "relay": role_relay, "server": role_server, "client": role_client}[role]
    conv = [int(a) if a.isdigit() else a for a in args]
    uvloop.run(fn(*conv))


# ---------------------------------------------------------------- measurements


def spawn(*args):
    return subprocess.Popen([sys.executable, __file__, "--role", *map(str, args)], stdout=subprocess.PIPE, text=True)


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def _open(port):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    nodelay(w.transport)
    return r, w


async def bulk(port, nbytes, streams):
    per = nbytes // streams
    block = os.urandom(CHUNK)

    async def one():
        r, w = await _open(port)
        w.write(b"S")
        sent = 0
        while sent < per:
            n = min(CHUNK, per - sent)
            w.write(block[:n])
            await w.drain()
            sent += n
        w.write_eof()
        got = int.from_bytes(await r.readexactly(8), "big")
        w.close()
        assert got == per, (got, per)

    await asyncio.gather(*(one() for _ in range(streams)))
    return per * streams


async def rtt(port, count=2000):
    r, w = await _open(port)
    w.write(b"E")
    msg = b"x" * 64
    samples = []
    for i in range(count + 100):
        t0 = time.perf_counter()
        w.write(msg)
        await r.readexactly(64)
        if i >= 100:  # warm-up excluded
            samples.append(time.perf_counter() - t0)
    w.close()
    return samples


async def new_streams(port, count=1000, concurrency=16):
    sem = asyncio.Semaphore(concurrency)

    async def one():
        async with sem:
            r, w = await _open(port)
            w.write(b"E!")
            await r.readexactly(1)
            w.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - t0)


async def idle(port, pids, count=IDLE_STREAMS):
    before = rss_kib(pids)
    conns = []
    for i in range(0, count, 100):
        batch = await asyncio.gather(*(_open(port) for _ in range(100)))
        for r, w in batch:
            w.write(b"H")
        conns += batch
    await asyncio.sleep(1.0)
    after = rss_kib(pids)
    for r, w in conns:
        w.close()
    return (after - before) / count


class Paths:
    """Starts backend, relay and a tunnel; ``fresh()`` restarts the tunnel processes. With
    ``cli=True`` the tunnel ends are the ``ferrotunnel server`` / ``client`` commands."""

    def __init__(self, tls_dir="", cli=False):
        self.tls_dir = tls_dir
        self.cli = cli
        self.procs = []
        self.backend_port, self.relay_port = free_port(), free_port()
        self.backend = self._start("backend", self.backend_port)
        self.relay = self._start("relay", self.relay_port, self.backend_port)
        self.relay2_port = free_port()  # a second relay in front of the first
        self.relay2 = self._start("relay", self.relay2_port, self.relay_port)
        self.server = self.client = None
        self.fresh_tunnel()

    def _start(self, *args, wait=True):
        p = spawn(*args)
        self.procs.append(p)
        if wait:
            p.stdout.readline()
        return p

    def fresh_tunnel(self):
        for p in (self.client, self.server):
            if p is not None:
                p.kill()
                p.wait()
        self.tun_port, self.ingress_port = free_port(), free_port()
        if self.cli:
            self._start_cli()
            return
        self.server = self._start("server", self.tun_port, self.ingress_port, self.tls_dir, wait=False)
        time.sleep(0.3)
        self.client = self._start("client", self.tun_port, self.backend_port, self.tls_dir, wait=False)
        self.server.stdout.readline()
        time.sleep(0.2)

    def _start_cli(self):
        env = dict(os.environ, FERROTUNNEL_TOKEN=TOKEN, FERROTUNNEL_LOG_LEVEL="warning")
        tls_s = ["--tls-cert", f"{self.tls_dir}/server.pem", "--tls-key", f"{self.tls_dir}/server.key"] if self.tls_dir else []
        tls_c = ["--tls", "--tls-ca", f"{self.tls_dir}/ca.pem"] if self.tls_dir else []
        cmd = [sys.executable, "-m", "ferrotunnel"]
        self.server = subprocess.Popen(cmd + ["server", "--bind", f"127.0.0.1:{self.tun_port}", "--tcp-bind",
                                              f"127.0.0.1:{self.ingress_port}", *tls_s],
                                       stdout=subprocess.PIPE, text=True, env=env)
        self.server.stdout.readline()
        self.client = subprocess.Popen(cmd + ["client", "--server", f"localhost:{self.tun_port}", "--local-addr",
                                              f"127.0.0.1:{self.backend_port}", *tls_c],
                                       stdout=subprocess.PIPE, text=True, env=env)
        self.client.stdout.readline()
        time.sleep(0.2)

    def fresh_relay(self):
        for p in (self.relay2, self.relay):
            p.kill()
            p.wait()
        self.relay_port, self.relay2_port = free_port(), free_port()
        self.relay = self._start("relay", self.relay_port, self.backend_port)
        self.relay2 = self._start("relay", self.relay2_port, self.relay_port)

    def targets(self):
        return {"direct": (self.backend_port, []), "relay": (self.relay_port, [self.relay.pid]),
                "relay2": (self.relay2_port, [self.relay2.pid, self.relay.pid]),
                "tunnel": (self.ingress_port, [self.server.pid, self.client.pid])}

    def close(self):
        for p in self.procs + [self.server, self.client]:
            if p is not None:
                if p.poll() is not None and p.returncode < 0 and p.returncode != -9:
                    print(f"warning: a benchmark process ({' '.join(p.args[2:5])}) died with signal "
                          f"{-p.returncode}", file=sys.stderr)
                p.kill()


def measure_all(args, tls_dir=""):
    """Returns {path: {figure: value}} for direct, relay and tunnel."""
    paths = Paths(tls_dir, cli=getattr(args, "cli", False))
    res = {k: {} for k in ("direct", "relay", "relay2", "tunnel")}
    try:
        nbytes = args.mb * 1_000_000
        targets = paths.targets()
        for streams in (1, 16):
            runs = {name: [] for name in targets}
            for _ in range(args.rounds):  # interleaved, so drift in machine speed hits every path alike
                for name, (port, pids) in targets.items():
                    c0 = cpu_seconds(pids) if pids else 0
                    t0 = time.perf_counter()
                    moved = uvloop.run(bulk(port, nbytes, streams))
                    dt = time.perf_counter() - t0
                    cpu = (cpu_seconds(pids) - c0) / (moved / 1e9) if pids else None
                    runs[name].append((moved / dt / 1e6, cpu))
            for name, (port, pids) in targets.items():
                res[name][f"mbps_{streams}"] = statistics.median(r[0] for r in runs[name])
                if pids:
                    res[name][f"cpu_s_per_gb_{streams}"] = statistics.median(r[1] for r in runs[name])
        samples = {name: [] for name in targets}
        segments = 4
        for _ in range(segments):  # interleaved segments of 64-byte ping-pong
            for name, (port, pids) in targets.items():
                samples[name] += uvloop.run(rtt(port, (300 if args.quick else 1500)))
        for name, (port, pids) in targets.items():
            s_ = sorted(samples[name])
            res[name]["rtt_p50_us"] = s_[len(s_) // 2] * 1e6
            res[name]["rtt_p99_us"] = s_[int(len(s_) * 0.99)] * 1e6
            res[name]["new_streams_per_s"] = uvloop.run(new_streams(port, 300 if args.quick else 2000))
        paths.fresh_tunnel()
        paths.fresh_relay()
        for name in ("relay", "relay2", "tunnel"):
            port, pids = paths.targets()[name]
            res[name]["idle_kib_per_stream"] = uvloop.run(idle(port, pids))
    finally:
        paths.close()
    return res


def ratios(res):
    t, r, r2 = res["tunnel"], res["relay"], res["relay2"]
    return {
        "throughput_1_vs_relay": t["mbps_1"] / r["mbps_1"],
        "throughput_16_vs_relay": t["mbps_16"] / r["mbps_16"],
        "rtt_p99_vs_relay": t["rtt_p99_us"] / r["rtt_p99_us"],
        # what the hop structure alone costs (two plain relays in series against one)
        "relay2_throughput_1_vs_relay": r2["mbps_1"] / r["mbps_1"],
        "relay2_rtt_p50_vs_relay": r2["rtt_p50_us"] / r["rtt_p50_us"],
        "relay2_rtt_p99_vs_relay": r2["rtt_p99_us"] / r["rtt_p99_us"],
        # what the tunnel adds on top of that structure
        "throughput_1_vs_relay2": t["mbps_1"] / r2["mbps_1"],
        "throughput_16_vs_relay2": t["mbps_16"] / r2["mbps_16"],
        "cpu_vs_relay2": t["cpu_s_per_gb_1"] / r2["cpu_s_per_gb_1"],
        "rtt_p50_vs_relay2": t["rtt_p50_us"] / r2["rtt_p50_us"],
        "rtt_p99_vs_relay2": t["rtt_p99_us"] / r2["rtt_p99_us"],
    }


def table(res, label):
    lines = [f"== {label}",
             f"{'path':<10}{'1 MB/s':>9}{'16 MB/s':>9}{'CPU s/GB':>10}{'p50 us':>9}{'p99 us':>9}{'new/s':>9}{'idle KiB':>10}"]
    for name, f in res.items():
        cpu = f.get("cpu_s_per_gb_1")
        idle_k = f.get("idle_kib_per_stream")
        lines.append(f"{name:<10}{f['mbps_1']:>9.0f}{f['mbps_16']:>9.0f}"
                     f"{(f'{cpu:.2f}' if cpu is not None else '-'):>10}{f['rtt_p50_us']:>9.0f}{f['rtt_p99_us']:>9.0f}"
                     f"{f['new_streams_per_s']:>9.0f}{(f'{idle_k:.1f}' if idle_k is not None else '-'):>10}")
    rt = ratios(res)
    lines.append("ratios (same run): " + ", ".join(f"{k} {v:.2f}" for k, v in rt.items() if "relay2" not in k))
    lines.append("  hop structure (relay2 / relay): " + ", ".join(
        f"{k[len('relay2_'):]} {v:.2f}" for k, v in rt.items() if k.startswith("relay2_")))
    lines.append("  tunnel / relay2: " + ", ".join(f"{k} {v:.2f}" for k, v in rt.items() if k.endswith("_vs_relay2")))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="payload per bulk measurement in MB")
    ap.add_argument("--rounds", type=int, default=3, help="bulk runs per figure (median)")
    ap.add_argument("--tls", action="store_true", help="also measure with TLS between the tunnel ends")
    ap.add_argument("--quick", action="store_true", help="fewer RTT and new-stream samples")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--cli", action="store_true", help="run the tunnel ends as the ferrotunnel server/client commands")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a ServerConfig/ClientConfig field on both tunnel ends (integers only)")
    args = ap.parse_args()
    if args.set:
        os.environ["FT_BENCH_CONFIG"] = json.dumps({k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)})
    import ferrotunnel.frames as F

    print(f"ferrotunnel implementation: {F.IMPLEMENTATION}; {args.mb} MB per bulk run; median of {args.rounds}"
          f"{'; tunnel ends are the CLI commands' if args.cli else ''}")
    out = {"implementation": F.IMPLEMENTATION, "plaintext": measure_all(args)}
    print(table(out["plaintext"], "plaintext"), flush=True)
    if args.tls:
        import ferrotunnel as ft

        with tempfile.TemporaryDirectory() as d:
            ft.tls.generate_certs(d)
            out["tls"] = measure_all(args, d)
        print(table(out["tls"], "TLS 1.3 between the tunnel ends"))
        print(f"TLS / plaintext tunnel throughput (1 stream): "
              f"{out['tls']['tunnel']['mbps_1'] / out['plaintext']['tunnel']['mbps_1']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        main_role(sys.argv[2:])
    else:
        main()
