"""Same-run A/B benchmark of the HTTP ingress of two commits: large downloads and small keep-alive
requests through the CLI server (``--http-bind``) and the CLI client, both from the commit's own
checkout (built as ``bench/ab.py`` builds it; the tunnel processes are checked to have loaded it).

    python bench/http_ab.py --base REF_A --head REF_B|WORKTREE [--pairs 5] [--mb 256] [--seconds 3]

The outside world — the app behind the client and the visitors in front of the ingress — is this
driver's own uvloop event loop, the same code for both sides: the app answers ``GET /big`` with a
Content-Length body of ``--mb`` MiB (1 MiB writes, with back-pressure) and ``GET /small`` with a
2-byte body; visitors download /big twice (MB/s, the better of the two) and keep 16 keep-alive
connections busy with /small for ``--seconds`` (requests/s). Runs interleave A/B (B/A on odd
pairs) after one discarded warm-up; the table shows medians and the median per-pair ratio B/A.

On a shared machine throughput follows whatever else runs; the CPU time the tunnel processes
(server and client, from /proc/PID/stat) spend per GB downloaded and per small request follows
the code much more closely, so it is shown too, for both processes and for the server alone
(lower is better; the last column is then A/B, so that above 1 still means B is better).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab  # noqa: E402  (checkout, build and environment of a commit)

TOKEN = "http-ab-token-0123456789"
SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class App(asyncio.Protocol):
    def __init__(self, mb: int) -> None:
        self.mb = mb
        self.buf = b""
        self.paused: "asyncio.Future[None] | None" = None

    def connection_made(self, transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            if head.split(b" ", 2)[1] == b"/big":
                asyncio.ensure_future(self.big())
            else:
                self.t.write(SMALL)

    async def big(self) -> None:
        chunk = b"x" * (1 << 20)
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (self.mb << 20))
        for _ in range(self.mb):
            self.t.write(chunk)
            if self.paused is not None:
                await self.paused

    def pause_writing(self) -> None:
        self.paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.paused is not None:
            self.paused.set_result(None)
            self.paused = None


class Download(asyncio.BufferedProtocol):
    def __init__(self, total: int, done: "asyncio.Future[float]") -> None:
        self.buf = bytearray(1 << 20)
        self.got = 0
        self.total = total
        self.done = done
        self.t0 = 0.0

    def connection_made(self, transport) -> None:
        self.t0 = time.perf_counter()
        transport.write(b"GET /big HTTP/1.1\r\nHost: web\r\n\r\n")

    def get_buffer(self, hint):
        return self.buf

    def buffer_updated(self, n: int) -> None:
        self.got += n
        if self.got >= self.total and not self.done.done():
            self.done.set_result(time.perf_counter() - self.t0)


class Small(asyncio.Protocol):
    def __init__(self, stop: float) -> None:
        self.stop = stop
        self.n = 0
        self.pending = 0
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.t = transport
        self.t.write(b"GET /small HTTP/1.1\r\nHost: web\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        while self.pending >= len(SMALL):
            self.pending -= len(SMALL)
            self.n += 1
            if time.perf_counter() >= self.stop:
                if not self.done.done():
                    self.done.set_result(self.n)
                return
            self.t.write(b"GET /small HTTP/1.1\r\nHost: web\r\n\r\n")


def cpu_seconds(procs) -> float:
    """User + system CPU seconds of these processes so far (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in procs:
        fields = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_run(dest: str, mb: int, seconds: float) -> dict:
    loop = asyncio.get_running_loop()
    app = await loop.create_server(lambda: App(mb), "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    tport, hport = free_port(), free_port()
    env = ab.run_env(dest)
    env["FERROTUNNEL_TOKEN"] = TOKEN
    procs = [subprocess.Popen([sys.executable, "-m", "ferrotunnel", "server", "--bind", f"127.0.0.1:{tport}",
                               "--http-bind", f"127.0.0.1:{hport}", "--log-level", "warning"], env=env, cwd=dest,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        await asyncio.sleep(0.5)
        procs.append(subprocess.Popen([sys.executable, "-m", "ferrotunnel", "client", "--server",
                                       f"127.0.0.1:{tport}", "--local-addr", f"127.0.0.1:{app_port}", "--tunnel-id",
                                       "web", "--log-level", "warning"], env=env, cwd=dest,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while True:  # ready: a request through the tunnel is answered
            try:
                r, w = await asyncio.open_connection("127.0.0.1", hport)
                w.write(b"GET /small HTTP/1.1\r\nHost: web\r\n\r\n")
                if (await asyncio.wait_for(r.readexactly(len(SMALL)), 5)) == SMALL:
                    w.close()
                    break
                w.close()
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the tunnel did not come up")
            await asyncio.sleep(0.2)
        for p in procs:  # the tunnel processes run this checkout's code
            maps = open(f"/proc/{p.pid}/maps").read()
            assert os.path.join(dest, "src", "ferrotunnel") in maps, "a tunnel process loaded another checkout"
        total = (mb << 20) + len(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (mb << 20))
        rates = []
        cpu0, srv0 = cpu_seconds(procs), cpu_seconds(procs[:1])
        for _ in range(2):
            done = loop.create_future()
            t, _p = await loop.create_connection(lambda: Download(total, done), "127.0.0.1", hport)
            secs = await asyncio.wait_for(done, 120)
            t.close()
            rates.append(mb * 1.048576 / secs)
        cpu1, srv1 = cpu_seconds(procs), cpu_seconds(procs[:1])
        stop = time.perf_counter() + seconds
        smalls = []
        for _ in range(16):
            _t, proto = await loop.create_connection(lambda: Small(stop), "127.0.0.1", hport)
            smalls.append(proto)
        t0 = time.perf_counter()
        counts = await asyncio.wait_for(asyncio.gather(*(s.done for s in smalls)), seconds + 60)
        rps = sum(counts) / (time.perf_counter() - t0)
        cpu2, srv2 = cpu_seconds(procs), cpu_seconds(procs[:1])
        for s in smalls:
            s.t.close()
        return {"download_mbps": max(rates), "small_rps": rps, "download_cpu_s_per_gb": (cpu1 - cpu0) / (2 * total / 1e9),
                "small_cpu_us_per_req": (cpu2 - cpu1) / sum(counts) * 1e6,
                "small_server_cpu_us_per_req": (srv2 - srv1) / sum(counts) * 1e6,
                "download_server_cpu_s_per_gb": (srv1 - srv0) / (2 * total / 1e9)}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        app.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    import uvloop

    work = tempfile.mkdtemp(prefix="http-ab-")
    sides = {}
    for tag, ref in (("A", args.base), ("B", args.head)):
        sha = ab.resolve(ref)
        dest = os.path.join(work, tag)
        ab.export(sha, dest)
        ab.build(dest, os.path.join(work, f"build-{tag}.log"))
        sides[tag] = (sha, dest)
        print(f"{tag}: {ref} ({sha[:10]}) in {dest}", flush=True)
    runner = uvloop.new_event_loop  # each run gets a fresh loop
    results = {"A": [], "B": []}
    order = [("A", "B") if i % 2 == 0 else ("B", "A") for i in range(args.pairs)]
    _run(runner, sides["A"][1], args)  # warm-up, discarded
    for pair in order:
        for tag in pair:
            res = _run(runner, sides[tag][1], args)
            results[tag].append(res)
            print(f"  {tag}: download {res['download_mbps']:.0f} MB/s ({res['download_cpu_s_per_gb']:.2f} CPU s/GB), "
                  f"small {res['small_rps']:.0f} req/s ({res['small_cpu_us_per_req']:.0f} CPU us/req)", flush=True)
    print(f"\n{'row':<26}{'A median':>12}{'B median':>12}{'B/A per pair (median, range)':>34}")
    for key, label in (("download_mbps", "download MB/s"), ("small_rps", "small keep-alive req/s"),
                       ("download_cpu_s_per_gb", "download CPU s/GB (A/B)"),
                       ("small_cpu_us_per_req", "small CPU us/req (A/B)"),
                       ("download_server_cpu_s_per_gb", "  server only (A/B)"),
                       ("small_server_cpu_us_per_req", "  server only (A/B)")):
        a = [r[key] for r in results["A"]]
        b = [r[key] for r in results["B"]]
        ratios = [x / y if "cpu" in key else y / x for x, y in zip(a, b)]
        print(f"{label:<26}{statistics.median(a):>12.{2 if 'gb' in key else 0}f}"
              f"{statistics.median(b):>12.{2 if 'gb' in key else 0}f}"
              f"{statistics.median(ratios):>14.3f} ({min(ratios):.3f}..{max(ratios):.3f})")


def _run(runner, dest: str, args) -> dict:
    loop = runner()
    try:
        return loop.run_until_complete(one_run(dest, args.mb, args.seconds))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
