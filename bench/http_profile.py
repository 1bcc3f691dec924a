"""Profile of the HTTP ingress under ``bench/http_ab.py``'s load: the CLI server of this checkout
runs under cProfile (the client and the app as in http_ab), visitors make ``--mode small``
keep-alive requests (16 connections, ``--seconds``) or ``--mode big`` downloads (``--mb`` MiB);
the server's profile is written to ``--out`` and its top functions printed. The profiler counts
the process's CPU time (``time.process_time``), not wall time, so what other processes on the
machine do shows less. ``--checkout DIR`` profiles another checkout (built in place, e.g. one
``bench/http_ab.py`` made) with this driver.

    python bench/http_profile.py --mode small --seconds 5 --out /tmp/small.prof [--checkout DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import http_ab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Runs ``python -m ferrotunnel ARGS`` under cProfile with CPU time; the profile is written when it ends.
BOOT = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["ferrotunnel"] + sys.argv[2:]
prof = cProfile.Profile(time.process_time)
prof.enable()
try:
    runpy.run_module("ferrotunnel", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
"""


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    app = await loop.create_server(lambda: http_ab.App(args.mb), "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    tport, hport = http_ab.free_port(), http_ab.free_port()
    root = os.path.abspath(args.checkout)
    env = dict(os.environ, FERROTUNNEL_TOKEN=http_ab.TOKEN, PYTHONPATH=os.path.join(root, "src"))
    server = subprocess.Popen([sys.executable, "-c", BOOT, os.path.abspath(args.out), "server",
                               "--bind", f"127.0.0.1:{tport}", "--http-bind", f"127.0.0.1:{hport}",
                               "--log-level", "warning"], env=env, cwd=root)
    client = None
    try:
        await asyncio.sleep(1.0)
        client = subprocess.Popen([sys.executable, "-m", "ferrotunnel", "client", "--server", f"127.0.0.1:{tport}",
                                   "--local-addr", f"127.0.0.1:{app_port}", "--tunnel-id", "web",
                                   "--log-level", "warning"], env=env, cwd=root)
        deadline = time.monotonic() + 20
        while True:
            try:
                r, w = await asyncio.open_connection("127.0.0.1", hport)
                w.write(b"GET /small HTTP/1.1\r\nHost: web\r\n\r\n")
                ok = (await asyncio.wait_for(r.readexactly(len(http_ab.SMALL)), 5)) == http_ab.SMALL
                w.close()
                if ok:
                    break
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the tunnel did not come up")
            await asyncio.sleep(0.2)
        if args.mode == "big":
            total = (args.mb << 20) + len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (args.mb << 20))
            for _ in range(2):
                done = loop.create_future()
                t, _p = await loop.create_connection(lambda: http_ab.Download(total, done), "127.0.0.1", hport)
                secs = await asyncio.wait_for(done, 120)
                t.close()
                print(f"download {args.mb * 1.048576 / secs:.0f} MB/s")
        else:
            stop = time.perf_counter() + args.seconds
            smalls = []
            for _ in range(16):
                _t, proto = await loop.create_connection(lambda: http_ab.Small(stop), "127.0.0.1", hport)
                smalls.append(proto)
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(s.done for s in smalls))
            print(f"small: {sum(counts)} requests, {sum(counts) / (time.perf_counter() - t0):.0f} req/s (under the profiler)")
            for s in smalls:
                s.t.close()
    finally:
        # the server first: it writes its profile when it ends (each side waits up to 10 s for open streams)
        server.send_signal(signal.SIGTERM)
        if client is not None:
            client.terminate()
        for proc in (server, client):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        app.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("small", "big"), default="small")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--out", default="http-ingress.prof")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--checkout", default=ROOT, help="the checkout whose server and client run (default: this one)")
    args = ap.parse_args()
    import uvloop

    uvloop.run(run(args))
    pstats.Stats(args.out).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
