"""Issue 14's end-to-end speed table in one run: ferrotunnel against ``relay2`` (two 1:1 uvloop
relays chained), every row with its same-run ratio and the issue's target, pass or fail.

    python bench/speed.py [--quick] [--rounds N] [--secs S] [--json FILE] [--profile]
                          [--phases bulk,rtt,open,idle,flat,handshake] [--loadgen PATH]
    python -m pytest bench/test_bench_speed.py --benchmark-only     # the same (--quick) under pytest-benchmark

How it measures (as issue 14 says): the tunnel is the CLI — ``ferrotunnel server`` with a
``--tcp-bind`` ingress and ``ferrotunnel client`` at ``--log-level warning`` (run through
``bench/speed_cli.py``, which is the command plus a profiler switch and the benchmark's raised
limits) — and the C load generator ``../shared/tools/loadgen.c`` (built with ``gcc -O2 -pthread``
into the temp directory on first use; ``--loadgen`` names another source or a built binary) is
both the visitor and the backend. ``relay2`` is bench/e2e.py's relay twice in series: the hop
structure of any two-process reverse tunnel with no framing.

Rows: bulk one way, acknowledged end to end, 256 KiB writes, sized to run about ``--secs`` (3 s)
on relay2, 1/16/64 streams, MB/s (10^6 B/s); CPU s/GB of both tunnel processes (both relays for
relay2) on the 1-stream runs; 64-byte ping-pong with TCP_NODELAY, 20,000 round trips after 500
warm-up, p50 and p99, and (no target) both processes' CPU per round trip in user space and in
the kernel; new streams/s (connect + 64-byte echo + close) in 1 and 8 blocking threads for
``--secs`` (and, no target, both processes' CPU per open with 1 thread, and with 8 split into
user space and kernel); idle memory per open
stream: RSS growth of both processes over 1,000 idle connections that each echoed one byte, on
freshly started processes each round; TLS 1.3 between the tunnel ends: bulk 1 stream (ratio to the plaintext tunnel) and CPU s/GB; the
pure-Python twins (FERROTUNNEL_NO_EXTENSIONS=1 on both ends): RTT p99 (ratio to the compiled
p99) and new streams/s with 1 thread; row 8, flatness: CPU microseconds per stream open (both
processes' CPU over a 1-thread stream-setup run / streams opened) and RTT with 9,990 idle
streams open against 10, and a new session's handshake time (TCP connect to HandshakeAck, from
this process) with 999 extra sessions connected (held by a process of their own) against the
first (two servers probed in turns, see ``handshakes``). For row 8 the benchmark
raises ``ingress_max_per_address`` and ``max_sessions`` in its own configuration (printed in the
header; the defaults stay as they are). Paths run in turns within each round (relay2, tunnel,
relay2, tunnel, ...) so drift hits both alike; figures are medians over ``--rounds`` (3; 1 with
``--quick``, which also shortens every run). Ratios are tunnel median / relay2 median.

``--profile`` adds a last step: a fresh compiled tunnel pair whose server and client each run
cProfile only during a 1-thread stream-setup run; the top functions by cumulative and by self
time of both processes are printed and written to ``--profile-dir`` (speed-profile-server.txt,
speed-profile-client.txt). cProfile sees Python functions only: time spent in uvloop's and the
compiled kernel's Cython functions (transport writes, the local connect) counts as the self time
of the Python function that called them. ``--json FILE`` keeps every per-round figure and the table.

Every process the benchmark starts is killed by its PID when the run ends, also when it fails.
On a shared machine the absolute figures move; compare the same-run ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import e2e
import speed_procs as sp

PHASES = ("bulk", "rtt", "open", "idle", "flat", "handshake")
IDLE_STREAMS = 1000  # row 5 (idle memory)
PINGPONG_WARMUP = 500  # round trips loadgen.c makes before it starts measuring
FLAT_FEW, FLAT_MANY = 10, 9990  # row 8: idle streams open on the session
EXTRA_SESSIONS = 999  # row 8: sessions connected for the handshake figure
# what the benchmark raises in its own configuration for row 8 (named ServerConfig limits)
SERVER_CONFIG = {"ingress_max_per_address": 20000, "max_sessions": 1100}


# ---------------------------------------------------------------- the load generator


def parse_kv(line: str) -> dict:
    out = {}
    for tok in line.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


class Loadgen:
    def __init__(self, binary: str, procs: sp.Procs) -> None:
        self.bin, self.procs = binary, procs

    def run(self, *args, timeout: float, partial: bool = False) -> dict:
        """Runs one loadgen command and returns its key=value figures. ``partial``: a run that
        reports failed connections (exit 2) still returns its figures (``fail`` counts them)."""
        p = self.procs.popen("loadgen", [self.bin, *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise sp.BenchError(f"loadgen {' '.join(map(str, args))}: no result within {timeout:.0f} s") from None
        finally:
            self.procs.kill(p)
        if p.returncode != 0 and not (partial and p.returncode == 2 and "fail=" in out):
            raise sp.BenchError(f"loadgen {' '.join(map(str, args))} failed ({p.returncode}): {out.strip()} {err.strip()}")
        return parse_kv(out)

    def server(self, port: int):
        p = self.procs.popen("loadgen-backend", [self.bin, "server", str(port)])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # ready once it accepts
            try:
                socket_probe(port)
                return p
            except OSError:
                if p.poll() is not None:
                    raise sp.BenchError(f"loadgen server exited: {sp.log_tail(p)}")
                time.sleep(0.05)
        raise sp.BenchError("loadgen server did not start")

    def idle(self, port: int, n: int, hold: float = 900):
        """Opens ``n`` echo connections (one byte echoed on each) and holds them; returns
        (process, connections opened). Stop it with ``procs.kill``."""
        p = self.procs.popen("loadgen-idle", [self.bin, "idle", "127.0.0.1", str(port), str(n), str(hold)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        if not line.startswith("READY"):
            self.procs.kill(p)
            raise sp.BenchError(f"loadgen idle: {line!r}")
        return p, int(line.split()[1])


def socket_probe(port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


# ---------------------------------------------------------------- measurements


class Bench:
    def __init__(self, args, procs: sp.Procs, loadgen: Loadgen) -> None:
        self.args, self.procs, self.lg = args, procs, loadgen
        self.runs: dict = {}  # figure -> path -> [value per round]
        self.meta: dict = {}

    def add(self, figure: str, path: str, value) -> None:
        self.runs.setdefault(figure, {}).setdefault(path, []).append(value)

    def bulk(self, path, streams: int, mib: float) -> None:
        path.check()
        c0 = e2e.cpu_seconds(path.pids)
        r = self.lg.run("bulk", "127.0.0.1", path.port, streams, f"{mib:.0f}", 60 + 10 * self.args.secs,
                        timeout=120 + 20 * self.args.secs)
        cpu = e2e.cpu_seconds(path.pids) - c0
        self.add(f"bulk_{streams}_mbps", path.name, r["MBps"])
        if streams == 1:
            self.add("cpu_s_per_gb", path.name, cpu / (r["bytes"] / 1e9))

    def pingpong(self, path, prefix: str = "rtt") -> None:
        path.check()
        u0, s0 = cpu_split(path.pids)
        r = self.lg.run("pingpong", "127.0.0.1", path.port, 64, self.args.pingpongs, 120, timeout=180)
        u1, s1 = cpu_split(path.pids)
        self.add(f"{prefix}_p50_us", path.name, r["p50_us"])
        self.add(f"{prefix}_p99_us", path.name, r["p99_us"])
        # where a round trip's time goes: both processes' CPU per round trip (warm-up included),
        # in user space (the relays' Python callbacks, our protocol code) and in the kernel
        trips = self.args.pingpongs + PINGPONG_WARMUP
        self.add(f"{prefix}_user_us_per_rt", path.name, (u1 - u0) / trips * 1e6)
        self.add(f"{prefix}_sys_us_per_rt", path.name, (s1 - s0) / trips * 1e6)

    def connrate(self, path, threads: int, prefix: str = "new") -> None:
        path.check()
        c0 = e2e.cpu_seconds(path.pids)
        u0, s0 = cpu_split(path.pids)
        r = self.lg.run("connrate", "127.0.0.1", path.port, threads, self.args.secs, 10_000_000,
                        timeout=60 + 5 * self.args.secs, partial=True)
        cpu = e2e.cpu_seconds(path.pids) - c0
        u1, s1 = cpu_split(path.pids)
        if r["fail"]:  # kept, and reported under the table: streams/s counts completed ones only
            self.meta.setdefault("failures", []).append(
                f"{path.name}: {prefix} {threads} thread(s): {r['fail']:.0f} of {r['ok'] + r['fail']:.0f} "
                f"stream setups failed")
        self.add(f"{prefix}_{threads}_per_s", path.name, r["conn_per_s"])
        self.add(f"{prefix}_{threads}_cpu_us_per_open", path.name, cpu / max(r["ok"], 1) * 1e6)
        # the same split as a round trip's: user space (Python, the loop) against the kernel
        self.add(f"{prefix}_{threads}_user_us_per_open", path.name, (u1 - u0) / max(r["ok"], 1) * 1e6)
        self.add(f"{prefix}_{threads}_sys_us_per_open", path.name, (s1 - s0) / max(r["ok"], 1) * 1e6)

    def idle_memory(self, path) -> None:
        first, more = idle_growth(self.lg, self.procs, path)
        self.add("idle_kib_per_stream", path.name, first)
        self.add("idle_more_kib_per_stream", path.name, more)

    def flat(self, path) -> None:
        """Row 8 on one path: stream-open CPU and RTT with FLAT_FEW, then FLAT_MANY idle open."""
        few = many = None
        try:
            few, n1 = self.lg.idle(path.port, FLAT_FEW)
            for label in ("few", "many"):
                if label == "many":
                    many, n2 = self.lg.idle(path.port, self.args.flat_many - FLAT_FEW)
                    self.meta[f"flat_{path.name}_idle_open"] = n1 + n2
                    if n1 + n2 != self.args.flat_many:
                        raise sp.BenchError(f"{path.name}: {n1 + n2} of {self.args.flat_many} idle connections")
                self.connrate(path, 1, prefix=f"flat_{label}")
                self.pingpong(path, prefix=f"flat_{label}_rtt")
        finally:
            self.procs.kill(many)
            self.procs.kill(few)


def idle_growth(lg: "Loadgen", procs: sp.Procs, path, n: int = IDLE_STREAMS) -> tuple:
    """KiB of RSS per idle stream on a fresh pair ``path`` (both processes): over the first ``n``
    (the row), and over ``n`` more opened while the first stay (information: the RSS at a fresh
    process's baseline depends on whether malloc had just trimmed its heap, about 0.2 KiB per
    stream and process either way; after the first ``n`` the heap's top is in use and the next
    ``n`` measure what a stream holds)."""
    time.sleep(0.5)  # let a fresh process settle
    before = e2e.rss_kib(path.pids)
    p, k = lg.idle(path.port, n)
    p2 = None
    try:
        time.sleep(1.0)
        middle = e2e.rss_kib(path.pids)
        p2, k2 = lg.idle(path.port, n)
        time.sleep(1.0)
        after = e2e.rss_kib(path.pids)
    finally:
        procs.kill(p)
        procs.kill(p2)
    if k != n or k2 != n:
        raise sp.BenchError(f"{path.name}: only {k} and {k2} of {n} idle connections opened")
    return (middle - before) / n, (after - middle) / n


def cpu_split(pids: list) -> tuple:
    """(user, system) CPU seconds used so far by ``pids`` together (``/proc/PID/stat``, in clock
    ticks: over a 20,000-round-trip run of ~3 s an error under 1 %)."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user, system = user + int(fields[11]), system + int(fields[12])
    return user / tick, system / tick


def _cpu_ns(pid: int) -> int:
    """CPU nanoseconds used so far by every thread of ``pid`` (``/proc/PID/task/*/schedstat``:
    exact, unlike the 10 ms ticks of ``/proc/PID/stat``)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that just ended
            pass
    return total


async def _probes(ports: list, pids: list, backend_port: int, count: int, tag: str) -> list:
    """``count`` new sessions on each server (tunnel ``ports[k]``, process ``pids[k]``), in turns:
    one on each server per turn, the order reversed every other turn, each closed again before the
    next (after 5 turns that are not counted: the first connections of a loop pay for warming up).
    Returns per server ([seconds from TCP connect to HandshakeAck], [server CPU seconds of one
    whole cycle: from one probe's connect to the next's on that server, so its handshake, the
    close and whatever else the server did meanwhile, such as its sessions' heartbeats])."""
    import ferrotunnel as ft

    cfg = ft.ClientConfig(local_addr=("127.0.0.1", backend_port))
    warm = 5
    out: list = [([], []) for _ in ports]
    last: list = [None] * len(ports)
    for i in range(count + warm + 1):
        order = list(range(len(ports)))
        if i % 2:
            order.reverse()
        for k in order:
            cpu = _cpu_ns(pids[k])
            if last[k] is not None and i > warm:
                out[k][1].append((cpu - last[k]) / 1e9)
            last[k] = cpu
            if i == count + warm:  # (this turn only closes the last cycle's CPU figure)
                continue
            c = ft.TunnelClient(f"127.0.0.1:{ports[k]}", sp.TOKEN, tunnel_id=f"probe-{tag}-{k}-{i}", config=cfg)
            t0 = time.perf_counter()
            await c.connect()
            if i >= warm:
                out[k][0].append(time.perf_counter() - t0)
            await c.close()
            await asyncio.sleep(0.001)  # (the server ends the cycle before its CPU is read again)
    return out


async def _hold_sessions(port: int, backend_port: int, count: int) -> None:
    """The ``--role-hold`` process: ``count`` sessions held open (in a process of their own, so
    the probes' timing includes no client-side cost of them) until stdin closes."""
    import ferrotunnel as ft

    cfg = ft.ClientConfig(local_addr=("127.0.0.1", backend_port))
    held = []
    sem = asyncio.Semaphore(16)

    async def hold(i: int) -> None:
        async with sem:
            c = ft.TunnelClient(f"127.0.0.1:{port}", sp.TOKEN, tunnel_id=f"held-{i}", config=cfg)
            await c.connect()
            held.append(c)

    loop = asyncio.get_running_loop()
    try:
        await asyncio.gather(*(hold(i) for i in range(count)))
        print(f"READY {len(held)}", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
    finally:
        await asyncio.gather(*(c.close() for c in held), return_exceptions=True)


def _import_uvloop():
    import uvloop

    return uvloop


def _hold_and_probe(args, procs: sp.Procs, first, loaded, backend_port: int, tag: str) -> dict:
    """``EXTRA_SESSIONS`` sessions held on ``loaded`` while ``args.probes`` new sessions per
    server are timed in turns (``_probes``); also the CPU the servers and the holder use, per
    second, while nothing is probed (the held sessions' heartbeats), and the holder's while probing."""
    uvloop = _import_uvloop()
    holder = procs.popen("sessions", [sys.executable, os.path.abspath(__file__), "--role-hold",
                                      str(loaded.tunnel_port), str(backend_port), str(EXTRA_SESSIONS)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        if line.split()[:2] != ["READY", str(EXTRA_SESSIONS)]:
            raise sp.BenchError(f"the session holder said {line!r}")
        time.sleep(0.5)
        pids = [first.members[0].pid, loaded.members[0].pid, holder.pid]
        c0, t0 = [_cpu_ns(p) for p in pids], time.monotonic()
        time.sleep(0.5)
        idle = [(_cpu_ns(p) - c) / 1e6 / (time.monotonic() - t0) for p, c in zip(pids, c0)]
        h0, t0 = _cpu_ns(holder.pid), time.monotonic()
        (w_first, c_first), (w_loaded, c_loaded) = uvloop.run(_probes(
            [first.tunnel_port, loaded.tunnel_port], pids[:2], backend_port, args.probes, tag))
        held = (_cpu_ns(holder.pid) - h0) / 1e6 / (time.monotonic() - t0)
    finally:
        procs.kill(holder)
    time.sleep(1.0)  # let the server drop the held sessions
    return {"wall": (w_first, w_loaded), "cpu": (c_first, c_loaded), "idle": idle, "held": held}


def handshakes(args, procs: sp.Procs, b: "Bench", backend_port: int) -> None:
    """Row 8, handshake: two fresh tunnel servers (each with its own CLI client, as ``tunnel``).
    Each round has two halves; in each half one server also holds ``EXTRA_SESSIONS`` sessions (a
    process of their own), and the servers swap roles for the second half, so neither process's
    own luck (its history, the CPU it was scheduled on) counts as the cost of the sessions. In
    each half ``--probes`` new sessions per server are timed in turns, one on each server, so the
    machine's load at any moment hits both alike. Figures per round (the mean of its two halves'
    medians): the handshake time (TCP connect to HandshakeAck, from this process) and the server
    CPU per session cycle, with no extra sessions ("first") and with them ("loaded"); their
    ratios; and how busy the servers and the session holder are (CPU ms per s) while nothing is
    probed."""
    cfg = json.dumps(SERVER_CONFIG)
    servers = [sp.Tunnel(f"hs-{name}", procs, server_config=cfg).start(backend_port) for name in "ab"]
    try:
        for r in range(args.rounds):
            got: dict = {"wf": [], "wl": [], "cf": [], "cl": []}  # the medians of each half
            for half in (0, 1):
                loaded = servers[(r + half) % 2]
                first = servers[1 - (r + half) % 2]
                for s in servers:
                    s.check()
                h = _hold_and_probe(args, procs, first, loaded, backend_port, f"r{r}h{half}")
                for key, v in zip(("wf", "wl", "cf", "cl"), h["wall"] + h["cpu"]):
                    got[key].append(statistics.median(v))
                for who, v in zip(("first", "loaded", "holder"), h["idle"]):
                    b.add("handshake_idle_cpu_ms_per_s", who, v)
                b.add("handshake_holder_cpu_ms_per_s", "probing", h["held"])
            med = {k: statistics.fmean(v) for k, v in got.items()}  # (not one median of both halves' probes:
            # when the load changes between the halves, that one lands between their distributions)
            b.add("handshake_first_ms", "tunnel", med["wf"] * 1e3)
            b.add("handshake_loaded_ms", "tunnel", med["wl"] * 1e3)
            b.add("handshake_first_cpu_us", "tunnel", med["cf"] * 1e6)
            b.add("handshake_loaded_cpu_us", "tunnel", med["cl"] * 1e6)
            b.add("handshake_ratio", "tunnel", med["wl"] / med["wf"])
            b.add("handshake_cpu_ratio", "tunnel", med["cl"] / med["cf"])
    finally:
        for s in servers:
            s.stop()
    m = {k: statistics.median(v["tunnel"]) for k, v in b.runs.items() if k.startswith("handshake_") and "tunnel" in v}
    idle = {k: statistics.median(v) for k, v in b.runs["handshake_idle_cpu_ms_per_s"].items()}
    print(f"row 8, handshake ({args.rounds} round(s) x 2 x {args.probes} per server, in turns): "
          f"{m['handshake_first_ms']:.3f} ms first, {m['handshake_loaded_ms']:.3f} ms with {EXTRA_SESSIONS} up "
          f"(per-round ratio x{m['handshake_ratio']:.2f}); server CPU per session cycle "
          f"{m['handshake_first_cpu_us']:.0f} vs {m['handshake_loaded_cpu_us']:.0f} us "
          f"(x{m['handshake_cpu_ratio']:.2f}); idle CPU ms/s: servers {idle['first']:.2f} vs "
          f"{idle['loaded']:.2f}, session holder {idle['holder']:.2f}", flush=True)


def measure(args, procs: sp.Procs, workdir: str) -> Bench:
    lg = Loadgen(sp.build_loadgen(args.loadgen), procs)
    b = Bench(args, procs, lg)
    phases = set(args.phases)
    backend_port = e2e.free_port()
    lg.server(backend_port)
    cfg = json.dumps(SERVER_CONFIG)
    relay2 = sp.Relay2("relay2", procs).start(backend_port)
    tunnel = sp.Tunnel("tunnel", procs, server_config=cfg).start(backend_port)
    tls = pure = None
    if "bulk" in phases:
        tls = sp.Tunnel("tls", procs, tls_dir=sp.certs(os.path.join(workdir, "certs")),
                        server_config=cfg).start(backend_port)
    if phases & {"rtt", "open"}:
        pure = sp.Tunnel("pure", procs, pure=True, server_config=cfg).start(backend_port)
    sizes = {}
    if "bulk" in phases:
        for streams in (1, 16, 64):  # size each run to ~secs on relay2 (a warm-up run, not counted)
            r = lg.run("bulk", "127.0.0.1", relay2.port, streams, 256, 60, timeout=120)
            sizes[streams] = min(max(r["MBps"] * 1e6 * args.secs / 1048576, 64), 32768)
        b.meta["bulk_mib"] = {str(k): round(v) for k, v in sizes.items()}
    for _ in range(args.rounds):
        if "bulk" in phases:
            for streams in (1, 16, 64):
                for path in (relay2, tunnel) + ((tls,) if streams == 1 else ()):
                    b.bulk(path, streams, sizes[streams])
        if "rtt" in phases:
            for path in (relay2, tunnel, pure):
                b.pingpong(path)
        if "open" in phases:
            for threads in (1, 8):
                for path in (relay2, tunnel) + ((pure,) if threads == 1 else ()):
                    b.connrate(path, threads)
    for p in (tls, pure):
        if p is not None:
            p.stop()
    if "idle" in phases:
        for _ in range(args.rounds):
            for path in (relay2, tunnel):
                path.start(backend_port)  # fresh processes each round
                b.idle_memory(path)
    if "flat" in phases:
        for _ in range(args.rounds):
            for path in (relay2, tunnel):
                b.flat(path)
    if "handshake" in phases:
        handshakes(args, procs, b, backend_port)
    return b


def profile(args, procs: sp.Procs, workdir: str) -> dict:
    """Both tunnel ends under cProfile during a 1-thread stream-setup run; returns {end: text}."""
    lg = Loadgen(sp.build_loadgen(args.loadgen), procs)
    backend_port = e2e.free_port()
    backend = lg.server(backend_port)
    prefix = os.path.join(workdir, "speed-profile")
    tunnel = sp.Tunnel("profiled", procs, profile=prefix).start(backend_port)
    try:
        lg.run("connrate", "127.0.0.1", tunnel.port, 1, 0.5, 10_000_000, timeout=60)  # warm-up
        for p in tunnel.members:
            os.kill(p.pid, signal.SIGUSR1)
        time.sleep(0.2)
        r = lg.run("connrate", "127.0.0.1", tunnel.port, 1, args.secs, 10_000_000, timeout=60 + 5 * args.secs)
        for p in tunnel.members:
            os.kill(p.pid, signal.SIGUSR2)
        out = {"conn_per_s_under_profile": r["conn_per_s"]}
        for end in ("server", "client"):
            path = f"{prefix}-{end}.txt"
            deadline = time.monotonic() + 60
            while not os.path.exists(path):
                tunnel.check()
                if time.monotonic() > deadline:
                    raise sp.BenchError(f"no profile from the {end}")
                time.sleep(0.1)
            with open(path) as f:
                out[end] = f.read()
            if args.profile_dir:
                os.makedirs(args.profile_dir, exist_ok=True)
                shutil.copy(path, os.path.join(args.profile_dir, f"speed-profile-{end}.txt"))
        return out
    finally:
        tunnel.stop()
        procs.kill(backend)


# ---------------------------------------------------------------- the table


def _med(runs: dict, figure: str, path: str):
    vals = runs.get(figure, {}).get(path)
    return statistics.median(vals) if vals else None


def _div(a, b):
    return a / b if a is not None and b else None


def rows(runs: dict, many: int = FLAT_MANY) -> list:
    """The table's rows from {figure: {path: [per-round values]}}: each row has label, unit,
    ferrotunnel, relay2, ratio (÷ relay2), target, checked (the value the target is about) and
    ok (True/False; None when not measured or when the row has no target). ``many``: the idle
    streams of row 8's loaded state, for the labels."""
    m = lambda f, p="tunnel": _med(runs, f, p)  # noqa: E731
    out = []

    def row(label, unit, t, r, target=None, checked=None, ok_fn=None):
        ok = None if checked is None or ok_fn is None else bool(ok_fn(checked))  # None: no verdict
        out.append({"row": label, "unit": unit, "ferrotunnel": t, "relay2": r, "ratio": _div(t, r),
                    "target": target or "-", "checked": checked, "ok": ok})

    def vs_relay2(label, unit, fig, op, limit):
        t, r = m(fig), m(fig, "relay2")
        sign = ">=" if op == "ge" else "<="
        fn = (lambda v: v >= limit) if op == "ge" else (lambda v: v <= limit)
        row(label, unit, t, r, f"{sign} {limit:.2f}x relay2", _div(t, r), fn)

    vs_relay2("bulk, 1 stream", "MB/s", "bulk_1_mbps", "ge", 1.0)
    vs_relay2("bulk, 16 streams", "MB/s", "bulk_16_mbps", "ge", 0.95)
    vs_relay2("bulk, 64 streams", "MB/s", "bulk_64_mbps", "ge", 0.95)
    vs_relay2("CPU s/GB, 1 stream", "s/GB", "cpu_s_per_gb", "le", 1.08)
    vs_relay2("RTT p50, 64-byte ping-pong", "us", "rtt_p50_us", "le", 1.05)
    vs_relay2("RTT p99", "us", "rtt_p99_us", "le", 1.15)
    for kind, where in (("user", "user space"), ("sys", "kernel")):
        fig = f"rtt_{kind}_us_per_rt"
        row(f"RTT: CPU per round trip, {where}", "us", m(fig), m(fig, "relay2"), "(info) both processes",
            _div(m(fig), m(fig, "relay2")))
    vs_relay2("new streams/s, 1 client thread", "/s", "new_1_per_s", "ge", 1.10)
    row("new streams: CPU per open, 1 thread", "us", m("new_1_cpu_us_per_open"), m("new_1_cpu_us_per_open", "relay2"),
        "(info) both processes", _div(m("new_1_cpu_us_per_open"), m("new_1_cpu_us_per_open", "relay2")))
    vs_relay2("new streams/s, 8 client threads", "/s", "new_8_per_s", "ge", 1.30)
    for kind in ("user", "sys"):
        fig = f"new_8_{kind}_us_per_open"
        row(f"new streams, 8 threads: CPU per open, {kind}", "us", m(fig), m(fig, "relay2"),
            "(info) both processes", _div(m(fig), m(fig, "relay2")))
    t = m("idle_kib_per_stream")
    row("idle memory per open stream, both ends", "KiB", t, m("idle_kib_per_stream", "relay2"), "<= 3.0 KiB", t,
        lambda v: v <= 3.0)
    t = m("idle_more_kib_per_stream")
    row("idle memory, 1,000 more streams", "KiB", t, m("idle_more_kib_per_stream", "relay2"), "(info) both ends",
        _div(t, m("idle_more_kib_per_stream", "relay2")))
    tls, plain = m("bulk_1_mbps", "tls"), m("bulk_1_mbps")
    row("TLS 1.3: bulk, 1 stream", "MB/s", tls, m("bulk_1_mbps", "relay2"), ">= 0.65x plaintext tunnel",
        _div(tls, plain), lambda v: v >= 0.65)
    t = m("cpu_s_per_gb", "tls")
    row("TLS 1.3: CPU s/GB, 1 stream", "s/GB", t, m("cpu_s_per_gb", "relay2"), "<= 1.35 s/GB", t, lambda v: v <= 1.35)
    t = m("rtt_p99_us", "pure")
    row("pure-Python twins: RTT p99", "us", t, m("rtt_p99_us", "relay2"), "<= 2.00x compiled p99",
        _div(t, m("rtt_p99_us")), lambda v: v <= 2.0)
    row("pure-Python twins: new streams/s, 1 thread", "/s", m("new_1_per_s", "pure"), m("new_1_per_s", "relay2"))
    for fig, label, unit, target in (
            ("cpu_us_per_open", f"8: CPU per stream open, {many:,} idle open", "us", True),
            ("rtt_p50_us", f"8: RTT p50, {many:,} idle open", "us", True),
            ("rtt_p99_us", f"8: RTT p99, {many:,} idle open", "us", False)):
        few = f"flat_few_1_{fig}" if fig == "cpu_us_per_open" else f"flat_few_{fig}"
        many_fig = few.replace("few", "many")
        t = m(many_fig)
        row(label, unit, t, m(many_fig, "relay2"), "<= 1.20x with 10 open" if target else "(info) x with 10 open",
            _div(t, m(few)), (lambda v: v <= 1.2) if target else None)
    t = m("handshake_loaded_ms")
    row("8: new session's handshake, 999 sessions up", "ms", t, None, "<= 1.20x the first",
        _div(t, m("handshake_first_ms")), lambda v: v <= 1.2)
    return out


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit in ("MB/s", "/s") or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def table(rs: list) -> str:
    head = f"{'row':<46}{'ferrotunnel':>12}{'relay2':>10}{'/relay2':>9}  {'target':<27}{'checked':>8}  verdict"
    lines = [head, "-" * len(head)]
    for r in rs:
        verdict = {True: "pass", False: "FAIL", None: "-" if r["checked"] is None else "info"}[r["ok"]]
        lines.append(f"{r['row'] + ' (' + r['unit'] + ')':<46}{_fmt(r['ferrotunnel'], r['unit']):>12}"
                     f"{_fmt(r['relay2'], r['unit']):>10}{_fmt(r['ratio']):>9}  {r['target']:<27}"
                     f"{_fmt(r['checked']):>8}  {verdict}")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a short run: 1 round, 1 s runs, 5,000 round trips, 2,000 idle streams for row 8")
    ap.add_argument("--rounds", type=int, help="interleaved rounds, medians over them (default 3; --quick 1)")
    ap.add_argument("--secs", type=float, help="length of each bulk and stream-setup run (default 3; --quick 1)")
    ap.add_argument("--pingpongs", type=int, help="measured round trips per ping-pong run (default 20000)")
    ap.add_argument("--flat-many", type=int, help=f"row 8: idle streams of the 'many' state (default {FLAT_MANY})")
    ap.add_argument("--probes", type=int,
                    help="row 8: handshakes timed per server in each half of a round (default 100)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--json", help="write every per-round figure and the table to this file")
    ap.add_argument("--profile", action="store_true",
                    help="also profile both tunnel ends (cProfile) during a 1-thread stream-setup run")
    ap.add_argument("--profile-dir", default=".", help="where --profile writes speed-profile-{server,client}.txt")
    ap.add_argument("--profile-top", type=int, default=25, help="functions listed per sort order (default 25)")
    ap.add_argument("--loadgen", default="", help="loadgen.c or a built loadgen (default ../shared/tools/loadgen.c)")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("rounds", 3, 1), ("secs", 3.0, 1.0), ("pingpongs", 20000, 5000),
                              ("flat_many", FLAT_MANY, 2000), ("probes", 100, 30)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.phases = [p for p in args.phases.split(",") if p]
    bad = [p for p in args.phases if p not in PHASES]
    if bad:
        ap.error(f"unknown phase(s) {','.join(bad)}; choose from {','.join(PHASES)}")
    if args.rounds < 1 or args.secs <= 0 or args.pingpongs < 1 or args.probes < 1:
        ap.error("--rounds, --secs, --pingpongs and --probes must be positive")
    if args.flat_many <= FLAT_FEW:
        ap.error(f"--flat-many must be above {FLAT_FEW}")
    if args.profile_top < 1:
        ap.error("--profile-top must be positive")
    return args


def run(args) -> dict:
    """Measures, profiles if asked, and returns {"meta", "runs", "rows", "profile"}. Every
    process started is killed by PID before this returns or raises."""
    sp.raise_fd_limit()
    os.environ["FT_SPEED_PROFILE_TOP"] = str(args.profile_top)
    workdir = tempfile.mkdtemp(prefix="ft-speed-")
    try:
        with sp.Procs(workdir) as procs:
            b = measure(args, procs, workdir) if args.phases else None
            prof = profile(args, procs, workdir) if args.profile else None
    except BaseException:
        print(f"benchmark failed; the processes' logs are kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    runs = b.runs if b else {}
    return {"meta": dict(b.meta if b else {}, rounds=args.rounds, secs=args.secs, pingpongs=args.pingpongs,
                         flat_many=args.flat_many, server_config=SERVER_CONFIG, phases=args.phases),
            "runs": runs, "rows": rows(runs, args.flat_many), "profile": prof}


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut the clean-up short
        raise SystemExit(128 + signum)  # unwinds through Procs.close: children are killed

    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    args = parse_args(argv)
    _stop_on_sigterm()
    import ferrotunnel.frames as F

    print(f"issue-14 speed table: tunnel = CLI server (--tcp-bind) + CLI client (--log-level warning), compiled "
          f"(this driver: {F.IMPLEMENTATION}); load = loadgen.c; medians of {args.rounds} interleaved round(s); "
          f"{args.secs:g} s runs; {args.pingpongs} round trips; row 8 with {args.flat_many} idle streams and "
          f"{EXTRA_SESSIONS} extra sessions; raised for row 8: {SERVER_CONFIG}", flush=True)
    t0 = time.monotonic()
    out = run(args)
    print(table(out["rows"]))
    print(f"({time.monotonic() - t0:.0f} s; bulk sizes MiB {out['meta'].get('bulk_mib')})")
    for line in out["meta"].get("failures", []):
        print(f"warning: {line}")
    if out["profile"]:
        print(f"\n== profile of a 1-thread stream-setup run ({out['profile']['conn_per_s_under_profile']:.0f} "
              f"streams/s under cProfile)")
        for end in ("server", "client"):
            print(f"\n==== {end}\n{out['profile'][end]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    failed = [r["row"] for r in out["rows"] if r["ok"] is False]
    print(f"{len(failed)} row(s) below target" if failed else "every measured row meets its target")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--role-hold"]:
        _import_uvloop().run(_hold_sessions(*map(int, sys.argv[2:5])))
    else:
        sys.exit(main())
