"""Same-run A/B of two source trees on issue 14's stream-setup and latency rows.

    python bench/speed_ab.py A_SRC B_SRC [--rounds 5] [--secs 2] [--threads 1,8] [--rtt] [--idle]
                             [--bulk 1,16,64 [--mib 1000]] [--fresh] [--env-a K=V] [--env-b K=V]

Each side is a CLI tunnel pair (bench/speed_cli.py) run with ``PYTHONPATH=<side's src>`` (build
the compiled kernel in each tree first: ``python setup.py build_ext --inplace``); loadgen.c is the
visitor and the backend. Rounds run the sides in turns (A, B, B, A, ...) so drift hits both alike.
Printed per side: medians of new streams/s, CPU microseconds per stream open (both tunnel
processes' CPU seconds over the run / streams opened), RTT p50/p99, idle KiB per stream, and with
``--bulk`` MB/s and CPU seconds per GB of one-way bulk over that many streams (``--mib`` in all).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from typing import Sequence

import e2e
import speed_procs as sp
from speed import Loadgen, idle_growth, parse_kv  # noqa: F401  (parse_kv: Loadgen's figures)


class SideTunnel(sp.Tunnel):
    def __init__(self, name: str, procs: sp.Procs, src: str, extra_env: Sequence[str] = ()) -> None:
        super().__init__(name, procs)
        self.src = os.path.abspath(src)
        self.extra_env = dict(kv.split("=", 1) for kv in extra_env)

    def _env(self, end: str) -> dict:
        env = super()._env(end)
        env["PYTHONPATH"] = self.src
        env.update(self.extra_env)
        return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--secs", type=float, default=2.0)
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--rtt", action="store_true", help="also 64-byte ping-pong")
    ap.add_argument("--pingpongs", type=int, default=5000)
    ap.add_argument("--idle", action="store_true", help="also idle memory (fresh pair per round)")
    ap.add_argument("--fresh", action="store_true",
                    help="start each side's pair afresh every round (a pair can stay slower than another for its "
                         "whole life: an A/A run with the same pairs gave 0.84 on 64-stream bulk)")
    ap.add_argument("--bulk", default="", help="also bulk over these stream counts, e.g. 1,16,64")
    ap.add_argument("--mib", type=float, default=1000.0, help="MiB per bulk run (all streams together)")
    ap.add_argument("--env-a", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for side A's processes only (repeatable)")
    ap.add_argument("--env-b", action="append", default=[], metavar="KEY=VALUE",
                    help="the same for side B (an A/B of one setting on one tree)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",") if t]
    sp.raise_fd_limit()
    figs: dict = {}

    def add(side: str, fig: str, v: float) -> None:
        figs.setdefault(fig, {}).setdefault(side, []).append(v)

    with tempfile.TemporaryDirectory(prefix="ft-ab-") as tmp, sp.Procs(tmp) as procs:
        lg = Loadgen(sp.build_loadgen(), procs)
        backend = e2e.free_port()
        lg.server(backend)
        sides = {"A": SideTunnel("A", procs, args.a, args.env_a), "B": SideTunnel("B", procs, args.b, args.env_b)}
        for s in sides.values():
            s.start(backend)
        for rnd in range(args.rounds):
            order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
            for name in order:
                t = sides[name]
                if args.fresh and rnd:
                    t.start(backend)
                for n in threads:
                    t.check()
                    c0 = e2e.cpu_seconds(t.pids)
                    r = lg.run("connrate", "127.0.0.1", t.port, n, args.secs, 10_000_000,
                               timeout=60 + 5 * args.secs, partial=True)
                    cpu = e2e.cpu_seconds(t.pids) - c0
                    add(name, f"new_{n}_per_s", r["conn_per_s"])
                    add(name, f"new_{n}_cpu_us", cpu / max(r["ok"], 1) * 1e6)
                for n in [int(x) for x in args.bulk.split(",") if x]:
                    t.check()
                    c0 = e2e.cpu_seconds(t.pids)
                    r = lg.run("bulk", "127.0.0.1", t.port, n, f"{args.mib:.0f}", 300, timeout=360)
                    add(name, f"bulk_{n}_mbps", r["MBps"])
                    add(name, f"bulk_{n}_cpu_s_gb", (e2e.cpu_seconds(t.pids) - c0) / (r["bytes"] / 1e9))
                if args.rtt:
                    r = lg.run("pingpong", "127.0.0.1", t.port, 64, args.pingpongs, 120, timeout=180)
                    add(name, "rtt_p50_us", r["p50_us"])
                    add(name, "rtt_p99_us", r["p99_us"])
                if args.idle:
                    t.start(backend)
                    first, more = idle_growth(lg, procs, t, 1000)
                    add(name, "idle_kib", first)
                    add(name, "idle_more_kib", more)  # (see speed.idle_growth)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{'figure':<18} {'A median':>10} {'B median':>10} {'B/A':>7}   A runs | B runs")
    for fig, by in figs.items():
        a, b = statistics.median(by["A"]), statistics.median(by["B"])
        runs = lambda xs: " ".join(f"{x:.0f}" if x >= 100 else f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"{fig:<18} {a:>10.1f} {b:>10.1f} {b / a:>7.3f}   {runs(by['A'])} | {runs(by['B'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
