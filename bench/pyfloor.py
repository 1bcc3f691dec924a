"""How far ferrotunnel is from the floor of any tunnel written in Python: relay2, the minimal
Python multiplexer of ``bench/pymux.py`` and the ferrotunnel CLI pair, in turns, in one run.

    python bench/pyfloor.py [--rounds 3] [--rtt 20000] [--secs 3]

Rows (medians over rounds, each path measured once per round in the order relay2, pymux,
tunnel): RTT p50/p99 of 64-byte ping-pong (TCP_NODELAY, 500 warm-up round trips), new streams per
second (connect, 64-byte echo, close) with 1 and 8 client threads, and the CPU both relaying
processes spent per round trip and per stream open (user + kernel, from /proc). Each figure is
printed with its ratio to relay2; the ``pymux ÷ relay2`` column is what Python on uvloop costs a
multiplexed tunnel before any protocol, and ``tunnel ÷ pymux`` what ferrotunnel adds to it.
Load: the C load generator ``../shared/tools/loadgen.c`` (built with gcc on first use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e  # noqa: E402
import speed_procs as sp  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


class PyMux(sp.Path):
    """``bench/pymux.py`` server and client in front of the backend."""

    def start(self, backend_port: int) -> "PyMux":
        self.stop()
        tunnel, self.port = e2e.free_port(), e2e.free_port()
        cmd = [sys.executable, os.path.join(HERE, "pymux.py")]
        server = self.procs.popen("pymux-server", cmd + ["server", str(tunnel), str(self.port)])
        time.sleep(0.3)  # (the server listens for its client first)
        client = self.procs.popen("pymux-client", cmd + ["client", str(tunnel), str(backend_port)])
        sp.wait_for_line(server, r"^ready")
        self.members += [server, client]
        return self


def cpu(pids) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def loadgen(exe, *args, timeout=120.0) -> dict:
    out = subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise sp.BenchError(f"loadgen {args}: {out.stdout} {out.stderr}")
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def measure(exe, path, args) -> dict:
    path.check()
    row = {}
    c0 = cpu(path.pids)
    r = loadgen(exe, "pingpong", "127.0.0.1", path.port, 64, args.rtt, 300)
    c1 = cpu(path.pids)
    row["rtt_p50"], row["rtt_p99"] = float(r["p50_us"]), float(r["p99_us"])
    row["cpu_rt"] = (c1 - c0) / (args.rtt + 500) * 1e6
    for threads in (1, 8):
        c0 = cpu(path.pids)
        r = loadgen(exe, "connrate", "127.0.0.1", path.port, threads, args.secs, 1_000_000)
        c1 = cpu(path.pids)
        if int(r.get("fail", "0")):
            raise sp.BenchError(f"{path.name}: {r['fail']} failed connections")
        row[f"new_{threads}"] = float(r["conn_per_s"])
        if threads == 1:
            row["cpu_open"] = (c1 - c0) / max(int(r["ok"]), 1) * 1e6
    path.check()
    return row


ROWS = (("rtt_p50", "RTT p50, us", False), ("rtt_p99", "RTT p99, us", False),
        ("cpu_rt", "CPU per round trip, us", False), ("new_1", "new streams/s, 1 thread", True),
        ("new_8", "new streams/s, 8 threads", True), ("cpu_open", "CPU per open (1 thread), us", False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rtt", type=int, default=20000, help="round trips per RTT run (after 500 warm-up)")
    ap.add_argument("--secs", type=int, default=3, help="seconds per stream-setup run")
    ap.add_argument("--loadgen", default="", help="loadgen.c or a built loadgen")
    args = ap.parse_args()
    sp.raise_fd_limit()
    with tempfile.TemporaryDirectory() as workdir, sp.Procs(workdir) as procs:
        exe = sp.build_loadgen(args.loadgen)
        backend_port = e2e.free_port()
        procs.popen("backend", [exe, "server", str(backend_port)])
        time.sleep(0.3)
        paths = [sp.Relay2("relay2", procs).start(backend_port), PyMux("pymux", procs).start(backend_port),
                 sp.Tunnel("tunnel", procs).start(backend_port)]
        runs = {p.name: [] for p in paths}
        for r in range(args.rounds):
            for p in paths:
                runs[p.name].append(measure(exe, p, args))
                print(f"round {r + 1}/{args.rounds} {p.name}: " +
                      ", ".join(f"{k} {v:.1f}" for k, v in runs[p.name][-1].items()), flush=True)
    med = {name: {k: statistics.median(x[k] for x in rows) for k, _, _ in ROWS} for name, rows in runs.items()}
    print(f"\n{'row':32s} {'relay2':>9s} {'pymux':>9s} {'tunnel':>9s} {'pymux/r2':>9s} {'tunnel/r2':>9s} "
          f"{'tunnel/pymux':>12s}")
    for key, title, _ in ROWS:
        r2, pm, tu = med["relay2"][key], med["pymux"][key], med["tunnel"][key]
        print(f"{title:32s} {r2:9.1f} {pm:9.1f} {tu:9.1f} {pm / r2:9.2f} {tu / r2:9.2f} {tu / pm:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
