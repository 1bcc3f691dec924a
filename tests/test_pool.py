"""Buffer pool: PROTOCOL.md section 6 semantics, limits, per-thread pools (both implementations)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading

import pytest

IMPLS = ["ferrotunnel._pool_py", "ferrotunnel._pool"]


@pytest.fixture(params=IMPLS)
def pool(request):
    try:
        return importlib.import_module(request.param)
    except ImportError:
        pytest.skip("compiled pool not built")


def _drain(pool):
    while pool.pool_stats()[0]:
        pool.acquire_bytes()


def test_parse_env(pool):
    p = pool.parse_pool_env
    assert p(None, 7) == 7 and p("", 7) == 7
    assert p("12", 7) == 12 and p("+12", 7) == 12
    for bad in ("0", "+0", " 12", "12 ", "1_000", "0x10", "-5", "abc", "+", "1e3", str(2**64)):
        assert p(bad, 7) == 7, bad
    assert p(str(2**64 - 1), 7) == 2**64 - 1


def test_acquire_release_lifo_and_floor(pool):
    _drain(pool)
    a = pool.acquire_bytes(10)
    assert len(a) >= 4096  # default floor
    b = pool.acquire_bytes(10000)
    assert len(b) >= 10000
    assert pool.release_bytes(a) and pool.release_bytes(b)
    assert pool.pool_stats() == (2, len(a) + len(b))
    assert pool.acquire_bytes() is b  # LIFO
    c = pool.acquire_bytes(8192)  # smaller popped buffer grows to the request
    assert c is a and len(c) >= 8192
    assert pool.pool_stats() == (0, 0)


def test_limits(pool):
    _drain(pool)
    assert not pool.release_bytes(bytearray(65537))  # over the capacity limit
    assert not pool.release_bytes(b"not a bytearray")
    kept = [pool.release_bytes(bytearray(100)) for _ in range(40)]
    assert kept.count(True) == 32 and pool.pool_stats()[0] == 32
    _drain(pool)


def test_viewed_buffer_is_not_retained(pool):
    _drain(pool)
    buf = pool.acquire_bytes()
    view = memoryview(buf)[:10]
    assert not pool.release_bytes(buf)
    view.release()
    assert pool.release_bytes(buf)
    _drain(pool)


def test_per_thread(pool):
    _drain(pool)
    pool.release_bytes(bytearray(100))
    seen = []

    def other():
        seen.append(pool.pool_stats())
        pool.release_bytes(bytearray(200))
        seen.append(pool.pool_stats())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [(0, 0), (1, 200)]
    assert pool.pool_stats() == (1, 100)
    _drain(pool)


SCRIPT = """
import json, os, sys
mod = __import__(sys.argv[1], fromlist=["x"])
first = mod.pool_config()
os.environ["FERROTUNNEL_POOL_MAX_SIZE"] = "99"  # read once: later changes are ignored
kept = sum(mod.release_bytes(bytearray(3000)) for _ in range(10))
big = mod.release_bytes(bytearray(5000))
print(json.dumps([first, mod.pool_config(), kept, big, len(mod.acquire_bytes(1))]))
"""


@pytest.mark.parametrize("impl", IMPLS)
def test_env_variables_read_once(impl):
    env = dict(os.environ, FERROTUNNEL_POOL_MAX_SIZE="3", FERROTUNNEL_POOL_MAX_CAPACITY_BYTES="4096",
               FERROTUNNEL_POOL_DEFAULT_CAPACITY_BYTES="+1024")
    out = subprocess.run([sys.executable, "-c", SCRIPT, impl], env=env, capture_output=True, text=True)
    if "ModuleNotFoundError" in out.stderr:
        pytest.skip("compiled pool not built")
    first, later, kept, big, acquired = json.loads(out.stdout)
    assert first == [3, 4096, 1024] and later == first
    assert kept == 3 and big is False
    assert acquired == 3000  # reused buffer, already above the 1024 floor


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_and_garbage_fall_back_to_defaults(impl):
    env = dict(os.environ, FERROTUNNEL_POOL_MAX_SIZE="0", FERROTUNNEL_POOL_MAX_CAPACITY_BYTES="lots",
               FERROTUNNEL_POOL_DEFAULT_CAPACITY_BYTES="-1")
    out = subprocess.run([sys.executable, "-c", f"import {impl} as m; print(list(m.pool_config()))"],
                         env=env, capture_output=True, text=True)
    if "ModuleNotFoundError" in out.stderr:
        pytest.skip("compiled pool not built")
    assert json.loads(out.stdout) == [32, 65536, 4096]
