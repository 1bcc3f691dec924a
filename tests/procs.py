"""Tunnel ends as separate processes, for tests that kill and restart them.

    python tests/procs.py server PORT INGRESS_PORT [TUNNEL_ID]
    python tests/procs.py client PORT LOCAL_PORT TUNNEL_ID
    python tests/procs.py echo PORT
    python tests/procs.py mixed-server PORT      (prints "ready IMPL", then "exercise ok ..." per session)
    python tests/procs.py mixed-client PORT      (prints "connected IMPL", then "exercise ok ...")

The mixed roles serve tests/test_mixed_impl.py: each end answers streams with ``mixed_handler``
and drives ``exercise`` over the streams it opens itself, so one end can run the compiled codec
and the other the pure-Python twin.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
import time
import traceback

import uvloop

TOKEN = "proc-token"


async def server(port: int, ingress_port: int, tunnel_id: str = "") -> None:
    import ferrotunnel as ft

    srv = ft.TunnelServer(("127.0.0.1", port), TOKEN, config=ft.ServerConfig(heartbeat_interval=0.5))
    async with srv, ft.TcpIngress(srv, ("127.0.0.1", ingress_port), tunnel_id=tunnel_id or None):
        print("ready", flush=True)
        await asyncio.Event().wait()


async def client(port: int, local_port: int, tunnel_id: str) -> None:
    import ferrotunnel as ft

    cfg = ft.ClientConfig(local_addr=("127.0.0.1", local_port), heartbeat_interval=0.5, session_timeout=3,
                          backoff=ft.BackoffConfig(base=0.2, max_delay=2.0))
    c = ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, tunnel_id=tunnel_id, config=cfg)
    await c.connect_and_run(on_connected=lambda s: print("connected", s.id, flush=True))


class Echo(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        # close (flushes first) rather than write_eof: uvloop 0.23 has aborted on write_eof under churn
        self.t.close()


async def echo(port: int) -> None:
    await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def httpapp(port: int, name: str) -> None:
    """Keep-alive HTTP/1.1 app answering its name; an Upgrade request gets 101, then raw echo."""

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"upgrade:" in head.lower():
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    while True:
                        data = await reader.read(65536)
                        if not data:
                            break
                        writer.write(data)
                        await writer.drain()
                    break
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body_in = await reader.readexactly(length) if length else b""
                path = head.split(b" ")[1].decode()
                body = f"{name} {path} {len(body_in)}".encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    await asyncio.start_server(handle, "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


# ------------------------------------------------------------------ mixed implementations

CHUNK = 256 * 1024


async def mixed_handler(stream) -> None:
    """The far end of ``exercise``. A stream starts with three bytes: the protocol and the
    priority the opener gave it (checked against what the OpenStream said), then what to do:

    E: echo everything, half-close after the opener's EOF (so data flows after that EOF);
    S: sink: read to EOF, answer length (8 bytes) + SHA-256, half-close;
    G: generate: read length and seed (8 + 8 bytes), send that many seeded random bytes and
       half-close first, then expect the opener's EOF."""
    protocol, priority, cmd = await stream.readexactly(3)
    if (stream.protocol, stream.priority) != (protocol, priority):
        raise AssertionError(f"opened as {protocol}/{priority}, arrived as {stream.protocol!r}/{stream.priority!r}")
    cmd = bytes([cmd])
    if cmd == b"E":
        async for chunk in stream:
            stream.write(chunk)
            await stream.drain()
        stream.write_eof()
    elif cmd == b"S":
        h, n = hashlib.sha256(), 0
        async for chunk in stream:
            h.update(chunk)
            n += len(chunk)
        stream.write(n.to_bytes(8, "big") + h.digest())
        stream.write_eof()
    elif cmd == b"G":
        head = await stream.readexactly(16)
        n, seed = int.from_bytes(head[:8], "big"), int.from_bytes(head[8:], "big")
        data = random.Random(seed).randbytes(n)
        for i in range(0, n, CHUNK):
            stream.write(data[i:i + CHUNK])
            await stream.drain()
        stream.write_eof()
        if await stream.read() != b"":
            raise AssertionError("data after the opener's EOF")
    else:
        raise AssertionError(f"unknown command {cmd!r}")


async def exercise(session, bulk: int = 16 * 1024 * 1024, streams: int = 200, seed: int = 1) -> dict:
    """Open streams on ``session`` (whose peer runs ``mixed_handler``) and check every byte: bulk
    each way and both ways at once (flow control paces the writers), then ``streams`` concurrent
    streams of random kinds, sizes and priorities. Raises AssertionError on any difference."""
    import ferrotunnel as ft

    prios = list(ft.StreamPriority)
    moved = [0, 0]  # bytes sent, received

    async def send_all(s, data):
        for i in range(0, len(data), CHUNK):
            s.write(data[i:i + CHUNK])
            await s.drain()
        s.write_eof()
        moved[0] += len(data)

    async def read_all(s):
        got = bytearray()
        async for chunk in s:
            got += chunk
        moved[1] += len(got)
        return bytes(got)

    protocols = list(ft.Protocol)

    async def open_for(cmd, sd, prio):
        protocol = random.Random(sd).choice(protocols)
        s = await session.open_stream(protocol, prio)
        s.write(bytes([protocol, prio]) + cmd)
        return s

    async def echo(n, sd, prio):
        data = random.Random(sd).randbytes(n)
        s = await open_for(b"E", sd, prio)
        writer = asyncio.ensure_future(send_all(s, data))
        got = await read_all(s)
        await writer
        if got != data:
            raise AssertionError(f"echo of {n} bytes came back as {len(got)} different bytes")

    async def sink(n, sd, prio):
        data = random.Random(sd).randbytes(n)
        s = await open_for(b"S", sd, prio)
        await send_all(s, data)
        if await read_all(s) != n.to_bytes(8, "big") + hashlib.sha256(data).digest():
            raise AssertionError(f"{n} bytes sent did not arrive intact")

    async def gen(n, sd, prio):
        s = await open_for(b"G", sd, prio)
        s.write(n.to_bytes(8, "big") + sd.to_bytes(8, "big"))
        s.write_eof()  # half-closed at once: the peer still sends its n bytes
        if await read_all(s) != random.Random(sd).randbytes(n):
            raise AssertionError(f"{n} generated bytes did not arrive intact")

    t0 = time.monotonic()
    await asyncio.gather(sink(bulk, seed, ft.StreamPriority.NORMAL), gen(bulk, seed + 1, ft.StreamPriority.NORMAL),
                         echo(bulk // 2, seed + 2, ft.StreamPriority.LOW))
    rng = random.Random(seed)
    kinds = (echo, sink, gen)
    await asyncio.gather(*(rng.choice(kinds)(rng.choice([0, 1, 1000, rng.randrange(256 * 1024)]), rng.randrange(1 << 30),
                                             rng.choice(prios)) for _ in range(streams)))
    return {"sent": moved[0], "received": moved[1], "streams": streams + 3, "seconds": round(time.monotonic() - t0, 2),
            "flow_control": session.flow_control}


async def _report(session) -> None:
    try:
        stats = await exercise(session)
    except BaseException as exc:  # reported to the test, which fails on it
        print("exercise FAILED", "".join(traceback.format_exception(exc)).replace("\n", " | "), flush=True)
    else:
        print("exercise ok", json.dumps(stats), flush=True)


async def mixed_server(port: int) -> None:
    import ferrotunnel as ft
    from ferrotunnel.frames import IMPLEMENTATION

    srv = ft.TunnelServer(("127.0.0.1", port), TOKEN, stream_handler=mixed_handler)
    async with srv:
        print("ready", IMPLEMENTATION, flush=True)
        seen: set = set()
        while True:  # drive each new session's server-opened streams
            session = await srv.wait_for_session()
            if session.id not in seen:
                seen.add(session.id)
                await _report(session)
            await session.wait_closed()


async def mixed_client(port: int) -> None:
    import ferrotunnel as ft
    from ferrotunnel.frames import IMPLEMENTATION

    c = ft.TunnelClient(f"127.0.0.1:{port}", TOKEN, tunnel_id="mixed")
    session = await c.connect(mixed_handler)
    print("connected", IMPLEMENTATION, flush=True)
    await _report(session)
    await session.wait_closed()


async def emfile() -> None:
    """Server, TCP ingress, client and echo app in one process on the selector event loop, with
    RLIMIT_NOFILE 256 and no descriptor reserves; commands on stdin: ``fill`` takes every free
    descriptor (prints "full N"), ``free`` gives them back, ``stats`` prints the listeners'
    accept-exhaustion counts as JSON, ``quit`` ends."""
    import os
    import resource

    import ferrotunnel as ft

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    loop = asyncio.get_running_loop()
    app = await loop.create_server(Echo, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    cfg = ft.ServerConfig(ingress_fd_reserve=0, tunnel_fd_reserve=0, heartbeat_interval=0.5)
    srv = ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=cfg)
    async with srv, ft.TcpIngress(srv, ("127.0.0.1", 0), tunnel_id="fd") as ingress:
        c = ft.TunnelClient("%s:%d" % srv.address, TOKEN, tunnel_id="fd",
                            config=ft.ClientConfig(local_addr=("127.0.0.1", app_port)))
        task = loop.create_task(c.connect_and_run())
        await srv.wait_for_session("fd", timeout=10)
        print("ready", ingress.address[1], flush=True)
        held: list = []
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            cmd = (await reader.readline()).decode().strip()
            if cmd == "fill":
                try:
                    while True:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    pass
                print("full", len(held), flush=True)
            elif cmd == "free":
                for fd in held:
                    os.close(fd)
                held.clear()
                print("freed", flush=True)
            elif cmd == "stats":
                print(json.dumps({"ingress": dict(ingress.listener_exhaustion),
                                  "tunnel": dict(srv.listener_exhaustion)}), flush=True)
            else:
                break
        task.cancel()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "emfile":  # the selector event loop: there ferrotunnel accepts for itself
        asyncio.run(emfile())
        sys.exit(0)
    fn = {"server": server, "client": client, "echo": echo, "httpapp": httpapp,
          "mixed-server": mixed_server, "mixed-client": mixed_client}[role]
    uvloop.run(fn(*[int(a) if a.isdigit() else a for a in args]))
