"""``ferrotunnel demo``: a server, a client and a small HTTP app in one process, on loopback,
with requests sent through the tunnel's HTTP ingress and a short summary at the end."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import List, Tuple

__all__ = ["run_demo"]

BODY_SIZES = (512, 4096, 65536)
_BODIES = {n: bytes(i % 251 for i in range(n)) for n in BODY_SIZES}


async def _app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive HTTP/1.1 app: GET /bytes/N answers N bytes."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            n = int(path.rsplit("/", 1)[1]) if path.startswith("/bytes/") else 2
            body = _BODIES.get(n) or bytes(i % 251 for i in range(min(n, 1 << 20)))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str) -> Tuple[int, bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ferrotunnel-demo\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, await reader.readexactly(length)


def _progress(done: int, total: int, tty: bool) -> None:
    if tty:
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    elif done == total or done % max(1, total // 4) == 0:
        print(f"  {done}/{total} requests", flush=True)


async def run_demo(requests: int = 300, concurrency: int = 8, cluster: bool = False) -> int:
    if cluster:  # three nodes, Redis and HAProxy as subprocesses: see demo_cluster.py
        from .demo_cluster import run_cluster_demo

        return await run_cluster_demo(requests, concurrency)
    import ferrotunnel as ft

    app = await asyncio.start_server(_app, "127.0.0.1", 0)
    app_addr = app.sockets[0].getsockname()[:2]
    token = "demo-token-" + str(time.monotonic_ns())
    server = ft.TunnelServer(("127.0.0.1", 0), token)
    async with server, ft.HttpIngress(server, ("127.0.0.1", 0)) as ingress:
        th, tp = server.address
        client = ft.TunnelClient(f"{th}:{tp}", token, tunnel_id="demo",
                                 config=ft.ClientConfig(local_addr=app_addr))
        task = asyncio.create_task(client.connect_and_run())
        session = await server.wait_for_session("demo", timeout=10)
        ih, ip = ingress.address
        print(f"ferrotunnel demo: tunnel server {th}:{tp}, HTTP ingress {ih}:{ip}, local app "
              f"{app_addr[0]}:{app_addr[1]}, session {session.id} (tunnel id 'demo')", flush=True)
        latencies: List[float] = []
        received = 0
        failures = 0
        done = 0
        tty = sys.stderr.isatty()
        queue: "asyncio.Queue[int]" = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)
        t0 = time.perf_counter()

        async def worker() -> None:
            nonlocal received, failures, done
            reader, writer = await asyncio.open_connection(ih, ip)  # keep-alive through the tunnel
            try:
                while not queue.empty():
                    i = queue.get_nowait()
                    size = BODY_SIZES[i % len(BODY_SIZES)]
                    start = time.perf_counter()
                    status, body = await _get(reader, writer, "demo", f"/bytes/{size}")
                    latencies.append(time.perf_counter() - start)
                    ok = status == 200 and body == _BODIES[size]
                    failures += not ok
                    received += len(body)
                    done += 1
                    _progress(done, requests, tty)
            finally:
                writer.close()

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        except (OSError, asyncio.IncompleteReadError) as exc:
            print(f"demo: a request failed: {exc}", file=sys.stderr)
            failures += 1
        elapsed = time.perf_counter() - t0
        # the visitors closed their keep-alive connections: let those streams end before the
        # client goes (a stream cut by the client's exit is reported as cut)
        deadline = time.monotonic() + 5
        while len(session.multiplexer) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    app.close()
    lat = sorted(latencies) or [0.0]
    print(f"requests: {done} ok of {requests}, {failures} failed, over {concurrency} keep-alive connections")
    print(f"received: {received / 1e6:.2f} MB in {elapsed:.2f} s ({received / 1e6 / elapsed:.1f} MB/s, "
          f"{done / elapsed:.0f} requests/s)")
    print(f"latency: p50 {statistics.median(lat) * 1e3:.2f} ms, p99 {lat[int(len(lat) * 0.99)] * 1e3:.2f} ms")
    return 0 if failures == 0 and done == requests else 1
