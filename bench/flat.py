"""Issue 14 row 8 in one process: does the server's cost stay flat as work grows?

    python bench/flat.py [--rounds N] [--handshakes K] [--opens K] [--pings K] [--sessions N]
                         [--streams N] [--loop uvloop|asyncio] [--json FILE]

Two figures, each measured on two tunnel servers side by side in one event loop (so the same
process load hits both), in turns (few, many, few, many, ...), medians over the rounds:

* **handshake**: wall time of ``TunnelClient.connect`` (TCP connect to HandshakeAck) on a
  server with no other session against one with ``--sessions`` (999) other sessions connected;
  and the CPU time (``time.process_time``) of the whole cycle: the handshake, the session closed
  and forgotten by the server. Both ends run in this process, so the figures are both sides'.
  Both servers also share this process's heap, so a cost that grows with the objects a process
  holds (a full collection of the cyclic GC, cache misses) hits both alike here: ``python
  bench/speed.py --phases handshake`` has each server in a process of its own.
* **stream open**: CPU microseconds (``time.process_time``) per visitor of the unnamed TCP
  ingress (``TcpIngress`` without a tunnel id: the oldest session offering tcp, as the CLI's
  ``--tcp-bind``) — connect, 64-byte echo through the tunnel, close — on a session with 10 idle
  streams open against one with ``--streams`` (9,990); and the 64-byte ping-pong RTT on one
  visitor connection of each. The idle streams are opened by the server on the session and held
  by the client (no sockets behind them); the measured streams are echoed by the client.

The benchmark raises ``max_sessions`` in its own ``ServerConfig`` (the defaults stay as they are).
Ratios are many / few; issue 14's target is <= 1.20 for each.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from typing import Any, Dict, List, Tuple

import ferrotunnel as ft

TOKEN = "flat-bench-token-0123456789"
IDLE = ("x-flat-idle", "1")
SERVER_CONFIG = dict(max_sessions=1100)


async def handler(stream: Any) -> None:
    """Idle streams are held until they end; the others are echoed."""
    if IDLE in tuple(stream.headers):
        async for _ in stream:
            pass
        return
    async for chunk in stream:
        stream.write(chunk)
        await stream.drain()
    stream.write_eof()


class Side:
    """One tunnel server with its clients and an unnamed TCP ingress."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = ft.TunnelServer(("127.0.0.1", 0), TOKEN, config=ft.ServerConfig(**SERVER_CONFIG))
        self.ingress: Any = None
        self.sessions: List[Any] = []
        self.ids = itertools.count()

    async def start(self, sessions: int, streams: int) -> None:
        await self.server.start()
        self.ingress = ft.TcpIngress(self.server, ("127.0.0.1", 0))
        await self.ingress.start()
        for _ in range(sessions):
            self.sessions.append(await self.client().connect(handler))
        if streams:
            srv_session = await self.server.wait_for_session(self.sessions[0].tunnel_id, timeout=10)
            for _ in range(streams):
                srv_session.open_stream_nowait(ft.Protocol.TCP, headers=(IDLE,))
            while len(self.sessions[0].multiplexer) < streams:
                await asyncio.sleep(0.01)

    def client(self) -> ft.TunnelClient:
        return ft.TunnelClient(self.server.address, TOKEN, tunnel_id=f"{self.name}{next(self.ids)}")

    async def handshake(self) -> Tuple[float, float]:
        """(wall seconds to the HandshakeAck, CPU seconds of the whole cycle: handshake, close,
        and the server forgetting the session)."""
        base = len(self.server.sessions)
        client = self.client()
        c0 = time.process_time()
        t0 = time.perf_counter()
        session = await client.connect(handler)
        dt = time.perf_counter() - t0
        session.close()
        while len(self.server.sessions) > base:
            await asyncio.sleep(0)
        return dt, time.process_time() - c0

    async def opens(self, n: int) -> float:
        """CPU seconds per visitor (connect, 64-byte echo, close) over ``n`` visitors."""
        host, port = self.ingress.address
        payload = b"x" * 64
        c0 = time.process_time()
        for _ in range(n):
            r, w = await asyncio.open_connection(host, port)
            w.write(payload)
            got = await r.readexactly(64)
            assert got == payload
            w.close()
            await w.wait_closed()
        return (time.process_time() - c0) / n

    async def rtt(self, n: int) -> float:
        """Median 64-byte round trip over one visitor connection."""
        r, w = await asyncio.open_connection(*self.ingress.address)
        payload = b"y" * 64
        times = []
        for i in range(n + 50):
            t0 = time.perf_counter()
            w.write(payload)
            await r.readexactly(64)
            if i >= 50:
                times.append(time.perf_counter() - t0)
        w.close()
        return statistics.median(times)

    async def close(self) -> None:
        for s in self.sessions:
            s.close()
        await self.ingress.close()
        await self.server.close()


async def main(args: argparse.Namespace) -> Dict[str, Any]:
    few_h, many_h = Side("hf"), Side("hm")
    few_s, many_s = Side("sf"), Side("sm")
    t0 = time.perf_counter()
    await few_h.start(0, 0)
    await many_h.start(args.sessions, 0)
    await few_s.start(1, 10)
    await many_s.start(1, args.streams)
    print(f"set up in {time.perf_counter() - t0:.1f}s: {args.sessions} sessions, {args.streams} idle streams",
          file=sys.stderr)
    res: Dict[str, List[float]] = {k: [] for k in ("hs_first", "hs_many", "cycle_first", "cycle_many",
                                                  "open_few", "open_many", "rtt_few", "rtt_many")}
    try:
        await few_s.opens(20)  # warm-up
        await many_s.opens(20)
        for r in range(args.rounds):
            pairs = [("first", few_h), ("many", many_h)]
            if r % 2:
                pairs.reverse()
            for key, side in pairs:
                runs = [await side.handshake() for _ in range(args.handshakes)]
                res[f"hs_{key}"].append(statistics.median(w for w, _ in runs))
                res[f"cycle_{key}"].append(statistics.median(c for _, c in runs))
            pairs = [("few", few_s), ("many", many_s)]
            if r % 2:
                pairs.reverse()
            for key, side in pairs:
                res[f"open_{key}"].append(await side.opens(args.opens))
                res[f"rtt_{key}"].append(await side.rtt(args.pings))
            print(f"round {r + 1}: " + " ".join(f"{k}={v[-1] * 1e6:.0f}us" for k, v in res.items()), file=sys.stderr)
    finally:
        for side in (few_h, many_h, few_s, many_s):
            await side.close()
    med = {k: statistics.median(v) for k, v in res.items()}
    table = [("new session's handshake, 1 vs %d sessions up" % args.sessions, "hs_first", "hs_many"),
             ("CPU per session (handshake, close), 1 vs %d up" % args.sessions, "cycle_first", "cycle_many"),
             ("CPU per stream open, 10 vs %d idle streams" % args.streams, "open_few", "open_many"),
             ("RTT p50, 10 vs %d idle streams" % args.streams, "rtt_few", "rtt_many")]
    print(f"{'row 8 (medians of %d rounds)' % args.rounds:52} {'few':>9} {'many':>9} {'ratio':>6}  target <= 1.20")
    for label, a, b in table:
        ratio = med[b] / med[a]
        print(f"{label:52} {med[a] * 1e6:8.0f}us {med[b] * 1e6:8.0f}us {ratio:6.2f}  {'ok' if ratio <= 1.2 else 'FAIL'}")
    return {"rounds": res, "medians": med}


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--handshakes", type=int, default=30, help="handshakes per side and round (median taken)")
    ap.add_argument("--opens", type=int, default=200, help="visitors per side and round")
    ap.add_argument("--pings", type=int, default=1000, help="round trips per side and round")
    ap.add_argument("--sessions", type=int, default=999)
    ap.add_argument("--streams", type=int, default=9990)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--json", help="write every per-round figure here")
    args = ap.parse_args()
    if args.sessions + 2 > SERVER_CONFIG["max_sessions"]:
        ap.error(f"--sessions must leave room under max_sessions={SERVER_CONFIG['max_sessions']}")
    if args.loop == "uvloop":
        import uvloop
        out = uvloop.run(main(args))
    else:
        out = asyncio.run(main(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    cli()
