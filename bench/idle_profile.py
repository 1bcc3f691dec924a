"""Where the bytes of an idle forwarded stream go (issue 14 row 5), both tunnel ends in one process.

    python bench/idle_profile.py [--streams 1000] [--loop uvloop|asyncio] [--top 30] [--no-trace]

A tunnel server with an unnamed TCP ingress and a tunnel client forwarding to a loadgen echo
backend run in this process; loadgen's ``idle`` mode (another process) opens ``--streams``
visitor connections, each echoing one byte, and holds them. Printed: the RSS growth of this
process per stream (what bench/speed.py measures, both ends together), the tracemalloc growth per
stream by allocation site, and the growth in live objects per stream by type (gc-tracked objects
and the per-stream types, with their sizes). The RSS growth minus the tracemalloc growth is what
the event loop's transports (libuv handles, uvloop's C objects) and malloc itself cost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import subprocess
import sys
import time
import tracemalloc
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e  # noqa: E402
import speed_procs as sp  # noqa: E402

import ferrotunnel as ft  # noqa: E402

TOKEN = "idle-profile-token-0123456789"


def mallinfo() -> Dict[str, int]:
    """glibc's heap figures (mallinfo2): arena (the heap's size), in use, free, top chunk, mmapped."""
    import ctypes

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = Info
    i = fn()
    return {"heap": i.arena, "in_use": i.uordblks, "free": i.fordblks, "top": i.keepcost, "mmapped": i.hblkhd}


def live_types() -> Dict[str, int]:
    counts: Dict[str, int] = collections.Counter()
    for o in gc.get_objects():
        counts[type(o).__qualname__] += 1
    return counts


def type_sizes() -> Dict[str, int]:
    sizes: Dict[str, int] = collections.Counter()
    for o in gc.get_objects():
        sizes[type(o).__qualname__] += sys.getsizeof(o)
    return sizes


def explain(names: str, k: int) -> None:
    """For each type named: what refers to its live objects (by referrer type and attribute)."""
    for name in names.split(","):
        objs = [o for o in gc.get_objects() if type(o).__qualname__ == name]
        by: Dict[str, int] = collections.Counter()
        sizes: Dict[str, int] = collections.Counter()
        for o in objs:
            refs = [r for r in gc.get_referrers(o) if r is not objs]
            desc = ",".join(sorted({type(r).__qualname__ for r in refs})) or "-"
            if isinstance(o, (list, dict, set, tuple)):
                desc += f" len={len(o)}"
            by[desc] += 1
            sizes[desc] += sys.getsizeof(o)
        print(f"\n-- {name}: {len(objs)} live, by referrer")
        for desc, c in by.most_common(12):
            print(f"{c / k:6.2f}/stream {sizes[desc] / max(c, 1):7.0f} B each  {desc}")
        del objs


def holders(site: str, k: int) -> None:
    """Who holds the untracked objects (bytes, str, int) allocated at ``site`` ("file.py:line")."""
    by: Dict[str, int] = collections.Counter()
    for o in gc.get_objects():
        for r in gc.get_referents(o):
            if type(r) in (bytes, str, int, float, memoryview, bytearray):
                tb = tracemalloc.get_object_traceback(r)
                if tb is not None and any(f"{os.path.basename(f.filename)}:{f.lineno}" == site for f in tb):
                    by[f"{type(o).__qualname__} -> {type(r).__name__}"] += 1
    print(f"\n-- holders of objects made at {site}")
    for desc, c in by.most_common(10):
        print(f"{c / k:6.2f}/stream  {desc}")


async def main_async(args: Any, lg: str, backend: int) -> None:
    server = ft.TunnelServer(("127.0.0.1", 0), TOKEN)
    await server.start()
    ingress = ft.TcpIngress(server, ("127.0.0.1", 0))
    await ingress.start()
    client = ft.TunnelClient(server.address, TOKEN, local_addr=("127.0.0.1", backend))
    task = asyncio.get_running_loop().create_task(client.connect_and_run())
    while not server.registry.local_sessions():
        await asyncio.sleep(0.05)
    port = ingress.address[1]

    async def hold(n: int):
        p = subprocess.Popen([lg, "idle", "127.0.0.1", str(port), str(n), "900"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, p.stdout.readline)
        if not line.startswith("READY"):
            raise RuntimeError(line)
        return p, int(line.split()[1])

    # warm up once (pools, code paths, caches), as nothing of the real run would count
    p, _ = await hold(50)
    await asyncio.sleep(0.5)
    p.kill()
    p.wait()
    await asyncio.sleep(1.0)
    gc.collect()

    n = args.streams
    pid = [os.getpid()]
    if args.trace:
        tracemalloc.start(args.frames)
    gc.collect()
    t0 = live_types()
    s0 = type_sizes()
    snap0 = tracemalloc.take_snapshot() if args.trace else None
    rss0 = e2e.rss_kib(pid)
    m0 = mallinfo()
    p, k = await hold(n)
    await asyncio.sleep(1.0)
    rss1 = e2e.rss_kib(pid)
    m1 = mallinfo()
    snap1 = tracemalloc.take_snapshot() if args.trace else None
    gc.collect()
    t1 = live_types()
    s1 = type_sizes()
    print(f"streams held: {k}; RSS growth {(rss1 - rss0) / k:.3f} KiB/stream (this process = both ends)")
    if m0:
        print("malloc heap (KiB) before -> after: " + ", ".join(f"{n} {m0[n] >> 10} -> {m1[n] >> 10}" for n in m0))
    if args.trace:
        traced = sum(st.size_diff for st in snap1.compare_to(snap0, "filename"))
        print(f"tracemalloc growth {traced / k:.1f} B/stream; outside it {(rss1 - rss0) * 1024 / k - traced / k:.0f} "
              "B/stream (loop transports, malloc)")
        key = "traceback" if args.frames > 1 else "lineno"
        stats = snap1.compare_to(snap0, key)
        print(f"\n-- top {args.top} allocation sites by growth (B/stream, blocks/stream)")
        for st in stats[: args.top]:
            if st.size_diff / k < 2:
                continue
            where = " <- ".join(f"{os.path.relpath(f.filename, os.path.dirname(HERE)) if 'ferrotunnel' in f.filename else os.path.basename(f.filename)}:{f.lineno}"
                                for f in st.traceback)
            print(f"{st.size_diff / k:8.1f} {st.count_diff / k:6.2f}  {where}")
    print("\n-- gc-tracked objects per stream by type (count, bytes incl. __dict__ not)")
    rows = []
    for name in set(t0) | set(t1):
        d = t1.get(name, 0) - t0.get(name, 0)
        if abs(d) >= k // 2:
            rows.append((d / k, (s1.get(name, 0) - s0.get(name, 0)) / k, name))
    for c, b, name in sorted(rows, key=lambda r: -r[1]):
        print(f"{c:6.2f} {b:8.1f}  {name}")
    if args.who:
        explain(args.who, k)
    if args.trace and args.holders:
        holders(args.holders, k)
    p.kill()
    p.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ingress.close()
    await server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--who", default="", help="types to explain by referrer, e.g. list,method")
    ap.add_argument("--holders", default="", help="file.py:line: who holds the bytes/str/int made there")
    ap.add_argument("--no-trace", dest="trace", action="store_false")
    args = ap.parse_args()
    sp.raise_fd_limit()
    lg = sp.build_loadgen()
    backend = e2e.free_port()
    bp = subprocess.Popen([lg, "server", str(backend)])
    try:
        time.sleep(0.3)
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(main_async(args, lg, backend))
        else:
            asyncio.run(main_async(args, lg, backend))
    finally:
        bp.kill()
        bp.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
