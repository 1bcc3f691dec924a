"""Tunnel ends as separate processes, for tests that kill and restart them.

    python tests/procs.py server PORT INGRESS_PORT [TUNNEL_ID]
    python tests/procs.py client PORT LOCAL_PORT TUNNEL_ID
    python tests/procs.py echo PORT
"""

from __future__ import annotations

import asyncio
import sys

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


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    fn = {"server": server, "client": client, "echo": echo, "httpapp": httpapp}[role]
    uvloop.run(fn(*[int(a) if a.isdigit() else a for a in args]))
