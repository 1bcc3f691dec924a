"""End-to-end figures under pytest-benchmark (JSON with --benchmark-json); see bench/e2e.py.

    python -m pytest bench/test_bench_e2e.py --benchmark-json e2e.json

Each test runs the whole comparison once (direct, 1:1 relay, two relays in series and the tunnel,
each in its own processes) and stores every figure and the same-run ratios in ``extra_info``; the
timed value is the whole run.
"""

from __future__ import annotations

import argparse
import tempfile

import pytest

import e2e


def _flat(res):
    out = {}
    for path, figures in res.items():
        for k, v in figures.items():
            out[f"{path}.{k}"] = round(v, 3) if isinstance(v, float) else v
    return out


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_end_to_end(benchmark, tls):
    args = argparse.Namespace(mb=256, rounds=1, quick=True)
    if tls:
        import ferrotunnel as ft

        d = tempfile.mkdtemp()
        ft.tls.generate_certs(d)
        run = lambda: e2e.measure_all(args, d)  # noqa: E731
    else:
        run = lambda: e2e.measure_all(args)  # noqa: E731
    res = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(_flat(res))
    benchmark.extra_info.update(e2e.ratios(res))
    print("\n" + e2e.table(res, "TLS" if tls else "plaintext"))
    assert res["tunnel"]["mbps_1"] > 0
