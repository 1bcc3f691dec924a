"""A fixed in-process workload for counting instructions (``valgrind --tool=callgrind``), which,
unlike wall-clock figures on a shared 2-core machine, repeat exactly for the same code.

    PYTHONPATH=CHECKOUT/src valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python bench/instr.py [new|rtt|bulk]

One process runs a tunnel server with a TcpIngress, a tunnel client and an echo backend on
loopback (uvloop) and does one part: ``new`` opens 300 visitor connections one after another,
each echoing 16 bytes; ``rtt`` makes 2,000 64-byte round trips on one connection; ``bulk`` pushes
32 MB one way through one connection; ``none`` only sets up and tears down (subtract it).
Compare the ``Collected`` totals of two checkouts.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

import ferrotunnel as ft


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    n = 0
    while data := await reader.read(262144):
        n += len(data)
    writer.write(str(n).encode())
    writer.close()


async def main(part: str) -> None:
    backend = await asyncio.start_server(sink if part == "bulk" else echo, "127.0.0.1", 0)
    baddr = backend.sockets[0].getsockname()[:2]
    server = ft.TunnelServer(("127.0.0.1", 0), "instr-token")
    async with server, ft.TcpIngress(server, ("127.0.0.1", 0), tunnel_id="i") as ingress:
        host, port = server.address
        client = ft.TunnelClient(f"{host}:{port}", "instr-token", tunnel_id="i",
                                 config=ft.ClientConfig(local_addr=baddr))
        task = asyncio.create_task(client.connect_and_run())
        await server.wait_for_session("i", timeout=10)
        ih, ip = ingress.address
        if part == "new":
            for _ in range(300):
                r, w = await asyncio.open_connection(ih, ip)
                w.write(b"x" * 16)
                assert await r.readexactly(16) == b"x" * 16
                w.close()
        elif part == "none":  # setup and teardown only: subtract it from the others
            pass
        elif part == "rtt":
            r, w = await asyncio.open_connection(ih, ip)
            for _ in range(2000):
                w.write(b"y" * 64)
                await r.readexactly(64)
            w.close()
        else:
            r, w = await asyncio.open_connection(ih, ip)
            chunk = b"z" * 262144
            for _ in range(128):
                w.write(chunk)
                await w.drain()
            w.write_eof()
            assert int(await r.read()) == 128 * len(chunk)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    backend.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1] if len(sys.argv) > 1 else "new"))
