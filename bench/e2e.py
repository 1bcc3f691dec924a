"""End-to-end bulk throughput: ferrotunnel (server and client in their own processes, traffic in
through TcpIngress) beside a 1:1 uvloop relay, in the same run, on loopback.

    python bench/e2e.py [--mb 512] [--streams 1 16] [--rounds 3]

Prints MB/s (10^6 B/s of payload delivered to the backend) for each path, CPU seconds per GB of
the relay processes (both tunnel ends together), and the ratio tunnel / relay. Set
FERROTUNNEL_NO_EXTENSIONS=1 to measure the pure-Python twins.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import uvloop

CHUNK = 256 * 1024
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- roles (each its own process)


class Sink(asyncio.Protocol):
    """Backend: counts bytes; at EOF answers with the count (8 bytes) and closes."""

    def connection_made(self, t):
        self.t, self.n = t, 0
        t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.n += len(data)

    def eof_received(self):
        self.t.write(self.n.to_bytes(8, "big"))
        self.t.close()
        return True


class RelayIn(asyncio.Protocol):
    """A 1:1 forwarder: one upstream connection per downstream connection, no framing."""

    def __init__(self, target):
        self.target, self.peer, self.pending, self.eof, self.paused = target, None, [], False, False

    def connection_made(self, t):
        self.t = t
        t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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
            self.peer.t.write_eof()
        return True

    def pause_writing(self):
        self.peer.t.pause_reading()

    def resume_writing(self):
        self.peer.t.resume_reading()


class RelayOut(asyncio.Protocol):
    def __init__(self, down):
        self.down = down

    def connection_made(self, t):
        self.t = t
        t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.down.t.write(data)

    def eof_received(self):
        self.down.t.write_eof()
        return True

    def connection_lost(self, exc):
        self.down.t.close()

    def pause_writing(self):
        if not self.down.eof:
            self.down.t.pause_reading()

    def resume_writing(self):
        if not self.down.eof:  # never resume a transport that saw EOF
            self.down.t.resume_reading()


async def role_sink(port):
    loop = asyncio.get_running_loop()
    await loop.create_server(Sink, "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def role_relay(port, target):
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: RelayIn(("127.0.0.1", target)), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def role_server(port, ingress_port):
    import ferrotunnel as ft

    server = ft.TunnelServer(("127.0.0.1", port), TOKEN)
    async with server, ft.TcpIngress(server, ("127.0.0.1", ingress_port)):
        await server.wait_for_session(timeout=30)
        print("ready", flush=True)
        await asyncio.Event().wait()


async def role_client(port, target):
    import ferrotunnel as ft

    client = ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, config=ft.ClientConfig(local_addr=("127.0.0.1", target)))
    await client.connect_and_run()


def main_role(argv):
    role, *ports = argv
    fn = {"sink": role_sink, "relay": role_relay, "server": role_server, "client": role_client}[role]
    uvloop.run(fn(*map(int, ports)))


# ---------------------------------------------------------------- driver


def spawn(*args):
    p = subprocess.Popen([sys.executable, __file__, "--role", *map(str, args)], stdout=subprocess.PIPE, text=True)
    return p


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def push(port, nbytes, streams):
    per = nbytes // streams
    block = os.urandom(CHUNK)

    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def measure(port, pids, nbytes, streams):
    c0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    moved = uvloop.run(push(port, nbytes, streams))
    dt = time.perf_counter() - t0
    cpu = cpu_seconds(pids) - c0
    return moved / dt / 1e6, cpu / (moved / 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512, help="payload per measurement in MB")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    sink_port, relay_port, tun_port, ing_port = (free_port() for _ in range(4))
    procs = []
    try:
        sink = spawn("sink", sink_port)
        procs.append(sink)
        sink.stdout.readline()
        relay = spawn("relay", relay_port, sink_port)
        procs.append(relay)
        relay.stdout.readline()
        server = spawn("server", tun_port, ing_port)
        procs.append(server)
        time.sleep(0.5)
        client = spawn("client", tun_port, sink_port)
        procs.append(client)
        server.stdout.readline()
        import ferrotunnel.frames as F

        print(f"ferrotunnel implementation: {F.IMPLEMENTATION}; {args.mb} MB per run; median of {args.rounds}")
        print(f"{'path':<34}{'streams':>8}{'MB/s':>10}{'CPU s/GB':>10}")
        nbytes = args.mb * 1_000_000
        for streams in args.streams:
            rows = {}
            for name, port, pids in (("1:1 uvloop relay", relay_port, [relay.pid]),
                                     ("ferrotunnel via TcpIngress", ing_port, [server.pid, client.pid])):
                runs = [measure(port, pids, nbytes, streams) for _ in range(args.rounds)]
                rows[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
                print(f"{name:<34}{streams:>8}{rows[name][0]:>10.0f}{rows[name][1]:>10.2f}")
            ratio = rows["ferrotunnel via TcpIngress"][0] / rows["1:1 uvloop relay"][0]
            print(f"{'ratio tunnel / relay':<34}{streams:>8}{ratio:>10.2f}")
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        main_role(sys.argv[2:])
    else:
        main()
