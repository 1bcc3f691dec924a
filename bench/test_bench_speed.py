"""Issue 14's speed table (bench/speed.py) under pytest-benchmark.

    python -m pytest bench/test_bench_speed.py --benchmark-only -s                  # the quick table
    python -m pytest bench/test_bench_speed.py --benchmark-json speed.json         # figures kept

``test_speed_table`` runs ``speed.py --quick`` once (every row, both paths, each process of its
own; about a minute) and stores every row's figures in ``extra_info``; the timed value is the
whole run. ``FT_SPEED_ARGS`` (e.g. ``"--rounds 3 --secs 3"``) replaces ``--quick`` for a full
run. The targets are reported, not asserted: a row below its target is a finding, not a broken
benchmark. ``test_verdicts`` checks the table's pass/fail logic on made-up figures, and
``test_procs_killed_when_a_run_fails`` that every process a run starts is killed when it fails.
"""

from __future__ import annotations

import os
import shlex

import speed


def _flat(rows):
    out = {}
    for r in rows:
        for k in ("ferrotunnel", "relay2", "ratio", "checked", "ok"):
            v = r[k]
            out[f"{r['row']} [{k}]"] = round(v, 4) if isinstance(v, float) else v
    return out


def test_speed_table(benchmark):
    args = speed.parse_args(shlex.split(os.environ.get("FT_SPEED_ARGS", "--quick")))
    out = benchmark.pedantic(speed.run, args=(args,), rounds=1, iterations=1)
    benchmark.extra_info.update(_flat(out["rows"]))
    print("\n" + speed.table(out["rows"]))
    for r in out["rows"]:
        if r["target"] != "-":  # every row with a target was measured on both paths (where relay2 has one)
            assert r["ferrotunnel"] is not None and r["ferrotunnel"] > 0, r
            assert r["checked"] is not None, r
        if r["relay2"] is not None:
            assert r["relay2"] > 0, r


def _runs(**overrides):
    """Made-up medians: every ratio exactly at its target's bound."""
    t, r2 = "tunnel", "relay2"
    runs = {
        "bulk_1_mbps": {r2: [1000.0], t: [1000.0], "tls": [650.0]},
        "bulk_16_mbps": {r2: [1000.0], t: [950.0]},
        "bulk_64_mbps": {r2: [1000.0], t: [950.0]},
        "cpu_s_per_gb": {r2: [1.0], t: [1.08], "tls": [1.35]},
        "rtt_p50_us": {r2: [100.0], t: [105.0]},
        "rtt_p99_us": {r2: [100.0], t: [115.0], "pure": [230.0]},
        "new_1_per_s": {r2: [1000.0], t: [1100.0], "pure": [500.0]},
        "new_8_per_s": {r2: [1000.0], t: [1300.0]},
        "rtt_user_us_per_rt": {r2: [10.0], t: [30.0]},
        "rtt_sys_us_per_rt": {r2: [40.0], t: [44.0]},
        "new_1_cpu_us_per_open": {r2: [400.0], t: [800.0]},
        "idle_kib_per_stream": {r2: [4.0], t: [3.0]},
        "idle_more_kib_per_stream": {r2: [6.0], t: [4.5]},
        "new_8_user_us_per_open": {r2: [50.0], t: [100.0]},
        "new_8_sys_us_per_open": {r2: [150.0], t: [90.0]},
        "flat_few_1_cpu_us_per_open": {r2: [50.0], t: [100.0]},
        "flat_many_1_cpu_us_per_open": {r2: [50.0], t: [120.0]},
        "flat_few_rtt_p50_us": {r2: [100.0], t: [100.0]},
        "flat_many_rtt_p50_us": {r2: [100.0], t: [120.0]},
        "flat_few_rtt_p99_us": {r2: [100.0], t: [100.0]},
        "flat_many_rtt_p99_us": {r2: [100.0], t: [500.0]},
        "handshake_first_ms": {t: [1.0]},
        "handshake_loaded_ms": {t: [1.2]},
    }
    for fig, paths in overrides.items():
        runs[fig] = dict(runs.get(fig, {}), **paths)
    return runs


def test_verdicts():
    rows = speed.rows(_runs())
    assert len(rows) == 23
    verdicts = {r["row"]: r["ok"] for r in rows}
    info = [r["row"] for r in rows if r["ok"] is None]
    assert info == ["RTT: CPU per round trip, user space", "RTT: CPU per round trip, kernel",
                    "new streams: CPU per open, 1 thread", "new streams, 8 threads: CPU per open, user",
                    "new streams, 8 threads: CPU per open, sys", "idle memory, 1,000 more streams",
                    "pure-Python twins: new streams/s, 1 thread", "8: RTT p99, 9,990 idle open"], info
    # the CPU split rows: both paths' figures and their ratio, no verdict
    by = {r["row"]: r for r in rows}
    assert (by["RTT: CPU per round trip, user space"]["ratio"], by["RTT: CPU per round trip, kernel"]["ratio"],
            by["new streams: CPU per open, 1 thread"]["ratio"]) == (3.0, 1.1, 2.0)
    assert by["RTT: CPU per round trip, kernel"]["relay2"] == 40.0
    assert (by["new streams, 8 threads: CPU per open, user"]["ratio"], by["new streams, 8 threads: CPU per open, sys"]
            ["ratio"], by["idle memory, 1,000 more streams"]["ratio"]) == (2.0, 0.6, 0.75)
    assert all(v for k, v in verdicts.items() if k not in info), verdicts  # at the bound: pass
    # just past each bound: that row, and only that row, fails
    past = {
        "bulk, 1 stream": {"bulk_1_mbps": {"tunnel": [999.0]}},
        "bulk, 16 streams": {"bulk_16_mbps": {"tunnel": [949.0]}},
        "bulk, 64 streams": {"bulk_64_mbps": {"tunnel": [949.0]}},
        "CPU s/GB, 1 stream": {"cpu_s_per_gb": {"tunnel": [1.081]}},
        "RTT p50, 64-byte ping-pong": {"rtt_p50_us": {"tunnel": [105.1]}},
        "new streams/s, 1 client thread": {"new_1_per_s": {"tunnel": [1099.0]}},
        "new streams/s, 8 client threads": {"new_8_per_s": {"tunnel": [1299.0]}},
        "idle memory per open stream, both ends": {"idle_kib_per_stream": {"tunnel": [3.01]}},
        "TLS 1.3: bulk, 1 stream": {"bulk_1_mbps": {"tls": [649.0]}},
        "TLS 1.3: CPU s/GB, 1 stream": {"cpu_s_per_gb": {"tls": [1.36]}},
        "pure-Python twins: RTT p99": {"rtt_p99_us": {"pure": [231.0]}},
        "8: CPU per stream open, 9,990 idle open": {"flat_many_1_cpu_us_per_open": {"tunnel": [121.0]}},
        "8: RTT p50, 9,990 idle open": {"flat_many_rtt_p50_us": {"tunnel": [121.0]}},
        "8: new session's handshake, 999 sessions up": {"handshake_loaded_ms": {"tunnel": [1.21]}},
    }
    for label, change in past.items():
        got = {r["row"]: r["ok"] for r in speed.rows(_runs(**change))}
        assert got[label] is False, (label, got[label])
        assert [k for k, v in got.items() if v is False] == [label], got
    # the pure twins' p99 is judged against the compiled p99, not relay2's
    got = {r["row"]: r for r in speed.rows(_runs(rtt_p99_us={"relay2": [1.0]}))}
    assert got["pure-Python twins: RTT p99"]["checked"] == 2.0
    # medians over rounds, and a figure not measured leaves its row without a verdict
    got = {r["row"]: r for r in speed.rows(_runs(bulk_1_mbps={"tunnel": [10.0, 1000.0, 2000.0]}))}
    assert got["bulk, 1 stream"]["ferrotunnel"] == 1000.0 and got["bulk, 1 stream"]["ok"] is True
    got = {r["row"]: r for r in speed.rows({k: v for k, v in _runs().items() if k != "new_8_per_s"})}
    assert got["new streams/s, 8 client threads"]["ok"] is None
    assert "new streams/s, 8 client threads" in speed.table(list(got.values()))


def test_parse_kv():
    assert speed.parse_kv("pingpong size=64 n=5000 p50_us=245.2 p99_us=359.6") == {
        "size": 64.0, "n": 5000.0, "p50_us": 245.2, "p99_us": 359.6}



def test_procs_killed_when_a_run_fails(tmp_path):
    """Every process started is killed by PID when the run fails, even when the clean-up itself
    is interrupted (SIGTERM raises SystemExit) while waiting for one of them."""
    import sys

    import pytest

    import speed_procs as sp

    with pytest.raises(SystemExit):
        with sp.Procs(str(tmp_path)) as procs:
            started = [procs.popen(f"sleeper{i}", [sys.executable, "-c", "import time; time.sleep(60)"])
                       for i in range(3)]
            started[0].wait = _interrupted_once(started[0].wait)
            raise sp.BenchError("a step failed")
    for p in started:
        p.wait(timeout=10)  # a live one would time out here
        assert p.returncode == -9, (p.pid, p.returncode)


def _interrupted_once(wait):
    calls = []

    def w(*a, **kw):
        if not calls:
            calls.append(1)
            raise SystemExit(143)
        return wait(*a, **kw)

    return w
