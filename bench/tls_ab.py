"""Same-run A/B of the TLS tunnel (issue 14, row 6): one bulk stream through a TLS 1.3 tunnel of
each side, and the plaintext tunnel of side A for the ratio, interleaved.

    python bench/tls_ab.py --a SRC_A --b SRC_B [--pairs 5] [--mib 1024] [--json FILE]
                           [--profile-dir DIR] [--perf-dir DIR] [--b-env NAME=VALUE]

``SRC_A``/``SRC_B`` are ``src`` directories of two checkouts (each with its extensions built in
place); every tunnel process runs with ``PYTHONPATH`` set to its side's directory, and the
benchmark checks in ``/proc/PID/maps`` that the compiled codec it loaded comes from there. The
tunnel is the CLI pair of bench/speed_procs.py (``--tcp-bind`` ingress, ``--log-level
warning``), the load is ``../shared/tools/loadgen.c`` (bulk, 1 stream, 256 KiB writes,
acknowledged end to end). Per run: MB/s and CPU seconds per GB of both tunnel processes. Each
pair runs plain, A, B (B before A on odd pairs); figures are medians over pairs.

``--profile-dir``: afterwards, one more bulk run per side under cProfile (both ends; speed_cli's
SIGUSR1/SIGUSR2) with the top functions written there. ``--perf-dir``: the same under
``perf record -g`` of both PIDs (needs ``perf``), a ``perf report --no-children`` summary each.
Every process started is killed by its PID when the run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e  # noqa: E402
import speed_procs as sp  # noqa: E402
from speed import Loadgen  # noqa: E402


class SideTunnel(sp.Tunnel):
    """A tunnel pair whose processes import ferrotunnel from ``src``."""

    def __init__(self, name: str, procs: sp.Procs, src: str, extra_env: Optional[dict] = None, **kw) -> None:
        super().__init__(name, procs, **kw)
        self.src = os.path.abspath(src)
        self.extra_env = extra_env or {}

    def _env(self, end: str) -> dict:
        env = super()._env(end)
        env["PYTHONPATH"] = self.src
        env.update(self.extra_env)
        return env

    def start(self, backend_port: int) -> "SideTunnel":
        super().start(backend_port)
        for p in self.members:
            with open(f"/proc/{p.pid}/maps") as f:
                maps = f.read()
            if os.path.join(self.src, "ferrotunnel", "_frames.cpython") not in maps:
                raise sp.BenchError(f"{self.name}: {p.bench_name} did not load ferrotunnel from {self.src}")
        return self


def times(pid: int) -> tuple:
    """(user, system) CPU seconds of one process."""
    tick = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / tick, int(fields[12]) / tick


def bulk(lg: Loadgen, path: sp.Path, mib: float) -> tuple:
    """One bulk run: (MB/s, CPU s/GB of both ends, {end: (user, system) s/GB})."""
    path.check()
    t0 = [times(pid) for pid in path.pids]
    r = lg.run("bulk", "127.0.0.1", path.port, 1, f"{mib:.0f}", 120, timeout=240)
    t1 = [times(pid) for pid in path.pids]
    gb = r["bytes"] / 1e9
    ends = {end: ((b[0] - a[0]) / gb, (b[1] - a[1]) / gb) for end, a, b in zip(("server", "client"), t0, t1)}
    return r["MBps"], sum(u + s for u, s in ends.values()), ends


def profiled(lg: Loadgen, path: sp.Path, mib: float, sig_on: int, sig_off: int) -> None:
    for pid in path.pids:
        os.kill(pid, sig_on)
    time.sleep(0.2)
    bulk(lg, path, mib)
    for pid in path.pids:
        os.kill(pid, sig_off)
    time.sleep(1.0)


def perf_run(lg: Loadgen, path: sp.Path, mib: float, out_dir: str, procs: sp.Procs) -> None:
    os.makedirs(out_dir, exist_ok=True)
    recs = []
    for pid, end in zip(path.pids, ("server", "client")):
        data = os.path.join(out_dir, f"{path.name}-{end}.data")
        recs.append((procs.popen(f"perf-{end}", ["perf", "record", "-g", "-F", "999", "-p", str(pid), "-o", data],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), data, end))
    time.sleep(0.5)
    bulk(lg, path, mib)
    for p, data, end in recs:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=30)
        with open(os.path.join(out_dir, f"{path.name}-{end}.txt"), "w") as f:
            subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio", "--percent-limit", "0.7",
                            "-g", "none", "--sort", "dso,symbol"], stdout=f, stderr=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="side A: a checkout's src directory")
    ap.add_argument("--b", required=True, help="side B: a checkout's src directory")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--mib", type=float, default=1024, help="MiB per bulk run")
    ap.add_argument("--json")
    ap.add_argument("--profile-dir")
    ap.add_argument("--perf-dir")
    ap.add_argument("--loadgen", default="")
    ap.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for side B's processes only (e.g. a malloc tunable)")
    args = ap.parse_args()
    runs: dict = {"plain": [], "A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="ft-tls-ab-") as work, sp.Procs(work) as procs:
        lg = Loadgen(sp.build_loadgen(args.loadgen), procs)
        backend = e2e.free_port()
        lg.server(backend)
        certs = sp.certs(os.path.join(work, "certs"))
        prof = os.path.join(args.profile_dir, "prof") if args.profile_dir else ""
        if args.profile_dir:
            os.makedirs(args.profile_dir, exist_ok=True)
        paths = {
            "plain": SideTunnel("plain", procs, args.a).start(backend),
            "A": SideTunnel("A", procs, args.a, tls_dir=certs, profile=prof and prof + "-A").start(backend),
            "B": SideTunnel("B", procs, args.b, extra_env=dict(kv.split("=", 1) for kv in args.b_env), tls_dir=certs, profile=prof and prof + "-B").start(backend),
        }
        bulk(lg, paths["A"], 256)  # warm-up
        bulk(lg, paths["B"], 256)
        for i in range(args.pairs):
            order = ("plain", "A", "B") if i % 2 == 0 else ("plain", "B", "A")
            for name in order:
                mbps, spg, ends = bulk(lg, paths[name], args.mib)
                runs[name].append((mbps, spg, ends))
                detail = "  ".join(f"{end} usr {u:.2f} sys {s:.2f}" for end, (u, s) in ends.items())
                print(f"pair {i} {name:5s} {mbps:8.0f} MB/s {spg:6.3f} CPU s/GB  ({detail})", flush=True)
        table = {}
        for name, rs in runs.items():
            table[name] = {"MBps": statistics.median(r[0] for r in rs), "cpu_s_per_gb": statistics.median(r[1] for r in rs)}
        plain = table["plain"]["MBps"]
        print(f"\n{'path':6s} {'MB/s':>8s} {'x plain':>8s} {'CPU s/GB':>9s}")
        for name, t in table.items():
            print(f"{name:6s} {t['MBps']:8.0f} {t['MBps'] / plain:8.2f} {t['cpu_s_per_gb']:9.3f}")
        ratios = [b[1] / a[1] for a, b in zip(runs["A"], runs["B"])]
        print(f"B/A CPU s/GB per pair: median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}..{max(ratios):.3f})")
        if args.profile_dir:
            for name in ("A", "B"):
                profiled(lg, paths[name], args.mib / 2, signal.SIGUSR1, signal.SIGUSR2)
            print(f"profiles in {args.profile_dir}")
        if args.perf_dir:
            for name in ("A", "B"):
                perf_run(lg, paths[name], args.mib / 2, args.perf_dir, procs)
            print(f"perf reports in {args.perf_dir}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"runs": runs, "table": table, "b_over_a_cpu": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
