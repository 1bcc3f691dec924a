"""Cross-node route benchmark (issue 11): 1-stream bulk and 64-byte RTT through a cluster route
that crosses a node link, against a local route, beside two and three chained 1:1 relays, all in
one run.

    python bench/cluster_route.py [--rounds 3] [--mb 1024] [--quick] [--json FILE] [--python-load]

Set-up (every process on 127.0.0.1, each its own process):

* one real ``redis-server`` (tests/redis_server.py) and two cluster nodes ``a`` and ``b``, the
  ``ferrotunnel server`` command, each with a TCP ingress bound to tunnel id ``bench``;
* one ``ferrotunnel client`` connected to node a, tunnel id ``bench``, in front of the backend;
* the backend: the C load generator's server (../shared/tools/loadgen.c, built into a temporary
  directory with gcc), or bench/e2e.py's backend role with ``--python-load`` or when gcc or the
  source is missing; the bulk and RTT clients are the matching ones;
* relays: bench/e2e.py's minimal 1:1 uvloop relay role, chained.

Paths, measured in turns (relay2, relay3, local, cross, relay2, ...) for ``--rounds`` rounds:

* ``relay2``: visitor -> relay -> relay -> backend
* ``relay3``: visitor -> relay -> relay -> relay -> backend
* ``local``:  visitor -> node a's TCP ingress -> client -> backend
* ``cross``:  visitor -> node b's TCP ingress -> node link b -> a -> client -> backend

Figures: bulk MB/s (10^6 B/s of payload, one stream, one way, acknowledged by the backend at the
end), RTT p50/p99 of 64-byte ping-pong with TCP_NODELAY (--rtt round trips after 500 warm-up with
the C load generator, 100 with the Python one), CPU seconds per GB of the relaying processes
(relays; for local and cross both nodes and the client). Each figure is the median over rounds.
The check: cross/local bulk >= 0.9 x relay3/relay2 bulk (the link hop may cost at most a little
more than one more plain relay hop costs) -- printed as PASS or FAIL with its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/e2e.py: relay/backend roles and the Python load generator
sys.path.insert(0, str(HERE.parent / "tests"))  # the real redis-server helper
import e2e  # noqa: E402
import uvloop  # noqa: E402
from redis_server import RedisServer, stop_by_pid  # noqa: E402

LOADGEN_SRC = HERE.parent.parent / "shared" / "tools" / "loadgen.c"
TUNNEL_ID = "bench"
PATHS = ("relay2", "relay3", "local", "cross")


class Bench:
    """Starts and owns every process; ``close()`` stops them all by PID."""

    def __init__(self, args, workdir: str):
        self.args, self.dir = args, workdir
        self.procs: list[subprocess.Popen] = []
        self.redis: RedisServer | None = None
        self.loadgen = None if args.python_load else build_loadgen(workdir)

    # -------------------------------------------------------------- processes

    def _popen(self, argv, name, env=None):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs.append(p)
        return p

    def _role(self, *args):
        """A bench/e2e.py role (backend or relay); returns once it printed "ready"."""
        p = e2e.spawn(*args)
        self.procs.append(p)
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"e2e.py role {args} did not start")
        return p

    def start(self):
        self.backend_port = e2e.free_port()
        if self.loadgen:
            self._popen([self.loadgen, "server", str(self.backend_port)], "backend")
        else:
            self._role("backend", self.backend_port)

        # the relay chains, each built from the backend outwards: 2 (or 3) relays in series
        self.relays = {}
        for name, hops in (("relay2", 2), ("relay3", 3)):
            target, pids = self.backend_port, []
            for _ in range(hops):
                port = e2e.free_port()
                pids.append(self._role("relay", port, target).pid)
                target = port
            self.relays[name] = (target, pids)

        self.redis = RedisServer().start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FERROTUNNEL")}
        env.update(FERROTUNNEL_TOKEN="bench-token-0123456", FERROTUNNEL_CLUSTER_TOKEN="bench-cluster-secret",
                   FERROTUNNEL_CLUSTER_REDIS=self.redis.url)
        cmd = [sys.executable, "-m", "ferrotunnel"]
        self.nodes = {}
        for node in ("a", "b"):
            tun, ingress, link = e2e.free_port(), e2e.free_port(), e2e.free_port()
            run = cmd
            if node in (self.args.profile or ""):  # cProfile, written when the node exits (SIGTERM)
                run = [sys.executable, "-m", "cProfile", "-o", os.path.join(self.dir, f"node-{node}.prof"),
                       "-m", "ferrotunnel"]
                print(f"profiling node {node} into {run[4]}", flush=True)
            p = self._popen(run + ["server", "--bind", f"127.0.0.1:{tun}",
                                   "--tcp-bind", f"127.0.0.1:{ingress}={TUNNEL_ID}",
                                   "--node-id", node, "--node-bind", f"127.0.0.1:{link}",
                                   "--log-level", "warning"], f"node-{node}", env)
            self.nodes[node] = {"tun": tun, "ingress": ingress, "proc": p}
        wait_listening(self.nodes["a"]["tun"], self.procs)
        self.client = self._popen(cmd + ["client", "--server", f"127.0.0.1:{self.nodes['a']['tun']}",
                                         "--tunnel-id", TUNNEL_ID, "--local-addr", f"127.0.0.1:{self.backend_port}",
                                         "--log-level", "warning"], "client", env)
        tunnel_pids = [self.nodes["a"]["proc"].pid, self.nodes["b"]["proc"].pid, self.client.pid]
        self.targets = {**self.relays,
                        "local": (self.nodes["a"]["ingress"], tunnel_pids),
                        "cross": (self.nodes["b"]["ingress"], tunnel_pids)}
        for name in PATHS:
            self.wait_route(name)

    def wait_route(self, name, timeout=30.0):
        """Retries a small echo through the path until it comes back (client connected, route known)."""
        port = self.targets[name][0]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{' '.join(map(str, p.args[:5]))} exited with {p.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"Eping")
                    got = b""
                    while len(got) < 4:
                        chunk = s.recv(4 - len(got))
                        if not chunk:
                            break
                        got += chunk
                    if got == b"ping":
                        return
                    last = f"got {got!r}"
            except OSError as e:
                last = repr(e)
            time.sleep(0.2)
        raise RuntimeError(f"route {name} (port {port}) not working after {timeout:.0f} s: {last}")

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is not None and p.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                print(f"warning: {' '.join(map(str, p.args[:4]))} had exited with {p.returncode}", file=sys.stderr)
            stop_by_pid(p)
            if p.stdout is not None:
                p.stdout.close()
        if self.redis is not None:
            self.redis.__exit__(None, None, None)  # stop by PID, remove its directory

    # -------------------------------------------------------------- measurements

    def bulk(self, name):
        """(MB/s, CPU s/GB of the path's relaying processes) for one stream of --mb MB."""
        port, pids = self.targets[name]
        nbytes = self.args.mb * 1_000_000
        c0 = e2e.cpu_seconds(pids)
        if self.loadgen:
            out = run_loadgen(self.loadgen, "bulk", port, 1, f"{nbytes / 1048576:.6f}", 300)
            if out.get("ok") != "1":
                raise RuntimeError(f"bulk through {name} failed: {out}")
            moved, mbps = float(out["bytes"]), float(out["MBps"])
        else:
            t0 = time.perf_counter()
            moved = uvloop.run(e2e.bulk(port, nbytes, 1))
            mbps = moved / (time.perf_counter() - t0) / 1e6
        return mbps, (e2e.cpu_seconds(pids) - c0) / (moved / 1e9)

    def rtt(self, name):
        """(p50 us, p99 us) of 64-byte ping-pong."""
        port = self.targets[name][0]
        if self.loadgen:
            out = run_loadgen(self.loadgen, "pingpong", port, 64, self.args.rtt, 300)
            return float(out["p50_us"]), float(out["p99_us"])
        s = sorted(uvloop.run(e2e.rtt(port, self.args.rtt)))
        return s[len(s) // 2] * 1e6, s[int(len(s) * 0.99)] * 1e6


def build_loadgen(workdir):
    if not LOADGEN_SRC.exists() or shutil.which("gcc") is None:
        print(f"note: {LOADGEN_SRC} or gcc missing; using the Python load generator", file=sys.stderr)
        return None
    exe = os.path.join(workdir, "loadgen")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, str(LOADGEN_SRC)], check=True)
    return exe


def run_loadgen(exe, mode, port, *args):
    """Runs one loadgen client command; returns its key=value figures."""
    out = subprocess.run([exe, mode, "127.0.0.1", str(port), *map(str, args)], capture_output=True, text=True,
                         timeout=float(args[-1]) + 30)
    return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)


def wait_listening(port, procs, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def measure(bench, rounds):
    """Interleaved rounds; returns {path: [per-round {figure: value}]}."""
    runs = {name: [] for name in PATHS}
    for r in range(rounds):
        for name in PATHS:
            mbps, cpu = bench.bulk(name)
            runs[name].append({"mbps": mbps, "cpu_s_per_gb": cpu})
        for name in PATHS:
            runs[name][-1]["rtt_p50_us"], runs[name][-1]["rtt_p99_us"] = bench.rtt(name)
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {runs[n][-1]['mbps']:.0f} MB/s {runs[n][-1]['rtt_p50_us']:.0f} us" for n in PATHS), flush=True)
    return runs


def summarize(runs):
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    ratio = {
        "local/relay2 bulk": med["local"]["mbps"] / med["relay2"]["mbps"],
        "cross/relay3 bulk": med["cross"]["mbps"] / med["relay3"]["mbps"],
        "cross/local bulk": med["cross"]["mbps"] / med["local"]["mbps"],
        "relay3/relay2 bulk": med["relay3"]["mbps"] / med["relay2"]["mbps"],
        "local/relay2 p50": med["local"]["rtt_p50_us"] / med["relay2"]["rtt_p50_us"],
        "cross/relay3 p50": med["cross"]["rtt_p50_us"] / med["relay3"]["rtt_p50_us"],
        "cross/local p50": med["cross"]["rtt_p50_us"] / med["local"]["rtt_p50_us"],
        "relay3/relay2 p50": med["relay3"]["rtt_p50_us"] / med["relay2"]["rtt_p50_us"],
        "cross/local p99": med["cross"]["rtt_p99_us"] / med["local"]["rtt_p99_us"],
        "relay3/relay2 p99": med["relay3"]["rtt_p99_us"] / med["relay2"]["rtt_p99_us"],
        "cross/local CPU": med["cross"]["cpu_s_per_gb"] / med["local"]["cpu_s_per_gb"],
        "relay3/relay2 CPU": med["relay3"]["cpu_s_per_gb"] / med["relay2"]["cpu_s_per_gb"],
    }
    # the same ratios round by round (each from one round's back-to-back runs)
    per_round = [{"cross/local": c["mbps"] / l["mbps"], "relay3/relay2": r3["mbps"] / r2["mbps"]}
                 for r2, r3, l, c in zip(runs["relay2"], runs["relay3"], runs["local"], runs["cross"])]
    need = 0.9 * ratio["relay3/relay2 bulk"]
    check = {"cross_over_local": ratio["cross/local bulk"], "bound": need,
             "pass": ratio["cross/local bulk"] >= need}
    return {"median": med, "ratios": ratio, "per_round": per_round, "check": check}


def report(summary):
    med = summary["median"]
    lines = [f"{'path':<8}{'bulk MB/s':>11}{'CPU s/GB':>10}{'p50 us':>9}{'p99 us':>9}"]
    for name in PATHS:
        f = med[name]
        lines.append(f"{name:<8}{f['mbps']:>11.0f}{f['cpu_s_per_gb']:>10.2f}"
                     f"{f['rtt_p50_us']:>9.1f}{f['rtt_p99_us']:>9.1f}")
    lines.append("ratios of medians: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios"].items()))
    lines.append("per round (bulk): " + "; ".join(
        f"cross/local {r['cross/local']:.2f} relay3/relay2 {r['relay3/relay2']:.2f}" for r in summary["per_round"]))
    c = summary["check"]
    lines.append(f"check: cross/local bulk {c['cross_over_local']:.3f} >= 0.9 x relay3/relay2 = {c['bound']:.3f}: "
                 f"{'PASS' if c['pass'] else 'FAIL'}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (figures are medians)")
    ap.add_argument("--mb", type=int, default=1024, help="payload per bulk run in MB (10^6 bytes)")
    ap.add_argument("--rtt", type=int, default=20000, help="64-byte round trips per RTT run")
    ap.add_argument("--quick", action="store_true", help="128 MB bulk runs and 5,000 round trips")
    ap.add_argument("--profile", default="", help="run these nodes (e.g. 'a', 'ab') under cProfile; the .prof "
                    "files stay in the work directory")
    ap.add_argument("--python-load", action="store_true", help="Python backend and load generator (bench/e2e.py)")
    ap.add_argument("--json", help="write the per-round figures, medians, ratios and check to this file")
    args = ap.parse_args()
    if args.quick:
        args.mb, args.rtt = min(args.mb, 128), min(args.rtt, 5000)
    # SIGTERM ends the run like Ctrl-C does, through the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import ferrotunnel.frames as F

    workdir = tempfile.mkdtemp(prefix="ft-cluster-route-")  # logs; kept if the run fails
    bench = Bench(args, workdir)
    try:
        bench.start()
        print(f"ferrotunnel implementation: {F.IMPLEMENTATION}; load: "
              f"{'C loadgen' if bench.loadgen else 'Python (e2e.py)'}; {args.mb} MB per bulk run, "
              f"{args.rtt} round trips per RTT run; {args.rounds} rounds; "
              f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
        runs = measure(bench, args.rounds)
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    except BaseException:
        print(f"logs of the nodes, client and backend kept in {workdir}", file=sys.stderr)
        raise
    finally:
        bench.close()
    if args.profile:
        print(f"profiles kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(runs)
    print(report(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"implementation": F.IMPLEMENTATION, "mb": args.mb, "rtt_count": args.rtt,
                       "runs": runs, **summary}, f, indent=2)
    return 0 if summary["check"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
