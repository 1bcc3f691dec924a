"""Same-run A/B benchmark of two commits: does a change cost end-to-end performance?

    python bench/ab.py --base REF_A --head REF_B [--pairs 5] [--mb 256] [--tls] [--json FILE]

Each side gets its own checkout in a temp dir (``git archive REF``, or for ``--head WORKTREE`` a
copy of the current working tree of this repository: tracked and untracked-not-ignored files,
without .git, .venv or build artefacts), its Cython extensions built in place with this
interpreter (``setup.py build_ext --inplace --force``), and is measured with its *own*
``bench/e2e.py``: a small driver, started with ``PYTHONPATH=<checkout>/src`` and cwd in the
checkout, imports that checkout's ``e2e`` module and runs its building blocks (``Paths``,
``bulk``, ``rtt``, ``new_streams``, ``cpu_seconds``) on the ``relay2`` baseline and the tunnel
only; the role processes ``e2e.spawn`` starts inherit that environment. Every run checks that
``ferrotunnel`` in the driver and the compiled modules mapped into the tunnel server and client
processes (``/proc/PID/maps``) come from that run's checkout, and fails otherwise.

Runs interleave: pair i runs A then B (B then A on odd i), each run a fresh driver and fresh
processes; one discarded warm-up run comes first (``--warmup``). Per row the table shows the
median over pairs of A and of B, B/A of those medians, the median (and range) of the per-pair
ratios B/A, and relay2's figures from the same runs (relay2's own B/A is the noise floor: it is
the same kind of code on both sides). The verdict uses the median per-pair ratio: "ok" unless B is
worse than A by more than 5 % (RTT p99: 15 %), where worse means lower throughput or new
streams/s, higher CPU or RTT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (key, label, higher_is_better, tolerance)
ROWS = [
    ("mbps_1", "1-stream MB/s", True, 0.05),
    ("mbps_16", "16-stream MB/s", True, 0.05),
    ("cpu_s_per_gb_1", "CPU s/GB, 1 stream (both ends)", False, 0.05),
    ("cpu_s_per_gb_16", "CPU s/GB, 16 streams (both ends)", False, 0.05),
    ("rtt_p50_us", "RTT p50 us", False, 0.05),
    ("rtt_p99_us", "RTT p99 us", False, 0.15),
    ("new_streams_per_s", "new streams/s", True, 0.05),
]

# Artefacts never copied from the working tree (on top of what .gitignore already excludes).
EXCLUDE_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".mypy_cache",
                ".hypothesis", ".benchmarks"}
EXCLUDE_SUFFIXES = (".so", ".pyd", ".o", ".pyc")

# ---------------------------------------------------------------- driver (runs inside a checkout)

DRIVER = r'''
import json, os, statistics, sys, tempfile, time

checkout, out_path = os.path.realpath(sys.argv[1]), sys.argv[2]
cfg = json.loads(sys.argv[3])
sys.path.insert(0, os.path.join(checkout, "bench"))
import e2e  # this checkout's bench/e2e.py
import uvloop
import ferrotunnel
import ferrotunnel.frames as F


def inside(path):
    return os.path.realpath(path).startswith(checkout + os.sep)


def proc_proof(pid):
    """Which ferrotunnel files a process has mapped, and its PYTHONPATH."""
    with open(f"/proc/{pid}/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "ferrotunnel" in line and ".so" in line})
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return {"pid": pid, "mapped_ferrotunnel_so": libs, "PYTHONPATH": env.get(b"PYTHONPATH", b"").decode()}


info = {"checkout": checkout, "ferrotunnel_file": ferrotunnel.__file__, "e2e_file": e2e.__file__,
        "implementation": F.IMPLEMENTATION, "python": sys.executable, "pid": os.getpid()}
problems = [f"{k} {info[k]} is outside {checkout}" for k in ("ferrotunnel_file", "e2e_file") if not inside(info[k])]
if problems:
    sys.exit("isolation: " + "; ".join(problems))


def measure(tls_dir):
    paths = e2e.Paths(tls_dir)
    res = {"relay2": {}, "tunnel": {}}
    raw = {"relay2": {}, "tunnel": {}}
    try:
        # the tunnel ends are the processes that import ferrotunnel: prove which copy they run
        proof = {role: proc_proof(p.pid) for role, p in (("server", paths.server), ("client", paths.client))}
        for role, pr in proof.items():
            bad = [lib for lib in pr["mapped_ferrotunnel_so"] if not inside(lib)]
            if bad:
                sys.exit(f"isolation: tunnel {role} maps {bad}, not from {checkout}")
            if F.IMPLEMENTATION == "c" and not pr["mapped_ferrotunnel_so"]:
                sys.exit(f"isolation: tunnel {role} maps no compiled ferrotunnel module")
            if pr["PYTHONPATH"] != os.environ.get("PYTHONPATH", ""):
                sys.exit(f"isolation: tunnel {role} did not inherit PYTHONPATH ({pr['PYTHONPATH']!r})")
        all_t = paths.targets()
        targets = {name: all_t[name] for name in ("relay2", "tunnel")}
        nbytes = cfg["mb"] * 1_000_000
        # same structure as e2e.measure_all, restricted to the two paths
        for streams in (1, 16):
            runs = {name: [] for name in targets}
            for _ in range(cfg["rounds"]):
                for name, (port, pids) in targets.items():
                    c0 = e2e.cpu_seconds(pids)
                    t0 = time.perf_counter()
                    moved = uvloop.run(e2e.bulk(port, nbytes, streams))
                    dt = time.perf_counter() - t0
                    runs[name].append((moved / dt / 1e6, (e2e.cpu_seconds(pids) - c0) / (moved / 1e9)))
            for name in targets:
                res[name][f"mbps_{streams}"] = statistics.median(r[0] for r in runs[name])
                res[name][f"cpu_s_per_gb_{streams}"] = statistics.median(r[1] for r in runs[name])
                raw[name][f"bulk_{streams}"] = runs[name]
        samples = {name: [] for name in targets}
        for _ in range(4):  # interleaved segments of 64-byte ping-pong, as in e2e.measure_all
            for name, (port, pids) in targets.items():
                samples[name] += uvloop.run(e2e.rtt(port, 300 if cfg["quick"] else 1500))
        for name, (port, pids) in targets.items():
            s_ = sorted(samples[name])
            res[name]["rtt_p50_us"] = s_[len(s_) // 2] * 1e6
            res[name]["rtt_p99_us"] = s_[int(len(s_) * 0.99)] * 1e6
            res[name]["new_streams_per_s"] = uvloop.run(e2e.new_streams(port, 300 if cfg["quick"] else 2000))
            raw[name]["rtt_samples"] = len(s_)
    finally:
        paths.close()
    for p in paths.procs + [paths.server, paths.client]:
        if p is not None:
            p.wait()
            if p.returncode not in (-9, 0):
                sys.exit(f"a benchmark process {p.args[2:5]} ended with {p.returncode}")
    return {"figures": res, "raw": raw, "proof": proof}


out = {"info": info, "variants": {}}
out["variants"]["plaintext"] = measure("")
if cfg["tls"]:
    with tempfile.TemporaryDirectory() as d:
        ferrotunnel.tls.generate_certs(d)
        out["variants"]["tls"] = measure(d)
with open(out_path, "w") as f:
    json.dump(out, f)
'''

# ---------------------------------------------------------------- checkouts


def git(*args, **kw):
    return subprocess.run(["git", "-C", REPO, *args], check=True, capture_output=True, **kw).stdout


def resolve(ref):
    if ref == "WORKTREE":
        return "WORKTREE"
    return git("rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}", text=True).strip()


def tree_digest(root):
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDE_DIRS)
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if name.endswith(EXCLUDE_SUFFIXES) or os.path.islink(p):
                continue
            h.update(os.path.relpath(p, root).encode() + b"\0")
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def export(sha, dest):
    os.makedirs(dest)
    if sha == "WORKTREE":
        # tracked files as they are on disk now, plus untracked files .gitignore does not exclude
        names = git("ls-files", "-z", "-c", "-o", "--exclude-standard").split(b"\0")
        n = 0
        for raw in names:
            if not raw:
                continue
            rel = os.fsdecode(raw)
            parts = rel.split("/")
            if any(p in EXCLUDE_DIRS for p in parts[:-1]) or rel.endswith(EXCLUDE_SUFFIXES):
                continue
            src = os.path.join(REPO, rel)
            if not os.path.lexists(src):  # tracked but deleted in the working tree
                continue
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel), follow_symlinks=False)
            n += 1
        status = git("status", "--porcelain", "--untracked-files=normal", text=True)
        return {"files": n, "status": status.splitlines(), "base_commit": resolve("HEAD")}
    archive = subprocess.Popen(["git", "-C", REPO, "archive", "--format=tar", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
    archive.stdout.close()
    if archive.wait() != 0:
        raise SystemExit(f"git archive {sha} failed")
    return {}


def build(dest, log):
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace", "--force", "-j", str(os.cpu_count() or 1)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=dest, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"build in {dest} failed (log {log}):\n{tail}")
    pkg = os.path.join(dest, "src", "ferrotunnel")
    pyx = sorted(n[:-4] for n in os.listdir(pkg) if n.endswith(".pyx"))
    built = sorted(n for n in os.listdir(pkg) if n.endswith(".so"))
    missing = [m for m in pyx if not any(b.startswith(m + ".") for b in built)]
    if missing:
        raise SystemExit(f"build in {dest}: no compiled module for {missing}")
    return built


# ---------------------------------------------------------------- runs


def run_env(dest):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(dest, "src")  # replaces, never extends: nothing else may shadow it
    env.pop("PYTHONHOME", None)
    env.pop("PYTHONSAFEPATH", None)
    if not env.get("FERROTUNNEL_NO_EXTENSIONS"):
        env["FERROTUNNEL_REQUIRE_EXTENSIONS"] = "1"  # a missing .so is an error, not a silent twin
    return env


def one_run(side, args, driver, workdir, tag, timeout):
    out_path = os.path.join(workdir, f"run-{tag}.json")
    cfg = {"mb": args.mb, "rounds": args.rounds, "quick": args.quick, "tls": args.tls}
    cmd = [sys.executable, driver, side["dir"], out_path, json.dumps(cfg)]
    for attempt in (1, 2):
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, cwd=side["dir"], env=run_env(side["dir"]), start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            try:  # the driver's children (backend, relays, tunnel ends) share its process group
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        if rc == 0 and os.path.exists(out_path):
            with open(out_path) as f:
                res = json.load(f)
            res["seconds"] = time.monotonic() - t0
            return res
        why = "timed out" if rc is None else f"exit {rc}"
        print(f"  run {tag} ({side['name']}) failed ({why}), attempt {attempt}", file=sys.stderr)
    raise SystemExit(f"run {tag} failed twice; stopping")


def show_proof(side, res):
    info = res["info"]
    print(f"[{side['name']}] {side['label']}: ferrotunnel.__file__ = {info['ferrotunnel_file']} "
          f"(implementation {info['implementation']}); e2e = {info['e2e_file']}", file=sys.stderr)
    for variant, v in res["variants"].items():
        for role, pr in v["proof"].items():
            libs = ", ".join(pr["mapped_ferrotunnel_so"]) or "none"
            print(f"    {variant} tunnel {role} pid {pr['pid']}: PYTHONPATH={pr['PYTHONPATH']}; mapped: {libs}",
                  file=sys.stderr)


# ---------------------------------------------------------------- report


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs, variants):
    """runs: list of {"pair", "side", "result"} (warm-up excluded)."""
    pairs = sorted({r["pair"] for r in runs})
    by = {(r["pair"], r["side"]): r["result"]["variants"] for r in runs}
    out = {}
    for variant in variants:
        rows = {}
        for key, label, higher, tol in ROWS:
            def vals(side, path):
                return [by[(i, side)][variant]["figures"][path][key] for i in pairs]

            a, b = vals("A", "tunnel"), vals("B", "tunnel")
            ra, rb = vals("A", "relay2"), vals("B", "relay2")
            per_pair = [y / x for x, y in zip(a, b)]
            paired = med(per_pair)
            worse = (1 - paired) if higher else (paired - 1)
            # the same ratio with each run's tunnel figure divided by its own relay2 figure first
            # (cancels machine drift between runs when the load generator is the same on both sides)
            norm = [(y / ry) / (x / rx) for x, y, rx, ry in zip(a, b, ra, rb)]
            r2_paired = med([y / x for x, y in zip(ra, rb)])
            r2_worse = (1 - r2_paired) if higher else (r2_paired - 1)
            verdict = "ok" if worse <= tol else "WORSE"
            note = ""
            if verdict == "WORSE":
                note = f"(>{tol:.0%} {'lower' if higher else 'higher'})"
                if r2_worse > tol:
                    note += "; relay2 moved the same way: machine noise? rerun with more --pairs"
            rows[key] = {
                "label": label, "higher_is_better": higher, "tolerance": tol,
                "A": a, "B": b, "A_median": med(a), "B_median": med(b),
                "ratio_of_medians": med(b) / med(a), "per_pair_ratios": per_pair, "ratio_paired_median": paired,
                "relay2_A": ra, "relay2_B": rb, "relay2_A_median": med(ra), "relay2_B_median": med(rb),
                "relay2_ratio_paired_median": r2_paired,
                "relay2_normalised_ratios": norm, "relay2_normalised_ratio_median": med(norm),
                "verdict": verdict, "note": note,
            }
        out[variant] = rows
    return out


def fmt(v):
    if v != v:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def print_table(summary, sides, args):
    print(f"A = {sides['A']['label']}   B = {sides['B']['label']}")
    print(f"{args.pairs} pairs, {args.mb} MB per bulk run, {args.rounds} bulk rounds per run"
          f"{', quick RTT/new-stream samples' if args.quick else ''}; medians over pairs; "
          f"verdict on the median per-pair ratio B/A")
    for variant, rows in summary.items():
        print(f"\n== {variant} (tunnel; relay2 from the same runs for context)")
        head = (f"{'row':<33}{'A':>8}{'B':>8}{'B/A':>7}{'paired B/A':>12}{'[range]':>14}"
                f"{'relay2 A':>10}{'relay2 B':>10}{'r2 B/A':>8}  verdict")
        print(head)
        print("-" * len(head))
        for key, row in rows.items():
            rng = f"[{min(row['per_pair_ratios']):.2f}-{max(row['per_pair_ratios']):.2f}]"
            print(f"{row['label']:<33}{fmt(row['A_median']):>8}{fmt(row['B_median']):>8}"
                  f"{row['ratio_of_medians']:>7.3f}{row['ratio_paired_median']:>12.3f}{rng:>14}"
                  f"{fmt(row['relay2_A_median']):>10}{fmt(row['relay2_B_median']):>10}"
                  f"{row['relay2_ratio_paired_median']:>8.3f}  {row['verdict']} {row['note']}".rstrip())


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="ref for side A (commit, branch, tag)")
    ap.add_argument("--head", required=True, help="ref for side B, or WORKTREE for the uncommitted working tree")
    ap.add_argument("--pairs", type=int, default=5, help="A/B pairs (each pair is one run of each side)")
    ap.add_argument("--mb", type=int, default=256, help="payload per bulk measurement in MB")
    ap.add_argument("--rounds", type=int, default=3, help="bulk measurements per figure within a run (median)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded runs before the first pair")
    ap.add_argument("--quick", action="store_true", help="fewer RTT and new-stream samples per run")
    ap.add_argument("--tls", action="store_true", help="also measure with TLS between the tunnel ends")
    ap.add_argument("--json", help="write everything (including per-run raw figures) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp checkouts")
    ap.add_argument("--timeout", type=float, default=900, help="seconds before one run is abandoned")
    args = ap.parse_args()
    if args.pairs < 1:
        ap.error("--pairs must be at least 1")

    t_start = time.monotonic()
    sides = {}
    for name, ref in (("A", args.base), ("B", args.head)):
        sha = resolve(ref)
        sides[name] = {"name": name, "ref": ref, "commit": sha,
                       "label": "working tree" if sha == "WORKTREE" else f"{ref} ({sha[:10]})"}
    workdir = tempfile.mkdtemp(prefix="ferrotunnel-ab-", dir="/tmp")
    driver = os.path.join(workdir, "ab_driver.py")
    with open(driver, "w") as f:
        f.write(DRIVER)
    print(f"work dir {workdir}", file=sys.stderr)
    try:
        for name, side in sides.items():
            side["dir"] = os.path.join(workdir, name)
            t0 = time.monotonic()
            side.update(export(side["commit"], side["dir"]))
            side["tree_digest"] = tree_digest(side["dir"])
            side["built"] = build(side["dir"], os.path.join(workdir, f"build-{name}.log"))
            side["build_seconds"] = time.monotonic() - t0
            print(f"[{name}] {side['label']}: exported to {side['dir']}, built {', '.join(side['built'])} "
                  f"in {side['build_seconds']:.0f} s (tree digest {side['tree_digest']})", file=sys.stderr)
            if side["commit"] == "WORKTREE" and side["status"]:
                print(f"    working-tree changes copied: {'; '.join(side['status'][:20])}", file=sys.stderr)
        e2e_hash = {n: hashlib.sha256(open(os.path.join(s["dir"], "bench", "e2e.py"), "rb").read()).hexdigest()
                    for n, s in sides.items()}
        if e2e_hash["A"] != e2e_hash["B"]:
            print("warning: bench/e2e.py differs between A and B: each side is measured by its own load "
                  "generator, so compare relay2's B/A too", file=sys.stderr)

        schedule = [(f"w{i}", None, "A" if i % 2 == 0 else "B") for i in range(args.warmup)]
        for i in range(args.pairs):
            schedule += [(f"p{i}{s}", i, s) for s in (("A", "B") if i % 2 == 0 else ("B", "A"))]
        runs, warmups, shown = [], [], set()
        for k, (tag, pair, s) in enumerate(schedule, 1):
            side = sides[s]
            print(f"[run {k}/{len(schedule)}] {'warm-up' if pair is None else f'pair {pair}'} side {s} "
                  f"({side['label']}) ...", file=sys.stderr, flush=True)
            res = one_run(side, args, driver, workdir, tag, args.timeout)
            if s not in shown:
                show_proof(side, res)
                shown.add(s)
            side.setdefault("impl", res["info"]["implementation"])
            if len({sd.get("impl") for sd in sides.values()} - {None}) > 1:
                raise SystemExit("the two sides run different implementations (compiled vs pure-Python twin)")
            f = res["variants"]["plaintext"]["figures"]
            t, r2 = f["tunnel"], f["relay2"]
            print(f"    {res['seconds']:.1f} s: tunnel {t['mbps_1']:.0f}/{t['mbps_16']:.0f} MB/s, "
                  f"{t['cpu_s_per_gb_1']:.2f} s/GB, RTT {t['rtt_p50_us']:.0f}/{t['rtt_p99_us']:.0f} us, "
                  f"{t['new_streams_per_s']:.0f} new/s | relay2 {r2['mbps_1']:.0f}/{r2['mbps_16']:.0f} MB/s, "
                  f"RTT {r2['rtt_p50_us']:.0f}/{r2['rtt_p99_us']:.0f} us", file=sys.stderr, flush=True)
            (warmups if pair is None else runs).append({"tag": tag, "pair": pair, "side": s, "result": res})

        variants = ["plaintext"] + (["tls"] if args.tls else [])
        summary = summarize(runs, variants)
        total = time.monotonic() - t_start
        print_table(summary, sides, args)
        print(f"\ntotal {total / 60:.1f} min ({len(schedule)} runs, builds "
              f"{sum(s['build_seconds'] for s in sides.values()):.0f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "sides": {n: {k: v for k, v in s.items()} for n, s in sides.items()},
                           "e2e_sha256": e2e_hash, "summary": summary, "runs": runs, "warmup_runs": warmups,
                           "total_seconds": total}, f, indent=2)
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
